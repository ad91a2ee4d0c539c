"""Compiled EP+TP training on real GPUs with NCCL: parity against one GPU, then throughput.

Launch with torchrun, one process per GPU::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node N benchmarks/multigpu.py --mesh world=N,tp=2,ep=4 [--steps 20]

1. Parity (float32, the tiny config): every rank runs the compiled program on its pieces; rank 0
   compares the loss and the rebuilt gradients with the unsharded model run on its own GPU
   (with ``--zero 3`` the program is compiled with zero=3: parameters and gradients split over
   the data-parallel axes too).
2. Throughput (bf16, Qwen3-30B-A3B-shaped layers, ``--layers`` of them): median step time over
   ``--steps`` steps after warm-up, tokens per second, MFU (``model_flops``: 6 x matmul
   parameters x tokens + causal attention, over ``PEAK_FLOPS`` = 989e12 per GPU), peak memory,
   and the report's predicted step time beside the measured one (``predicted``). The step is
   the gradient program (``--optimizer none``, the model cast to ``--dtype``) or the whole
   training step (``--optimizer adamw``: ``sg.compile(..., optimizer=sg.optim.AdamW(...),
   clip_grad_norm=1.0, compute_dtype=--dtype, zero=--zero)`` run by ``program.train_step``;
   fp32 master weights, gradients and AdamW state). Writes JSON under benchmarks/results/.
   Both count the collectives one step issues (``collectives_per_step``, by op).
   ``--profile``: a torch.profiler breakdown of 3 steps (``profile_step``). ``--all-to-all``: the
   all-to-all bandwidth one step achieves against the backend's own ``all_to_all_single`` at
   the same message sizes (``all_to_all_bandwidth``).

3. The same two for the hand-written baseline (``benchmarks/titan_baseline.py``: DTensor
   ``parallelize_module`` for TP, an all-to-all EP in which every TP lane dispatches its
   duplicated tokens, gradient sync by hand), and the ratio of tokens per second.
4. ``--titan``: torchtitan the package's own MoE training at the same shapes in the same run
   (``benchmarks/titan_package.py``), and ``tokens_per_s_over_titan``.

With one GPU (``--nproc-per-node 1``, ``--mesh world=1``) it exercises the NCCL code path end to
end on a single device. ``--summarize A.json B.json [--out T.md]`` prints one table of several
runs' JSON (benchmarks/multigpu_runs.sh runs the meshes of issue #27 and calls it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import shardgraph as sg  # noqa: E402
from examples.moe_model import CONFIGS, MoEConfig, shardgraph_entry  # noqa: E402
from passes.cost import axis_label  # noqa: E402
from shardgraph.runtime import c10d  # noqa: E402
from shardgraph.runtime.distributed import DistributedCommunicator, init_from_environment  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


def parity(mesh: sg.MeshSpec, rank: int, device: torch.device, zero: int = 0) -> dict:
    """float32 loss and gradients of the compiled program (``zero=3``: parameters and gradients
    split over the data-parallel axes too) against the unsharded model, on the tiny config."""
    torch.manual_seed(0)
    model, inputs, loss_fn = shardgraph_entry("tiny_shared", batch_size=8, seq_len=8, device=str(device))
    program = sg.compile(model, mesh, inputs, loss_fn, zero=zero)
    state = {n: p.detach() for n, p in model.named_parameters()}
    communicator = DistributedCommunicator(mesh)
    loss, gradients = program.run(program.local_parameters(rank, state), program.local_batch(rank, inputs),
                                  communicator=communicator)
    gathered = [None] * mesh.world
    dist.all_gather_object(gathered, {n: g.cpu() for n, g in gradients.items()})
    if rank != 0:
        return {}
    reference = loss_fn(model(*inputs), *inputs)
    reference_gradients = dict(zip(state, torch.autograd.grad(reference, list(model.parameters()))))
    worst = 0.0
    for name in program.parameter_names:
        rebuilt = program.unshard_held([g[name] for g in gathered], program.parameter_sharding(name),
                                       program.parameter_padding(name), program.traced.parameter_shapes[name], name)
        expected = reference_gradients[name].cpu()
        worst = max(worst, ((rebuilt - expected).norm() / expected.norm()).item())
    return {"zero": zero, "loss_rel_err": abs(loss.item() - reference.item()) / abs(reference.item()),
            "grad_rel_err": worst}


def _dp_rows(mesh: sg.MeshSpec, rank: int, batch: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the global batch in the baseline: split over dp, replicated over tp."""
    rows = batch.shape[0] // mesh.dp
    return batch[mesh.index("dp", rank) * rows:(mesh.index("dp", rank) + 1) * rows]


