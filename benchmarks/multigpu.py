"""Compiled EP+TP training on real GPUs with NCCL: parity against one GPU, then throughput.

Launch with torchrun, one process per GPU::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node N benchmarks/multigpu.py --mesh world=N,tp=2,ep=4 [--steps 20]

1. Parity (float32, the tiny config): every rank runs the compiled program on its pieces; rank 0
   compares the loss and the rebuilt gradients with the unsharded model run on its own GPU.
2. Throughput (bf16, Qwen3-30B-A3B-shaped layers, ``--layers`` of them): median step time over
   ``--steps`` steps after warm-up, tokens per second. Writes JSON under benchmarks/results/.
Both count the collectives one step issues (``collectives_per_step``, by op).

3. The same two for the hand-written baseline (``benchmarks/titan_baseline.py``: DTensor
   ``parallelize_module`` for TP, an all-to-all EP in which every TP lane dispatches its
   duplicated tokens, gradient sync by hand), and the ratio of tokens per second.

With one GPU (``--nproc-per-node 1``, ``--mesh world=1``) it exercises the NCCL code path end to
end on a single device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import shardgraph as sg  # noqa: E402
from examples.moe_model import shardgraph_entry  # noqa: E402
from passes.cost import axis_label  # noqa: E402
from shardgraph.runtime import c10d  # noqa: E402
from shardgraph.runtime.distributed import DistributedCommunicator, init_from_environment  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


def parity(mesh: sg.MeshSpec, rank: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model, inputs, loss_fn = shardgraph_entry("tiny_shared", batch_size=8, seq_len=8, device=str(device))
    program = sg.compile(model, mesh, inputs, loss_fn)
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
        rebuilt = sg.unshard([g[name] for g in gathered], program.parameter_sharding(name), mesh)
        expected = reference_gradients[name].cpu()
        worst = max(worst, ((rebuilt - expected).norm() / expected.norm()).item())
    return {"loss_rel_err": abs(loss.item() - reference.item()) / abs(reference.item()), "grad_rel_err": worst}


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


def _median_step_s(step, device: torch.device, steps: int) -> float:
    """Median seconds of ``step()`` over ``steps`` after three warm-up steps."""
    times = []
    for index in range(steps + 3):
        _synchronize(device)
        begin = time.perf_counter()
        step()
        _synchronize(device)
        if index >= 3:
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def throughput(mesh: sg.MeshSpec, rank: int, device: torch.device, config: str, layers: int, batch: int, seq: int,
               steps: int, dtype: torch.dtype, compile_mode: str | None = None) -> dict:
    torch.manual_seed(0)
    # Built on the device it runs on: factory ops in the traced graph keep the tracing device.
    model, inputs, loss_fn = shardgraph_entry(config, device=str(device), batch_size=batch, seq_len=seq,
                                              num_layers=layers)
    model = model.to(dtype)  # trace in the dtype the step runs in
    started = time.perf_counter()
    program = sg.compile(model, mesh, inputs, loss_fn)
    compile_s = time.perf_counter() - started
    local = program.local_parameters(rank, {n: p.detach() for n, p in model.named_parameters()})
    del model
    batch_local = program.local_batch(rank, inputs)
    communicator = DistributedCommunicator(mesh)
    median = _median_step_s(lambda: program.run(local, batch_local, communicator=communicator, compile=compile_mode),
                            device, steps)
    single_device = {}
    if mesh.world == 1:
        # The same program without torch.distributed in the loop, timed in the same process.
        step = program.single_device_step(compile=compile_mode)
        single_median = _median_step_s(lambda: step(local, batch_local), device, steps)
        single_device = {"single_device_step_median_s": single_median,
                         "run_over_single_device_step": median / single_median}
    with _CountCollectives(mesh) as counter:
        program.run(local, batch_local, communicator=communicator, compile=compile_mode)
    # By purpose from the program's own records (what the report prints), to set beside the
    # counts seen at run time.
    by_purpose: dict[str, dict] = {}
    for row in program.report(format="dict")["collectives"]:
        entry = by_purpose.setdefault(f"{row['family']} | {row['kind']} | {row['axis']}", {"count": 0, "bytes_per_rank": 0.0})
        entry["count"] += 1
        entry["bytes_per_rank"] += row["bytes_per_rank"]
    return {"layers": layers, "batch": batch, "seq": seq, "compile": compile_mode, **single_device,
            "compile_s": compile_s, "median_step_s": median,
            "tokens_per_s": batch * seq / median,
            "collectives_per_step": sum(counter.counts.values()), "collectives_by_op": counter.counts,
            "collectives_by_phase_op_axis": counter.by_axis, "collectives_by_purpose_kind_axis": by_purpose,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", required=True)
    parser.add_argument("--config", default="qwen3_30b_a3b", help="example config for the throughput run")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"], help="gloo runs on the CPU")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", choices=["inductor"], default=None,
                        help="run our step under torch.compile (program.run(compile=...)); at world=1 the same "
                             "program's single_device_step(compile=...) is timed beside it")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the hand-written DTensor TP + duplicated-dispatch EP baseline")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "multigpu.json"))
    args = parser.parse_args()
    init_from_environment(args.backend)
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if args.backend == "nccl" else torch.device("cpu")
    mesh = sg.MeshSpec.parse(args.mesh)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"mesh": args.mesh, "device": name, "torch": torch.__version__, "config": args.config}
    result["parity"] = parity(mesh, rank, device)
    result["throughput"] = throughput(mesh, rank, device, args.config, args.layers, args.batch, args.seq, args.steps,
                                      getattr(torch, args.dtype), args.compile)
    if not args.no_baseline:
        result["baseline_parity"] = baseline_parity(mesh, rank, device)
        result["baseline_throughput"] = baseline_throughput(mesh, rank, device, args.config, args.layers, args.batch,
                                                            args.seq, args.steps, getattr(torch, args.dtype))
        result["tokens_per_s_over_baseline"] = (result["throughput"]["tokens_per_s"]
                                                / result["baseline_throughput"]["tokens_per_s"])
    if rank == 0:
        print(json.dumps(result, indent=1))
        print(collectives_markdown(result))
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
