"""`python -m paper_repro.stn.run --quick` runs and writes its table."""

import json
import subprocess
import sys


def test_quick_reproduction_writes_table_and_figure(tmp_path):
  out = tmp_path / "stn"
  completed = subprocess.run(
      [sys.executable, "-m", "paper_repro.stn.run", "--quick", "--out",
       str(out), "--settings", "digits-mlp,mnist1d-cnn,overhead"],
      capture_output=True, text=True, timeout=900, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  report = (out / "results.md").read_text()
  for heading in ("digits-mlp: 60 STN cycles", "mnist1d-cnn: 30 STN cycles",
                  "overhead"):
    assert heading in report
  results = json.loads((out / "results.json").read_text())["settings"]
  run = results["digits-mlp"]["runs"][0]
  assert set(run["methods"]) == {
      "STN", "grid search, equal steps", "random search, equal steps",
      "best fixed dropout (6x steps)", "no regularization",
      "plain network at STN's final values",
      "STN hypernetwork at STN's final values",
      "STN hypernetwork, start values never tuned"}
  for metrics in run["methods"].values():
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["test_loss"] > 0.0
  # Grid and random search get 3 * 60 / 12 = 15 steps per network: at
  # chance. Measured: STN 0.91 test accuracy after 120 training steps.
  assert run["methods"]["STN"]["test_accuracy"] > 0.6
  assert len(run["schedule"]["dropout0"]) == 60
  assert set(results["overhead"]) == {"digits-mlp"}  # both in the full run
  assert results["overhead"]["digits-mlp"]["ratio"] > 0
  # The schedule moves: the per-layer dropout and L2 leave their start.
  schedule = run["schedule"]
  assert schedule["dropout0"][-1] != schedule["dropout0"][0]
  assert schedule["l2"][-1] != schedule["l2"][0]
  # Both controls at the end point train at STN's final values, and the
  # hypernetwork's control keeps STN's final perturbation scales.
  methods = run["methods"]
  for name in ("plain network at STN's final values",
               "STN hypernetwork at STN's final values"):
    assert methods[name]["config"] == methods["STN"]["config"]
  assert len(run["final_scale"]) == len(methods["STN"]["config"])
  assert "STN hypernetwork at STN's final values" in report
  assert (out / "summary.png").stat().st_size > 10_000
