"""One GPU: RMSNorm forward + backward as ``shardgraph.rms_norm`` against the forms it replaces.

  op        ``torch.ops.shardgraph.rms_norm`` and its backward: one Triton kernel each way on a
            GPU (``kernels/rms_norm.py``)
  aten      HF transformers' ``RMSNorm.forward`` (float32 statistics, normalised value rounded to
            the input's dtype, then weighted) run eagerly with autograd: what the unfused program
            ran per norm
  compiled  the same module under ``torch.compile``: what inductor makes of it

Shapes are Qwen3-30B-A3B's norms at 8192 tokens: the hidden norms (``[8192, 2048]``) and the
per-head query and key norms (``[8192, 32, 128]``, ``[8192, 4, 128]``). Before timing, each form's
output and gradients are compared with the float64 definition (relative error of each, which is
the input dtype's rounding). Times are medians of CUDA-event timings of forward + backward; the
bandwidth column counts the bytes one fused pass must move (forward: read x and the weight, write
the output; backward: read the gradient, x and the weight, write the input's gradient).

    python benchmarks/rms_norm.py                       # bfloat16 on the GPU
    python benchmarks/rms_norm.py --device cpu --tiny   # the same code on a CPU (op runs its aten form)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import shardgraph.ops  # noqa: E402,F401 - registers torch.ops.shardgraph.rms_norm

SHAPES = {"hidden": (8192, 2048), "query_heads": (8192, 32, 128), "key_heads": (8192, 4, 128)}
TINY = {"hidden": (64, 48), "heads": (16, 4, 32)}
EPS = 1e-6


class HFRMSNorm(nn.Module):
    """HF transformers' RMSNorm forward (``Qwen3MoeRMSNorm``), the module the op replaces."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.variance_epsilon = EPS

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tiny", action="store_true", help="small shapes (a CPU run)")
    parser.add_argument("--steps", type=int, default=50, help="timed forward + backward passes per form")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "rms_norm.json"))
    return parser.parse_args(argv)


def _op_forward_backward(x, weight, grad):
    out, rstd = torch.ops.shardgraph.rms_norm(x, weight, EPS, True)
    grad_x, grad_weight = torch.ops.shardgraph.rms_norm_backward(grad, x, weight, rstd, True)
    return out, grad_x, grad_weight


def _module_forward_backward(module):
    def run(x, weight, grad):
        leaf = x.detach().requires_grad_(True)
        out = module(leaf)
        grad_x, grad_weight = torch.autograd.grad(out, (leaf, module.weight), grad)
        return out, grad_x, grad_weight
    return run


def _errors(result, expected) -> dict:
    names = ("out", "grad_x", "grad_weight")
    return {name: float((got.detach().double() - want.detach()).norm() / want.detach().norm().clamp_min(1e-30))
            for name, got, want in zip(names, result, expected)}


def _timed(run, operands, device, steps) -> float:
    for _ in range(3):
        run(*operands)
    if device.type != "cuda":
        import time

        times = []
        for _ in range(steps):
            started = time.perf_counter()
            run(*operands)
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(*operands)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_shape(name, shape, dtype, device, steps) -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    weight = (torch.randn(shape[-1], generator=generator) * 0.1 + 1).to(device=device, dtype=dtype)
    grad = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    reference = _module_forward_backward(HFRMSNorm(weight.double()))(x.double(), weight.double(), grad.double())
    forms = {"op": _op_forward_backward, "aten": _module_forward_backward(HFRMSNorm(weight))}
    if device.type == "cuda":
        forms["compiled"] = _module_forward_backward(torch.compile(HFRMSNorm(weight), dynamic=False))
    row = {"shape": name, "dims": list(shape), "dtype": str(dtype).removeprefix("torch.")}
    for form, run in forms.items():
        row[f"{form}_errors"] = _errors(run(x, weight, grad), reference)
        row[f"{form}_ms"] = _timed(run, (x, weight, grad), device, steps)
    element = x.element_size()
    moved = x.numel() * element * 5 + weight.numel() * element * 3
    row["op_gb_per_s"] = moved / (row["op_ms"] * 1e-3) / 1e9
    for form in forms:
        if form != "op":
            row[f"op_speedup_vs_{form}"] = row[f"{form}_ms"] / row["op_ms"]
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (with --tiny)")
    dtype = getattr(torch, args.dtype)
    rows = [run_shape(name, shape, dtype, device, args.steps)
            for name, shape in (TINY if args.tiny else SHAPES).items()]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": args.dtype, "rows": rows}
    columns = [c for c in ("op", "aten", "compiled") if f"{c}_ms" in rows[0]]
    print(f"{'shape':<14}" + "".join(f"{c + ' ms':>13}" for c in columns) + f"{'op GB/s':>10}"
          + "".join(f"{'x ' + c:>11}" for c in columns if c != "op") + "   max rel. error (op, aten)")
    for row in rows:
        errors = [max(row[f"{c}_errors"].values()) for c in ("op", "aten")]
        print(f"{row['shape']:<14}" + "".join(f"{row[c + '_ms']:>13.4f}" for c in columns)
              + f"{row['op_gb_per_s']:>10.0f}"
              + "".join(f"{row['op_speedup_vs_' + c]:>11.2f}" for c in columns if c != "op")
              + f"   {errors[0]:.2e}, {errors[1]:.2e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
