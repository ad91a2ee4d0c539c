"""The attention op's GPU kernels against float64 math attention, and their times.

    python benchmarks/attention_check.py            # one GPU; one line per case, exits non-zero on a failure
    python benchmarks/attention_check.py --time     # also times the Qwen3-30B-A3B layer's attention

Prints the torch and cuDNN versions and the schemas of the aten ops the op calls, then, for
bf16 / fp16 / fp32, grouped and equal heads, causal and not, even and odd sequence lengths:

* every plan the op may run (``cudnn``, ``flash``, ``math``, each with grouped key/value heads as
  they are where the kernel takes them and widened; forced one at a time), its output and
  log-sum-exp against float64, and its backward fed the log-sum-exp of every forward plan (the
  saved log-sum-exp is the formula's, whichever kernel made it);
* the op end to end (``shardgraph.attention`` + its autograd backward), naming the kernel it picks.

``--time`` times, at batch 2, 32 query / 4 key-value heads, seq 4096, head_dim 128, causal,
bf16: each plan's forward and backward (a widened plan's copies and group sums apart), the op's
forward + backward, and the previous
backward (key/value widened, flash forward run again for the log-sum-exp, flash backward).
"""

import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import shardgraph.ops  # noqa: E402,F401 - registers the ops
from benchmarks.cuda_timing import milliseconds  # noqa: E402

attention = importlib.import_module("shardgraph.ops.attention")
aten = torch.ops.aten
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}
USED_OPS = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
            "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
            "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")


def relative(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def reference(query, key, value, is_causal, scale, grad_out):
    """float64 out, log-sum-exp and gradients of the written-out formulas."""
    inputs = [t.double().requires_grad_() for t in (query, key, value)]
    groups = query.shape[1] // key.shape[1]
    k, v = inputs[1].repeat_interleave(groups, 1), inputs[2].repeat_interleave(groups, 1)
    scores = (inputs[0] @ k.transpose(-2, -1)) * scale
    if is_causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1),
                                    float("-inf"))
    out = scores.softmax(-1) @ v
    grads = torch.autograd.grad(out, inputs, grad_out.double())
    return out.detach(), scores.logsumexp(-1).detach(), grads


def check(dtype, heads, kv_heads, seq, is_causal) -> int:
    generator = torch.Generator(device="cuda").manual_seed(0)
    make = lambda h: torch.randn(2, h, seq, 128, device="cuda", generator=generator, dtype=dtype)  # noqa: E731
    query, key, value = make(heads), make(kv_heads), make(kv_heads)
    grad_out = torch.randn(2, heads, seq, 128, device="cuda", generator=generator, dtype=dtype)
    scale, groups, tolerance = 0.088, heads // kv_heads, TOLERANCE[dtype]
    expected_out, expected_logsumexp, expected_grads = reference(query, key, value, is_causal, scale, grad_out)
    # Every plan the op may run: each kernel with grouped key/value heads as they are (where it
    # takes them) and widened.
    plans = {plan_label(kernel, widened, groups): (kernel, plan_key, plan_value, widened)
             for kernel, plan_key, plan_value, widened in attention._plans(query, key, value, is_causal, groups)}
    failures = 0
    case = f"{str(dtype):14} heads {heads:2}/{kv_heads:2} seq {seq:4} causal {is_causal!s:5}"
    forwards = {}
    for label, (kernel, plan_key, plan_value, _) in plans.items():
        run = attention._math_forward if kernel == "math" else attention._FUSED_FORWARD[kernel]
        out, logsumexp = run(query, plan_key, plan_value, is_causal, scale)
        forwards[label] = (attention._sequence_major(out), logsumexp)
        errors = (relative(out, expected_out), relative(logsumexp, expected_logsumexp))
        ok = errors[0] < tolerance and errors[1] < 1e-4 and logsumexp.shape == expected_logsumexp.shape
        failures += not ok
        print(f"{case} forward  {label:15} out {errors[0]:.2e} logsumexp {errors[1]:.2e} {'ok' if ok else 'FAIL'}")
    for label, (kernel, plan_key, plan_value, widened) in plans.items():
        run = attention._math_backward if kernel == "math" else attention._FUSED_BACKWARD[kernel]
        for made_by, (out, logsumexp) in forwards.items():
            grads = run(grad_out, query, plan_key, plan_value, out, logsumexp, is_causal, scale)
            if widened:
                grads = (grads[0], attention._sum_groups(grads[1], groups), attention._sum_groups(grads[2], groups))
            errors = [relative(g, e) for g, e in zip(grads, expected_grads)]
            shapes = all(g.shape == e.shape and g.dtype == dtype for g, e in zip(grads, expected_grads))
            ok = max(errors) < tolerance and shapes
            failures += not ok
            print(f"{case} backward {label:15} (logsumexp of {made_by:15}) dq {errors[0]:.2e} dk {errors[1]:.2e} "
                  f"dv {errors[2]:.2e} {'ok' if ok else 'FAIL'}")
    inputs = [t.detach().requires_grad_() for t in (query, key, value)]
    out, _ = torch.ops.shardgraph.attention(*inputs, is_causal, scale, groups > 1)
    grads = torch.autograd.grad(out, inputs, grad_out)
    errors = [relative(out, expected_out)] + [relative(g, e) for g, e in zip(grads, expected_grads)]
    ok = max(errors) < tolerance
    failures += not ok
    print(f"{case} op       {next(iter(plans)):15} out {errors[0]:.2e} dq {errors[1]:.2e} dk {errors[2]:.2e} "
          f"dv {errors[3]:.2e} {'ok' if ok else 'FAIL'}")
    return failures


