"""RMSNorm over the last dim as one Triton kernel each way, rounding as HF transformers' ``RMSNorm`` does.

The module this replaces (Llama, Qwen, Mixtral, OLMoE ...) computes, with ``x`` of dtype ``xd`` and the
output dtype ``od = promote_types(xd, weight.dtype)``::

    rstd   = rsqrt(mean(float32(x) ** 2 over the last dim) + eps)
    normed = (float32(x) * rstd).to(xd)                  # rounded to the input's dtype first
    out    = weight * normed                             # in od, rounded once

and autograd of it rounds the backward at the forward's casts: the gradient of ``normed`` is
``grad_out * weight`` rounded to ``od`` and then to ``xd``; the weight's gradient sums ``grad_out *
normed`` (each product rounded to ``od``) over the rows in float32. As aten ops each direction is many
passes over float32 copies of the input; here each is one pass over the rows, the statistics kept in
float32 registers and only ``rstd`` (one float per row) written for the backward:

``forward(x, weight, eps) -> (out, rstd)``
    one program per tile of whole rows (``BLOCK_WIDTH`` the width's next power of two, as many rows
    as make about 4096 elements): ``x`` read once, ``out`` and ``rstd`` written.
``backward(grad_out, x, weight, rstd) -> (grad_x, grad_weight)``
    a few programs per SM, each looping over its share of row tiles with the weight loaded once;
    ``grad_x`` is written per tile and the weight's gradient summed in registers, written once per
    program as a float32 partial, the partials summed by one ``torch.sum`` over programs.

``reference_forward`` / ``reference_backward`` are the same values as aten ops (any device, any float
dtype; a float64 input too is normalised in float32, as HF's cast does), for where ``runs`` is False.
The kernels sum in another order than the aten form, so float32 results agree to rounding and 16-bit
results to one unit in the last place, mostly bit for bit. They run on a CUDA device, or on the CPU
under ``TRITON_INTERPRET=1`` for the tests. Plain functions: ``shardgraph/ops/norm.py`` registers the ops.
"""

from __future__ import annotations

import sys

import torch

from . import rounding
from .caches import ROW_DTYPES, interpreter_guard, interpreting, multiprocessors, switched

__all__ = ["forward", "backward", "reference_forward", "reference_backward", "runs", "use_triton", "TRITON_ENABLED"]

# False sends every norm through the aten form (to compare the two on a GPU).
TRITON_ENABLED = True
# Elements of one program's tile: 32 per thread of 4 warps, four 16-byte vectors in 16-bit types,
# enough loads in flight per thread to stream at memory speed. Rows wider than this take a tile each.
_TILE_ELEMENTS = 4096
# The widest row one program holds in registers (16 warps, 128 float32 values a thread per tensor).
MAX_WIDTH = 65536


def use_triton(enabled: bool):
    """``TRITON_ENABLED`` set to ``enabled`` inside the block (a program compiled inside it keeps the choice)."""
    return switched(sys.modules[__name__], "TRITON_ENABLED", bool(enabled))


def runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``forward`` / ``backward`` run the Triton kernels for this input and weight."""
    if not TRITON_ENABLED or x.dim() < 1 or weight.dim() != 1 or x.numel() == 0:
        return False
    width = x.shape[-1]
    if not (1 <= width <= MAX_WIDTH and weight.numel() == width):
        return False
    if x.dtype not in ROW_DTYPES or weight.dtype not in ROW_DTYPES or weight.device != x.device:
        return False
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        return False
    try:
        import triton
    except ImportError:
        return False
    return hasattr(triton, "jit")


# ----------------------------------------------------------------------------------------------
# The aten form
# ----------------------------------------------------------------------------------------------

def _statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    # HF's ``hidden_states.to(torch.float32)``: a float64 input too is normalised in float32.
    return torch.float32


def reference_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, rstd)`` as HF's ``RMSNorm.forward`` computes them, as aten ops."""
    statistics = x.to(_statistics_dtype(x.dtype))
    rstd = torch.rsqrt(statistics.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (statistics * rstd).to(x.dtype), rstd.squeeze(-1)


def reference_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight)`` as autograd of ``reference_forward`` computes them: the same
    operations in the same order, so float64 and float32 agree with it bit for bit on one device."""
    width = x.shape[-1]
    statistics = x.to(_statistics_dtype(x.dtype))
    rstd = rstd.to(statistics.dtype).unsqueeze(-1)
    normed = (statistics * rstd).to(x.dtype)
    # Mul's backward gives the product in the output's dtype, cast to each operand's dtype.
    grad_weight = (grad_out * normed).reshape(-1, width).sum(0).to(weight.dtype)
    grad_normed = (grad_out * weight).to(x.dtype).to(statistics.dtype)
    # rsqrt's backward is -0.5 * grad * result ** 3, mean's divides by the width, pow(2)'s multiplies
    # by 2 * x; the direct term of ``x * rstd`` is added last.
    grad_rstd = (grad_normed * statistics).sum(-1, keepdim=True)
    grad_mean_square = -0.5 * grad_rstd * rstd.pow(3)
    grad_statistics = grad_normed * rstd + grad_mean_square / width * (2 * statistics)
    return grad_statistics.to(x.dtype), grad_weight


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

_kernels = None
# The kernels' rounding helper (kernels/rounding.py): a module global, where Triton looks up the
# functions a kernel calls.
_round_to = None


def _build():
    """The kernels, defined on first use so that importing this module needs no Triton."""
    global _kernels, _round_to
    if _kernels is not None:
        return _kernels
    import triton
    import triton.language as tl

    _round_to = rounding.round_to()

    @triton.jit
    def forward_kernel(x, weight, out, rstd, rows, width, x_stride, out_stride, eps, BLOCK_ROWS: tl.constexpr,
                       BLOCK_WIDTH: tl.constexpr, EMULATE_RTNE: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        column = tl.arange(0, BLOCK_WIDTH)
        row_ok = row < rows
        column_ok = column < width
        mask = row_ok[:, None] & column_ok[None, :]
        offset = row.to(tl.int64)[:, None]
        values = tl.load(x + offset * x_stride + column[None, :], mask=mask, other=0).to(tl.float32)
        factor = tl.rsqrt(tl.sum(values * values, axis=1) / width + eps)
        normed = _round_to(values * factor[:, None], x.dtype.element_ty, EMULATE_RTNE).to(tl.float32)
        scale = tl.load(weight + column, mask=column_ok, other=0).to(tl.float32)
        result = _round_to(scale[None, :] * normed, out.dtype.element_ty, EMULATE_RTNE)
        tl.store(out + offset * out_stride + column[None, :], result, mask=mask)
        tl.store(rstd + row, factor, mask=row_ok)

    @triton.jit
    def backward_kernel(grad_out, x, weight, rstd, grad_x, partial, rows, width, grad_out_stride, x_stride,
                        grad_x_stride, BLOCK_ROWS: tl.constexpr, BLOCK_WIDTH: tl.constexpr,
                        EMULATE_RTNE: tl.constexpr):
        program, programs = tl.program_id(0), tl.num_programs(0)
        column = tl.arange(0, BLOCK_WIDTH)
        column_ok = column < width
        scale = tl.load(weight + column, mask=column_ok, other=0).to(tl.float32)
        input_dtype = x.dtype.element_ty
        output_dtype = grad_out.dtype.element_ty
        # Summed over the loop in two dimensions, reduced over rows once at the end.
        weight_sum = tl.zeros((BLOCK_ROWS, BLOCK_WIDTH), dtype=tl.float32)
        for block in range(program, tl.cdiv(rows, BLOCK_ROWS), programs):
            row = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            row_ok = row < rows
            mask = row_ok[:, None] & column_ok[None, :]
            offset = row.to(tl.int64)[:, None]
            gradient = tl.load(grad_out + offset * grad_out_stride + column[None, :], mask=mask,
                               other=0).to(tl.float32)
            values = tl.load(x + offset * x_stride + column[None, :], mask=mask, other=0).to(tl.float32)
            factor = tl.load(rstd + row, mask=row_ok, other=0).to(tl.float32)
            normed = _round_to(values * factor[:, None], input_dtype, EMULATE_RTNE).to(tl.float32)
            weight_sum += _round_to(gradient * normed, output_dtype, EMULATE_RTNE).to(tl.float32)
            grad_normed = _round_to(_round_to(gradient * scale[None, :], output_dtype, EMULATE_RTNE), input_dtype,
                                   EMULATE_RTNE).to(tl.float32)
            # -0.5 * dot * rstd^3 / width times 2 * x: the powers of two cancel exactly.
            dot = tl.sum(grad_normed * values, axis=1)
            coefficient = dot * (factor * factor * factor) / width
            result = grad_normed * factor[:, None] - values * coefficient[:, None]
            tl.store(grad_x + offset * grad_x_stride + column[None, :], _round_to(result, input_dtype, EMULATE_RTNE),
                     mask=mask)
        tl.store(partial + program.to(tl.int64) * width + column, tl.sum(weight_sum, axis=0), mask=column_ok)

    _kernels = (forward_kernel, backward_kernel)
    return _kernels


# ----------------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------------

def _launch(kernel, grid, *args, **constexprs):
    with interpreter_guard(interpreting()):
        # No floating-point contraction: an FMA would skip the float32 rounding of a product the
        # aten form rounds (``grad_out * normed`` before its sum); memory-bound, so no time lost.
        kernel[grid](*args, **constexprs, enable_fp_fusion=False)


def _rows(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` as ``[rows, width]`` with a unit last stride: a view where one row stride reaches
    every row, a copy otherwise (an expanded gradient, a transposed input)."""
    if width > 1 and tensor.stride(-1) != 1:
        tensor = tensor.contiguous()
    return tensor.reshape(-1, width)


