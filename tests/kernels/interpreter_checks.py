"""Run the Triton grouped GEMM kernels under TRITON_INTERPRET=1 and print one JSON line per case.

Started as a subprocess by test_grouped_gemm.py: the interpreter must be chosen before Triton
compiles anything, and the rest of the suite must not run interpreted kernels.
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import grouped_gemm  # noqa: E402
from kernels.reference import grouped_mm_dgrad_loop, grouped_mm_loop, grouped_mm_wgrad_loop  # noqa: E402

CASES = [
    # name, group sizes, K, N
    ("uneven groups, an empty group, M not a multiple of the block", [5, 0, 17, 1, 9], 40, 33),
    ("groups smaller than a tile, odd K and N", [1, 2, 3], 19, 7),
    ("all groups empty but one, trailing rows past the last offset", [0, 0, 11, 0], 24, 20),
    ("one group", [37], 48, 64),
]


def relative(value, reference):
    return ((value.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


# The Hopper kernels (TMA descriptors, persistent grid) run here too, on shapes whose row strides
# meet TMA's rules: 16-byte rows, and a reduction length a multiple of 16 where the weight is not
# stored transposed.
TMA_CASES = [
    ("TMA path: uneven groups, an empty group, trailing rows", [5, 0, 17, 1, 9], 64, 48),
    ("TMA path: groups smaller than a tile, K and N not multiples of the block", [1, 2, 3, 0], 48, 32),
]


def run(dtype, layout, sizes, k, n, seed, path="auto"):
    generator = torch.Generator().manual_seed(seed)
    trailing = 3 if sizes[-1] == 0 or seed % 2 else 0
    m = sum(sizes) + trailing
    experts = len(sizes)
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    x = torch.randn(m, k, generator=generator).to(dtype)
    shape = (experts, k, n) if layout == "ekn" else (experts, n, k)
    w = torch.randn(shape, generator=generator).to(dtype)
    dout = torch.randn(m, n, generator=generator).to(dtype)
    poisoned = torch.full((m, n), float("nan"), dtype=dtype)
    before = dict(grouped_gemm.launch_counts)
    out = grouped_gemm.triton_grouped_mm(x, w, offsets, layout, out=poisoned, path=path)
    reference = grouped_mm_loop(x.double(), w.double(), offsets, layout)
    dx = grouped_gemm.triton_grouped_mm(dout, w, offsets, layout, transpose_weight=True,
                                        out=torch.full((m, k), float("nan"), dtype=dtype), path=path)
    reference_dx = grouped_mm_dgrad_loop(dout.double(), w.double(), offsets, layout)
    dw = grouped_gemm.triton_grouped_mm_wgrad(x, dout, offsets, experts, layout,
                                              out=torch.full(shape, float("nan"), dtype=dtype), path=path)
    reference_dw = grouped_mm_wgrad_loop(x.double(), dout.double(), offsets, experts, layout)
    # Without an output given, each function allocates its own (or takes the one torch's kernel returns).
    same_without_out = bool(
        torch.equal(grouped_gemm.triton_grouped_mm(x, w, offsets, layout, path=path), out)
        and torch.equal(grouped_gemm.triton_grouped_mm_wgrad(x, dout, offsets, experts, layout, path=path), dw))
    return {
        "forward": relative(out, reference), "dgrad": relative(dx, reference_dx), "wgrad": relative(dw, reference_dw),
        "unwritten": int(torch.isnan(out).sum() + torch.isnan(dx).sum() + torch.isnan(dw).sum()),
        "trailing_rows_zero": bool((out[sum(sizes):] == 0).all()) if trailing else True,
        "same_without_out": same_without_out,
        "paths": sorted(key for key, count in grouped_gemm.launch_counts.items() if count > before.get(key, 0)),
    }


def sgd_case(dtype, layout, sizes, k, n, seed, path="auto"):
    """The wgrad with the SGD step as its epilogue against float64: the updated weight, the sum of
    the gradient's squares, and the weights of empty groups left exactly as they were."""
    generator = torch.Generator().manual_seed(seed)
    m = sum(sizes) + 3
    experts = len(sizes)
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    x = torch.randn(m, k, generator=generator).to(dtype)
    dout = torch.randn(m, n, generator=generator).to(dtype)
    shape = (experts, k, n) if layout == "ekn" else (experts, n, k)
    param = torch.randn(shape, generator=generator).to(dtype)
    lr = torch.tensor(0.05, dtype=dtype)
    original = param.clone()
    before = dict(grouped_gemm.launch_counts)
    squares = grouped_gemm.triton_grouped_mm_wgrad_sgd_(param, x, dout, offsets, lr, experts, layout, path=path)
    reference_dw = grouped_mm_wgrad_loop(x.double(), dout.double(), offsets, experts, layout)
    empty = [g for g, size in enumerate(sizes) if size == 0]
    return {
        "weight": relative(param, original.double() - lr.double() * reference_dw),
        "squares": abs(squares.double().item() - reference_dw.pow(2).sum().item()) / reference_dw.pow(2).sum().item(),
        "empty_groups_unchanged": bool(all(torch.equal(param[g], original[g]) for g in empty)),
        "squares_dtype": str(squares.dtype),
        "paths": sorted(key for key, count in grouped_gemm.launch_counts.items() if count > before.get(key, 0)),
    }