def plan_label(kernel: str, widened: bool, groups: int) -> str:
    return kernel if widened or groups == 1 else f"{kernel} grouped"


def timings() -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    make = lambda h: torch.randn(2, 4096, h, 128, device="cuda", generator=generator,  # noqa: E731
                                 dtype=torch.bfloat16).transpose(1, 2)  # sequence-major, as the projections make
    query, key, value, grad_out = make(32), make(4), make(4), make(32)
    scale, groups = 128 ** -0.5, 8
    plans = {plan_label(kernel, widened, groups): (kernel, plan_key, plan_value, widened)
             for kernel, plan_key, plan_value, widened in attention._plans(query, key, value, True, groups)
             if kernel != "math"}
    print(f"timing batch 2, heads 32/4, seq 4096, head_dim 128, causal, bf16; plans {list(plans)}")
    forward_ms = {}
    for label, (kernel, plan_key, plan_value, widened) in plans.items():
        out, logsumexp = attention._FUSED_FORWARD[kernel](query, plan_key, plan_value, True, scale)
        forward = forward_ms[label] = milliseconds(
            lambda: attention._FUSED_FORWARD[kernel](query, plan_key, plan_value, True, scale))
        backward = milliseconds(lambda: attention._FUSED_BACKWARD[kernel](grad_out, query, plan_key, plan_value, out,
                                                                         logsumexp, True, scale))
        # A widened plan also pays for the widening copies (forward and backward) and the group sums.
        extra = milliseconds(lambda: (attention._widen(key, groups), attention._widen(value, groups))) if widened \
            else 0.0
        sums = 0.0
        if widened:
            sums = milliseconds(lambda: (attention._sum_groups(plan_key, groups),
                                         attention._sum_groups(plan_value, groups)))
        print(f"  {label:15} kernel forward {forward:6.2f} ms  backward {backward:6.2f} ms  widening copies "
              f"{extra:5.2f} ms (x2)  group sums {sums:5.2f} ms")
    op_forward = milliseconds(lambda: torch.ops.shardgraph.attention(query, key, value, True, scale, True))
    out, logsumexp = torch.ops.shardgraph.attention(query, key, value, True, scale, True)
    op_backward = milliseconds(lambda: torch.ops.shardgraph.attention_backward(grad_out, query, key, value, out,
                                                                               logsumexp, True, scale, True))
    print(f"  op (kernel {attention.attention_kernel(query, key, value, True, True)}): forward {op_forward:.2f} ms, "
          f"backward {op_backward:.2f} ms, together {op_forward + op_backward:.2f} ms")
    if "flash" in plans:
        def previous_backward():
            k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
            result = aten._scaled_dot_product_flash_attention(query, k, v, 0.0, True, False, scale=scale)
            grads = aten._scaled_dot_product_flash_attention_backward(
                grad_out, query, k, v, result[0], result[1], result[2], result[3], result[4], result[5], 0.0, True,
                result[6], result[7], scale=scale)
            return grads[0], attention._sum_groups(grads[1], groups), attention._sum_groups(grads[2], groups)

        previous = milliseconds(previous_backward)
        print(f"  previous backward (flash forward again + flash backward): {previous:.2f} ms; with the flash "
              f"forward {forward_ms['flash'] + previous:.2f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time", action="store_true", help="also time the Qwen3-30B-A3B layer's attention")
    args = parser.parse_args()
    properties = torch.cuda.get_device_properties(0)
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {properties.name} "
          f"sm{properties.major}{properties.minor}; cudnn_sdp_enabled {torch.backends.cuda.cudnn_sdp_enabled()}")
    for name in USED_OPS:
        print(f"  {getattr(aten, name).default._schema}")
    print(f"  meta: cudnn forward extras {attention._forward_extras('cudnn')}, "
          f"flash forward extras {attention._forward_extras('flash')}")
    failures = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for heads, kv_heads, seq, is_causal in ((32, 4, 512, True), (8, 8, 512, False), (8, 2, 333, True),
                                                (8, 8, 1000, False), (4, 4, 77, True)):
            failures += check(dtype, heads, kv_heads, seq, is_causal)
    if args.time:
        timings()
    print(f"{failures} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
