"""The rotary kernels against the aten form, bit for bit: under the CPU interpreter (from
``tests/kernels/test_rotary.py``, small shapes) or on a GPU (``--device cuda``, also the training
shapes of Qwen3-30B-A3B's ``q`` and ``k`` with the time of each form). One JSON row per case."""

import json
import os
import sys

# Run as a script: the repository root on the path, for ``kernels`` and ``tests``.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from kernels import rotary  # noqa: E402
from benchmarks.cuda_timing import milliseconds  # noqa: E402
from tests.kernels import write_rows_where_asked  # noqa: E402

DEVICE = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
SMALL = [((2, 3, 5, 8), (2, 1, 5, 8), True), ((4, 16), (4, 16), False), ((2, 4, 3, 2, 6), (1, 1, 3, 1, 6), False)]
LARGE = [((2, 32, 4096, 128), (2, 1, 4096, 128), True), ((2, 4, 4096, 128), (2, 1, 4096, 128), True)]


def operands(shape, table, transposed, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if transposed:  # attention's q: [batch, heads, seq, dim] as a view of [batch, seq, heads, dim]
        stored = (shape[0], shape[2], shape[1], *shape[3:])
        x = torch.randn(stored, generator=generator).to(dtype).to(DEVICE).transpose(1, 2)
    else:
        x = torch.randn(shape, generator=generator).to(dtype).to(DEVICE)
    angles = torch.rand(table, generator=generator) * 6.3
    grad = torch.randn(shape, generator=generator).to(dtype).to(DEVICE)
    return x, angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE), grad


def main():
    rows = []
    cases = SMALL + (LARGE if DEVICE == "cuda" else [])
    for shape, table, transposed in cases:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x, cos, sin, grad = operands(shape, table, transposed, dtype)
            assert rotary.runs(x, cos, sin), (shape, dtype)
            layout = rotary.layout_of(x)  # as the frontend gives the op: x's own, transposed or not
            out, want = rotary.forward(x, cos, sin, layout), rotary.reference_forward(x, cos, sin)
            grad_x, want_grad = rotary.backward(grad, cos, sin, layout), rotary.reference_backward(grad, cos, sin)
            row = {"shape": list(shape), "table": list(table), "transposed": transposed, "dtype": str(dtype),
                   "layout_kept": out.stride() == x.stride() and grad_x.stride() == x.stride(),
                   "forward_equal": bool(torch.equal(out, want)), "backward_equal": bool(torch.equal(grad_x, want_grad)),
                   "forward_max_diff": float((out.float() - want.float()).abs().max()),
                   "backward_max_diff": float((grad_x.float() - want_grad.float()).abs().max())}
            if DEVICE == "cuda" and shape in [case[0] for case in LARGE]:
                row.update(kernel_forward_ms=milliseconds(lambda: rotary.forward(x, cos, sin, layout)),
                           aten_forward_ms=milliseconds(lambda: rotary.reference_forward(x, cos, sin)),
                           kernel_backward_ms=milliseconds(lambda: rotary.backward(grad, cos, sin, layout)),
                           aten_backward_ms=milliseconds(lambda: rotary.reference_backward(grad, cos, sin)))
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_rows_where_asked(rows, DEVICE)


if __name__ == "__main__":
    main()
