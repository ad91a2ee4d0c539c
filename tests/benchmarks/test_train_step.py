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
    names = {"ours": "ours", **{family: f"{family}/default" for family in ("mixtral", "qwen2_moe", "qwen3_moe")}}
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
            assert 0 < len(row["profile"]["top_kernels_ms"]) <= 40
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["device"] == "cpu" and saved["torch"] == torch.__version__
    assert len(saved["rows"]) == len(rows)
    table = capsys.readouterr().out
    assert "shardgraph_compile" in table and "x eager" in table


def test_norms_and_rotary_run_as_ops_or_as_aten_ops_and_every_program_takes_eagers_step(tmp_path):
    result = load().main(TINY + ["--models", "qwen3_moe", "--variants",
                                 "eager,shardgraph_sgd,shardgraph_sgd_aten_norms,shardgraph_sgd_aten_rotary,"
                                 "shardgraph_sgd_dispatched",
                                 "--out", str(tmp_path / "n.json")])
    rows = {row["variant"]: row for row in result["rows"]}
    # One layer of Qwen3-MoE: input, post-attention, query and key norms, and the final norm;
    # rotary embedding of its query and key.
    assert rows["shardgraph_sgd"]["rms_norm_ops"] == 5 and rows["shardgraph_sgd"]["rotary_ops"] == 2
    assert rows["shardgraph_sgd_aten_norms"]["rms_norm_ops"] == 0
    assert rows["shardgraph_sgd_aten_rotary"]["rotary_ops"] == 0
    assert rows["shardgraph_sgd_aten_rotary"]["rms_norm_ops"] == 5
    for variant in ("shardgraph_sgd", "shardgraph_sgd_aten_norms", "shardgraph_sgd_aten_rotary",
                    "shardgraph_sgd_dispatched"):
        assert rows[variant]["first_loss_rel_diff_vs_eager"] < 1e-5, rows[variant]
        assert rows[variant]["last_loss_rel_diff_vs_eager"] < 1e-5, rows[variant]


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


def test_the_cuda_graph_train_step_is_refused_on_the_cpu_before_compiling(tmp_path):
    # The replay needs a CUDA device (run it there with --variants shardgraph_sgd,shardgraph_sgd_cudagraph).
    module = load()
    assert [module.train_step_compile(v) for v in ("shardgraph_sgd", "shardgraph_sgd_compile",
                                                    "shardgraph_sgd_cudagraph")] == [None, "inductor", "cuda_graph"]
    result = module.main(TINY + ["--models", "ours", "--variants", "shardgraph_sgd_cudagraph",
                                 "--out", str(tmp_path / "train_step.json")])
    (row,) = result["rows"]
    assert row["variant"] == "shardgraph_sgd_cudagraph" and "median_ms" not in row
    assert "needs --device cuda, not cpu" in row["error"] and "compile_s" not in row, row


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


def test_adamw_variants_take_the_same_steps_in_float32(tmp_path):
    # fp32 master weights and compute: eager fused AdamW + clip_grad_norm_ and the program's
    # in-graph AdamW take the same updates, so the loss after warmup + timed steps agrees too.
    module = load()
    result = module.main(TINY + ["--models", "mixtral", "--variants", "adamw", "--compile-backend", "aot_eager",
                                 "--out", str(tmp_path / "train_step.json")])
    rows = result["rows"]
    assert [r["variant"] for r in rows] == list(module.ADAMW_VARIANTS)
    for row in rows:
        assert "error" not in row, row
        assert row["steps_taken"] == 3 and row["last_loss"] < row["first_loss"], row  # 1 + warmup 0 + 2 timed
        assert row["first_loss_rel_diff_vs_eager"] < 1e-5 and row["last_loss_rel_diff_vs_eager"] < 1e-4, row
        assert row["speedup_vs_eager"] > 0 and row["model_flops_per_step"] > 0 and row["mfu"] is None, row
    assert result["adamw"]["clip_grad_norm"] == 1.0


