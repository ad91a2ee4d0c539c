"""benchmarks/moe_block.py on the CPU at tiny shapes: every row is timed, every column agrees with
the HF block in float32, and a column that disagrees is marked and left out of the ratios."""

import json

import pytest

from . import load_benchmark

TINY = ["--device", "cpu", "--tiny", "--tokens", "64", "--steps", "1", "--warmup", "0",
        "--compile-backend", "aot_eager"]


def load():
    return load_benchmark("moe_block.py", "moe_block_benchmark")


def test_every_row_is_timed_and_every_column_matches_the_hf_block_in_float32(tmp_path):
    module = load()
    columns = ["ours", "hf", "grouped_gemm_only"]
    if module.torchtitan_importable() is None:
        columns.append("torchtitan")
    out = tmp_path / "moe_block.json"
    # DeepSeek-V3's block: sigmoid scores, scaled top-k and a shared expert (olmoe below, qwen3 in
    # the routing test: softmax routers).
    result = module.main(TINY + ["--shapes", "deepseek_v3_local32", "--routing", "balanced,skewed",
                                 "--columns", ",".join(columns), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["device"] == "cpu"
    assert [(r["shape"], r["routing"], r["tokens"]) for r in saved["rows"]] == [
        ("deepseek_v3_local32", routing, 64) for routing in ("balanced", "skewed")]
    assert len(saved["checks"]) == 2
    for check in saved["checks"]:
        assert check["routing_matches"], check
        assert sorted(check["columns"]) == sorted(columns)
        for column, entry in check["columns"].items():
            assert entry["passed"] and entry["max_rel_err"] < 1e-4, (column, entry)
    for row in saved["rows"]:
        assert row["routing_matches"], row
        counts = row["tokens_per_expert"]
        if row["routing"] == "balanced":  # 64 tokens x top-2 over 8 experts
            assert counts["min"] == counts["max"] == 16, row
        else:
            assert counts["max"] > 2 * counts["min"], row
        for column in columns:
            entry = row["columns"][column]
            assert entry["ms"] > 0 and not entry["wrong"] and entry["check_passed"], (column, entry)
        # bf16 first steps of ours against HF eager's at the row's shape
        assert row["columns"]["ours"]["rel_err_vs_hf"] < 2e-2, row["columns"]["ours"]
        gemms = row["columns"]["grouped_gemm_only"]
        assert gemms["ms"] == min(gemms["torch"]["ms"], gemms["ours"]["ms"])
        assert row["ours_over_ceiling"] == row["ours_ms"] / gemms["ms"]
        assert row["best_other_over_ours"] == row["best_other_ms"] / row["ours_ms"]
    assert result["rows"][0]["columns"].keys() == set(columns)


def test_a_column_that_disagrees_with_hf_is_marked_and_left_out_of_the_ratios(tmp_path, monkeypatch):
    module = load()
    step = module.ProgramStep.step

    def off_by_one_percent(self, keep_output=False):
        loss, gradients = step(self, keep_output)
        return loss, {name: g * 1.01 for name, g in gradients.items()}

    monkeypatch.setattr(module.ProgramStep, "step", off_by_one_percent)
    result = module.main(TINY + ["--shapes", "olmoe", "--routing", "skewed", "--columns", "ours,hf",
                                 "--out", str(tmp_path / "moe_block.json")])
    check = result["checks"][0]["columns"]
    assert not check["ours"]["passed"] and check["ours"]["max_rel_err"] > 5e-3, check["ours"]
    assert check["hf"]["passed"], check["hf"]
    row = result["rows"][0]
    assert row["columns"]["ours"]["wrong"] and "ms" in row["columns"]["ours"]
    assert row["ours_ms"] is None and row["best_other_over_ours"] is None


def test_routing_gives_the_chosen_experts_their_counts():
    module = load()
    shape = module.tiny(module.SHAPES["qwen3_30b_a3b"])
    balanced = module.expert_choices(shape, 40, "balanced", 0)
    assert module.tokens_per_expert(balanced, shape.experts).tolist() == [10] * 8
    skewed = module.tokens_per_expert(module.expert_choices(shape, 400, "skewed", 0), shape.experts)
    assert skewed[0] == skewed.max() and skewed.sum() == 800 and skewed.min() < skewed.max() / 2


def test_a_fused_column_that_could_not_fuse_is_recorded_and_left_out_of_the_fused_ratios(tmp_path):
    # On a CPU without TRITON_INTERPRET=1 the fused kernels cannot run: the column's program keeps
    # the unfused path, says so (fused_moe_layers 0), and gives no fused figure. (Under the
    # interpreter the same column runs the fused kernels: tests/kernels/test_fused_moe.py.)
    module = load()
    result = module.main(TINY + ["--shapes", "olmoe", "--routing", "balanced", "--columns", "ours,ours_fused",
                                 "--out", str(tmp_path / "moe_block.json")])
    check = result["checks"][0]["columns"]
    assert check["ours_fused"]["passed"] and check["ours_fused"]["fused_moe_layers"] == 0, check["ours_fused"]
    row = result["rows"][0]
    assert row["columns"]["ours_fused"]["fused_moe_layers"] == 0 and row["columns"]["ours"]["fused_moe_layers"] == 0
    assert row["ours_unfused_ms"] == row["columns"]["ours"]["ms"]
    assert row["ours_fused_ms"] is None and row["fused_over_ceiling"] is None and row["unfused_over_fused"] is None


def test_a_profiled_column_carries_its_kernel_breakdown(tmp_path):
    module = load()
    result = module.main(TINY + ["--shapes", "qwen3_30b_a3b", "--routing", "balanced", "--columns", "ours,hf",
                                 "--profile", "ours", "--skip-check", "--out", str(tmp_path / "moe_block.json")])
    columns = result["rows"][0]["columns"]
    profile = columns["ours"]["profile"]
    assert "profile" not in columns["hf"]
    # On the CPU the breakdown is the ops' self time; the program's grouped products are among them.
    assert profile["measures"] == "CPU op self time" and profile["gpu_busy_ms"] > 0
    assert profile["ms_by_class"]["grouped GEMM"] > 0
    assert any("grouped_mm" in kernel["name"] for kernel in profile["top_kernels_ms"])


def test_an_unknown_profile_column_is_refused_by_name():
    module = load()
    with pytest.raises(SystemExit):
        module.parse_args(["--profile", "ours,nonsense"])
