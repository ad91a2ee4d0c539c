"""A plain SGD step on an embedding table that touches only the rows the batch looked up.

``embedding_sgd_(weight, grad_output, indices, lr, padding_idx, after)`` takes the step
``weight -= lr * embedding_dense_backward(grad_output, indices, ...)`` in place and returns the
gradient norm's term ``sum(float32(grad) ** 2)``, where the dense form writes a gradient the size
of the whole table (a float32 accumulation of it on a GPU), reads it back for the norm and again
for the update, and reads and writes every row of the weight: at a 151936-word vocabulary and a
2048-wide model that is about 5 GB of traffic for the 8192 rows one step of 8192 tokens can
touch. Rows no index names have a zero gradient, so plain SGD (no momentum, no weight decay)
leaves them as they are and their squares add nothing to the norm.

The rows are summed per distinct index in a fixed order (indices sorted, then one segment sum
per index in float32, rounded once to the gradient's dtype, as the dense backward rounds), so
the result does not depend on thread timing; the update then reads and writes only those rows,
with the same two operations in the weight's dtype as the unfused graph (``grad * lr``, then
``weight - that``). Shapes stay static: a batch of ``T`` indices has at most ``T`` distinct ones,
and the slots past the last distinct index repeat it (they write the same value to the same row),
so nothing waits on the host for the count.

With ``TRITON_ENABLED`` (the default) the sums and the step are one Triton kernel on
a GPU (and on the CPU under ``TRITON_INTERPRET=1``), one program per distinct-index slot and column
block, reading the slot's rows in sorted order; otherwise the same values come from aten ops
(``torch.segment_reduce``, gathers and an ``index_copy_``).

``after``: tensors the step is ordered after and does not read (the other readers of the old
weight), as for ``grouped_mm_wgrad_sgd_``: a compiler free to reorder a functional graph keeps
them before the in-place update.
"""

from __future__ import annotations

import sys

import torch

from . import op_bodies
from .caches import interpreter_guard, interpreting, triton_takes_rows, switched

__all__ = ["embedding_sgd_", "use_triton", "EmbeddingSgdError", "TRITON_ENABLED"]

# On the H100 the kernel gives the aten form's weight bit for bit (bf16 and fp32,
# ``tests/kernels/embedding_sgd_interpreted.py --device cuda``) and takes 0.34 ms against its
# 0.82 ms at 8192 tokens, 0.66 against 2.64 ms at 32768 (``benchmarks/embedding_sgd.py``).
# False runs the aten form (the CPU's, without the interpreter) everywhere.
TRITON_ENABLED = True


def use_triton(enabled: bool):
    """``TRITON_ENABLED`` set to ``enabled`` inside the block (to run or compare one form)."""
    return switched(sys.modules[__name__], "TRITON_ENABLED", bool(enabled))


class EmbeddingSgdError(ValueError):
    """Operands an embedding SGD step cannot take."""


_library = torch.library.Library("shardgraph", "FRAGMENT")
_library.define("embedding_sgd_(Tensor(a!) weight, Tensor grad_output, Tensor indices, Tensor lr, "
                "SymInt padding_idx, Tensor[] after) -> Tensor")


