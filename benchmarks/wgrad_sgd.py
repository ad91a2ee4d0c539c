"""One GPU: the grouped wgrad with the SGD step in its epilogue against the wgrad followed by the
step, at MoE expert shapes.

For each shape (experts, tokens per expert, K, N; bf16 by default) and weight layout:

  fused      ``torch.ops.shardgraph.grouped_mm_wgrad_sgd_(W, x, dout, offsets, lr, E, layout, [])``: the
             weight updated in place tile by tile, the sum of the gradient's squares returned
  unfused    ``grouped_mm_wgrad`` (our kernel or torch's, whichever its timed schedule picked),
             then the step as the unfused program runs it: ``W.copy_(W - dW * lr)`` and
             ``sum(dW ** 2)``, each as one kernel under ``torch.compile``
  wgrad      ``grouped_mm_wgrad`` alone: what the fused kernel adds to it is the weight read and
             written

Before timing, both steps are run once from the same weight and compared with the float64
definition ``W - lr * dW``: the error of the new weight relative to the step's size
(``fused_step_error``, ``unfused_step_error``; rounding the weight itself to its dtype is part of
both), and the sums of squares (``squares_rel_diff``). The fused step must be as exact as the
unfused one (within 1.5x, or 1e-6) and, against the unfused step run as eager aten ops on our own
wgrad kernel (the same tile sums, every op's result rounded to the weight's dtype, as the kernel
rounds), bitwise equal (``equal_to_triton_unfused``). The compiled unfused step is not that
reference: inductor keeps ``dW * lr`` in float32 inside its one kernel, one rounding fewer. Times
are medians of CUDA-event timings, each step restoring the weight first (the copy is timed apart and subtracted).

    python benchmarks/wgrad_sgd.py                      # Qwen3-30B-A3B's and Mixtral-like shapes
    python benchmarks/wgrad_sgd.py --device cpu --tiny  # the same code path on a CPU (loop backend)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kernels  # noqa: E402
from benchmarks.fused_loss import measure  # noqa: E402
from kernels import grouped_gemm  # noqa: E402

# name: (experts, rows per expert, K = hidden, N = the projection's output width)
SHAPES = {
    "qwen3_gate_up": (128, 512, 2048, 1536),
    "qwen3_down": (128, 512, 768, 2048),
    "mixtral_like_gate_up": (8, 4096, 4096, 28672),
}
TINY = {"tiny_gate_up": (4, 24, 32, 48), "tiny_down": (4, 24, 24, 32)}
OPS = torch.ops.shardgraph


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tiny", action="store_true", help="small shapes (a CPU run)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "wgrad_sgd.json"))
    return parser.parse_args(argv)


def timed(fn, steps: int, device) -> float:
    """Median ms of ``fn()`` over ``steps`` runs after two warm-up runs."""
    return measure(fn, device, steps, 2)["median_ms"]


def run_shape(name, shape, layout, dtype, device, steps) -> dict:
    experts, rows, k, n = shape
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(experts * rows, k, generator=generator).to(device, dtype)
    dout = torch.randn(experts * rows, n, generator=generator).to(device, dtype)
    offsets = torch.arange(1, experts + 1, dtype=torch.int32, device=device) * rows
    weight_shape = (experts, k, n) if layout == "ekn" else (experts, n, k)
    original = (torch.randn(weight_shape, generator=generator) * 0.02).to(device, dtype)
    lr = torch.tensor(1e-3, dtype=torch.float64).to(device, dtype)

    def unfused_update(weight, grad):
        weight.copy_(weight - grad * lr)
        return torch.sum(torch.pow(grad, 2)).float()

    update = torch.compile(unfused_update, dynamic=False) if device.type == "cuda" else unfused_update

    def unfused(weight):
        return update(weight, OPS.grouped_mm_wgrad(x, dout, offsets, experts, layout))

    def fused(weight):
        return OPS.grouped_mm_wgrad_sgd_(weight, x, dout, offsets, lr, experts, layout, [])

    a, b, c = original.clone(), original.clone(), original.clone()
    squares_a, squares_b = fused(a), unfused(b)
    with grouped_gemm.use_schedule("triton"):
        unfused_update(c, OPS.grouped_mm_wgrad(x, dout, offsets, experts, layout))
    with kernels.use_backend("loop"):
        exact = OPS.grouped_mm_wgrad(x.double(), dout.double(), offsets, experts, layout)
    wanted_step = lr.double() * exact
    wanted = original.double() - wanted_step
    scale = wanted_step.norm().item()
    fused_error = (a.double() - wanted).norm().item() / scale
    unfused_error = (b.double() - wanted).norm().item() / scale
    squares_rel = abs(squares_a.item() - exact.pow(2).sum().item()) / exact.pow(2).sum().item()
    weight = original.clone()
    restore_ms = timed(lambda: weight.copy_(original), steps, device)
    row = {"shape": name, "experts": experts, "rows_per_expert": rows, "k": k, "n": n, "layout": layout,
           "fused_step_error": fused_error, "unfused_step_error": unfused_error, "squares_rel_diff": squares_rel,
           "unfused_squares_rel_diff": abs(squares_b.item() - exact.pow(2).sum().item()) / exact.pow(2).sum().item(),
           "equal_to_triton_unfused": bool(torch.equal(a, c)),
           "agree": fused_error <= max(1.5 * unfused_error, 1e-6) and squares_rel < 1e-3,
           "wgrad_ms": timed(lambda: OPS.grouped_mm_wgrad(x, dout, offsets, experts, layout), steps, device),
           "unfused_ms": timed(lambda: (weight.copy_(original), unfused(weight)), steps, device) - restore_ms,
           "fused_ms": timed(lambda: (weight.copy_(original), fused(weight)), steps, device) - restore_ms}
    row["unfused_over_fused"] = row["unfused_ms"] / row["fused_ms"]
    row["fused_over_wgrad"] = row["fused_ms"] / row["wgrad_ms"]
    return row


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    started = time.perf_counter()
    for name, shape in (TINY if args.tiny else SHAPES).items():
        for layout in ("enk", "ekn"):
            row = run_shape(name, shape, layout, dtype, device, args.steps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"{'shape':22} {'layout':6} {'wgrad ms':>9} {'unfused ms':>10} {'fused ms':>9} {'unfused/fused':>13} "
          f"{'fused/wgrad':>11} {'step err fused':>14} {'unfused':>8} {'= triton':>8} agree")
    for row in rows:
        print(f"{row['shape']:22} {row['layout']:6} {row['wgrad_ms']:9.3f} {row['unfused_ms']:10.3f} "
              f"{row['fused_ms']:9.3f} {row['unfused_over_fused']:13.3f} {row['fused_over_wgrad']:11.3f} "
              f"{row['fused_step_error']:14.2e} {row['unfused_step_error']:8.2e} {str(row['equal_to_triton_unfused']):>8} "
              f"{row['agree']}")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"device": name, "torch": torch.__version__, "dtype": args.dtype, "steps": args.steps,
                   "grouped_mm_backend": kernels.current_backend(), "rows": rows,
                   "wall_s": time.perf_counter() - started}, handle, indent=1)
    print(f"\nwrote {args.out}")
    return 0 if all(row["agree"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
