"""Planned against measured peak memory of the compiled training step, per recomputation policy.

For each policy the example model is compiled as a training step (AdamW in the program, bf16
compute from fp32 master weights, one rank), the report's planned peak per rank is read
(``peak_memory_bytes_per_rank``: parameters, optimizer state, batch and the liveness walk over
the lowered graph), and on a GPU two steps of the plain program (no inductor, whose fusion
changes what is alive) are run and ``torch.cuda.max_memory_allocated`` is taken over the second.
Usage:

    python benchmarks/memory_plan.py --config qwen3_30b_a3b --layers 2 --batch 2 --seq 4096 \\
        --out benchmarks/results/memory_plan.json

On a machine without CUDA only the planned column is filled.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import shardgraph as sg  # noqa: E402
from examples.moe_model import shardgraph_entry  # noqa: E402

GIB = 2**30


def measure(args, policy: str) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model, inputs, loss_fn = shardgraph_entry(args.config, device=device, batch_size=args.batch, seq_len=args.seq,
                                              num_layers=args.layers)
    started = time.perf_counter()
    program = sg.compile(model, sg.MeshSpec(world=1), inputs, loss_fn, optimizer=sg.optim.AdamW(lr=1e-4),
                         clip_grad_norm=1.0, compute_dtype=torch.bfloat16, recompute=policy)
    compile_s = time.perf_counter() - started
    totals = program.report(format="dict")["totals"]
    row = {"policy": policy, "compile_s": compile_s, "planned_peak_gib": totals["peak_memory_bytes_per_rank"] / GIB,
           "planned_activation_gib": totals["peak_activation_bytes_per_rank"] / GIB,
           "parameter_gib": totals["parameter_bytes_per_rank"] / GIB,
           "optimizer_state_gib": totals["optimizer_state_bytes_per_rank"] / GIB}
    if device != "cuda":
        return row
    state = program.init_state(model, 0)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    loss, state, _ = program.train_step(state, inputs)  # first step: kernels tuned and compiled
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, state, _ = program.train_step(state, inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    row.update(measured_peak_gib=peak / GIB, allocated_before_step_gib=before / GIB,
               planned_over_measured=row["planned_peak_gib"] / (peak / GIB), loss=float(loss))
    # The step time of the same plain program: what each policy's recomputation costs.
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss, state, _ = program.train_step(state, inputs)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    row["step_ms"] = statistics.median(times)
    del state
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="small", help="a config of examples/moe_model.py")
    parser.add_argument("--layers", type=int, default=None, help="layers (default: the config's)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--policies", default="none,selective,full")
    parser.add_argument("--cpu", action="store_true", help="plan only, even where CUDA is available")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the measured one (median)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = [measure(args, policy) for policy in args.policies.split(",")]
    header = (f"{'policy':<10} {'planned GiB':>11} {'measured GiB':>12} {'planned/measured':>16} {'activations GiB':>15}"
              f" {'step ms':>8}")
    print(f"{args.config}, {args.layers or 'all'} layers, batch {args.batch} x {args.seq}, AdamW, bf16 compute")
    print(header)
    for row in rows:
        measured = row.get("measured_peak_gib")
        shown = f"{measured:.2f}" if measured is not None else "-"
        ratio = f"{row['planned_over_measured']:.3f}" if measured is not None else "-"
        step = f"{row['step_ms']:.1f}" if "step_ms" in row else "-"
        print(f"{row['policy']:<10} {row['planned_peak_gib']:>11.2f} {shown:>12} {ratio:>16} "
              f"{row['planned_activation_gib']:>15.2f} {step:>8}")
    if args.out:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else platform.processor()
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"device": device, "torch": torch.__version__, "config": args.config, "layers": args.layers,
                       "batch": args.batch, "seq": args.seq, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
