"""Test configuration: float64 by default, fixed seeds, strict promotion."""

import gc

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Clears JAX's compilation caches after each test module.

  Every new ``bilevel.Problem`` is a new static argument, so its compiled
  programs stay cached for the life of the process. A test worker that runs
  a thousand tests otherwise accumulates tens of thousands of memory
  mappings of compiled code and can hit the kernel's ``vm.max_map_count``
  (65530), which XLA's compiler answers with a segmentation fault
  (measured: about 12 mappings per solver ``init`` on a new problem, freed
  by ``jax.clear_caches``).
  """
  yield
  jax.clear_caches()
  gc.collect()