def test_adamw_master_weights_stay_float32_under_bf16(tmp_path, monkeypatch):
    # The CPU smoke run of the docstring, space-separated variants included; the master-weight
    # copy of eager_adamw and the program's in-graph casts both keep fp32 weights.
    module = load()
    runners = []

    class Kept(module.Runner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runners.append(self)

    monkeypatch.setattr(module, "Runner", Kept)
    result = module.main(["--device", "cpu", "--tiny", "--layers", "1", "--seq", "16", "--steps", "1", "--warmup", "1",
                          "--models", "ours", "--variants", "eager_adamw", "shardgraph_adamw",
                          "--out", str(tmp_path / "train_step.json")])
    eager, ours = result["rows"]
    assert (eager["variant"], ours["variant"]) == ("eager_adamw", "shardgraph_adamw")
    assert "error" not in eager and "error" not in ours, result["rows"]
    assert ours["first_loss_rel_diff_vs_eager"] < 2e-2 and ours["last_loss_rel_diff_vs_eager"] < 2e-2, ours
    eager_runner, ours_runner = runners
    assert {m.dtype for m in eager_runner.masters} == {torch.float32}
    assert {p.dtype for p in eager_runner.compute_parameters} == {torch.bfloat16}
    assert {p.dtype for p in ours_runner.state.parameters.values()} == {torch.float32}
    assert {s.dtype for slots in ours_runner.state.optimizer.values() for s in slots.values()} == {torch.float32}


def test_variant_groups_and_model_flops():
    module = load()
    args = module.parse_args(["--variants", "adamw,eager", "eager_adamw_autocast"])
    assert args.variants == [*module.ADAMW_VARIANTS, "eager", "eager_adamw_autocast"]
    args = module.parse_args(["--models", "mixtral"])  # Qwen3-30B-A3B's layer, 4 layers, 2 x 4096 tokens
    per_token = module.matmul_parameters_per_token("mixtral", module.FULL_SHAPE, 4)
    assert per_token == 4 * (2048 * 4096 * 2 + 2048 * 512 * 2 + 2048 * 128 + 8 * 3 * 2048 * 768) + 2048 * 151936
    attention = 3 * 2 * 2 * 4096 ** 2 * 32 * 128 * 4
    assert module.model_flops("mixtral", args) == 6 * per_token * 8192 + attention


def test_predict_only_prices_each_program_variant_from_the_meta_model_and_runs_nothing(capsys):
    result = load().main(["--tiny", "--models", "ours", "--variants", "eager,shardgraph,shardgraph_compile,"
                              "shardgraph_adamw", "--batch", "2", "--seq", "16", "--layers", "1",
                              "--predict-only", "h100"])
    rows = {row["variant"]: row for row in result["predictions"]}
    assert set(rows) == {"shardgraph", "shardgraph_compile", "shardgraph_adamw"}  # eager is no program
    # The fused price of the same program is below its op-by-op one; the AdamW step, with its
    # update of fp32 master weights and moments in the program, above the SGD step's.
    assert 0 < rows["shardgraph_compile"]["predicted_ms"] < rows["shardgraph"]["predicted_ms"]
    assert rows["shardgraph_adamw"]["predicted_ms"] > rows["shardgraph"]["predicted_ms"]
    assert "shardgraph predicted (h100 presets)" in capsys.readouterr().out


def test_predict_row_sets_preset_and_calibrated_predictions_beside_the_measured_step(tmp_path):
    # The SGD variant updates outside the program (priced on top); the AdamW one inside it.
    result = load().main(["--tiny", "--device", "cpu", "--models", "ours", "--variants", "shardgraph,shardgraph_adamw",
                              "--batch", "2", "--seq", "16", "--layers", "1", "--steps", "1", "--warmup", "1",
                              "--predict", "--out", str(tmp_path / "out.json")])
    assert [row["variant"] for row in result["rows"]] == ["shardgraph", "shardgraph_adamw"]
    for row in result["rows"]:
        assert "error" not in row, row["error"]
        prediction = row["prediction"]
        assert prediction["measured_ms"] == row["median_ms"]
        for label in ("preset", "calibrated"):
            assert prediction[label]["predicted_ms"] > 0
            assert (prediction[label]["predicted_over_measured"]
                    == prediction[label]["predicted_ms"] / prediction["measured_ms"])
        # Calibration timed every product, grouped GEMM, attention and loss of the program.
        assert prediction["calibrated"]["measured_nodes"] > 0 and prediction["preset"]["measured_nodes"] == 0
        assert set(prediction["kind_efficiency"]) == {"matmul", "grouped_mm", "attention", "loss"}
    sgd, adamw = (row["prediction"]["preset"]["update_outside_program_ms"] for row in result["rows"])
    assert sgd > 0 and adamw == 0


def test_a_kernel_is_attributed_to_the_op_chains_that_launched_it():
    from types import SimpleNamespace

    module = load()
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, parent=None, kernels=(), device=cpu):
        return SimpleNamespace(name=name, cpu_parent=parent, device_type=device,
                               kernels=[SimpleNamespace(name=k) for k in kernels])

    step = event("ProfilerStep#3")
    attention = event("aten::_scaled_dot_product_cudnn_attention", step)
    contiguous = event("aten::contiguous", attention)
    copy = event("aten::copy_", contiguous)
    launches = [event("cudaLaunchKernel", copy, ["direct_copy"]), event("cudaLaunchKernel", copy, ["direct_copy"]),
                event("aten::copy_", event("aten::to", step), ["direct_copy"]),
                event("direct_copy", device=cuda, kernels=["ignored: a device event"])]
    profiler = SimpleNamespace(events=lambda: [step, attention, contiguous, copy, *launches])
    chains = module.launch_chains(profiler)
    assert chains == {"direct_copy": {
        "aten::copy_ < aten::contiguous < aten::_scaled_dot_product_cudnn_attention": 2,
        "aten::copy_ < aten::to": 1}}
