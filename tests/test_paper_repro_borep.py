"""`python -m paper_repro.borep.run --quick` runs and writes its table."""

import json
import re
import subprocess
import sys

SETTINGS = ("hyper_cleaning", "hyperparameter", "hyper_representation")
LABELS = ("BO-REP", "MA-SOBA", "StocBiO", "TTSA", "SOBA", "AID")


def test_quick_reproduction_writes_table_and_figures(tmp_path):
  out = tmp_path / "borep"
  completed = subprocess.run(
      [sys.executable, "-m", "paper_repro.borep.run", "--quick", "--out",
       str(out)], capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]

  report = (out / "results.md").read_text()
  rows = re.findall(r"^\| (\S+) \| ([0-9.]+) ± ([0-9.]+) \| ([0-9.]+) ± "
                    r"([0-9.]+) \|", report, flags=re.M)
  assert len(rows) == len(SETTINGS) * len(LABELS)
  for index, setting_rows in enumerate(
      rows[i:i + len(LABELS)] for i in range(0, len(rows), len(LABELS))):
    assert [row[0] for row in setting_rows] == list(LABELS), index
    for row in setting_rows:
      for accuracy in (float(row[1]), float(row[3])):
        assert 0.0 <= accuracy <= 1.0

  summary = json.loads((out / "results.json").read_text())
  assert sorted(summary["settings"]) == sorted(SETTINGS)
  for name, block in summary["settings"].items():
    for solver, runs in block["runs"].items():
      for run in runs:
        assert len(run["calls"]) == len(run["seconds"]) == len(
            run["accuracy"])
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"])
        assert all(b >= a for a, b in zip(run["calls"], run["calls"][1:]))
    for figure in block["figures"]:
      assert (out / figure).stat().st_size > 0
    assert (out / f"{name}_vs_calls.png").exists()
    assert (out / f"{name}_vs_seconds.png").exists()
  assert (out / "summary.png").stat().st_size > 0
