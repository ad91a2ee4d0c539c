"""Trace, propagation and lowering time against layer count, on the meta device.

The Qwen3-30B-A3B-shaped config (hidden 2048, 128 experts, top-8, moe_intermediate 768) is built
on the meta device, so no weights are allocated; the table shows how each stage grows with
layers. Usage: ``python benchmarks/compile_time.py [--layers 1 12 48] [--mesh world=8,tp=2,ep=4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from examples.moe_model import shardgraph_entry  # noqa: E402
from passes.pipeline import CompileOptions, run_pipeline  # noqa: E402
from shardgraph.frontend import trace  # noqa: E402
from shardgraph.mesh import MeshSpec  # noqa: E402


def measure(layers: int, mesh: MeshSpec, batch: int, seq: int) -> dict:
    model, inputs, loss_fn = shardgraph_entry("qwen3_30b_a3b", device="meta", batch_size=batch, seq_len=seq,
                                              num_layers=layers)
    started = time.perf_counter()
    traced = trace(model, inputs, loss_fn)
    traced_at = time.perf_counter()
    compiled = run_pipeline(traced.graph_module, CompileOptions(mesh))
    seconds = compiled.pass_seconds
    nodes = sum(1 for _ in traced.graph_module.graph.nodes)
    return {
        "layers": layers,
        "nodes": nodes,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trace_s": traced_at - started,
        "propagate_s": seconds["decompose_loss"] + seconds["propagate"],
        "propagate_sweeps": compiled.placed.sweeps,
        "lower_s": sum(s for name, s in seconds.items() if name not in ("decompose_loss", "propagate")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 12, 48])
    parser.add_argument("--mesh", default="world=8,tp=2,ep=4")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile_time.json"))
    args = parser.parse_args()
    mesh = MeshSpec.parse(args.mesh)
    rows = [measure(layers, mesh, args.batch, args.seq) for layers in args.layers]
    print(f"qwen3_30b_a3b shape on meta, batch {args.batch} x seq {args.seq}, mesh {args.mesh}")
    print(f"{'layers':>6} {'params':>14} {'nodes':>7} {'trace s':>8} {'propagate s':>12} {'sweeps':>6} {'lower s':>8} {'ms/layer (trace+prop)':>22}")
    for row in rows:
        per_layer = 1000 * (row["trace_s"] + row["propagate_s"]) / row["layers"]
        print(f"{row['layers']:>6} {row['parameters']:>14,} {row['nodes']:>7} {row['trace_s']:>8.2f} {row['propagate_s']:>12.2f} "
              f"{row['propagate_sweeps']:>6} {row['lower_s']:>8.2f} {per_layer:>22.1f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump({"mesh": args.mesh, "batch": args.batch, "seq": args.seq, "torch": torch.__version__,
                   "machine": platform.processor() or platform.machine(), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
