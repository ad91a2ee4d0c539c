"""benchmarks/train_step.py end to end on the CPU: tiny models, float32, every model and variant."""

import json

import pytest
import torch

from . import load_benchmark

TINY = ["--device", "cpu", "--tiny", "--dtype", "float32", "--layers", "1", "--seq", "16", "--batch", "2",
        "--steps", "2", "--warmup", "1"]


def load():
    return load_benchmark("train_step.py", "train_step_benchmark")


def test_every_variant_runs_and_one_shardgraph_sgd_step_equals_eager(tmp_path, capsys):
    # aot_eager: dynamo and AOTAutograd as on the GPU, without inductor's C++ builds (a test
    # below compiles the program with inductor, another runs the CUDA-graph variants).
    module = load()
    out = tmp_path / "train_step.json"
    result = module.main(TINY + ["--check", "--profile", "--compile-backend", "aot_eager", "--out", str(out)])
    rows = result["rows"]
    names = {"ours": "ours", "mixtral": "mixtral/default", "qwen2_moe": "qwen2_moe/default"}
    assert [(r["model"], r["variant"]) for r in rows] == [(names[m], v) for m in module.MODELS
                                                          for v in module.DEFAULT_VARIANTS]
    for row in rows:
        assert "error" not in row, row
        assert row["median_ms"] > 0 and row["tokens_per_s"] > 0 and row["p10_ms"] <= row["p90_ms"], row
        # Same weights, same batch, float32: every variant's first loss is eager's.
        assert row["first_loss_rel_diff_vs_eager"] < 1e-5, row
        if row["variant"].startswith("shardgraph"):
            assert row["compile_s"] > 0 and isinstance(row["comm_users"], list), row
    assert [c["model"] for c in result["checks"]] == [names[m] for m in module.MODELS]
    for check in result["checks"]:
        assert check["initial_weights_max_rel_err"] == 0.0, check
        assert check["loss_rel_err"] < 1e-5 and check["weights_max_rel_err"] < 1e-5, check
        assert check["update_max_rel_err"] < 1e-3, check  # lr * gradient itself, summed in another order
    # The profile finds the custom ops in their classes (on the CPU: op self time).
    profiled = [(r["model"], r["variant"]) for r in rows if "profile" in r]
    assert profiled == [(names[m], v) for m in module.MODELS for v in ("shardgraph", "shardgraph_compile")]
    for row in rows:
        if "profile" in row:
            classes = row["profile"]["ms_by_class"]
            assert classes["grouped GEMM"] > 0 and classes["attention"] > 0, row["profile"]
            assert 0 < len(row["profile"]["top_kernels_ms"]) <= 25
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["device"] == "cpu" and saved["torch"] == torch.__version__
    assert len(saved["rows"]) == len(rows)
    table = capsys.readouterr().out
    assert "shardgraph_compile" in table and "x eager" in table


def test_kernel_classes():
    classify = load().classify
    assert classify("_grouped_product_tma_kernel") == "grouped GEMM"
    assert classify("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, "
                    "false, cutlass::bfloat16_t") == "attention"
    assert classify("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "dense GEMM"
    # Inductor's fused kernels name the ops they fused; they are still elementwise.
    assert classify("triton_poi_fused__to_copy__unsafe_view_add_embedding_floor_divide_grouped_mm_index_select"
                    ) == "elementwise/reduction"
    assert classify("triton_poi_fused__to_copy__unsafe_view_add_attention_bmm_cat_cos") == "elementwise/reduction"
    assert classify("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::"
                    ) == "optimizer update"
    assert classify("void at::native::vectorized_elementwise_kernel<8, at::native::FillFunctor<c10::BFloat16>"
                    ) == "elementwise/reduction"


@pytest.mark.slow
def test_program_under_inductor_matches_eager(tmp_path):
    module = load()
    result = module.main(TINY + ["--models", "ours", "--variants", "eager,shardgraph_compiled",
                                 "--out", str(tmp_path / "train_step.json")])
    eager, compiled = result["rows"]
    assert compiled["variant"] == "shardgraph_compile" and "error" not in compiled, compiled
    assert compiled["first_loss_rel_diff_vs_eager"] < 1e-5, compiled


def test_cuda_graph_variants_run(tmp_path):
    # On the CPU they run without CUDA graphs, which still exercises their set-up (static
    # parameter addresses, the loss kept past the next replay).
    result = load().main(TINY + ["--models", "ours", "--variants", "eager,torch_compile_cudagraph,shardgraph_cudagraph",
                                 "--compile-backend", "aot_eager", "--out", str(tmp_path / "train_step.json")])
    assert [r["variant"] for r in result["rows"]] == ["eager", "torch_compile_cudagraph", "shardgraph_cudagraph"]
    for row in result["rows"]:
        assert "error" not in row and row["first_loss_rel_diff_vs_eager"] < 1e-5, row


def test_out_of_memory_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    module = load()

    class Exhausted(module.Runner):
        def step(self):
            if self.variant == "shardgraph":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
            return super().step()

    monkeypatch.setattr(module, "Runner", Exhausted)
    result = module.main(TINY + ["--models", "ours", "--variants", "shardgraph,eager",
                                 "--out", str(tmp_path / "train_step.json")])
    failed, eager = result["rows"]
    assert failed["error"] == "oom" and "9.00 GiB" in failed["error_detail"] and "median_ms" not in failed
    assert "error" not in eager and eager["median_ms"] > 0
