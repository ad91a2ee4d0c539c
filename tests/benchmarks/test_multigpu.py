"""benchmarks/multigpu.py's training-step path on 4 gloo processes (AdamW in the program, zero=3
parity, MFU, predicted step, profile, all-to-all bandwidth), benchmarks/titan_package.py (torchtitan's
own training at the same shapes, where torchtitan is importable) and benchmarks/multigpu_runs.sh."""

import os
import subprocess
import sys
import types
from dataclasses import replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)


def test_model_flops_from_a_config_equal_train_step_model_flops_at_the_qwen3_layer_shape():
    import multigpu
    import train_step
    from examples.moe_model import CONFIGS

    config = replace(CONFIGS["qwen3_30b_a3b"], num_layers=4)
    args = types.SimpleNamespace(tiny=False, batch=2, seq=4096, layers=4)
    assert multigpu.model_flops(config, 2, 4096) == train_step.model_flops("ours", args)


def training_step_on_rank(rank):
    sys.path.insert(0, BENCHMARKS)
    import multigpu
    import shardgraph as sg

    mesh = sg.MeshSpec.parse("world=4,tp=2,ep=4")
    device = torch.device("cpu")
    return {"parity": multigpu.parity(mesh, rank, device, zero=3),
            "throughput": multigpu.throughput(mesh, rank, device, "tiny", 2, 8, 16, 1, torch.float32,
                                              optimizer="adamw", profile=True, all_to_all=True, warmup=1)}


@pytest.mark.distributed
def test_adamw_training_step_on_four_gloo_ranks_reports_mfu_prediction_profile_and_all_to_all():
    import multigpu
    from examples.moe_model import CONFIGS
    from shardgraph.runtime.distributed import spawn_gloo

    results = spawn_gloo(training_step_on_rank, 4)
    # zero=3: parameters and gradients split over dp as well, rebuilt and compared in float32.
    assert results[0]["parity"]["zero"] == 3 and results[0]["parity"]["grad_rel_err"] < 1e-5, results[0]["parity"]
    runs = [r["throughput"] for r in results]
    assert len({r["last_loss"] for r in runs}) == 1  # the global loss, the same on every rank
    ours = runs[0]
    assert ours["optimizer"]["name"] == "AdamW" and ours["master_weights"] == "float32"
    assert len(ours["step_s"]) == 1 and ours["median_step_s"] == ours["step_s"][0]
    assert ours["graphs_compiled_in_timed_steps_by_rank"] == [0, 0, 0, 0]  # eager: nothing compiled
    flops = multigpu.model_flops(replace(CONFIGS["tiny"], num_layers=2), 8, 16)
    assert ours["model_flops_per_step"] == flops
    assert ours["mfu"] == pytest.approx(flops / (ours["median_step_s"] * 4 * multigpu.PEAK_FLOPS))
    predicted = ours["predicted"]
    assert predicted["hardware"] == "cpu" and predicted["step_s"] > 0
    assert predicted["measured_over_predicted"] == pytest.approx(ours["median_step_s"] / predicted["step_s"])
    assert ours["profile"]["ms_by_class"].get("communication", 0) > 0
    # Every all-to-all of the ep groups that the counting step saw was timed, tokens and counts.
    by_axis = ours["all_to_all"]["by_axis"]
    counted = ours["collectives_by_phase_op_axis"]["forward+backward | all_to_all_single | ep"]["count"]
    assert by_axis["ep float32"]["calls"] + by_axis["ep int64"]["calls"] == counted
    tokens = by_axis["ep float32"]
    assert 0 < tokens["sent_bytes"] < sum(call["input_bytes"] for call in tokens["per_call"])
    assert tokens["achieved_GBps"] > 0 and all(ref["GBps"] > 0 for ref in tokens["nccl_alone"])


def titan_training_on_rank(rank):
    sys.path.insert(0, BENCHMARKS)
    import shardgraph as sg
    import titan_package

    mesh = sg.MeshSpec.parse("world=4,tp=2,ep=2")
    return titan_package.run_titan(mesh, rank, torch.device("cpu"), "tiny", 2, 8, 16, 2, warmup=1,
                                   compile_model=False)


@pytest.mark.distributed
@pytest.mark.slow
def test_torchtitan_package_trains_the_tiny_shapes_on_four_gloo_ranks():
    titan_package = pytest.importorskip("titan_package")
    try:
        titan_package.import_torchtitan()
    except titan_package.TorchtitanUnavailable as error:
        pytest.skip(str(error))
    from shardgraph.runtime.distributed import spawn_gloo

    results = spawn_gloo(titan_training_on_rank, 4)
    losses = results[0]["losses"]
    assert all(r["losses"] == losses for r in results)  # one global loss
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses  # AdamW on one batch
    assert results[0]["mesh_run"] == "world=4,tp=2,ep=2" and results[0]["parallel_dims"]["dp_shard"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_titan_package_refuses_nccl_without_a_gpu():
    run = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "titan_package.py"), "--mesh", "world=1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "needs a GPU" in run.stderr


def test_runs_script_dry_run_lists_the_issue_meshes_for_eight_gpus():
    run = subprocess.run(["bash", os.path.join(BENCHMARKS, "multigpu_runs.sh"), "--dry-run"],
                         env={**os.environ, "GPUS": "8"}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    commands = [line for line in run.stdout.splitlines() if "multigpu.py --mesh" in line]
    meshes = [line.split("--mesh ")[1].split()[0] for line in commands]
    assert meshes == ["world=8,tp=2,ep=4", "world=8,tp=1,ep=8", "world=8,tp=2,ep=2,etp=2", "world=8,tp=2,ep=4"]
    assert all("--optimizer adamw" in c and "--titan" in c and c.startswith("timeout") for c in commands)
    assert ["--zero 3" in c for c in commands] == [False, False, False, True]
    assert "NCCL_NVLS_ENABLE=0" in run.stdout and "pip install" in run.stdout
