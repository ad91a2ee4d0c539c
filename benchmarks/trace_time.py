"""Trace time against layer count: the qwen3_30b_a3b shape on the meta device.

    python benchmarks/trace_time.py [--layers 1 12 48] [--batch 8] [--seq 4096] [--repeats 1]

Builds ``examples/moe_model.py``'s ``qwen3_30b_a3b`` config with the given layer counts on the
meta device (no weight is allocated: 48 layers are 30.5e9 parameters, 122 GB in float32),
traces loss + gradients with ``shardgraph.frontend.trace``, and prints one row per layer count:
graph nodes, moe_experts forward/backward nodes, the best trace time over the repeats, the time
per layer, and the process's peak resident memory so far. Writes the rows as JSON to
``benchmarks/results/trace_time.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from examples.moe_model import shardgraph_entry  # noqa: E402
from shardgraph.frontend import op_histogram, trace  # noqa: E402


def peak_memory_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def measure(layers: int, batch: int, seq: int, repeats: int) -> dict:
    model, inputs, loss_fn = shardgraph_entry("qwen3_30b_a3b", device="meta", batch_size=batch, seq_len=seq,
                                              num_layers=layers)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        traced = trace(model, inputs, loss_fn)
        times.append(time.perf_counter() - started)
    histogram = op_histogram(traced)
    return {
        "layers": layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "nodes": len(traced.graph_module.graph.nodes),
        "moe_forward_nodes": histogram.get("shardgraph.moe_experts.default", 0),
        "moe_backward_nodes": histogram.get("shardgraph.moe_experts_backward.default", 0),
        "distinct_ops": len(histogram),
        "trace_s": min(times),
        "trace_s_all": times,
        "peak_rss_mb": peak_memory_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 12, 48])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "trace_time.json"))
    args = parser.parse_args()
    measure(1, args.batch, args.seq, 1)  # imports, op registration and first-call caches, not timed
    rows = [measure(layers, args.batch, args.seq, args.repeats) for layers in args.layers]
    print(f"qwen3_30b_a3b shape on meta, batch {args.batch} x seq {args.seq}, best of {args.repeats}")
    print(f"{'layers':>6} {'parameters':>15} {'nodes':>7} {'moe fwd/bwd':>11} {'ops':>4} {'trace s':>8} "
          f"{'ms/layer':>9} {'peak RSS MB':>12}")
    for row in rows:
        print(f"{row['layers']:>6} {row['parameters']:>15,} {row['nodes']:>7} "
              f"{row['moe_forward_nodes']:>5}/{row['moe_backward_nodes']:<5} {row['distinct_ops']:>4} "
              f"{row['trace_s']:>8.2f} {1000 * row['trace_s'] / row['layers']:>9.1f} {row['peak_rss_mb']:>12.0f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump({"config": "qwen3_30b_a3b", "device": "meta", "batch": args.batch, "seq": args.seq,
                   "repeats": args.repeats, "torch": torch.__version__, "python": platform.python_version(),
                   "machine": platform.machine(), "cpus": os.cpu_count(), "rows": rows}, handle, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
