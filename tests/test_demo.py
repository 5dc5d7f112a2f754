"""`make demo` runs end to end (quick mode, two problems) and writes its report."""

import subprocess
import sys


def test_demo_writes_report_and_plots(tmp_path):
  out = tmp_path / "demo"
  completed = subprocess.run(
      [sys.executable, "-m", "problems.demo", "--quick", "--out", str(out),
       "--only", "deterministic", "hyper-cleaning"],
      capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  report = (out / "report.md").read_text()
  for solver in ("aid", "itd", "stocbio", "soba", "amigo"):
    assert f"| {solver} |" in report
  assert "test_accuracy" in report and "‖x_T − x*‖ / ‖x*‖" in report
  assert "‖ĥ(x_T) − ∇Φ(x_T)‖ / ‖∇Φ(x_0)‖" in report
  assert "Hypergradient estimators" in report
  assert len(list(out.glob("*.png"))) == 2
  assert "diverged" not in report