def autograd_case():
    calls = {"forward": 0, "wgrad": 0}
    forward, wgrad = grouped_gemm.triton_grouped_mm, grouped_gemm.triton_grouped_mm_wgrad

    def counted_forward(*args, **kwargs):
        calls["forward"] += 1
        return forward(*args, **kwargs)

    def counted_wgrad(*args, **kwargs):
        calls["wgrad"] += 1
        return wgrad(*args, **kwargs)

    grouped_gemm.triton_grouped_mm, grouped_gemm.triton_grouped_mm_wgrad = counted_forward, counted_wgrad
    generator = torch.Generator().manual_seed(9)
    offsets = torch.tensor([3, 3, 8], dtype=torch.int32)
    x = torch.randn(8, 12, generator=generator, requires_grad=True)
    w = torch.randn(3, 10, 12, generator=generator, requires_grad=True)  # enk
    out = kernels.grouped_mm(x, w, offsets, w_layout="enk")
    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    with kernels.use_backend("loop"):
        out_ref = kernels.grouped_mm(x, w, offsets, w_layout="enk")
        rx, rw = torch.autograd.grad(out_ref, (x, w), grad)
    grouped_gemm.triton_grouped_mm, grouped_gemm.triton_grouped_mm_wgrad = forward, wgrad
    return {"backend": kernels.current_backend(), "triton_calls": calls, "forward": relative(out, out_ref.double()),
            "dgrad": relative(gx, rx.double()), "wgrad": relative(gw, rw.double()),
            "interpreted": grouped_gemm.INTERPRETED, "kernel_is_interpreted": type(grouped_gemm._grouped_product_kernel.fn).__name__}


def main():
    results = []
    seed = 0
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("ekn", "enk"):
            for name, sizes, k, n in CASES:
                seed += 1
                row = run(dtype, layout, sizes, k, n, seed)
                row.update(name=name, dtype=str(dtype), layout=layout)
                results.append(row)
    # The Hopper product stores whole tiles through TMA (in column halves here) and each group's
    # partial tile through a row mask; the masked-store variant of the kernel is run too.
    product = grouped_gemm._grouped_product_tma_kernel
    masked = grouped_gemm.product_tma_config(16, 32, 16, 4, 1, tma_store=False)
    for dtype in (torch.bfloat16, torch.float16):
        for layout in ("ekn", "enk"):
            for name, sizes, k, n in TMA_CASES:
                for store, config in (("TMA store", product.configs[0]), ("masked store", masked)):
                    seed += 1
                    with grouped_gemm.use_config(product, config):
                        row = run(dtype, layout, sizes, k, n, seed, path="tma")
                    row.update(name=f"{name} ({store})", dtype=str(dtype), layout=layout)
                    results.append(row)
    # torch's grouped GEMM as the Hopper schedule: its unwritten rows after the last offset and
    # its empty groups' weight gradients are zeroed by the interpreted zeroing kernels.
    for layout in ("ekn", "enk"):
        for name, sizes, k, n in TMA_CASES:
            seed += 1
            with grouped_gemm.use_schedule("torch"):
                row = run(torch.bfloat16, layout, sizes, k, n, seed, path="tma")
            row.update(name=f"{name} (torch schedule)", dtype=str(torch.bfloat16), layout=layout)
            results.append(row)
    # The SGD epilogue on both kernel families (its first call tunes the plain wgrad).
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("ekn", "enk"):
            for name, sizes, k, n in (CASES[0], CASES[2]):
                seed += 1
                row = sgd_case(dtype, layout, sizes, k, n, seed)
                row.update(name=f"sgd: {name}", dtype=str(dtype), layout=layout)
                results.append(row)
    for layout in ("ekn", "enk"):
        name, sizes, k, n = TMA_CASES[0]
        seed += 1
        row = sgd_case(torch.bfloat16, layout, sizes, k, n, seed, path="tma")
        row.update(name=f"sgd: {name}", dtype=str(torch.bfloat16), layout=layout)
        results.append(row)
    results.append({"name": "autograd through the custom op", **autograd_case()})
    for row in results:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
