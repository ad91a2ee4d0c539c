"""Planned bytes per rank for real-size MoE models at every ZeRO level and recomputation policy,
computed on the meta device (no weights allocated).

Models:
  qwen3_30b_a3b  the Qwen3-30B-A3B-shaped example model (``examples/moe_model.py``), 48 layers;
  deepseek_v3    transformers' ``DeepseekV3ForCausalLM`` at DeepSeek-V3's sizes: 61 layers, the first
                 3 dense, MLA attention (q LoRA rank 1536, kv LoRA rank 512, 128 heads), 256 routed
                 experts of 2048 with top-8 group-limited routing and one shared expert.
Each is traced once per mesh as the AdamW training step with bf16 compute on fp32 master weights
(a micro-batch of ``--sequences`` sequences of ``--seq`` tokens per data-parallel rank), then
compiled for every ``zero`` in (0, 1, 3) and recomputation policy. The columns are the report's
totals per rank: parameters (fp32 masters), gradients, optimizer state, the peak of live
activations, and the peak in all (inputs held plus everything live at the worst point).
``fits`` marks a peak under an H200's 141 GB.

Usage: ``python benchmarks/memory_table.py [--model qwen3_30b_a3b deepseek_v3] [--out ...]``;
prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import shardgraph as sg  # noqa: E402
from shardgraph.compiler import compile_traced  # noqa: E402
from shardgraph.frontend import trace  # noqa: E402

H200_BYTES = 141e9
ZERO_LEVELS = (0, 1, 3)
POLICIES = ("none", "selective", "full")
MESHES = {
    "qwen3_30b_a3b": ("world=8,tp=2,ep=4", "world=8,tp=1,ep=8"),
    "deepseek_v3": ("world=64,tp=8,ep=64", "world=256,tp=8,ep=64"),
}


def qwen3_30b_a3b(batch: int, seq: int, layers: int | None = None):
    from dataclasses import replace

    from examples.moe_model import CONFIGS, MoETransformer, lm_loss, make_batch

    config = replace(CONFIGS["qwen3_30b_a3b"], num_layers=layers or CONFIGS["qwen3_30b_a3b"].num_layers)
    with torch.device("meta"):
        model = MoETransformer(config)
    return model, make_batch(config, batch, seq, device="meta"), lm_loss


def deepseek_v3(batch: int, seq: int, layers: int | None = None):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from examples.hf_models import lm_loss

    config = DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=layers or 61, first_k_dense_replace=3, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=max(seq, 4096),
        attn_implementation="sdpa", tie_word_embeddings=False)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    inputs = (torch.empty(batch, seq, dtype=torch.long, device="meta"),)
    return model, inputs, lm_loss


BUILDERS = {"qwen3_30b_a3b": qwen3_30b_a3b, "deepseek_v3": deepseek_v3}


def rows_for(name: str, mesh_text: str, sequences: int, seq: int, layers: int | None = None) -> list[dict]:
    mesh = sg.MeshSpec.parse(mesh_text)
    model, inputs, loss_fn = BUILDERS[name](sequences * mesh.dp, seq, layers)
    started = time.perf_counter()
    traced = trace(model, inputs, loss_fn, optimizer=sg.optim.AdamW(), clip_grad_norm=1.0,
                   compute_dtype=torch.bfloat16)
    print(f"# traced {name} for {mesh_text} in {time.perf_counter() - started:.1f} s", flush=True)
    rows = []
    for zero in ZERO_LEVELS:
        for policy in POLICIES:
            started = time.perf_counter()
            program = compile_traced(traced, mesh, donate_state=True, zero=zero, recompute=policy)
            totals = program.report(format="dict")["totals"]
            row = {
                "model": name, "mesh": mesh_text, "zero": zero, "recompute": policy,
                "tokens_per_rank": sequences * seq,
                "parameter_bytes": totals["parameter_bytes_per_rank"],
                "gradient_bytes": totals["gradient_bytes_per_rank"],
                "optimizer_state_bytes": totals["optimizer_state_bytes_per_rank"],
                "peak_activation_bytes": totals["peak_activation_bytes_per_rank"],
                "peak_bytes": totals["peak_memory_bytes_per_rank"],
                "communication_bytes": totals["communication_bytes_per_rank"],
                "communication_bytes_by_family": totals["communication_bytes_per_rank_by_family"],
                "compile_s": time.perf_counter() - started,
            }
            row["fits_h200"] = row["peak_bytes"] < H200_BYTES
            print(_line(row), flush=True)
            rows.append(row)
    return rows


def _gb(value: float) -> str:
    return f"{value / 1e9:.1f}"


HEADER = ("| model | mesh | zero | recompute | params GB | grads GB | optimizer GB | activations GB | peak GB | "
          "fits H200 |\n|---|---|---:|---|---:|---:|---:|---:|---:|---|")


def _line(row: dict) -> str:
    return (f"| {row['model']} | {row['mesh']} | {row['zero']} | {row['recompute']} | {_gb(row['parameter_bytes'])} | "
            f"{_gb(row['gradient_bytes'])} | {_gb(row['optimizer_state_bytes'])} | "
            f"{_gb(row['peak_activation_bytes'])} | {_gb(row['peak_bytes'])} | {'yes' if row['fits_h200'] else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", choices=sorted(BUILDERS), default=sorted(BUILDERS, reverse=True))
    parser.add_argument("--sequences", type=int, default=1, help="sequences per data-parallel rank")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--layers", type=int, help="override the model's depth (a quicker look)")
    parser.add_argument("--mesh", nargs="+", help="override the meshes")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "memory_table.json"))
    args = parser.parse_args()
    print(HEADER, flush=True)
    rows = []
    for name in args.model:
        for mesh_text in args.mesh or MESHES[name]:
            rows += rows_for(name, mesh_text, args.sequences, args.seq, args.layers)
    with open(args.out, "w") as handle:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        json.dump({"commit": commit, "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                   "sequences_per_rank": args.sequences, "seq": args.seq, "rows": rows}, handle, indent=1)
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