def baseline_parity(mesh: sg.MeshSpec, rank: int, device: torch.device) -> dict:
    """The hand-written baseline's gradients against the unsharded model (its own check)."""
    from titan_baseline import full_gradients, parallelize

    torch.manual_seed(0)
    model, inputs, loss_fn = shardgraph_entry("tiny_shared", batch_size=8, seq_len=8, device=str(device))
    reference = loss_fn(model(*inputs), *inputs)
    names = [n for n, _ in model.named_parameters()]
    expected = dict(zip(names, torch.autograd.grad(reference, list(model.parameters()))))
    sync = parallelize(model, mesh, device)
    ids = _dp_rows(mesh, rank, inputs[0])
    loss = loss_fn(model(ids), ids)
    loss.backward()
    sync()
    got = full_gradients(model, mesh)
    worst = max(((got[n] - expected[n]).norm() / expected[n].norm()).item() for n in names)
    return {"grad_rel_err": worst}


def baseline_throughput(mesh: sg.MeshSpec, rank: int, device: torch.device, config: str, layers: int, batch: int,
                        seq: int, steps: int, dtype: torch.dtype) -> dict:
    from titan_baseline import parallelize

    torch.manual_seed(0)
    model, inputs, loss_fn = shardgraph_entry(config, device=str(device), batch_size=batch, seq_len=seq,
                                              num_layers=layers)
    model = model.to(dtype)
    sync = parallelize(model, mesh, device)
    ids = _dp_rows(mesh, rank, inputs[0])
    times = []
    for step in range(steps + 3):
        _synchronize(device)
        begin = time.perf_counter()
        loss_fn(model(ids), ids).backward()
        sync()
        model.zero_grad(set_to_none=True)
        _synchronize(device)
        if step >= 3:
            times.append(time.perf_counter() - begin)
    median = statistics.median(times)
    with _CountCollectives(mesh) as counter:
        loss_fn(model(ids), ids).backward()
        counter.phase = "gradient sync"
        sync()
        model.zero_grad(set_to_none=True)
    return {"median_step_s": median, "tokens_per_s": batch * seq / median,
            "collectives_per_step": sum(counter.counts.values()), "collectives_by_op": counter.counts,
            "collectives_by_phase_op_axis": counter.by_axis}


# Bytes one rank sends in a collective of ``n`` ranks whose local input is ``b`` bytes (ring
# algorithms; the formulas of passes/cost.py, which the report's bytes use too).
_SENT = {
    "all_reduce": lambda b, n: 2 * b * (n - 1) / n,
    "allreduce_": lambda b, n: 2 * b * (n - 1) / n,
    "all_gather_into_tensor": lambda b, n: b * (n - 1),
    "reduce_scatter_tensor": lambda b, n: b * (n - 1) / n,
    "all_to_all_single": lambda b, n: b * (n - 1) / n,
    "alltoall_base_": lambda b, n: b * (n - 1) / n,
}


class _CountCollectives(TorchDispatchMode):
    """Counts the collectives a step issues: torch's functional (``_c10d_functional``, what our
    program and DTensor issue) and eager (``c10d``, what ``dist.all_reduce`` issues) ops, by op,
    and by mesh axis (found from the group's ranks) and ``phase`` with the bytes each rank sends."""

    def __init__(self, mesh: sg.MeshSpec):
        super().__init__()
        self._mesh = mesh
        self.counts: dict[str, int] = {}
        self.by_axis: dict[str, dict] = {}
        self.phase = "forward+backward"
        # Axes of a folded mesh may have the same groups (tp and ep at world=4 tp=2 ep=2): a group
        # seen only by its ranks is labelled with every axis it serves ("tp=ep"), while our
        # program's groups carry their axis in their name.
        labels: dict[tuple, list[str]] = {}
        for axis in ("dp", "tp", "ep", "etp", "edp", ("dp", "tp"), ("ep", "etp"), ("edp", "ep"), ("edp", "etp"),
                     ("edp", "ep", "etp")):
            if mesh.size(axis) > 1:
                for members in mesh.groups(axis):
                    labels.setdefault(tuple(sorted(members)), []).append(axis_label(axis))
        self._axis_of = {members: "=".join(names) for members, names in labels.items()}
        self._size = {label: len(members) for members, label in self._axis_of.items()}

    def _axis(self, args) -> tuple[str, int]:
        from torch.distributed import distributed_c10d

        for value in args:
            group = None
            if isinstance(value, str):
                try:
                    axis = c10d.axis_of_group(value)
                    return axis_label(axis), self._mesh.size(axis)
                except ValueError:  # not one of our program's groups
                    pass
                try:
                    group = distributed_c10d._resolve_process_group(value)
                except Exception:  # noqa: BLE001 - a string argument that names no group (a reduce op)
                    continue
            elif isinstance(value, torch.ScriptObject) and "ProcessGroup" in str(value._type()):
                group = dist.ProcessGroup.unbox(value)
            if group is not None:
                members = tuple(sorted(dist.get_process_group_ranks(group)))
                return self._axis_of.get(members, "other"), len(members)
        return "?", 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # (``_wrap_tensor_autograd`` and the waits are bookkeeping, not collectives)
        if func.namespace in ("_c10d_functional", "c10d") and not any(
                word in func.__name__ for word in ("wait", "_wrap_tensor_autograd")):
            key = func.__name__.split(".")[0]
            self.counts[key] = self.counts.get(key, 0) + 1
            tensors = [a for a in args if isinstance(a, torch.Tensor)] + [
                t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            axis, n = self._axis(list(args) + list((kwargs or {}).values()))
            local = tensors[0].numel() * tensors[0].element_size() if tensors else 0
            row = self.by_axis.setdefault(f"{self.phase} | {key} | {axis}", {"count": 0, "bytes_per_rank": 0.0})
            row["count"] += 1
            row["bytes_per_rank"] += _SENT.get(key, lambda b, n: 0.0)(local, n) if n > 1 else 0.0
        return func(*args, **(kwargs or {}))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_step_s(step, device: torch.device, steps: int, warmup: int = 3) -> float:
    """Median seconds of ``step()`` over ``steps`` after ``warmup`` warm-up steps."""
    return statistics.median(timed_steps(step, device, steps, warmup)["step_s"])


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def timed_steps(step, device: torch.device, steps: int, warmup: int = 3) -> dict:
    """Seconds of each of ``steps`` calls of ``step()`` after ``warmup`` untimed ones, and how many
    graphs torch.compile compiled during the timed ones (a recompile, e.g. for a token count not
    seen before, lands in that step's time; the median keeps such steps out while they are few)."""
    times = []
    for index in range(warmup + steps):
        if index == warmup:
            compiled_before = _graphs_compiled()
        _synchronize(device)
        begin = time.perf_counter()
        step()
        _synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - begin)
    return {"step_s": times, "warmup": warmup, "graphs_compiled_in_timed_steps": _graphs_compiled() - compiled_before}


