"""`python -m paper_repro.lvhba.run --quick` runs and writes its table."""

import json
import subprocess
import sys


def test_quick_reproduction_writes_table_and_figure(tmp_path):
  out = tmp_path / "lvhba"
  completed = subprocess.run(
      [sys.executable, "-m", "paper_repro.lvhba.run", "--quick", "--out",
       str(out)], capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  report = (out / "results.md").read_text()
  for heading in ("LLC toy", "LLSC toy", "svm_breast_cancer",
                  "cleaning_fourclass"):
    assert heading in report
  results = json.loads((out / "results.json").read_text())["settings"]
  llc = results["llc"]
  # The quick run (5000 steps) is still in LV-HBA's transient on the LLC toy
  # (error 1.5): it checks curve shapes and feasibility; tests/test_lvhba.py
  # checks convergence to x*.
  for run in llc.values():
    assert len(run["steps"]) == len(run["seconds"]) == len(run["error"])
  assert llc["LV-HBA"]["violation"][-1] < 1e-10
  for setting in ("svm_breast_cancer", "svm_fourclass", "cleaning_breast_cancer",
                  "cleaning_fourclass"):
    runs = results[setting]
    assert set(runs) == {"LV-HBA", "LV-HBA, QP projection", "penalty (rho=10)",
                         "x frozen"}
    assert runs["LV-HBA"][0]["train_violation"][-1] < 1e-10
  assert (out / "summary.png").stat().st_size > 10_000