def _check(weight, grad_output, indices, lr):
    if weight.dim() != 2:
        raise EmbeddingSgdError(f"embedding_sgd_: weight must be a [rows, width] table, "
                                f"got shape {tuple(weight.shape)}")
    width = weight.shape[1]
    if grad_output.shape[-1] != width or tuple(grad_output.shape[:-1]) != tuple(indices.shape):
        raise EmbeddingSgdError(f"embedding_sgd_: grad_output {tuple(grad_output.shape)} must be indices' shape "
                                f"{tuple(indices.shape)} plus the weight's width {width}")
    if grad_output.dtype != weight.dtype:
        raise EmbeddingSgdError(f"embedding_sgd_: grad_output is {grad_output.dtype}, the weight {weight.dtype}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise EmbeddingSgdError(f"embedding_sgd_: indices must be int32 or int64, got {indices.dtype}")
    if lr.dim() != 0 or lr.dtype != weight.dtype:
        raise EmbeddingSgdError(f"embedding_sgd_: lr must be a 0-dim tensor in the weight's dtype {weight.dtype}, "
                                f"got {lr.dtype} of shape {tuple(lr.shape)}")


_kernel = None


def _build():
    """The kernel, defined on first use so that importing this module needs no Triton."""
    global _kernel
    if _kernel is not None:
        return _kernel
    import triton.language as tl
    from triton import jit

    @jit
    def embedding_sgd_kernel(rows_ptr, order_ptr, starts_ptr, sorted_index_ptr, weight_ptr, lr_ptr, partial_ptr,
                             width, rows_stride, weight_stride, padding_idx, BLOCK: tl.constexpr):
        # One program per (distinct-index slot, column block): the slot's rows summed in sorted
        # (token) order in float32, rounded to the weight's dtype, the step taken on its row.
        slot = tl.program_id(0)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = columns < width
        start = tl.load(starts_ptr + slot)
        end = tl.load(starts_ptr + slot + 1)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for position in range(start, end):
            token = tl.load(order_ptr + position)
            total += tl.load(rows_ptr + token * rows_stride + columns, mask=mask, other=0.0).to(tl.float32)
        row = tl.load(sorted_index_ptr + tl.minimum(start, tl.num_programs(0) - 1))
        # A slot past the last distinct index (start == end) or the padding row takes no step.
        live = ((end > start) & (row != padding_idx)).to(tl.int32)
        active = mask & (tl.zeros([BLOCK], dtype=tl.int32) + live > 0)
        dtype = weight_ptr.dtype.element_ty
        grad = tl.where(active, total, 0.0).to(dtype).to(tl.float32)
        step = (grad * tl.load(lr_ptr).to(tl.float32)).to(dtype).to(tl.float32)
        pointers = weight_ptr + row * weight_stride + columns
        weight = tl.load(pointers, mask=active, other=0.0).to(tl.float32)
        tl.store(pointers, (weight - step).to(dtype), mask=active)
        tl.store(partial_ptr + slot * tl.num_programs(1) + tl.program_id(1), tl.sum(grad * grad, axis=0))

    _kernel = embedding_sgd_kernel
    return _kernel


def _triton_step(weight, rows, sorted_index, order, segment, lr, padding_idx):
    import triton

    count, width = rows.shape
    # Where each distinct index's run of sorted positions starts; slots past the last distinct
    # index start (and end) at ``count``.
    starts = torch.full((count + 1,), count, dtype=torch.long, device=rows.device)
    starts.scatter_reduce_(0, segment, torch.arange(count, device=rows.device), "amin")
    block = min(1024, triton.next_power_of_2(width))
    grid = (count, triton.cdiv(width, block))
    partial = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=rows.device)
    with interpreter_guard(interpreting()):
        # No floating-point contraction: an FMA would skip the rounding of ``grad * lr``.
        _build()[grid](rows, order, starts, sorted_index, weight, lr, partial, width, rows.stride(0),
                       weight.stride(0), padding_idx, BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return partial.sum()


def embedding_sgd_(weight, grad_output, indices, lr, padding_idx, after):
    """``weight -= lr * grad`` on the looked-up rows, in place; returns ``sum(float32(grad) ** 2)``
    with ``grad = embedding_dense_backward(grad_output, indices, rows, padding_idx, False)``."""
    _check(weight, grad_output, indices, lr)
    width = weight.shape[1]
    flat = indices.reshape(-1).long()
    count = flat.numel()
    if count == 0:
        return torch.zeros((), dtype=torch.float32, device=weight.device)
    rows = grad_output.reshape(count, width)
    # Stable: the rows of one index are summed in token order, the same order on every run.
    sorted_index, order = torch.sort(flat, stable=True)
    first_of_index = torch.ones_like(sorted_index, dtype=torch.bool)
    first_of_index[1:] = sorted_index[1:] != sorted_index[:-1]
    segment = torch.cumsum(first_of_index, 0) - 1
    if TRITON_ENABLED and triton_takes_rows(weight, rows):
        return _triton_step(weight, rows, sorted_index, order, segment, lr, padding_idx)
    if padding_idx >= 0:
        # The padding row's gradient is zero in the dense backward: its tokens add nothing.
        rows = rows.masked_fill((flat == padding_idx).unsqueeze(1), 0)
    lengths = torch.zeros_like(sorted_index).index_add_(0, segment, torch.ones_like(sorted_index))
    # Sums in index order, in float32 at least (the dense backward's accumulation), rounded once
    # to the gradient's dtype; slots past the last distinct index have length 0 and sum to 0.
    accumulate = torch.promote_types(weight.dtype, torch.float32)
    sums = torch.segment_reduce(rows[order].to(accumulate), "sum", lengths=lengths, axis=0, unsafe=True)
    grad = sums.to(weight.dtype)
    norm_term = torch.sum(torch.pow(grad.float(), 2))
    # Every index of one segment writes that segment's row number: the same value, whichever lands.
    row_of_segment = torch.zeros_like(sorted_index).scatter_(0, segment, sorted_index)
    slot = torch.minimum(torch.arange(count, device=flat.device), segment[-1])
    target = row_of_segment[slot]
    weight.index_copy_(0, target, weight[target] - grad[slot] * lr)
    return norm_term


op_bodies.impl(_library, "embedding_sgd_", embedding_sgd_)


@torch.library.register_fake("shardgraph::embedding_sgd_", lib=_library)
def _(weight, grad_output, indices, lr, padding_idx, after):
    _check(weight, grad_output, indices, lr)
    return weight.new_empty((), dtype=torch.float32)
