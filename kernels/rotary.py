"""Rotary position embedding (the rotate-half form) as one Triton kernel each way.

The form HF transformers' Llama, Qwen, Mixtral, OLMoE ... write, with ``x1, x2`` the halves of the
last dim and ``cos``, ``sin`` broadcast to ``x``'s shape::

    out = x * cos + cat(-x2, x1) * sin

rounds each product to the dtype and then the sum, so on the halves
``out1 = x1*cos1 + (-x2)*sin1`` and ``out2 = x2*cos2 + x1*sin2``. Its gradient, as autograd of those
ops computes it (mul, then cat's and neg's backward, the three contributions to ``x`` summed)::

    grad_x1 = g1*cos1 + g2*sin2          grad_x2 = g2*cos2 - g1*sin1

As aten ops the forward is seven kernels (two slices copied by ``cat``, a negation, three
multiplications, an addition) and the backward about eight, each over the whole of ``q`` or ``k``;
here each is one pass that reads ``x`` (or the gradient) once and writes the result once. ``x`` may
be any strided view (attention's ``q`` is ``[batch, heads, seq, dim]`` transposed from the
projection's ``[batch, seq, heads, dim]``) and ``cos``/``sin`` broadcast over any dims: a row's offset
is computed from up to four leading indices and each operand's strides.

``forward(x, cos, sin, layout)`` and ``backward(grad, cos, sin, layout)`` return tensors of ``x``'s shape
stored in ``layout`` (dims outermost first, the last innermost: ``layout_of``; contiguous by default);
``reference_forward`` / ``reference_backward`` are the same values as aten ops. Products are rounded
before they are summed and no multiply-add is contracted, so the kernels equal the aten form bit for
bit. They run on a CUDA device, or on the CPU under ``TRITON_INTERPRET=1`` for the tests.
"""

from __future__ import annotations

import sys

import torch

from . import rounding
from .caches import ROW_DTYPES, interpreter_guard, interpreting, switched

__all__ = ["forward", "backward", "reference_forward", "reference_backward", "runs", "use_triton", "layout_of",
           "laid_out", "empty_laid_out", "broadcasts_to", "TRITON_ENABLED"]

# False sends every rotary embedding through the aten form (to compare the two on a GPU).
TRITON_ENABLED = True
# Leading dims a row's offset is computed from; more are merged where their strides allow.
_LEADING = 4
_TILE_ELEMENTS = 4096


def use_triton(enabled: bool):
    """``TRITON_ENABLED`` set to ``enabled`` inside the block."""
    return switched(sys.modules[__name__], "TRITON_ENABLED", bool(enabled))


