"""The README's example and the docstrings' examples run as written."""

import doctest
import pathlib
import re

import jax
import pytest

import bilevel
from bilevel import _run, hypergradient

ROOT = pathlib.Path(__file__).parent.parent


def test_readme_example_runs():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "the README has no python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  residual = bilevel.implicit_hypergradient(
      namespace["problem"], namespace["result"].x, namespace["result"].y)
  assert float(jax.numpy.max(jax.numpy.abs(residual))) < 1e-5


@pytest.mark.parametrize("module", [hypergradient, _run],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
  failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert tried > 0 and failures == 0
