"""Row kernels around the experts: the dispatch gather, the weighted combine and its backward.

Between the router and the grouped GEMMs the MoE path moves rows, not math: every token is copied
``top_k`` times into expert order, and after the experts its ``top_k`` outputs are summed back
with the router weights. Each of these reads or writes ``tokens x top_k x hidden`` elements, the
size of the grouped GEMM's operand, so they run at memory speed or not at all. As aten ops (an
``index_select``, a broadcast multiply, a sum over slots) each is several passes over that size;
a compiler fuses some of them but reads the gathered rows one element at a time. Here each is one
Triton kernel over 2-D tiles of whole rows (one index load per row, 16-byte vector loads along
the row):

``gather_rows(source, index, divisor=1, scale=None)``
    ``out[r] = source[index[r] // divisor] * scale[index[r]]``: the dispatch copies
    (``index = order``, ``divisor = top_k``), a permutation undone (``index`` its inverse), and the
    copies' gradient in the backward of the combine (``scale`` the flattened router weights).
``gather_sum(source, index, top_k, weights=None)``
    ``out[t] = sum_s source[index[t*top_k + s]] * weights[t, s]``: the combine (``index`` the
    inverse of the expert order) and, without weights, the gradient of the dispatch copies summed
    back onto their token.
``combine_backward(grad_out, returned, order, weights)``
    both gradients of the combine in one pass over the expert outputs: the copies' gradient in
    expert order and the router weights' gradient (a row dot product), where the aten form gathers
    the output gradient twice.
``swiglu(gate_up, interleaved=False)``
    ``out = silu(gate) * up`` between the experts' two grouped GEMMs, gate and up the halves of
    ``gate_up [rows, 2I]`` (``interleaved``: its even and odd columns), where the aten form reads
    the gate twice (``silu``, then the product).
``swiglu_backward(grad, gate_up, interleaved=False)``
    its gradient ``[rows, 2I]`` in ``gate_up``'s layout, in one pass where the aten form (of
    ``ops.moe.GatedActivation.backward``) runs nine elementwise ops and a concatenation.

Rounding follows the aten form they replace: a product of two 16-bit values is rounded to the
operands' dtype before it is summed, the sums accumulate in float32 and are rounded once. Float32
operands give the aten form's values up to the order of the sum. The SwiGLU kernels round every
elementwise step of the aten form to the operands' dtype where it does (``silu`` and ``sigmoid``
computed in float32 as ``x / (1 + exp(-x))`` and ``1 / (1 + exp(-x))``, then each product, sum and
difference rounded in turn), with the same IEEE division and libdevice ``exp`` as PyTorch's CUDA
kernels, so on a GPU their results equal the aten form's bit for bit (under the interpreter the
``exp`` is numpy's: 16-bit results within one unit in the last place).

They run on a CUDA device (and on the CPU under ``TRITON_INTERPRET=1``, for the tests) for 2-D
float16 / bfloat16 / float32 rows with a unit last stride; elsewhere, or with ``TRITON_ENABLED``
False, ``shardgraph.runtime.moe`` keeps the aten form. Registered as ``torch.ops.shardgraph.*``
with fake kernels, so a compiler treats each as one opaque op.
"""

from __future__ import annotations

import sys

import torch

from . import op_bodies, rounding
from .caches import ROW_DTYPES, interpreter_guard, interpreting, triton_takes_rows, switched

__all__ = ["gather_rows", "gather_sum", "combine_backward", "swiglu", "swiglu_backward", "runs", "use_row_kernels",
           "MoeRowsError", "TRITON_ENABLED"]

# False sends the runtime's MoE row steps through the aten ops (to compare the two on a GPU).
TRITON_ENABLED = True
# Elements of one program's tile: 4096 is 32 per thread of 4 warps, four 16-byte vectors in
# 16-bit types, enough loads in flight per thread to stream at memory speed.
_TILE_ELEMENTS = 4096


