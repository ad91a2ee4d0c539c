"""One GPU, one training step: the eager model, ``torch.compile`` of it, and the shardgraph program.

For each model, from the same seed and the same batch, time forward + backward + SGD update of:

  eager               the model as written (for HF models, the expert implementation --hf-experts
                      names: transformers' default, grouped_mm in 5.x, or its per-expert loop), ``loss.backward()``,
                      ``torch.optim.SGD(foreach=True)``
  torch_compile       the same with ``torch.compile(model)``
  shardgraph          ``shardgraph.compile(model, MeshSpec(world=1))``: the joint graph with the MoE
                      layers lowered to grouped GEMMs and fused attention, run as an fx GraphModule;
                      SGD applied to the gradients it returns with one ``_foreach_add_``
  shardgraph_compile  the same program's graph module under ``torch.compile`` (inductor fuses the
                      elementwise ops around the grouped GEMM and attention ops, which stay opaque)
  shardgraph_cudagraph  the same under ``mode="reduce-overhead"``: the whole step replayed as one CUDA
                      graph, which the program allows because nothing in it reads a value on the host;
                      parameters are marked static, so the replay reads them where SGD updates them
  torch_compile_cudagraph  the model under ``torch.compile(mode="reduce-overhead")``, for comparison

Models (``--models``): ``ours`` (examples/moe_model.py), ``mixtral`` (HF MixtralForCausalLM) and
``qwen2_moe`` (HF Qwen2MoeForCausalLM, with a shared expert), all at Qwen3-30B-A3B's layer shape
(hidden 2048, 32 query / 4 KV heads of 128, 128 experts, top-8, expert intermediate 768, vocab
151936) with ``--layers`` layers, SDPA attention, bf16.

Reported per row: median / p10 / p90 step ms over ``--steps`` steps after ``--warmup``, tokens/s,
speed-up over eager and over torch_compile, peak memory over the timed steps, the first step's loss
and its relative difference from eager's, compile seconds (shardgraph.compile's wall time, or the
first step of a torch.compile variant), and host-device syncs in one step
(``torch.cuda.set_sync_debug_mode``). ``--profile`` adds a torch.profiler breakdown of the
shardgraph step's GPU time (grouped GEMM, attention, dense GEMM, other kernels, idle).

    python benchmarks/train_step.py                              # one H100; writes benchmarks/results/train_step.json
    python benchmarks/train_step.py --device cpu --tiny --dtype float32 --steps 2 --warmup 1 --check
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import shardgraph as sg  # noqa: E402
from examples.moe_model import CONFIGS, MoETransformer, lm_loss  # noqa: E402

VARIANTS = ("eager", "torch_compile", "torch_compile_cudagraph", "shardgraph", "shardgraph_compile",
            "shardgraph_cudagraph")
DEFAULT_VARIANTS = ("eager", "torch_compile", "shardgraph", "shardgraph_compile")
LEARNING_RATE = 1e-3

QWEN3_LAYER = dict(vocab_size=151936, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                   num_experts=128, top_k=8, moe_intermediate_size=768)
TINY_LAYER = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_experts=8, top_k=2, moe_intermediate_size=32)


def build(name: str, layers: int, tiny: bool, seed: int, hf_experts: str = "default"):
    """``(model, loss_fn)`` built on the current default device.

    ``hf_experts`` picks HF transformers' expert implementation: ``"default"`` is what the
    installed transformers chooses (5.x: ``"grouped_mm"``, one ``torch._grouped_mm`` per
    projection), ``"eager"`` HF's per-expert loop."""
    shape = TINY_LAYER if tiny else QWEN3_LAYER
    torch.manual_seed(seed)
    if name == "ours":
        base = CONFIGS["tiny_shared"] if tiny else CONFIGS["qwen3_30b_a3b"]
        config = dataclasses.replace(base, vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                                     num_heads=shape["num_attention_heads"], num_kv_heads=shape["num_key_value_heads"],
                                     head_dim=shape["head_dim"], num_experts=shape["num_experts"],
                                     top_k=shape["top_k"], moe_intermediate_size=shape["moe_intermediate_size"],
                                     num_layers=layers)
        return MoETransformer(config), lm_loss
    from examples.hf_models import lm_loss as hf_loss
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = dict(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], num_hidden_layers=layers,
                  num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
                  head_dim=shape["head_dim"], num_experts_per_tok=shape["top_k"], attn_implementation="sdpa",
                  use_cache=False)
    if hf_experts != "default":
        common["experts_implementation"] = hf_experts
    if name == "mixtral":
        config = MixtralConfig(**common, intermediate_size=shape["moe_intermediate_size"],
                               num_local_experts=shape["num_experts"])
        return MixtralForCausalLM(config), hf_loss
    if name == "qwen2_moe":
        config = Qwen2MoeConfig(**common, intermediate_size=4 * shape["moe_intermediate_size"],
                                moe_intermediate_size=shape["moe_intermediate_size"],
                                shared_expert_intermediate_size=shape["hidden_size"],
                                num_experts=shape["num_experts"])
        return Qwen2MoeForCausalLM(config), hf_loss
    raise SystemExit(f"unknown model {name!r}; choose from ours, mixtral, qwen2_moe")


