"""torch's own grouped GEMM (``torch._grouped_mm``, CUTLASS on Hopper) as one more schedule.

The Hopper grouped product and wgrad time their own kernels against this one on the first call
of a problem and keep the fastest (``kernels.grouped_gemm``): on some shapes (a long reduction,
a wide output) CUTLASS's persistent kernels are a few percent ahead of the Triton ones, and a
caller should never get the slower of the two. The same functions serve the ``torch`` backend.

``torch._grouped_mm`` leaves the rows after ``offsets[-1]`` of a product unwritten and does
not promise zeros for a group with no rows in a weight gradient, where this package's kernels
write zeros. Both are put right here without reading ``offsets`` on the host: on a GPU by a
kernel whose programs each read one or two offsets and return unless their block lies in the
tail or an empty group (a few microseconds when, as in an MoE layer, there is nothing to
zero), elsewhere by a masked fill.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["runs", "product", "wgrad", "zero_rows_after", "zero_empty_groups"]


def _aligned_rows(tensor: torch.Tensor) -> bool:
    """Every stride but a unit one 16-byte aligned, and the base too: what torch._grouped_mm takes."""
    size = tensor.element_size()
    return (tensor.data_ptr() % 16 == 0 and all(stride == 1 or stride * size % 16 == 0 for stride in tensor.stride())
            and 1 in tensor.stride()[-2:])


def runs(*tensors: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: bfloat16 on an sm_90+ GPU, or
    float32/bfloat16/float16 on the CPU; non-empty; 16-byte aligned rows."""
    first = tensors[0]
    if not hasattr(torch, "_grouped_mm") or any(t.numel() == 0 for t in tensors):
        return False
    if first.is_cuda:
        if first.dtype != torch.bfloat16 or torch.cuda.get_device_capability(first.device)[0] < 9:
            return False
    elif first.device.type != "cpu" or first.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return all(_aligned_rows(t) for t in tensors)


def _kernels_run(tensor: torch.Tensor) -> bool:
    import os

    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _zero_rows_after_kernel(out_ptr, offsets_ptr, m, p, stride_out, last_group, BLOCK_M: tl.constexpr,
                            BLOCK_P: tl.constexpr):
    start = tl.program_id(0) * BLOCK_M
    end = tl.load(offsets_ptr + last_group).to(tl.int64)
    if start + BLOCK_M > end:
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        keep = (rows >= end) & (rows < m)
        for column in range(0, p, BLOCK_P):
            columns = column + tl.arange(0, BLOCK_P)
            mask = keep[:, None] & (columns[None, :] < p)
            zeros = tl.zeros((BLOCK_M, BLOCK_P), dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows[:, None] * stride_out + columns[None, :], zeros, mask=mask)


@triton.jit
def _zero_empty_groups_kernel(dw_ptr, offsets_ptr, p1, p2, stride_group, stride_row, BLOCK_1: tl.constexpr,
                              BLOCK_2: tl.constexpr):
    group = tl.program_id(0)
    end = tl.load(offsets_ptr + group)
    begin = tl.where(group > 0, tl.load(offsets_ptr + tl.maximum(group - 1, 0)), 0)
    if end == begin:
        rows = tl.program_id(1) * BLOCK_1 + tl.arange(0, BLOCK_1)
        base = dw_ptr + group.to(tl.int64) * stride_group
        for column in range(0, p2, BLOCK_2):
            columns = column + tl.arange(0, BLOCK_2)
            mask = (rows[:, None] < p1) & (columns[None, :] < p2)
            zeros = tl.zeros((BLOCK_1, BLOCK_2), dtype=dw_ptr.dtype.element_ty)
            tl.store(base + rows[:, None].to(tl.int64) * stride_row + columns[None, :], zeros, mask=mask)


def zero_rows_after(out: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out`` with its rows after ``offsets[-1]`` zeroed (in place where a kernel can run)."""
    m, p = out.shape
    if not _kernels_run(out) or out.stride(1) != 1:
        rows = torch.arange(m, device=out.device)
        return out.masked_fill((rows >= offsets[-1:]).unsqueeze(1), 0)
    block_m, block_p = 64, min(256, triton.next_power_of_2(max(p, 16)))
    _zero_rows_after_kernel[(triton.cdiv(m, block_m),)](out, offsets, m, p, out.stride(0), offsets.numel() - 1,
                                                        BLOCK_M=block_m, BLOCK_P=block_p)
    return out


def zero_empty_groups(dw: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``dw [groups, p1, p2]`` with the groups that have no rows zeroed (in place where a kernel can run)."""
    groups, p1, p2 = dw.shape
    if not _kernels_run(dw) or dw.stride(2) != 1:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
        return dw.masked_fill((counts == 0).view(-1, 1, 1), 0)
    block_1, block_2 = 64, min(256, triton.next_power_of_2(max(p2, 16)))
    _zero_empty_groups_kernel[(groups, triton.cdiv(p1, block_1))](dw, offsets, p1, p2, dw.stride(0), dw.stride(1),
                                                                  BLOCK_1=block_1, BLOCK_2=block_2)
    return dw


def product(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x @ weight[g]`` per group (``weight [groups, R, P]``, any layout torch takes); rows
    after ``offsets[-1]`` zero."""
    return zero_rows_after(torch._grouped_mm(x, weight, offs=offsets), offsets)


def wgrad(left: torch.Tensor, right: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``left_g.T @ right_g`` per group of rows, ``[groups, P1, P2]``; groups with no rows zero.
    The transposed ``left`` is a view: torch's kernel reads it column-major, no copy."""
    return zero_empty_groups(torch._grouped_mm(left.t(), right, offs=offsets), offsets)
