"""The fused attention op on a GPU against F.scaled_dot_product_attention autograd (float64 reference).

    python benchmarks/attention_check.py          # one GPU; prints one line per case, exits non-zero on a failure
"""

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
import shardgraph.ops  # noqa: E402,F401 - registers the ops


def relative(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def main():
    failures = 0
    for dtype, tolerance in ((torch.bfloat16, 2e-2), (torch.float16, 5e-3), (torch.float32, 1e-5)):
        for heads, kv_heads, causal in ((32, 4, True), (8, 8, False)):
            generator = torch.Generator(device="cuda").manual_seed(0)
            shape = (2, heads, 512, 128)
            query = torch.randn(shape, device="cuda", generator=generator, dtype=dtype)
            key = torch.randn(2, kv_heads, 512, 128, device="cuda", generator=generator, dtype=dtype)
            value = torch.randn(2, kv_heads, 512, 128, device="cuda", generator=generator, dtype=dtype)
            gqa = heads != kv_heads
            inputs64 = [t.double().requires_grad_() for t in (query, key, value)]
            reference = F.scaled_dot_product_attention(*inputs64, is_causal=causal, scale=0.088, enable_gqa=gqa)
            grad_out = torch.randn_like(reference)
            expected = torch.autograd.grad(reference, inputs64, grad_out)
            out = torch.ops.shardgraph.attention(query, key, value, causal, 0.088, gqa)
            grads = torch.ops.shardgraph.attention_backward(grad_out.to(dtype), query, key, value, causal, 0.088, gqa)
            errors = [relative(out, reference.detach())] + [relative(g, e) for g, e in zip(grads, expected)]
            ok = max(errors) < tolerance
            failures += not ok
            print(f"{str(dtype):15} heads {heads:2}/{kv_heads:2} causal {causal!s:5} out {errors[0]:.2e} "
                  f"dq {errors[1]:.2e} dk {errors[2]:.2e} dv {errors[3]:.2e} {'ok' if ok else 'FAIL'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