class Runner:
    """One variant of one model: ``step()`` runs forward, backward and the SGD update."""

    def __init__(self, variant: str, model, loss_fn, batch, compile_mode: str | None):
        self.variant, self.model, self.loss_fn, self.batch = variant, model, loss_fn, batch
        self.compile_s = None
        if variant in ("eager", "torch_compile", "torch_compile_cudagraph"):
            self.optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, foreach=True)
            mode = "reduce-overhead" if variant == "torch_compile_cudagraph" else compile_mode
            self.forward = model if variant == "eager" else torch.compile(model, mode=mode)
            return
        started = time.perf_counter()
        self.program = sg.compile(model, sg.MeshSpec(world=1), batch, loss_fn)
        self.compile_s = time.perf_counter() - started
        self.graph = self.program.graph_module
        # The program reads the parameters from these tensors and SGD updates them in place.
        self.parameters = {name: p.detach() for name, p in model.named_parameters()}
        if variant == "shardgraph_compile":
            self.graph = torch.compile(self.graph, mode=compile_mode, dynamic=False)
        if variant == "shardgraph_cudagraph":
            # Static addresses: the graph replay reads the parameters in place instead of copying
            # every one into its own buffers before each replay.
            for tensor in [*self.parameters.values(), *self.program.default_buffers.values()]:
                torch._dynamo.mark_static_address(tensor)
            self.graph = torch.compile(self.graph, mode="reduce-overhead", dynamic=False)
        self.trainable = [self.parameters[name] for name in self.program.gradient_names]
        self.buffers = [self.program.default_buffers[name] for name in self.program.buffer_names]
        self.arguments = [self.parameters[name] for name in self.program.parameter_names] + self.buffers + list(batch)
        used = [n for n in self.graph_module_nodes() if n.op == "placeholder" and n.name == "comm" and n.users]
        if used:
            raise SystemExit(f"the world=1 program uses its communicator ({list(used[0].users)[:3]}); "
                             f"benchmarks/train_step.py runs without one")

    def graph_module_nodes(self):
        return self.program.graph_module.graph.nodes

    def step(self) -> torch.Tensor:
        if self.variant in ("eager", "torch_compile", "torch_compile_cudagraph"):
            loss = self.loss_fn(self.forward(*self.batch), *self.batch)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        loss, *gradients = self.graph(None, *self.arguments)
        with torch.no_grad():
            torch._foreach_add_(self.trainable, gradients, alpha=-LEARNING_RATE)
        # A CUDA graph replay overwrites its outputs: keep the loss past the next step.
        return loss.detach().clone()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(runner, device, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            runner.step()
            times.append((time.perf_counter() - started) * 1e3)
    return times


def count_syncs(runner, device) -> int | None:
    """Host-device synchronisations in one step, as ``set_sync_debug_mode("warn")`` reports them."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


KERNEL_CLASSES = [
    ("grouped GEMM", ("grouped_product", "grouped_wgrad", "grouped_mm")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cutlass_mha")),
    ("dense GEMM", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "matmul")),
]


def profile_step(runner, device, steps: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            runner.step()
        synchronize(device)
    wall_ms = (time.perf_counter() - started) * 1e3 / steps
    totals, kernels = {}, {}
    for event in profiler.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name
        duration = event.device_time_total / 1e3 / steps if hasattr(event, "device_time_total") else 0.0
        kernels[name] = kernels.get(name, 0.0) + duration
        lowered = name.lower()
        category = next((label for label, keys in KERNEL_CLASSES if any(k in lowered for k in keys)), "other kernels")
        totals[category] = totals.get(category, 0.0) + duration
    busy = sum(totals.values())
    totals["idle / launch gaps"] = max(wall_ms - busy, 0.0)
    top = sorted(kernels.items(), key=lambda item: -item[1])[:25]
    return {"step_wall_ms": wall_ms, "gpu_busy_ms": busy, "ms_by_class": totals,
            "top_kernels_ms": [{"name": name[:120], "ms": ms} for name, ms in top]}


def release(*objects):
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_variant(name, variant, args, device, dtype, batch):
    with torch.device(device):
        model, loss_fn = build(name, args.layers, args.tiny, args.seed, args.hf_experts)
    model = model.to(dtype)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    row = {"model": name if name == "ours" else f"{name}/{args.hf_experts}", "variant": variant, "batch": args.batch, "seq": args.seq, "layers": args.layers,
           "parameter_gib": parameter_bytes / 2**30}
    runner = None
    try:
        runner = Runner(variant, model, loss_fn, batch, args.compile_mode)
        synchronize(device)
        started = time.perf_counter()
        row["first_loss"] = runner.step().float().item()
        synchronize(device)
        first_step_s = time.perf_counter() - started
        # shardgraph.compile's own time, plus the first step where torch.compile works in it.
        uses_torch_compile = variant not in ("eager", "shardgraph")
        row["compile_s"] = (runner.compile_s or 0.0) + (first_step_s if uses_torch_compile else 0.0) if (
            uses_torch_compile or runner.compile_s is not None) else None
        for _ in range(max(args.warmup - 1, 0)):
            runner.step()
        row["host_syncs_per_step"] = count_syncs(runner, device)
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = timed_steps(runner, device, args.steps)
        if device.type == "cuda":
            # A CUDA graph replay allocates nothing: its intermediates live in the graph's private
            # pool, which "allocated" does not show between replays; "reserved" does.
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        ordered = sorted(times)
        row.update(median_ms=statistics.median(times), p10_ms=ordered[int(0.1 * (len(ordered) - 1))],
                   p90_ms=ordered[int(math.ceil(0.9 * (len(ordered) - 1)))])
        row["tokens_per_s"] = args.batch * args.seq / (row["median_ms"] / 1e3)
        if args.profile and variant.startswith("shardgraph"):
            row["profile"] = profile_step(runner, device)
    except torch.cuda.OutOfMemoryError as error:
        row["error"] = f"out of memory: {str(error).splitlines()[0]}"
    except Exception as error:  # a variant that cannot run is reported, the others still run
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:400]
    release(runner, model)
    return row


def check_one_step(name, args, device, dtype, batch) -> dict:
    """From identical weights, one step of eager and of the shardgraph program: loss and weights."""
    results = {}
    for variant in ("eager", "shardgraph"):
        with torch.device(device):
            model, loss_fn = build(name, args.layers, args.tiny, args.seed, args.hf_experts)
        model = model.to(dtype)
        runner = Runner(variant, model, loss_fn, batch, None)
        loss = runner.step()
        results[variant] = (loss.double(), {n: p.detach().double().clone() for n, p in model.named_parameters()})
        release(runner, model)
    (eager_loss, eager_weights), (ours_loss, ours_weights) = results["eager"], results["shardgraph"]

    def relative(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    return {"model": name, "loss_rel_err": relative(ours_loss, eager_loss),
            "weights_max_rel_err": max(relative(ours_weights[n], eager_weights[n]) for n in eager_weights)}


def print_table(rows):
    eager = {r["model"]: r for r in rows if r["variant"] == "eager" and "median_ms" in r}
    compiled = {r["model"]: r for r in rows if r["variant"] == "torch_compile" and "median_ms" in r}
    print(f"{'model':10} {'variant':19} {'ms':>9} {'tok/s':>9} {'x eager':>8} {'x t.c':>7} {'peak GiB':>8} "
          f"{'syncs':>5} {'compile s':>9} {'loss':>9} {'loss vs eager':>13}")
    for row in rows:
        if "median_ms" not in row:
            print(f"{row['model']:10} {row['variant']:19} {row.get('error', 'did not run')}")
            continue
        base, other = eager.get(row["model"]), compiled.get(row["model"])
        row["speedup_vs_eager"] = base["median_ms"] / row["median_ms"] if base else None
        row["speedup_vs_torch_compile"] = other["median_ms"] / row["median_ms"] if other else None
        if base:
            row["first_loss_rel_diff_vs_eager"] = abs(row["first_loss"] - base["first_loss"]) / abs(base["first_loss"])

        def show(value, spec):
            return format(value, spec) if value is not None else "-"

        print(f"{row['model']:10} {row['variant']:19} {row['median_ms']:9.2f} {row['tokens_per_s']:9.0f} "
              f"{show(row['speedup_vs_eager'], '8.2f')} {show(row['speedup_vs_torch_compile'], '7.2f')} "
              f"{show(row.get('peak_gib'), '8.2f')} {show(row.get('host_syncs_per_step'), '5d')} "
              f"{show(row.get('compile_s'), '9.1f')} {row['first_loss']:9.4f} "
              f"{show(row.get('first_loss_rel_diff_vs_eager'), '13.2e')}")
    for row in rows:
        if "profile" in row:
            profile = row["profile"]
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(profile["ms_by_class"].items(), key=lambda kv: -kv[1]))
            print(f"profile {row['model']} {row['variant']}: wall {profile['step_wall_ms']:.1f} ms/step, "
                  f"GPU busy {profile['gpu_busy_ms']:.1f}: {parts}")
            for kernel in profile["top_kernels_ms"][:10]:
                print(f"    {kernel['ms']:8.2f} ms  {kernel['name']}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ours,mixtral,qwen2_moe")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tiny", action="store_true", help="a few hundred thousand parameters per model (CPU tests)")
    parser.add_argument("--hf-experts", default="default", choices=["default", "eager", "grouped_mm", "batched_mm"],
                        help="HF models' expert implementation (default: what transformers picks)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode for the *compile variants")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--check", action="store_true", help="also compare one SGD step of shardgraph with eager")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "train_step.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (with --tiny)")
    dtype = getattr(torch, args.dtype)
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    vocab = (TINY_LAYER if args.tiny else QWEN3_LAYER)["vocab_size"]
    generator = torch.Generator().manual_seed(args.seed)
    batch = (torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device),)

    rows, checks = [], []
    for name in models:
        if args.check:
            checks.append(check_one_step(name, args, device, dtype, batch))
            print(f"check {name}: one SGD step of shardgraph vs eager: loss rel err {checks[-1]['loss_rel_err']:.2e}, "
                  f"weights max rel err {checks[-1]['weights_max_rel_err']:.2e}", flush=True)
        for variant in variants:
            rows.append(run_variant(name, variant, args, device, dtype, batch))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "profile"}), flush=True)
    print_table(rows)
    import triton
    import transformers

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "dtype": args.dtype, "layers": args.layers, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "warmup": args.warmup, "tiny": args.tiny, "hf_experts": args.hf_experts, "rows": rows, "checks": checks,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