def throughput(mesh: sg.MeshSpec, rank: int, device: torch.device, config: str, layers: int, batch: int, seq: int,
               steps: int, dtype: torch.dtype, compile_mode: str | None = None, *, optimizer: str = "none",
               zero: int = 0, profile: bool = False, all_to_all: bool = False, hardware: str | None = None,
               warmup: int = 3) -> dict:
    """Our compiled step at ``config`` x ``layers``, timed on this rank.

    ``optimizer="none"``: the gradient program (loss and gradients), the model cast to ``dtype``.
    ``optimizer="adamw"``: the whole training step, ``sg.compile(..., optimizer=sg.optim.AdamW(...),
    clip_grad_norm=1.0, compute_dtype=dtype)`` run by ``program.train_step``: the model's float32
    parameters are the master weights, forward and backward compute in ``dtype``, gradients and
    AdamW state stay float32. ``zero`` (0, 1, 3) is ``compile``'s ZeRO stage."""
    torch.manual_seed(0)
    # Built on the device it runs on: factory ops in the traced graph keep the tracing device.
    model, inputs, loss_fn = shardgraph_entry(config, device=str(device), batch_size=batch, seq_len=seq,
                                              num_layers=layers)
    training = optimizer == "adamw"
    compute_dtype = dtype if dtype != torch.float32 else None
    started = time.perf_counter()
    if training:
        program = sg.compile(model, mesh, inputs, loss_fn, optimizer=sg.optim.AdamW(**ADAMW),
                             clip_grad_norm=CLIP_GRAD_NORM, compute_dtype=compute_dtype, zero=zero)
    else:
        model = model.to(dtype)  # trace in the dtype the step runs in
        program = sg.compile(model, mesh, inputs, loss_fn, zero=zero)
    compile_s = time.perf_counter() - started
    batch_local = program.local_batch(rank, inputs)
    communicator = DistributedCommunicator(mesh)
    if training:
        # init_state gives this rank's pieces in memory of their own (the step donates them).
        held = {"state": program.init_state(model, rank), "loss": None}
        del model

        def step(compile=compile_mode):
            held["loss"], held["state"], _ = program.train_step(held["state"], batch_local, communicator=communicator,
                                                               compile=compile)
            return held["loss"]
    else:
        local = program.local_parameters(rank, {n: p.detach() for n, p in model.named_parameters()})
        del model

        def step(compile=compile_mode):
            loss, _gradients = program.run(local, batch_local, communicator=communicator, compile=compile)
            return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = timed_steps(step, device, steps, warmup)
    if dist.is_initialized():
        # A rank that recompiles holds every other rank at its next collective: rank 0's step
        # time shows it, rank 0's own count does not.
        by_rank = [None] * dist.get_world_size()
        dist.all_gather_object(by_rank, timing["graphs_compiled_in_timed_steps"])
        timing["graphs_compiled_in_timed_steps_by_rank"] = by_rank
    median = statistics.median(timing["step_s"])
    single_device = {}
    if mesh.world == 1 and not training:
        # The same program without torch.distributed in the loop, timed in the same process.
        single_step = program.single_device_step(compile=compile_mode)
        single_median = _median_step_s(lambda: single_step(local, batch_local), device, steps)
        single_device = {"single_device_step_median_s": single_median,
                         "run_over_single_device_step": median / single_median}
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    # Counted on the step as lowered (eager): a dispatch mode does not see inside a compiled graph.
    with _CountCollectives(mesh) as counter:
        loss = step(compile=None)
    hardware = hardware or hardware_of(device)
    report = program.report(format="dict", hardware=hardware)
    # By purpose from the program's own records (what the report prints), to set beside the
    # counts seen at run time.
    by_purpose: dict[str, dict] = {}
    for row in report["collectives"]:
        entry = by_purpose.setdefault(f"{row['family']} | {row['kind']} | {row['axis']}", {"count": 0, "bytes_per_rank": 0.0})
        entry["count"] += 1
        entry["bytes_per_rank"] += row["bytes_per_rank"]
    flops = model_flops(replace(CONFIGS[config], num_layers=layers), batch, seq)
    result = {"layers": layers, "batch": batch, "seq": seq, "compile": compile_mode, **single_device,
              "optimizer": ({"name": "AdamW", **ADAMW, "clip_grad_norm": CLIP_GRAD_NORM, "in_program": True}
                            if training else None),
              "zero": zero, "compute_dtype": str(dtype).replace("torch.", ""),
              "master_weights": "float32" if training else None,
              "compile_s": compile_s, "median_step_s": median, **timing,
              "tokens_per_s": batch * seq / median, "tokens_per_s_per_gpu": batch * seq / median / mesh.world,
              "model_flops_per_step": flops, "mfu": flops / (median * mesh.world * PEAK_FLOPS),
              "predicted": predicted_step(report, median, compile_mode),
              "collectives_per_step": sum(counter.counts.values()), "collectives_by_op": counter.counts,
              "collectives_by_phase_op_axis": counter.by_axis, "collectives_by_purpose_kind_axis": by_purpose,
              "peak_memory_gib": peak_memory, "last_loss": float(loss.float().item())}
    if profile:
        result["profile"] = profile_step(step, device, median)
    if all_to_all:
        result["all_to_all"] = all_to_all_bandwidth(lambda: step(compile=None), communicator, device)
    return result


