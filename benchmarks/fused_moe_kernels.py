"""The fused MoE expert kernels against the unfused steps they replace, one GPU.

For one MoE layer's local expert work (Qwen3-30B-A3B by default: E=128, top-8, H=2048, I=768,
8192 tokens, balanced routing), times with ``triton.testing.do_bench`` (L2 flushed between runs):

  forward    gather_glu_grouped_mm            against  index_select + grouped_mm + glu
  dgrad      glu_grouped_mm_dgrad             against  grouped_mm_dgrad + glu_backward
  wgrad      gather_grouped_mm_wgrad          against  index_select + grouped_mm_wgrad
  products   the plain grouped_mm / dgrad / wgrad alone (what the fused kernels compete with)

and first checks each fused output against float64 products of the same bf16 operands (relative
Frobenius error; bf16 outputs: < 1e-2). Writes JSON (``--out``) and prints one line per figure.

    python benchmarks/fused_moe_kernels.py
    python benchmarks/fused_moe_kernels.py --tokens 32768 --routing skewed
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import fused_moe  # noqa: E402
from kernels.grouped_gemm import CACHES, launch_counts  # noqa: E402


def relative(value, reference):
    return ((value.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def problem(experts, top_k, hidden, inner, tokens, routing, device, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if routing == "balanced":
        ids = torch.arange(tokens * top_k).reshape(tokens, top_k) % experts
    else:
        preference = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64)
        ids = torch.multinomial(preference.expand(tokens, experts), top_k, replacement=False, generator=generator)
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=experts)
    offsets = torch.cumsum(counts, 0).to(torch.int32)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=generator) * scale).to(dtype).to(device)

    return dict(x=randn(tokens, hidden), index=(order // top_k).to(device), offsets=offsets.to(device),
                w_gate_up=randn(experts, 2 * inner, hidden, scale=hidden ** -0.5),
                w_down=randn(experts, hidden, inner, scale=inner ** -0.5),
                d_down=randn(tokens * top_k, hidden), counts=counts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inner", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--routing", default="balanced", choices=["balanced", "skewed"])
    parser.add_argument("--activation", default="silu", choices=list(fused_moe.FUSED_ACTIVATIONS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from triton.testing import do_bench

    device, dtype = torch.device("cuda"), torch.bfloat16
    p = problem(args.experts, args.top_k, args.hidden, args.inner, args.tokens, args.routing, device, dtype)
    x, index, offsets, w1, w2, d_down = (p[k] for k in ("x", "index", "offsets", "w_gate_up", "w_down", "d_down"))
    e, act = args.experts, args.activation

    def glu(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return fused_moe._act(act, gate) * up

    # Correctness, against float64 products of the same operands.
    h, gate_up = fused_moe.gather_glu_grouped_mm(x, index, w1, offsets, act, False, "enk")
    reference_gate_up = kernels.grouped_mm(x.double().index_select(0, index).cpu(), w1.double().cpu(),
                                           offsets.cpu(), w_layout="enk")
    d_gate_up = fused_moe.glu_grouped_mm_dgrad(d_down, w2, offsets, gate_up, act, False, "enk")
    reference_d_gate_up = fused_moe.composed_glu_dgrad(d_down.double().cpu(), w2.double().cpu(), offsets.cpu(),
                                                       gate_up.double().cpu(), act, False, "enk")
    d_w1 = fused_moe.gather_grouped_mm_wgrad(x, index, d_gate_up, offsets, e, "enk")
    reference_d_w1 = kernels.grouped_mm_wgrad(x.double().index_select(0, index).cpu(), d_gate_up.double().cpu(),
                                              offsets.cpu(), e, w_layout="enk")
    errors = {"gate_up": relative(gate_up.cpu(), reference_gate_up),
              "h": relative(h.cpu(), glu(reference_gate_up)),
              "d_gate_up": relative(d_gate_up.cpu(), reference_d_gate_up),
              "d_w_gate_up": relative(d_w1.cpu(), reference_d_w1)}
    print(json.dumps({"errors": errors}), flush=True)

    def unfused_forward():
        gate_up = kernels.grouped_mm(x.index_select(0, index), w1, offsets, w_layout="enk")
        return glu(gate_up), gate_up

    def unfused_dgrad():
        dh = kernels.grouped_mm_dgrad(d_down, w2, offsets, w_layout="enk")
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.cat([dh * up * fused_moe._act_derivative(act, gate), dh * fused_moe._act(act, gate)], dim=-1)

    grouped = x.index_select(0, index)
    cases = {
        "forward_fused": lambda: fused_moe.gather_glu_grouped_mm(x, index, w1, offsets, act, False, "enk"),
        "forward_unfused": unfused_forward,
        "gate_up_product_alone": lambda: kernels.grouped_mm(grouped, w1, offsets, w_layout="enk"),
        "dgrad_fused": lambda: fused_moe.glu_grouped_mm_dgrad(d_down, w2, offsets, gate_up, act, False, "enk"),
        "dgrad_unfused": unfused_dgrad,
        "down_dgrad_alone": lambda: kernels.grouped_mm_dgrad(d_down, w2, offsets, w_layout="enk"),
        "wgrad_fused": lambda: fused_moe.gather_grouped_mm_wgrad(x, index, d_gate_up, offsets, e, "enk"),
        "wgrad_unfused": lambda: kernels.grouped_mm_wgrad(x.index_select(0, index), d_gate_up, offsets, e,
                                                          w_layout="enk"),
        "gate_up_wgrad_alone": lambda: kernels.grouped_mm_wgrad(grouped, d_gate_up, offsets, e, w_layout="enk"),
    }
    times = {}
    for name, fn in cases.items():
        fn()
        torch.cuda.synchronize()
        times[name] = do_bench(fn, warmup=5, rep=50)
        print(json.dumps({"case": name, "ms": times[name]}), flush=True)
    for (kernel, key), config in CACHES.tuned.items():
        print(kernel.fn.__name__, key, config, flush=True)
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "args": vars(args), "errors": errors, "ms": times,
              "launch_counts": dict(launch_counts),
              "configs": {f"{kernel.fn.__name__} {key}": str(config) for (kernel, key), config in CACHES.tuned.items()},
              "tokens_per_expert": {"min": int(p["counts"].min()), "max": int(p["counts"].max())}}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