def runs(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels run for these row tensors (every one 2-D, unit last stride)."""
    return TRITON_ENABLED and triton_takes_rows(*tensors)


def use_row_kernels(enabled: bool):
    """``TRITON_ENABLED`` set to ``enabled`` inside the block (a program compiled inside it keeps the choice)."""
    return switched(sys.modules[__name__], "TRITON_ENABLED", bool(enabled))


def _launch(kernel, grid, *args, **constexprs):
    with interpreter_guard(interpreting()):
        kernel[grid](*args, **constexprs)


def _tiles(width: int) -> tuple[int, int]:
    import triton

    block_width = min(1024, triton.next_power_of_2(max(width, 1)))
    return max(1, _TILE_ELEMENTS // block_width), block_width


def _swiglu_tiles(width: int) -> tuple[int, int]:
    """``_tiles`` with rows at most 256 wide: an intermediate width is a multiple of 256 more often
    than of a larger power of two (768 wide rows in 1024-wide tiles leave a quarter of the lanes
    masked: 186 / 353 us forward / backward against 149 / 261 us in 256-wide ones, bfloat16
    65536 x 768 on an H100)."""
    import triton

    block_width = min(256, triton.next_power_of_2(max(width, 1)))
    return max(1, _TILE_ELEMENTS // block_width), block_width


_kernels = None
# The SwiGLU kernels' helpers and the libdevice module they call: module globals, where Triton
# looks up the functions a kernel calls.
_rounded = None
_round_to = None
_one_plus_exp_negated = None
_libdevice = None


def _build():
    """The kernels, defined on first use so that importing this module needs no Triton."""
    global _kernels, _rounded, _round_to, _one_plus_exp_negated, _libdevice
    if _kernels is not None:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def gather_rows_kernel(source, index, scale, out, rows, width, source_stride, out_stride, divisor,
                           HAS_SCALE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_WIDTH: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        column = tl.program_id(1) * BLOCK_WIDTH + tl.arange(0, BLOCK_WIDTH)
        row_ok = row < rows
        mask = row_ok[:, None] & (column < width)[None, :]
        position = tl.load(index + row, mask=row_ok, other=0).to(tl.int64)
        values = tl.load(source + (position // divisor)[:, None] * source_stride + column[None, :], mask=mask, other=0)
        if HAS_SCALE:
            factor = tl.load(scale + position, mask=row_ok, other=0).to(values.dtype)
            values = (values.to(tl.float32) * factor.to(tl.float32)[:, None]).to(values.dtype)
        tl.store(out + row.to(tl.int64)[:, None] * out_stride + column[None, :], values, mask=mask)

    @triton.jit
    def gather_sum_kernel(source, index, weights, out, tokens, width, top_k, source_stride, weights_stride,
                          out_stride, HAS_WEIGHTS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                          BLOCK_WIDTH: tl.constexpr):
        token = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        column = tl.program_id(1) * BLOCK_WIDTH + tl.arange(0, BLOCK_WIDTH)
        token_ok = token < tokens
        mask = token_ok[:, None] & (column < width)[None, :]
        total = tl.zeros((BLOCK_ROWS, BLOCK_WIDTH), dtype=tl.float32)
        for slot in range(top_k):
            position = tl.load(index + token.to(tl.int64) * top_k + slot, mask=token_ok, other=0).to(tl.int64)
            values = tl.load(source + position[:, None] * source_stride + column[None, :], mask=mask, other=0)
            if HAS_WEIGHTS:
                weight = tl.load(weights + token.to(tl.int64) * weights_stride + slot, mask=token_ok, other=0)
                # The aten form multiplies in the rows' dtype (the weight cast to it), then sums.
                weight = weight.to(values.dtype).to(tl.float32)
                total += (values.to(tl.float32) * weight[:, None]).to(values.dtype).to(tl.float32)
            else:
                total += values.to(tl.float32)
        tl.store(out + token.to(tl.int64)[:, None] * out_stride + column[None, :], total.to(out.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def combine_backward_kernel(grad_out, returned, order, weights, grad_copies, grad_weights, rows, width, top_k,
                                grad_out_stride, returned_stride, grad_copies_stride,
                                BLOCK_ROWS: tl.constexpr, BLOCK_WIDTH: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = row < rows
        position = tl.load(order + row, mask=row_ok, other=0).to(tl.int64)
        token = position // top_k
        weight = tl.load(weights + position, mask=row_ok, other=0)
        dot = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        for start in range(0, width, BLOCK_WIDTH):
            column = start + tl.arange(0, BLOCK_WIDTH)
            mask = row_ok[:, None] & (column < width)[None, :]
            gradient = tl.load(grad_out + token[:, None] * grad_out_stride + column[None, :], mask=mask, other=0)
            value = tl.load(returned + row.to(tl.int64)[:, None] * returned_stride + column[None, :], mask=mask,
                            other=0)
            scaled = gradient.to(tl.float32) * weight.to(gradient.dtype).to(tl.float32)[:, None]
            tl.store(grad_copies + row.to(tl.int64)[:, None] * grad_copies_stride + column[None, :],
                     scaled.to(gradient.dtype), mask=mask)
            product = (value.to(tl.float32) * gradient.to(tl.float32)).to(gradient.dtype).to(tl.float32)
            dot += tl.sum(product, axis=1)
        # The aten form sums in the gradient's dtype, then casts to the weights' dtype.
        rounded = dot.to(grad_out.dtype.element_ty)
        tl.store(grad_weights + position, rounded.to(grad_weights.dtype.element_ty), mask=row_ok)

    if not interpreting():
        from triton.language.extra import libdevice as _libdevice

    _round_to = rounding.round_to()

    @triton.jit
    def rounded(value, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
        # ``value`` rounded to ``dtype`` (as the aten op that computed it rounds its result), held in float32.
        return _round_to(value, dtype, EMULATE_RTNE).to(tl.float32)

    @triton.jit
    def one_plus_exp_negated(x, PRECISE_EXP: tl.constexpr):
        # The denominator of PyTorch's silu and sigmoid (``x / (1 + exp(-x))``, ``1 / (1 + exp(-x))``
        # in float32). Compiled, libdevice's expf is the exp those kernels call; tl.exp's
        # approximate ex2 would differ in the last bits and move some 16-bit roundings.
        if PRECISE_EXP:
            power = _libdevice.exp(-x)
        else:
            power = tl.exp(-x)
        return 1.0 + power

    _rounded, _one_plus_exp_negated = rounded, one_plus_exp_negated

    @triton.jit
    def swiglu_kernel(gate_up, out, rows, width, gate_up_stride, out_stride, INTERLEAVED: tl.constexpr,
                      BLOCK_ROWS: tl.constexpr, BLOCK_WIDTH: tl.constexpr, EMULATE_RTNE: tl.constexpr,
                      PRECISE_EXP: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        column = tl.program_id(1) * BLOCK_WIDTH + tl.arange(0, BLOCK_WIDTH)
        mask = (row < rows)[:, None] & (column < width)[None, :]
        offset = row.to(tl.int64)[:, None]
        if INTERLEAVED:
            gate_column = 2 * column
            up_column = gate_column + 1
        else:
            gate_column = column
            up_column = column + width
        source = gate_up + offset * gate_up_stride
        gate = tl.load(source + gate_column[None, :], mask=mask, other=0).to(tl.float32)
        up = tl.load(source + up_column[None, :], mask=mask, other=0).to(tl.float32)
        dtype = gate_up.dtype.element_ty
        # F.silu(gate) * up: silu rounded to the dtype, then the product.
        silu = _rounded(tl.math.div_rn(gate, _one_plus_exp_negated(gate, PRECISE_EXP)), dtype, EMULATE_RTNE)
        result = _rounded(silu * up, dtype, EMULATE_RTNE)
        tl.store(out + offset * out_stride + column[None, :], result.to(dtype), mask=mask)

    @triton.jit
    def swiglu_backward_kernel(grad, gate_up, grad_gate_up, rows, width, grad_stride, gate_up_stride,
                               grad_gate_up_stride, INTERLEAVED: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                               BLOCK_WIDTH: tl.constexpr, EMULATE_RTNE: tl.constexpr, PRECISE_EXP: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        column = tl.program_id(1) * BLOCK_WIDTH + tl.arange(0, BLOCK_WIDTH)
        mask = (row < rows)[:, None] & (column < width)[None, :]
        offset = row.to(tl.int64)[:, None]
        if INTERLEAVED:
            gate_column = 2 * column
            up_column = gate_column + 1
        else:
            gate_column = column
            up_column = column + width
        source = gate_up + offset * gate_up_stride
        gradient = tl.load(grad + offset * grad_stride + column[None, :], mask=mask, other=0).to(tl.float32)
        gate = tl.load(source + gate_column[None, :], mask=mask, other=0).to(tl.float32)
        up = tl.load(source + up_column[None, :], mask=mask, other=0).to(tl.float32)
        dtype = gate_up.dtype.element_ty
        denominator = _one_plus_exp_negated(gate, PRECISE_EXP)
        sigmoid = _rounded(tl.math.div_rn(1.0, denominator), dtype, EMULATE_RTNE)
        silu = _rounded(tl.math.div_rn(gate, denominator), dtype, EMULATE_RTNE)
        # activation_derivative's sigmoid * (1 + x * (1 - sigmoid)), each aten op's result rounded;
        # then (grad * up) * derivative and grad * silu(gate).
        slope = _rounded(1.0 - sigmoid, dtype, EMULATE_RTNE)
        slope = _rounded(gate * slope, dtype, EMULATE_RTNE)
        slope = _rounded(1.0 + slope, dtype, EMULATE_RTNE)
        derivative = _rounded(sigmoid * slope, dtype, EMULATE_RTNE)
        grad_gate = _rounded(_rounded(gradient * up, dtype, EMULATE_RTNE) * derivative, dtype, EMULATE_RTNE)
        grad_up = _rounded(gradient * silu, dtype, EMULATE_RTNE)
        target = grad_gate_up + offset * grad_gate_up_stride
        tl.store(target + gate_column[None, :], grad_gate.to(dtype), mask=mask)
        tl.store(target + up_column[None, :], grad_up.to(dtype), mask=mask)

    _kernels = (gather_rows_kernel, gather_sum_kernel, combine_backward_kernel, swiglu_kernel, swiglu_backward_kernel)
    return _kernels


# ----------------------------------------------------------------------------------------------
# Checks: what the kernels assume, named before any launch
# ----------------------------------------------------------------------------------------------

class MoeRowsError(ValueError):
    """An operand of a row kernel breaks what the kernel assumes."""


def _check(condition: bool, op: str, message: str) -> None:
    if not condition:
        raise MoeRowsError(f"shardgraph::{op}: {message}")


def _check_rows(op: str, name: str, tensor: torch.Tensor) -> None:
    _check(tensor.dim() == 2, op, f"{name} must be 2-D [rows, width], got shape {tuple(tensor.shape)}")


def _check_index(op: str, name: str, index: torch.Tensor) -> None:
    _check(index.dim() == 1 and not index.dtype.is_floating_point and index.dtype != torch.bool, op,
           f"{name} must be a 1-D integer tensor, got {index.dtype} of shape {tuple(index.shape)}")


def _check_gather_rows(source, index, divisor, scale) -> None:
    _check_rows("gather_rows", "source", source)
    _check_index("gather_rows", "index", index)
    _check(divisor >= 1, "gather_rows", f"divisor must be at least 1, got {divisor}")
    if scale is not None:
        _check(scale.dim() == 1, "gather_rows", f"scale must be 1-D (one factor per index value), got shape "
                                                f"{tuple(scale.shape)}")


def _check_gather_sum(source, index, top_k, weights) -> None:
    _check_rows("gather_sum", "source", source)
    _check_index("gather_sum", "index", index)
    _check(top_k >= 1 and index.shape[0] % top_k == 0, "gather_sum",
           f"index has {index.shape[0]} entries, not a multiple of top_k={top_k}")
    if weights is not None:
        _check(tuple(weights.shape) == (index.shape[0] // top_k, top_k), "gather_sum",
               f"weights must be [tokens, top_k] = [{index.shape[0] // top_k}, {top_k}], got {tuple(weights.shape)}")


def _check_combine_backward(grad_out, returned, order, weights) -> None:
    _check_rows("combine_backward", "grad_out", grad_out)
    _check_rows("combine_backward", "returned", returned)
    _check_index("combine_backward", "order", order)
    _check(weights.dim() == 2 and weights.shape[0] == grad_out.shape[0], "combine_backward",
           f"weights must be [tokens, top_k] with tokens = grad_out's {grad_out.shape[0]}, got {tuple(weights.shape)}")
    _check(returned.shape[0] == order.shape[0] == weights.numel(), "combine_backward",
           f"returned ({returned.shape[0]} rows), order ({order.shape[0]}) and weights ({weights.numel()}) must "
           f"count the same copies")
    _check(returned.shape[1] == grad_out.shape[1] and returned.dtype == grad_out.dtype, "combine_backward",
           f"returned {tuple(returned.shape)} {returned.dtype} and grad_out {tuple(grad_out.shape)} {grad_out.dtype} "
           f"must have the same width and dtype")


def _check_swiglu(op, gate_up, grad=None) -> None:
    _check_rows(op, "gate_up", gate_up)
    _check(gate_up.dtype in ROW_DTYPES, op, f"gate_up must be float16, bfloat16 or float32, got {gate_up.dtype}")
    _check(gate_up.shape[1] % 2 == 0, op,
           f"gate_up must hold gate and up columns in pairs (an even width), got shape {tuple(gate_up.shape)}")
    if grad is not None:
        want = (gate_up.shape[0], gate_up.shape[1] // 2)
        _check(tuple(grad.shape) == want and grad.dtype == gate_up.dtype and grad.device == gate_up.device, op,
               f"grad must be {list(want)} in gate_up's dtype {gate_up.dtype} on {gate_up.device}, got "
               f"{tuple(grad.shape)} {grad.dtype} on {grad.device}")


def _unit_stride(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.shape[1] <= 1 or tensor.stride(1) == 1 else tensor.contiguous()


# ----------------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------------

def _launch_gather_rows(source, index, divisor, scale):
    import triton

    source = _unit_stride(source)
    rows, width = index.shape[0], source.shape[1]
    out = source.new_empty((rows, width))
    if rows == 0 or width == 0:
        return out
    block_rows, block_width = _tiles(width)
    gather_rows_kernel = _build()[0]
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(width, block_width))
    scale_or_unused = scale.contiguous() if scale is not None else index
    _launch(gather_rows_kernel, grid, source, index.contiguous(), scale_or_unused, out, rows, width, source.stride(0),
            out.stride(0), divisor, HAS_SCALE=scale is not None, BLOCK_ROWS=block_rows, BLOCK_WIDTH=block_width,
            num_warps=4)
    return out


def _launch_gather_sum(source, index, top_k, weights):
    import triton

    source = _unit_stride(source)
    tokens, width = index.shape[0] // top_k, source.shape[1]
    out = source.new_empty((tokens, width))
    if tokens == 0 or width == 0:
        return out
    if weights is not None:
        weights = weights.contiguous()
    block_rows, block_width = _tiles(width)
    gather_sum_kernel = _build()[1]
    grid = (triton.cdiv(tokens, block_rows), triton.cdiv(width, block_width))
    weights_or_unused = weights if weights is not None else source
    _launch(gather_sum_kernel, grid, source, index.contiguous(), weights_or_unused, out, tokens, width, top_k,
            source.stride(0), top_k, out.stride(0), HAS_WEIGHTS=weights is not None, BLOCK_ROWS=block_rows,
            BLOCK_WIDTH=block_width, num_warps=4)
    return out


def _launch_combine_backward(grad_out, returned, order, weights):
    import triton

    grad_out, returned = _unit_stride(grad_out), _unit_stride(returned)
    rows, width = returned.shape
    grad_copies = returned.new_empty((rows, width))
    grad_weights = weights.new_empty(weights.shape)
    if rows == 0:
        return grad_copies, grad_weights
    if width == 0:
        return grad_copies, grad_weights.zero_()
    block_rows, block_width = _tiles(width)
    combine_backward_kernel = _build()[2]
    _launch(combine_backward_kernel, (triton.cdiv(rows, block_rows),), grad_out, returned, order.contiguous(),
            weights.contiguous(), grad_copies, grad_weights, rows, width, weights.shape[1], grad_out.stride(0),
            returned.stride(0), grad_copies.stride(0), BLOCK_ROWS=block_rows, BLOCK_WIDTH=block_width, num_warps=4)
    return grad_copies, grad_weights


def _launch_swiglu(gate_up, interleaved):
    import triton

    gate_up = _unit_stride(gate_up)
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty((rows, width))
    if rows == 0 or width == 0:
        return out
    block_rows, block_width = _swiglu_tiles(width)
    swiglu_kernel = _build()[3]
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(width, block_width))
    # No floating-point contraction, as in the backward (nothing here to contract yet: kept so that
    # a later change cannot fuse away a rounding the aten form does).
    _launch(swiglu_kernel, grid, gate_up, out, rows, width, gate_up.stride(0), out.stride(0), INTERLEAVED=interleaved,
            BLOCK_ROWS=block_rows, BLOCK_WIDTH=block_width, EMULATE_RTNE=interpreting(),
            PRECISE_EXP=not interpreting(), num_warps=4, enable_fp_fusion=False)
    return out


def _launch_swiglu_backward(grad, gate_up, interleaved):
    import triton

    grad, gate_up = _unit_stride(grad), _unit_stride(gate_up)
    rows, width = grad.shape
    grad_gate_up = gate_up.new_empty(gate_up.shape)
    if rows == 0 or width == 0:
        return grad_gate_up
    block_rows, block_width = _swiglu_tiles(width)
    swiglu_backward_kernel = _build()[4]
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(width, block_width))
    # No floating-point contraction: in float32 an FMA would skip the rounding of ``x * (1 - sigmoid)``
    # before ``1 +``, which the aten form rounds as two ops.
    _launch(swiglu_backward_kernel, grid, grad, gate_up, grad_gate_up, rows, width, grad.stride(0), gate_up.stride(0),
            grad_gate_up.stride(0), INTERLEAVED=interleaved, BLOCK_ROWS=block_rows, BLOCK_WIDTH=block_width,
            EMULATE_RTNE=interpreting(), PRECISE_EXP=not interpreting(), num_warps=4, enable_fp_fusion=False)
    return grad_gate_up


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------

_library = torch.library.Library("shardgraph", "FRAGMENT")
_library.define("gather_rows(Tensor source, Tensor index, int divisor=1, Tensor? scale=None) -> Tensor")
_library.define("gather_sum(Tensor source, Tensor index, int top_k, Tensor? weights=None) -> Tensor")
_library.define("combine_backward(Tensor grad_out, Tensor returned, Tensor order, Tensor weights) -> (Tensor, Tensor)")
_library.define("swiglu(Tensor gate_up, bool interleaved=False) -> Tensor")
_library.define("swiglu_backward(Tensor grad, Tensor gate_up, bool interleaved=False) -> Tensor")


def gather_rows(source, index, divisor=1, scale=None):
    """``out[r] = source[index[r] // divisor]``, times ``scale[index[r]]`` where given (cast to
    ``source``'s dtype, as the aten form's multiply casts it)."""
    _check_gather_rows(source, index, divisor, scale)
    return _launch_gather_rows(source, index, divisor, scale)


def gather_sum(source, index, top_k, weights=None):
    """``out[t] = sum over s < top_k of source[index[t * top_k + s]] (* weights[t, s])``."""
    _check_gather_sum(source, index, top_k, weights)
    return _launch_gather_sum(source, index, top_k, weights)


def combine_backward(grad_out, returned, order, weights):
    """``(grad_copies, grad_weights)`` of ``out[t] = sum_s weights[t, s] * returned[i]`` where copy
    ``i`` is slot ``order[i]`` of the flattened ``[tokens, top_k]`` (``t = order[i] // top_k``):
    ``grad_copies[i] = grad_out[t] * weights.flat[order[i]]`` (rows in ``returned``'s order) and
    ``grad_weights.flat[order[i]] = returned[i] . grad_out[t]``."""
    _check_combine_backward(grad_out, returned, order, weights)
    return _launch_combine_backward(grad_out, returned, order, weights)


def swiglu(gate_up, interleaved=False):
    """``silu(gate) * up`` ``[rows, 2I] -> [rows, I]``: gate the first ``I`` columns and up the
    rest, or (``interleaved``) gate the even columns and up the odd ones; as
    ``GatedActivation.parse("silu")(gate_up)`` rounds it."""
    _check_swiglu("swiglu", gate_up)
    return _launch_swiglu(gate_up, interleaved)


def swiglu_backward(grad, gate_up, interleaved=False):
    """The gradient of ``swiglu`` with respect to ``gate_up`` (``[rows, 2I]``, gate and up columns
    in ``gate_up``'s layout), as ``GatedActivation.backward`` rounds it."""
    _check_swiglu("swiglu_backward", gate_up, grad)
    return _launch_swiglu_backward(grad, gate_up, interleaved)


op_bodies.impl(_library, "gather_rows", gather_rows)
op_bodies.impl(_library, "gather_sum", gather_sum)
op_bodies.impl(_library, "combine_backward", combine_backward)
op_bodies.impl(_library, "swiglu", swiglu)
op_bodies.impl(_library, "swiglu_backward", swiglu_backward)


@torch.library.register_fake("shardgraph::gather_rows", lib=_library)
def _(source, index, divisor=1, scale=None):
    _check_gather_rows(source, index, divisor, scale)
    return source.new_empty((index.shape[0], source.shape[1]))


@torch.library.register_fake("shardgraph::gather_sum", lib=_library)
def _(source, index, top_k, weights=None):
    _check_gather_sum(source, index, top_k, weights)
    return source.new_empty((index.shape[0] // top_k, source.shape[1]))


@torch.library.register_fake("shardgraph::combine_backward", lib=_library)
def _(grad_out, returned, order, weights):
    _check_combine_backward(grad_out, returned, order, weights)
    return returned.new_empty(returned.shape), weights.new_empty(weights.shape)


@torch.library.register_fake("shardgraph::swiglu", lib=_library)
def _(gate_up, interleaved=False):
    _check_swiglu("swiglu", gate_up)
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.register_fake("shardgraph::swiglu_backward", lib=_library)
def _(grad, gate_up, interleaved=False):
    _check_swiglu("swiglu_backward", gate_up, grad)
    return gate_up.new_empty(gate_up.shape)
