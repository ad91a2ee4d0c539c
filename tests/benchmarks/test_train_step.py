"""benchmarks/train_step.py end to end on the CPU, tiny models, float32."""

import importlib.util
import os

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks",
                      "train_step.py")


def load():
    spec = importlib.util.spec_from_file_location("train_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_variant_runs_and_one_shardgraph_sgd_step_equals_eager(tmp_path):
    result = load().main(["--device", "cpu", "--tiny", "--dtype", "float32", "--layers", "1", "--seq", "16",
                          "--batch", "2", "--steps", "2", "--warmup", "1", "--check", "--models", "ours,mixtral",
                          "--variants", "eager,shardgraph", "--hf-experts", "eager", "--out", str(tmp_path / "train_step.json")])
    rows = result["rows"]
    assert [(r["model"], r["variant"]) for r in rows] == [
        ("ours", "eager"), ("ours", "shardgraph"), ("mixtral/eager", "eager"), ("mixtral/eager", "shardgraph")]
    assert all("median_ms" in r and r["tokens_per_s"] > 0 for r in rows), rows
    for row in rows:
        assert row["first_loss_rel_diff_vs_eager"] < 1e-5, row
    assert [c["model"] for c in result["checks"]] == ["ours", "mixtral"]
    for check in result["checks"]:
        assert check["loss_rel_err"] < 1e-5 and check["weights_max_rel_err"] < 1e-5, check
    assert (tmp_path / "train_step.json").exists()