def _tiles(width: int) -> tuple[int, int, int]:
    """``(BLOCK_ROWS, BLOCK_WIDTH, num_warps)``: whole rows, about ``_TILE_ELEMENTS`` a tile, and
    more warps for a wider row so that each thread holds at most 32 values of a tensor up to 8192
    elements."""
    import triton

    block_width = triton.next_power_of_2(width)
    block_rows = max(1, _TILE_ELEMENTS // block_width)
    return block_rows, block_width, min(16, max(4, block_rows * block_width // 1024))


def _row_programs(device: torch.device, row_blocks: int) -> int:
    # A few programs per SM keep every SM streaming; more would only add partial rows to sum.
    if device.type == "cuda":
        return max(1, min(row_blocks, multiprocessors(device) * 4))
    return max(1, min(row_blocks, 4))


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, rstd)``: ``out`` of ``x``'s shape in ``promote_types(x.dtype, weight.dtype)``, ``rstd``
    float32 of ``x.shape[:-1]``. Assumes ``runs(x, weight)``."""
    import triton

    width = x.shape[-1]
    rows_in = _rows(x, width)
    rows = rows_in.shape[0]
    out = torch.empty((rows, width), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows > 0:
        block_rows, block_width, num_warps = _tiles(width)
        _launch(_build()[0], (triton.cdiv(rows, block_rows),), rows_in, weight.contiguous(), out, rstd, rows, width,
                rows_in.stride(0), out.stride(0), eps, BLOCK_ROWS=block_rows, BLOCK_WIDTH=block_width,
                EMULATE_RTNE=interpreting(), num_warps=num_warps)
    return out.view(x.shape), rstd.view(x.shape[:-1])


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
             rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight)`` in ``x``'s and ``weight``'s dtypes and shapes, ``grad_x`` contiguous.
    ``grad_out`` is taken in the forward's output dtype (cast to it where it is not). Assumes
    ``runs(x, weight)``."""
    import triton

    width = x.shape[-1]
    # The output dtype's roundings are read off grad_out's pointer type.
    grad_out = grad_out.to(torch.promote_types(x.dtype, weight.dtype))
    grad_rows, x_rows = _rows(grad_out, width), _rows(x, width)
    rows = x_rows.shape[0]
    grad_x = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    if rows == 0:
        return grad_x.view(x.shape), torch.zeros_like(weight)
    block_rows, block_width, num_warps = _tiles(width)
    programs = _row_programs(x.device, triton.cdiv(rows, block_rows))
    partial = torch.empty((programs, width), dtype=torch.float32, device=x.device)
    _launch(_build()[1], (programs,), grad_rows, x_rows, weight.contiguous(), rstd.contiguous().view(-1), grad_x,
            partial, rows, width, grad_rows.stride(0), x_rows.stride(0), grad_x.stride(0), BLOCK_ROWS=block_rows,
            BLOCK_WIDTH=block_width, EMULATE_RTNE=interpreting(), num_warps=num_warps)
    return grad_x.view(x.shape), partial.sum(0).to(weight.dtype)