# ---------------------------------------------------------------------------------- MFU
# MFU's denominator: dense bf16 tensor-core peak of one H100 / H200 SXM (989 TFLOP/s, no
# sparsity), as benchmarks/train_step.py.
PEAK_FLOPS = 989e12
# AdamW in the program, as benchmarks/train_step.py's AdamW variants (torchtitan gets the same).
ADAMW = dict(lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
CLIP_GRAD_NORM = 1.0


def matmul_parameters_per_token(config: MoEConfig) -> int:
    """Parameters one token multiplies by: attention projections, router, its top_k experts, the
    shared expert, and the lm_head (not the embedding lookup)."""
    hidden, head_dim = config.hidden_size, config.attention_head_dim
    attention = hidden * config.num_heads * head_dim * 2 + hidden * config.num_kv_heads * head_dim * 2
    router = hidden * config.num_experts
    experts = config.top_k * 3 * hidden * config.moe_intermediate_size
    shared = 3 * hidden * config.shared_expert_intermediate_size
    return config.num_layers * (attention + router + experts + shared) + hidden * config.vocab_size


def model_flops(config: MoEConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one training step over the global batch, as benchmarks/train_step.py's
    ``model_flops``: 6 x matmul parameters x tokens, plus causal attention (QK^T and PV over the
    lower triangle, 2 * batch * seq^2 * heads * head_dim forward, three times that forward +
    backward) per layer. Recomputation is not counted."""
    attention = 3 * 2 * batch * seq ** 2 * config.num_heads * config.attention_head_dim * config.num_layers
    return 6.0 * matmul_parameters_per_token(config) * batch * seq + attention


# ---------------------------------------------------------------------------------- prediction
def hardware_of(device: torch.device) -> str:
    """The report's hardware preset for this device: h200, h100 (any other GPU too), cpu."""
    if device.type != "cuda":
        return "cpu"
    return "h200" if "H200" in torch.cuda.get_device_name(device) else "h100"


def predicted_step(report: dict, measured_s: float, compile_mode: str | None) -> dict:
    """The report's predicted step time (a model of the program, not a measurement) beside the
    measured median: op by op, and with the elementwise chains fused (what inductor does)."""
    totals = report["totals"]
    prediction = totals["prediction"]
    fused = totals["predicted_step_seconds_fused"]
    closest = fused if compile_mode else totals["predicted_step_seconds"]
    return {"hardware": prediction["hardware"], "step_s": totals["predicted_step_seconds"],
            "step_without_overlap_s": totals["predicted_step_seconds_without_overlap"], "step_fused_s": fused,
            "compute_s": prediction["compute_seconds"], "communication_s": prediction["communication_seconds"],
            "exposed_communication_s": prediction["exposed_communication_seconds"],
            "communication_hidden_fraction": totals["communication_hidden_fraction"],
            "measured_s": measured_s, "compared_with": "step_fused_s" if compile_mode else "step_s",
            "measured_over_predicted": measured_s / closest if closest else None}


# ---------------------------------------------------------------------------------- profile
# Kernel (GPU) or op (CPU) names of collectives: NCCL's kernels, c10d's and gloo's ops.
_COMMUNICATION_KEYS = ("nccl", "c10d", "gloo")


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams overlap)."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def profile_step(step, device: torch.device, median_s: float, steps: int = 3) -> dict:
    """torch.profiler over ``steps`` calls of ``step()``: time per step by class, against the
    unprofiled median step.

    On a GPU: every kernel, memcpy and memset, classed as benchmarks/train_step.py classes them
    plus ``communication`` (NCCL's kernels). Kernels of different streams overlap, so besides the
    sums by class: ``compute_busy_ms`` (the union of non-communication kernels' intervals),
    ``communication_busy_ms`` (the union of NCCL kernels'), ``overlap_ms`` (time both ran) and
    ``idle_ms`` (the median step minus the union of all). An NCCL kernel's time includes its
    wait for the slowest peer. On a CPU (gloo): the same breakdown of the ops' self time (c10d
    ops as communication), without intervals."""
    from torch.profiler import ProfilerActivity, profile
    from train_step import classify, timed_events

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    _synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        _synchronize(device)
    profiled_ms = (time.perf_counter() - started) * 1e3 / steps
    by_class: dict[str, float] = {}
    kernels: dict[str, tuple[int, float]] = {}
    compute, communication = [], []
    for event, us in timed_events(profiler, on_gpu):
        lowered = event.name.lower()
        label = "communication" if any(key in lowered for key in _COMMUNICATION_KEYS) else classify(event.name)
        if on_gpu:
            (communication if label == "communication" else compute).append(
                (event.time_range.start, event.time_range.end))
        ms = us / 1e3 / steps
        count, total = kernels.get(event.name, (0, 0.0))
        kernels[event.name] = (count + 1, total + ms)
        by_class[label] = by_class.get(label, 0.0) + ms
    median_ms = median_s * 1e3
    result = {"measures": "GPU kernels" if on_gpu else "CPU op self time", "profiled_steps": steps,
              "step_ms": median_ms, "profiled_step_wall_ms": profiled_ms,
              "ms_by_class": dict(sorted(by_class.items(), key=lambda kv: -kv[1]))}
    if on_gpu:
        compute_ms = _union_us(compute) / 1e3 / steps
        communication_ms = _union_us(communication) / 1e3 / steps
        busy_ms = _union_us(compute + communication) / 1e3 / steps
        result.update(compute_busy_ms=compute_ms, communication_busy_ms=communication_ms,
                      overlap_ms=compute_ms + communication_ms - busy_ms, busy_ms=busy_ms,
                      idle_ms=max(median_ms - busy_ms, 0.0))
    top = sorted(kernels.items(), key=lambda item: -item[1][1])[:25]
    result["top_ms"] = [{"name": name[:160], "ms": total, "calls_per_step": count / steps,
                         "class": "communication" if any(k in name.lower() for k in _COMMUNICATION_KEYS)
                         else classify(name)} for name, (count, total) in top]
    return result


# ---------------------------------------------------------------------------------- all-to-all
class _TimeAllToAll(TorchDispatchMode):
    """Times each ``all_to_all_single`` of our program's groups that one step issues, alone: the
    device is synchronised before it is issued and it is waited for at once, so its time is the
    exchange (including any wait for a slower peer), not compute it overlapped. For one extra
    step; the timed steps run without it."""

    def __init__(self, communicator, device: torch.device):
        super().__init__()
        self.communicator, self.device = communicator, device
        self.calls: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not c10d.ALL_TO_ALL:
            return func(*args, **kwargs)
        tensor, _output_splits, input_splits, name = args
        try:
            axis = c10d.axis_of_group(name)
        except ValueError:  # not one of our program's groups
            return func(*args, **kwargs)
        _synchronize(self.device)
        begin = time.perf_counter()
        out = c10d.WAIT(func(*args, **kwargs))
        _synchronize(self.device)
        seconds = time.perf_counter() - begin
        n = self.communicator.mesh.size(axis)
        rows = tensor.shape[0] if tensor.dim() else 0
        row_bytes = tensor.numel() * tensor.element_size() // rows if rows else 0
        splits = list(input_splits) or [rows // n] * n  # no splits given: even ones
        sent = (sum(splits) - splits[self.communicator.index(axis)]) * row_bytes
        self.calls.append({"axis": axis_label(axis), "axis_key": list(axis) if isinstance(axis, tuple) else axis,
                           "group_size": n, "dtype": str(tensor.dtype),
                           "input_bytes": tensor.numel() * tensor.element_size(), "sent_bytes": sent,
                           "seconds": seconds})
        return out


def nccl_all_to_all_seconds(communicator, axis, input_bytes: int, dtype: torch.dtype, device: torch.device,
                            repeats: int = 10, warmup: int = 3) -> tuple[float, int]:
    """Median seconds of the backend's own ``dist.all_to_all_single`` on this rank's group of
    ``axis`` for an input of ``input_bytes`` split evenly (every rank runs it at once), and the
    bytes used (rounded to a multiple of the group size)."""
    members, group = communicator._process_group(axis)
    n = len(members)
    element = torch.empty((), dtype=dtype).element_size()
    elements = max(input_bytes // element // n, 1) * n
    data = torch.ones(elements, dtype=dtype, device=device)
    out = torch.empty_like(data)
    samples = []
    for index in range(warmup + repeats):
        _synchronize(device)
        begin = time.perf_counter()
        dist.all_to_all_single(out, data, group=group)
        _synchronize(device)
        if index >= warmup:
            samples.append(time.perf_counter() - begin)
    return statistics.median(samples), elements * element


def all_to_all_bandwidth(step, communicator, device: torch.device) -> dict:
    """All-to-all bandwidth our step achieves against the backend's own ``all_to_all_single`` at
    the same message sizes.

    Achieved: one step under ``_TimeAllToAll``; per axis, the bytes this rank sends to other
    ranks (its input minus its own split) over the seconds of its all-to-alls, on every rank
    (``achieved_GBps``: rank 0's; ``achieved_GBps_min_rank``: the slowest rank's). Reference: for
    each axis, at rank 0's mean and largest all-to-all input of the step, the median of 10
    ``dist.all_to_all_single`` calls with even splits on the same groups, as bytes sent to other
    ranks ((n-1)/n of the input) per second. A MoE all-to-all has uneven splits (the routing), so
    ``achieved_over_nccl`` below 1 is partly the routing's imbalance, not only overhead."""
    timer = _TimeAllToAll(communicator, device)
    with timer:
        step()
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, timer.calls)
    calls = per_rank[0]
    by_axis: dict[str, dict] = {}
    # By axis and dtype: the token exchanges apart from the exchange of counts (int64) before them.
    for label in dict.fromkeys(f"{call['axis']} {call['dtype'].replace('torch.', '')}" for call in calls):
        mine = [c for c in calls if f"{c['axis']} {c['dtype'].replace('torch.', '')}" == label]
        rates = []
        for rank_calls in per_rank:
            rank_axis = [c for c in rank_calls if f"{c['axis']} {c['dtype'].replace('torch.', '')}" == label]
            seconds = sum(c["seconds"] for c in rank_axis)
            rates.append(sum(c["sent_bytes"] for c in rank_axis) / seconds / 1e9 if seconds else None)
        sizes = [c["input_bytes"] for c in mine]
        key = mine[0]["axis_key"]
        axis = tuple(key) if isinstance(key, list) else key
        dtype = getattr(torch, mine[0]["dtype"].replace("torch.", ""))
        references = []
        for what, size in (("mean", int(statistics.mean(sizes))), ("largest", max(sizes))):
            seconds, used = nccl_all_to_all_seconds(communicator, axis, size, dtype, device)
            n = mine[0]["group_size"]
            references.append({"size": what, "input_bytes": used, "seconds": seconds,
                               "GBps": used * (n - 1) / n / seconds / 1e9})
        achieved = rates[0]
        valid = [r for r in rates if r is not None]
        by_axis[label] = {
            "calls": len(mine), "group_size": mine[0]["group_size"], "dtype": mine[0]["dtype"],
            "input_bytes_min_mean_max": [min(sizes), statistics.mean(sizes), max(sizes)],
            "sent_bytes": sum(c["sent_bytes"] for c in mine), "seconds": sum(c["seconds"] for c in mine),
            "achieved_GBps": achieved, "achieved_GBps_min_rank": min(valid) if valid else None,
            "nccl_alone": references,
            "achieved_over_nccl": achieved / references[0]["GBps"] if achieved and references[0]["GBps"] else None,
            "per_call": [{k: c[k] for k in ("input_bytes", "sent_bytes", "seconds")} for c in mine],
        }
    return {"backend": dist.get_backend(), "by_axis": by_axis,
            "method": "each all_to_all_single of one step timed alone (synchronised before, waited at once) against "
                      "dist.all_to_all_single with even splits at rank 0's mean and largest input size"}


def collectives_markdown(result: dict) -> str:
    """Collectives and bytes sent per rank in one step, by phase, op and axis (counted at run
    time), ours beside the baseline; then ours by purpose (the program's records)."""
    ours = result["throughput"].get("collectives_by_phase_op_axis", {})
    theirs = result.get("baseline_throughput", {}).get("collectives_by_phase_op_axis", {})
    lines = ["| phase | op | axis | ours: count | ours: bytes/rank | baseline: count | baseline: bytes/rank |",
             "|---|---|---|---:|---:|---:|---:|"]
    for key in sorted(set(ours) | set(theirs)):
        phase, op, axis = key.split(" | ")
        mine, other = ours.get(key, {}), theirs.get(key, {})
        lines.append(f"| {phase} | {op} | {axis} | {mine.get('count', 0)} | {mine.get('bytes_per_rank', 0):,.0f} | "
                     f"{other.get('count', 0)} | {other.get('bytes_per_rank', 0):,.0f} |")
    total = [sum(r["count"] for r in table.values()) for table in (ours, theirs)]
    sent = [sum(r["bytes_per_rank"] for r in table.values()) for table in (ours, theirs)]
    lines.append(f"| all | | | {total[0]} | {sent[0]:,.0f} | {total[1]} | {sent[1]:,.0f} |")
    lines += ["", "| ours by purpose | kind | axis | count | bytes/rank |", "|---|---|---|---:|---:|"]
    for key, row in sorted(result["throughput"].get("collectives_by_purpose_kind_axis", {}).items()):
        lines.append(f"| {' | '.join(key.split(' | '))} | {row['count']} | {row['bytes_per_rank']:,.0f} |")
    return "\n".join(lines)


def summary_markdown(results: list[dict], names: list[str]) -> str:
    """One row per run: ours (throughput, MFU, predicted against measured, the MoE all-to-all
    against the backend's own), torchtitan's, and the ratio; from the JSON of each run."""
    lines = ["| run | mesh | zero | parity grad err | ours ms | ours tok/s | ours MFU | predicted ms | measured / "
             "predicted | a2a GB/s (ours / alone) | torchtitan ms | torchtitan tok/s | torchtitan MFU | "
             "ours / torchtitan |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]

    def number(value, form):
        return format(value, form) if isinstance(value, (int, float)) else "-"

    for name, result in zip(names, results):
        ours = result.get("throughput", {})
        predicted = ours.get("predicted") or {}
        closest = predicted.get(predicted.get("compared_with", "step_s"))
        a2a = "-"
        for label, row in (ours.get("all_to_all") or {}).get("by_axis", {}).items():
            if "int" not in label:  # the token exchanges, not the counts
                a2a = f"{label}: {number(row['achieved_GBps'], '.3g')} / {number(row['nccl_alone'][0]['GBps'], '.3g')}"
                break
        titan = result.get("titan") or {}
        titan_ms = titan.get("median_step_s")
        lines.append(
            f"| {name} | {result.get('mesh', '')} | {ours.get('zero', '-')} | "
            f"{number(result.get('parity', {}).get('grad_rel_err'), '.1e')} | "
            f"{number(ours['median_step_s'] * 1e3 if 'median_step_s' in ours else None, '.1f')} | "
            f"{number(ours.get('tokens_per_s'), ',.0f')} | {number(ours.get('mfu'), '.3f')} | "
            f"{number(closest * 1e3 if closest else None, '.1f')} | {number(predicted.get('measured_over_predicted'), '.2f')} | "
            f"{a2a} | {number(titan_ms * 1e3 if titan_ms else None, '.1f')} | "
            f"{number(titan.get('tokens_per_s'), ',.0f')} | {number(titan.get('mfu'), '.3f')} | "
            f"{number(result.get('tokens_per_s_over_titan'), '.2f')}"
            + (f" (torchtitan: {titan['error'][:80]})" if "error" in titan else "") + " |")
    return "\n".join(lines)


def summarize(paths: list[str], out: str | None) -> str:
    """``--summarize A.json B.json ... [--out table.md]``: the table of ``summary_markdown``."""
    results, names = [], []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            results.append(json.load(handle))
        names.append(os.path.splitext(os.path.basename(path))[0])
    table = summary_markdown(results, names)
    print(table)
    if out:
        with open(out, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")
    return table


def main() -> None:
    if "--summarize" in sys.argv:
        summary = argparse.ArgumentParser(description="summary table of benchmarks/multigpu.py JSON files")
        summary.add_argument("--summarize", nargs="+", required=True)
        summary.add_argument("--out", default=None)
        found = summary.parse_args()
        summarize(found.summarize, found.out)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", required=True)
    parser.add_argument("--config", default="qwen3_30b_a3b", help="example config for the throughput run")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"], help="gloo runs on the CPU")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first, ours and torchtitan's (the first compiles; graphs_compiled_in_timed_steps "
                             "counts any graph torch.compile compiled in the timed ones)")
    parser.add_argument("--compile", choices=["inductor"], default=None,
                        help="run our step under torch.compile (program.run / train_step(compile=...)); at world=1 "
                             "the same program's single_device_step(compile=...) is timed beside it")
    parser.add_argument("--optimizer", choices=["none", "adamw"], default="none",
                        help="adamw: the whole training step in the program (AdamW, clip 1.0, fp32 master weights, "
                             "compute in --dtype), run by program.train_step; none: the gradient program")
    parser.add_argument("--zero", type=int, choices=[0, 1, 3], default=0,
                        help="compile's ZeRO stage (1 needs --optimizer adamw); the parity check runs zero=3 too")
    parser.add_argument("--profile", action="store_true", help="torch.profiler per-step breakdown (3 steps)")
    parser.add_argument("--all-to-all", action="store_true",
                        help="all-to-all bandwidth of our step against the backend's own all_to_all_single")
    parser.add_argument("--hardware", choices=["h100", "h200", "cpu"], default=None,
                        help="the report's preset for the predicted step (default: from the device)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the hand-written DTensor TP + duplicated-dispatch EP baseline")
    parser.add_argument("--titan", action="store_true",
                        help="also run torchtitan the package's own MoE training at the same shapes "
                             "(benchmarks/titan_package.py; needs the torchtitan wheels on PYTHONPATH)")
    parser.add_argument("--titan-no-compile", action="store_true", help="torchtitan without its torch.compile")
    import titan_package

    titan_package.add_titan_arguments(parser, prefix="titan-")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "multigpu.json"))
    args = parser.parse_args()
    if args.zero == 1 and args.optimizer != "adamw":
        parser.error("--zero 1 shards optimizer state: pass --optimizer adamw")
    if args.backend == "nccl" and not torch.cuda.is_available():
        parser.error("--backend nccl needs a GPU and none is visible; on a CPU pass --backend gloo")
    init_from_environment(args.backend)
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if args.backend == "nccl" else torch.device("cpu")
    mesh = sg.MeshSpec.parse(args.mesh)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"mesh": args.mesh, "device": name, "torch": torch.__version__, "config": args.config,
              "gpus": mesh.world, "peak_flops_per_gpu": PEAK_FLOPS}
    result["parity"] = parity(mesh, rank, device, zero=3 if args.zero == 3 else 0)
    result["throughput"] = throughput(mesh, rank, device, args.config, args.layers, args.batch, args.seq, args.steps,
                                      getattr(torch, args.dtype), args.compile, optimizer=args.optimizer,
                                      zero=args.zero, profile=args.profile, all_to_all=args.all_to_all,
                                      hardware=args.hardware, warmup=args.warmup)
    _release(device)
    if not args.no_baseline:
        result["baseline_parity"] = baseline_parity(mesh, rank, device)
        result["baseline_throughput"] = baseline_throughput(mesh, rank, device, args.config, args.layers, args.batch,
                                                            args.seq, args.steps, getattr(torch, args.dtype))
        result["tokens_per_s_over_baseline"] = (result["throughput"]["tokens_per_s"]
                                                / result["baseline_throughput"]["tokens_per_s"])
        _release(device)
    if args.titan:
        _write(result, args.out, rank)  # ours stands even if torchtitan fails or hangs
        try:
            result["titan"] = titan_package.run_titan(
                mesh, rank, device, args.config, args.layers, args.batch, args.seq, args.steps, warmup=args.warmup,
                compile_model=not args.titan_no_compile, attention=args.titan_attention, ac=args.titan_ac,
                spmd_backend=args.titan_spmd_backend, cuda_graphs=args.titan_cuda_graphs, profile=args.profile)
            result["tokens_per_s_over_titan"] = result["throughput"]["tokens_per_s"] / result["titan"]["tokens_per_s"]
        except Exception as error:  # noqa: BLE001 - recorded; our numbers above stand
            result["titan"] = {"error": f"{type(error).__name__}: {error}"[:2000]}
            print(f"rank {rank}: torchtitan failed: {result['titan']['error']}", file=sys.stderr, flush=True)
    if rank == 0:
        print(json.dumps(result, indent=1))
        print(collectives_markdown(result))
    _write(result, args.out, rank)
    dist.destroy_process_group()


def _write(result: dict, path: str, rank: int) -> None:
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)


def _release(device: torch.device) -> None:
    """Free what one part of the benchmark left, before the next part measures its memory."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
