"""benchmarks/embedding_sgd.py on a CPU: the sparse step agrees with the dense one and the float64
definition, leaves the rows no index names as they were, and the JSON has a row per shape and token count."""

import json

from . import load_benchmark


def test_a_tiny_cpu_run_agrees_and_writes_a_row_per_shape_and_token_count(tmp_path):
    module = load_benchmark("embedding_sgd.py", "embedding_sgd_benchmark")
    out = tmp_path / "embedding_sgd.json"
    module.main(["--device", "cpu", "--tiny", "--dtype", "float32", "--steps", "1", "--tokens", "64", "300",
                 "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["tokens"]) for r in rows] == [("tiny_64", 64), ("tiny_300", 300)]
    for row in rows:
        assert row["agree"] and row["sparse_untouched_equal"] and row["sparse_ms"] > 0, row
        # Float32: the step itself is exact to rounding, relative to its size.
        assert row["sparse_step_error"] < 1e-5 and row["squares_rel_diff"] < 1e-5, row