def _rotated(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def layout_of(x: torch.Tensor) -> list[int]:
    """``x``'s dims from outermost to innermost in memory (``torch.empty_permuted``'s physical
    layout), the last dim innermost; the plain order where its last dim is not the innermost."""
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    last = x.dim() - 1
    if x.dim() == 0 or order[-1] != last:
        return list(range(x.dim()))
    return order


def empty_laid_out(like: torch.Tensor, layout) -> torch.Tensor:
    """An empty tensor of ``like``'s shape, dtype and device, stored in ``layout``."""
    return torch.empty_permuted(like.shape, list(layout), dtype=like.dtype, device=like.device)


def laid_out(value: torch.Tensor, layout) -> torch.Tensor:
    """``value`` stored in ``layout`` (a copy where it is not)."""
    if value.stride() == torch.empty_permuted(value.shape, list(layout), device="meta").stride():
        return value
    return empty_laid_out(value, layout).copy_(value)


def reference_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` as aten ops."""
    return x * cos + _rotated(x) * sin


def reference_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to ``x`` as autograd of ``reference_forward`` computes it."""
    half = grad.shape[-1] // 2
    through_sin = grad * sin
    # cat's backward slices, neg's negates: the transpose of rotate_half.
    return grad * cos + torch.cat((through_sin[..., half:], -through_sin[..., :half]), dim=-1)


def broadcasts_to(shape, target) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target``. Plain Python: two of these
    run per rotary call on the host, where ``torch.broadcast_shapes`` (its symbolic-shape checks)
    costs tens of microseconds."""
    if len(shape) > len(target):
        return False
    return all(size == 1 or size == full for size, full in zip(reversed(shape), reversed(target)))


def _leading_strides(tensor: torch.Tensor, shape) -> list[int] | None:
    """The strides of ``tensor`` broadcast to ``shape`` (0 along a broadcast dim), over ``shape``'s
    leading dims padded in front to ``_LEADING``; None where there are more leading dims than that."""
    leading = len(shape) - 1
    if leading > _LEADING:
        return None
    offset = len(shape) - tensor.dim()
    sizes, own_strides = tensor.shape, tensor.stride()
    strides = [0] * (_LEADING - leading)
    for dim in range(leading):
        own = dim - offset
        strides.append(own_strides[own] if own >= 0 and shape[dim] > 1 and sizes[own] > 1 else 0)
    return strides


def runs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the kernels run for these operands."""
    if not TRITON_ENABLED or x.dim() < 1 or x.numel() == 0 or x.shape[-1] % 2:
        return False
    if x.dtype not in ROW_DTYPES or cos.dtype != x.dtype or sin.dtype != x.dtype:
        return False
    if x.dim() - 1 > _LEADING or cos.dim() > x.dim() or sin.dim() > x.dim():
        return False
    if not (broadcasts_to(cos.shape, x.shape) and broadcasts_to(sin.shape, x.shape)):
        return False
    if any(t.shape[-1] > 1 and t.stride(-1) != 1 for t in (x, cos, sin)) or cos.shape[-1] != x.shape[-1] \
            or sin.shape[-1] != x.shape[-1]:
        return False
    device = x.device.type
    if device != "cuda" and not (device == "cpu" and interpreting()):
        return False
    if cos.device != x.device or sin.device != x.device:
        return False
    try:
        import triton  # noqa: F401 - the kernels need it
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

_kernel = None
_round_to = None  # kernels/rounding.py's helper, a module global where Triton looks it up


def _build():
    global _kernel, _round_to
    if _kernel is not None:
        return _kernel
    import triton
    import triton.language as tl

    _round_to = rounding.round_to()

    @triton.jit
    def rotary_kernel(x, cos, sin, out, rows, half, size1, size2, size3,
                      x_stride0, x_stride1, x_stride2, x_stride3,
                      cos_stride0, cos_stride1, cos_stride2, cos_stride3,
                      sin_stride0, sin_stride1, sin_stride2, sin_stride3,
                      out_stride0, out_stride1, out_stride2, out_stride3,
                      BACKWARD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
                      EMULATE_RTNE: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        column = tl.arange(0, BLOCK_HALF)
        mask = (row < rows)[:, None] & (column < half)[None, :]
        # The row's four leading indices, outermost first.
        index = row.to(tl.int64)
        index3 = index % size3
        index = index // size3
        index2 = index % size2
        index = index // size2
        index1 = index % size1
        index0 = index // size1
        x_row = index0 * x_stride0 + index1 * x_stride1 + index2 * x_stride2 + index3 * x_stride3
        cos_row = index0 * cos_stride0 + index1 * cos_stride1 + index2 * cos_stride2 + index3 * cos_stride3
        sin_row = index0 * sin_stride0 + index1 * sin_stride1 + index2 * sin_stride2 + index3 * sin_stride3
        first = column[None, :]
        second = first + half
        dtype = out.dtype.element_ty
        x1 = tl.load(x + x_row[:, None] + first, mask=mask, other=0).to(tl.float32)
        x2 = tl.load(x + x_row[:, None] + second, mask=mask, other=0).to(tl.float32)
        cos1 = tl.load(cos + cos_row[:, None] + first, mask=mask, other=0).to(tl.float32)
        cos2 = tl.load(cos + cos_row[:, None] + second, mask=mask, other=0).to(tl.float32)
        sin1 = tl.load(sin + sin_row[:, None] + first, mask=mask, other=0).to(tl.float32)
        sin2 = tl.load(sin + sin_row[:, None] + second, mask=mask, other=0).to(tl.float32)
        if BACKWARD:
            # x holds the incoming gradient g: g1*cos1 + g2*sin2 and g2*cos2 - g1*sin1.
            a1 = _round_to(x1 * cos1, dtype, EMULATE_RTNE).to(tl.float32)
            b1 = _round_to(x2 * sin2, dtype, EMULATE_RTNE).to(tl.float32)
            a2 = _round_to(x2 * cos2, dtype, EMULATE_RTNE).to(tl.float32)
            b2 = -_round_to(x1 * sin1, dtype, EMULATE_RTNE).to(tl.float32)
        else:
            a1 = _round_to(x1 * cos1, dtype, EMULATE_RTNE).to(tl.float32)
            b1 = _round_to(-x2 * sin1, dtype, EMULATE_RTNE).to(tl.float32)
            a2 = _round_to(x2 * cos2, dtype, EMULATE_RTNE).to(tl.float32)
            b2 = _round_to(x1 * sin2, dtype, EMULATE_RTNE).to(tl.float32)
        out_row = (index0 * out_stride0 + index1 * out_stride1 + index2 * out_stride2 + index3 * out_stride3)[:, None]
        tl.store(out + out_row + first, _round_to(a1 + b1, dtype, EMULATE_RTNE), mask=mask)
        tl.store(out + out_row + second, _round_to(a2 + b2, dtype, EMULATE_RTNE), mask=mask)

    _kernel = rotary_kernel
    return _kernel


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool, layout) -> torch.Tensor:
    import triton

    kernel = _build()
    shape = x.shape
    out = empty_laid_out(x, layout)
    half = shape[-1] // 2
    rows = x.numel() // shape[-1]
    sizes = [1] * (_LEADING - (len(shape) - 1)) + list(shape[:-1])
    block_half = triton.next_power_of_2(half)
    block_rows = max(1, min(64, _TILE_ELEMENTS // (2 * block_half)))
    with interpreter_guard(interpreting()):
        # No contraction: an FMA would skip the rounding of a float32 product the aten form rounds.
        kernel[(triton.cdiv(rows, block_rows),)](
            x, cos, sin, out, rows, half, sizes[1], sizes[2], sizes[3],
            *_leading_strides(x, shape), *_leading_strides(cos, shape), *_leading_strides(sin, shape),
            *_leading_strides(out, shape),
            BACKWARD=backward, BLOCK_ROWS=block_rows, BLOCK_HALF=block_half, EMULATE_RTNE=interpreting(),
            num_warps=4, enable_fp_fusion=False)
    return out


def forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout=None) -> torch.Tensor:
    """The rotated ``x`` stored in ``layout`` (``layout_of``'s form; None: contiguous)."""
    return _launch(x, cos, sin, False, range(x.dim()) if layout is None else layout)


def backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout=None) -> torch.Tensor:
    """The gradient with respect to ``x`` stored in ``layout`` (None: contiguous)."""
    return _launch(grad, cos, sin, True, range(grad.dim()) if layout is None else layout)
