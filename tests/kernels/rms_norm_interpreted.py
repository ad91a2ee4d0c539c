"""Run the RMSNorm kernels under TRITON_INTERPRET=1 against the aten form and print one JSON line per case.

Started as a subprocess by test_rms_norm.py (the interpreter must be chosen before Triton compiles
anything, and the rest of the suite must not run interpreted kernels). ``--device cuda`` runs the
same cases compiled on a GPU, and Qwen3-30B-A3B's sizes besides (8192 tokens of 2048 features, and
32 heads of 128 per token).

Each case reports, against ``reference_forward`` / ``reference_backward`` on the same operands:
the largest distance in units of the last place of each result's dtype (of the input's dtype for a
float32 output of a 16-bit input, where the input's rounding is the one that can differ), the
share of elements that differ at all, and the relative error (Frobenius) of the kernels and of the
aten form against the formula in float64 without roundings, on the same operands.
"""

import json
import os
import sys

DEVICE = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from benchmarks.cuda_timing import milliseconds  # noqa: E402
from kernels import rms_norm  # noqa: E402
from tests.kernels import write_rows_where_asked  # noqa: E402

EPS = 1e-6
ROWS = []  # every line printed, for --out


def ordered(tensor):
    """The float bits as integers in the order of the values, +0 and -0 both 0."""
    bits = {2: torch.int16, 4: torch.int32}[tensor.element_size()]
    value = tensor.contiguous().view(bits).long()
    magnitude = value & ((1 << (8 * tensor.element_size() - 1)) - 1)
    return torch.where(value < 0, -magnitude, magnitude)


def ulps(value, reference, dtype):
    return int((ordered(value.to(dtype)) - ordered(reference.to(dtype))).abs().max())


def relative(value, reference):
    return ((value.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30)).item()


def float64_norm(x, weight, grad_out):
    """``(out, rstd, grad_x, grad_weight)`` in float64 throughout, no rounding between (the reference
    functions keep HF's float32 statistics even for float64)."""
    x, weight = x.double().requires_grad_(True), weight.double().requires_grad_(True)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + EPS)
    out = weight * (x * rstd[..., None])
    grad_x, grad_weight = torch.autograd.grad(out, (x, weight), grad_out.double())
    return out.detach(), rstd.detach(), grad_x, grad_weight


def case(shape, dtype, weight_dtype, seed, layout="contiguous"):
    generator = torch.Generator().manual_seed(seed)
    width = shape[-1]
    if layout == "transposed":
        # Rows no single stride reaches: the kernels take a copy.
        x = torch.randn(shape[1], shape[0], *shape[2:], generator=generator).to(DEVICE, dtype).transpose(0, 1)
    elif layout == "sliced":
        # A row stride wider than the row: a view.
        x = torch.randn(*shape[:-1], width + 8, generator=generator).to(DEVICE, dtype)[..., :width]
    else:
        x = (torch.randn(shape, generator=generator) * 3).to(DEVICE, dtype)
    weight = (1 + 0.5 * torch.randn(width, generator=generator)).to(DEVICE, weight_dtype)
    output_dtype = torch.promote_types(dtype, weight_dtype)
    grad_out = torch.randn(shape, generator=generator).to(DEVICE, output_dtype)
    if layout == "transposed":
        # An expanded gradient (a sum's backward): stride 0 everywhere.
        grad_out = torch.ones((), dtype=output_dtype, device=DEVICE).expand(shape)
    assert rms_norm.runs(x, weight)
    out, rstd = rms_norm.forward(x, weight, EPS)
    grad_x, grad_weight = rms_norm.backward(grad_out, x, weight, rstd)
    want_out, want_rstd = rms_norm.reference_forward(x, weight, EPS)
    want_grad_x, want_grad_weight = rms_norm.reference_backward(grad_out, x, weight, want_rstd)
    exact_out, exact_rstd, exact_grad_x, exact_grad_weight = float64_norm(x, weight, grad_out)
    got = {"out": out, "rstd": rstd, "grad_x": grad_x, "grad_weight": grad_weight}
    want = {"out": want_out, "rstd": want_rstd, "grad_x": want_grad_x, "grad_weight": want_grad_weight}
    exact = {"out": exact_out, "rstd": exact_rstd, "grad_x": exact_grad_x, "grad_weight": exact_grad_weight}
    unit = {"out": dtype if output_dtype == torch.float32 and dtype != torch.float32 else output_dtype,
            "rstd": torch.float32, "grad_x": dtype, "grad_weight": weight_dtype}
    emit = {
        "device": DEVICE, "shape": list(shape), "dtype": str(dtype), "weight_dtype": str(weight_dtype),
        "layout": layout,
        "shapes_ok": all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in got),
        "ulps": {k: ulps(got[k], want[k], unit[k]) for k in got},
        "differing": {k: (got[k] != want[k]).double().mean().item() for k in got},
        "error": {k: relative(got[k], exact[k]) for k in got},
        "aten_error": {k: relative(want[k], exact[k]) for k in got},
    }
    ROWS.append(emit)
    print(json.dumps(emit), flush=True)


def timing(shape, dtype):
    """Milliseconds of each direction, the kernels against the aten form (eager)."""
    x = torch.randn(shape, device=DEVICE).to(dtype)
    weight = torch.randn(shape[-1], device=DEVICE).to(dtype)
    grad_out = torch.randn(shape, device=DEVICE).to(dtype)
    _, rstd = rms_norm.forward(x, weight, EPS)
    ROWS.append({
        "timing": list(shape), "dtype": str(dtype),
        "forward_ms": milliseconds(lambda: rms_norm.forward(x, weight, EPS)),
        "aten_forward_ms": milliseconds(lambda: rms_norm.reference_forward(x, weight, EPS)),
        "backward_ms": milliseconds(lambda: rms_norm.backward(grad_out, x, weight, rstd)),
        "aten_backward_ms": milliseconds(lambda: rms_norm.reference_backward(grad_out, x, weight, rstd)),
    })
    print(json.dumps(ROWS[-1]), flush=True)


def main():
    for dtype, weight_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                (torch.bfloat16, torch.float32)):
        case((3, 5, 24), dtype, weight_dtype, 1)  # a width not a power of two, rows not a multiple of the tile
        case((7, 128), dtype, weight_dtype, 2)
        case((2, 1, 40), dtype, weight_dtype, 3)
    case((150, 1000), torch.bfloat16, torch.bfloat16, 4)  # more row tiles than programs on the CPU
    case((5, 3, 24), torch.float32, torch.float32, 5, "transposed")
    case((4, 6, 20), torch.bfloat16, torch.bfloat16, 6, "sliced")
    case((7,), torch.float16, torch.float16, 7)
    if DEVICE != "cpu":
        case((8192, 2048), torch.bfloat16, torch.bfloat16, 8)
        case((8192 * 32, 128), torch.bfloat16, torch.bfloat16, 9)
        timing((8192, 2048), torch.bfloat16)
        timing((8192 * 32, 128), torch.bfloat16)
        timing((8192 * 4, 128), torch.bfloat16)


if __name__ == "__main__":
    main()
    write_rows_where_asked(ROWS, DEVICE)
