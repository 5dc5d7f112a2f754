"""`python -m paper_repro.penalty.run --quick` runs and writes its table."""

import json
import math
import re
import subprocess
import sys

SOLVERS = ("penalty", "penalty_momentum", "f2sa", "bome", "aid", "soba",
           "stocbio")


def test_quick_reproduction_writes_table_and_figure(tmp_path):
  out = tmp_path / "penalty"
  completed = subprocess.run(
      [sys.executable, "-m", "paper_repro.penalty.run", "--quick", "--out",
       str(out)], capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]

  report = (out / "results.md").read_text()
  names = re.findall(r"^\| (\w+) \| \S+ ± \S+ \|", report, flags=re.M)
  assert names == list(SOLVERS) * 2
  summary = json.loads((out / "results.json").read_text())
  assert sorted(summary["settings"]) == ["hyper_cleaning", "nonunique"]
  for block in summary["settings"].values():
    for runs in block["runs"].values():
      for run in runs:
        assert len(run["calls"]) == len(run["seconds"]) == len(run["values"])
        assert all(b >= a for a, b in zip(run["calls"], run["calls"][1:]))
        assert run["calls"][-1] <= block["budget"] + 1e-9
  accuracy = summary["settings"]["hyper_cleaning"]["runs"]
  assert all(0.0 <= a <= 1.0 for runs in accuracy.values() for run in runs
             for a in run["values"])
  # Even the quick run shows the point of the second setting: the penalty
  # method gets closer to the optimistic solution than SOBA, which keeps y
  # on another lower solution.
  nonunique = summary["settings"]["nonunique"]["rows"]
  assert nonunique["penalty"]["budget_mean"] < 0.5 * nonunique["soba"][
      "budget_mean"]
  assert math.isfinite(nonunique["penalty"]["budget_mean"])
  assert (out / "summary.png").stat().st_size > 0
