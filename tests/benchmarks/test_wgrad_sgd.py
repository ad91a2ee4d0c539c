"""benchmarks/wgrad_sgd.py on a CPU: the fused step and the unfused one agree, and the JSON has a
row per shape and layout."""

import json
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCHMARKS)


def test_a_tiny_cpu_run_agrees_and_writes_a_row_per_shape_and_layout(tmp_path):
    import wgrad_sgd

    out = tmp_path / "wgrad_sgd.json"
    assert wgrad_sgd.main(["--device", "cpu", "--tiny", "--dtype", "float32", "--steps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["layout"]) for r in rows] == [(s, layout) for s in wgrad_sgd.TINY for layout in ("enk", "ekn")]
    assert all(r["agree"] and r["equal_to_triton_unfused"] and r["fused_ms"] > 0 for r in rows)
