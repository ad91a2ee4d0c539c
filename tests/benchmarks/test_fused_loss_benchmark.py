"""benchmarks/fused_loss.py (the op part) runs on a CPU at tiny shapes; its fused rows agree with float32."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fused_loss_benchmark_writes_rows_whose_fused_results_match_float32(tmp_path):
    out = tmp_path / "fused_loss.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fused_loss.py"), "--device", "cpu",
                           "--tiny", "--op-steps", "1", "--skip-train",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    fused = [row for row in result["op"] if row["case"].startswith("fused")]
    assert fused and all(row["err_grad_weight"] < 1e-5 and row["err_loss"] < 1e-5 for row in fused), fused
