"""Trace, propagation and lowering time against layer count, on the meta device.

The Qwen3-30B-A3B-shaped config (hidden 2048, 128 experts, top-8, moe_intermediate 768) is built
on the meta device, so no weights are allocated; the table shows how each stage grows with
layers. ``--model deepseek_v3`` builds a DeepSeek-V3-shaped model instead (hidden 7168, 128
heads, 256 routed experts of 2048, top-8, one shared expert of 2048, vocab 129280, 61 layers),
as far as the example model expresses it: every layer is an MoE layer (V3's first three are
dense) and attention is plain multi-head (V3 uses MLA).

Usage: ``python benchmarks/compile_time.py [--layers 1 12 48] [--mesh world=8,tp=2,ep=4]
[--model qwen3_30b_a3b|deepseek_v3] [--label after] [--repeat 3]``. Rows are written to the JSON
file under ``runs[label][model]``, keeping the other labels' rows, so a baseline and a change can
be kept side by side. Timings are wall-clock seconds; ``total_s`` is the model to a runnable
program (the pipeline's copies between passes and the program's code generation included). With
``--repeat n`` each row is measured n times in a row and the run with the least ``total_s`` is
kept (the machine may be shared; the first compile in a process also pays torch's lazy imports).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from examples.moe_model import CONFIGS, MoEConfig, MoETransformer, lm_loss, make_batch  # noqa: E402
from passes.pipeline import CompileOptions, run_pipeline  # noqa: E402
from shardgraph.frontend import trace  # noqa: E402
from shardgraph.mesh import MeshSpec  # noqa: E402

MODELS = {
    "qwen3_30b_a3b": CONFIGS["qwen3_30b_a3b"],
    "deepseek_v3": MoEConfig(vocab_size=129280, hidden_size=7168, num_layers=61, num_heads=128, num_kv_heads=128,
                             head_dim=128, num_experts=256, top_k=8, moe_intermediate_size=2048,
                             shared_expert_intermediate_size=2048),
}


def measure(config: MoEConfig, layers: int, mesh: MeshSpec, batch: int, seq: int) -> dict:
    settings = replace(config, num_layers=layers)
    with torch.device("meta"):
        model = MoETransformer(settings)
    inputs = make_batch(settings, batch, seq, device="meta")
    started = time.perf_counter()
    traced = trace(model, inputs, lm_loss)
    traced_at = time.perf_counter()
    compiled = run_pipeline(traced.graph_module, CompileOptions(mesh))
    piped_at = time.perf_counter()
    # The program writes its Python code when first run or read: that is part of compiling it.
    compiled.lowered.code  # noqa: B018
    finished = time.perf_counter()
    seconds = compiled.pass_seconds
    nodes = sum(1 for _ in traced.graph_module.graph.nodes)
    return {
        "layers": layers,
        "nodes": nodes,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trace_s": traced_at - started,
        "propagate_s": seconds["decompose_split_norms"] + seconds["decompose_loss"] + seconds["propagate"],
        "propagate_sweeps": compiled.placed.sweeps,
        "lower_s": sum(s for name, s in seconds.items() if name not in ("decompose_split_norms", "decompose_loss", "propagate"))
        + (finished - piped_at),
        "total_s": finished - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 12, 48])
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen3_30b_a3b")
    parser.add_argument("--mesh", default="world=8,tp=2,ep=4")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--label", default="after", help="the run's name in the JSON file (before, after, ...)")
    parser.add_argument("--repeat", type=int, default=1, help="measure each row this many times, keep the fastest")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile_time.json"))
    args = parser.parse_args()
    mesh = MeshSpec.parse(args.mesh)
    rows = [min((measure(MODELS[args.model], layers, mesh, args.batch, args.seq) for _ in range(args.repeat)),
                key=lambda row: row["total_s"]) for layers in args.layers]
    print(f"{args.model} shape on meta, batch {args.batch} x seq {args.seq}, mesh {args.mesh}"
          + (f", fastest of {args.repeat}" if args.repeat > 1 else ""))
    print(f"{'layers':>6} {'params':>16} {'nodes':>7} {'trace s':>8} {'propagate s':>12} {'sweeps':>6} {'lower s':>8} "
          f"{'total s':>8} {'ms/layer (trace+prop)':>22}")
    for row in rows:
        per_layer = 1000 * (row["trace_s"] + row["propagate_s"]) / row["layers"]
        print(f"{row['layers']:>6} {row['parameters']:>16,} {row['nodes']:>7} {row['trace_s']:>8.2f} {row['propagate_s']:>12.2f} "
              f"{row['propagate_sweeps']:>6} {row['lower_s']:>8.2f} {row['total_s']:>8.2f} {per_layer:>22.1f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    results = {}
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as handle:
            results = json.load(handle)
    if "runs" not in results:  # a file from before runs were labelled: start afresh
        results = {"runs": {}}
    results.update({"batch": args.batch, "seq": args.seq, "torch": torch.__version__,
                    "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()})
    run = results["runs"].setdefault(args.label, {})
    run[args.model] = {"mesh": args.mesh, "repeat": args.repeat, "rows": rows}
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
