"""Triton grouped GEMM for MoE experts: forward, dgrad and wgrad, offsets read on the device.

``out[rows of group g] = x[rows of group g] @ W[g]``, group ``g`` spanning rows
``offsets[g-1]:offsets[g]`` (int32 end offsets, cumulative, on the device). Weights are stored
``[E, K, N]`` (``"ekn"``) or ``[E, N, K]`` (``"enk"``, HF's ``gate_up_proj [E, 2I, H]``); both are
read through strides, so dgrad is the forward kernel over the transposed view of the same
storage. Accumulation is fp32; fp32 inputs use IEEE products (no TF32) so they match a float64
reference to ~1e-6.

The forward grid is static, ``(cdiv(M, BLOCK_M) + E) x cdiv(N, BLOCK_N)`` (every group adds at most
one partial tile), so launching needs no host read of the group sizes. Each program finds its
group with a vectorised prefix sum over the per-group tile counts; programs past the last tile
zero the rows after ``offsets[-1]``, so the whole output is always written.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["triton_grouped_mm", "triton_grouped_mm_wgrad", "INTERPRETED"]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _forward_configs():
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    configs = []
    for block_m, block_n, block_k, warps, stages in [
        (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 64, 64, 4, 4),
        (64, 128, 128, 4, 3), (128, 64, 128, 4, 3),
    ]:
        configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                                     num_warps=warps, num_stages=stages))
    return configs


def _wgrad_configs():
    if INTERPRETED:
        return [triton.Config({"BLOCK_K": 16, "BLOCK_N": 32, "BLOCK_M": 16}, num_warps=4, num_stages=1)]
    configs = []
    for block_k, block_n, block_m, warps, stages in [
        (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 256, 64, 8, 3),
    ]:
        configs.append(triton.Config({"BLOCK_K": block_k, "BLOCK_N": block_n, "BLOCK_M": block_m},
                                     num_warps=warps, num_stages=stages))
    return configs


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        # The CPU interpreter multiplies 16-bit floats wrongly; products of bf16/fp16 values are
        # exact in fp32, so upcasting there computes what the GPU's fp32-accumulating dot does.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _group_of_tile(offsets_ptr, pid_m, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """(group, first row, end row, tile index inside the group, total tiles) of M-tile ``pid_m``."""
    e = tl.arange(0, E_POW2)
    valid = e < E
    ends = tl.load(offsets_ptr + e, mask=valid, other=0)
    starts = tl.load(offsets_ptr + e - 1, mask=valid & (e > 0), other=0)
    counts = tl.where(valid, ends - starts, 0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    inclusive = tl.cumsum(tiles, 0)
    total = tl.sum(tiles, 0)
    group = tl.sum((inclusive <= pid_m).to(tl.int32), 0)
    in_group = group == e
    first_tile = tl.sum(tl.where(in_group, inclusive - tiles, 0), 0)
    row_start = tl.sum(tl.where(in_group, starts, 0), 0)
    row_end = tl.sum(tl.where(in_group, ends, 0), 0)
    used_rows = tl.sum(tl.where(e == E - 1, ends, 0), 0)
    return group, row_start, row_end, pid_m - first_tile, total, used_rows


@triton.autotune(configs=_forward_configs(), key=["N", "K", "E", "W_TRANSPOSED"])
@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, out_ptr, offsets_ptr,
    M, N, K, E,
    stride_xm, stride_xk, stride_wg, stride_wk, stride_wn, stride_om, stride_on,
    W_TRANSPOSED: tl.constexpr, E_POW2: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group, row_start, row_end, tile, total, used_rows = _group_of_tile(offsets_ptr, pid_m, E, BLOCK_M, E_POW2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if pid_m >= total:
        # Rows after the last group: zeros, so no element of the output is left unwritten.
        rows = used_rows + (pid_m - total) * BLOCK_M + tl.arange(0, BLOCK_M)
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, zero,
                 mask=(rows[:, None] < M) & col_mask[None, :])
    else:
        rows = row_start + tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        ks = tl.arange(0, BLOCK_K)
        x_tile = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
        w_tile = w_ptr + group.to(tl.int64) * stride_wg + ks[:, None] * stride_wk + cols[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_mask = ks < K - k * BLOCK_K
            a = tl.load(x_tile, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_tile, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = _dot(a, b, acc, IEEE, UPCAST)
            x_tile += BLOCK_K * stride_xk
            w_tile += BLOCK_K * stride_wk
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(configs=_wgrad_configs(), key=["N", "K", "E"], reset_to_zero=[])
@triton.jit
def _grouped_wgrad_kernel(
    x_ptr, dout_ptr, dw_ptr, offsets_ptr,
    K, N, E,
    stride_xm, stride_xk, stride_dm, stride_dn, stride_wg, stride_wk, stride_wn,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    group = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_k = tl.program_id(1) // tiles_n
    pid_n = tl.program_id(1) % tiles_n
    row_end = tl.load(offsets_ptr + group)
    row_start = tl.load(offsets_ptr + group - 1, mask=group > 0, other=0)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < K
    col_mask = cols < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    ms = tl.arange(0, BLOCK_M)
    for m in range(row_start, row_end, BLOCK_M):
        rows = m + ms
        row_mask = rows < row_end
        a = tl.load(x_ptr + rows[None, :] * stride_xm + ks[:, None] * stride_xk,
                    mask=k_mask[:, None] & row_mask[None, :], other=0.0)
        b = tl.load(dout_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dn,
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE, UPCAST)
    tl.store(dw_ptr + group.to(tl.int64) * stride_wg + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
             acc.to(dw_ptr.dtype.element_ty), mask=k_mask[:, None] & col_mask[None, :])


def _tma_configs():
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1)]
    configs = []
    for block_m, block_n, block_k, warps, stages in [
        (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 5),
        (128, 64, 64, 4, 5), (64, 256, 64, 8, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3),
    ]:
        for group_m in (8,):
            configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
                                         num_warps=warps, num_stages=stages))
    return configs


@triton.jit
def _swizzle(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Walk GROUP_M row tiles across all column tiles before moving on, so tiles that share
    rows or a weight block run close together and hit L2."""
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.autotune(configs=_tma_configs(), key=["N", "K", "E", "B_TRANSPOSED"])
@triton.jit
def _grouped_mm_tma_kernel(
    x_ptr, w_ptr, out_ptr, offsets_ptr,
    M, N, K, E, W_ROWS, W_COLS, stride_om,
    B_TRANSPOSED: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Hopper path: operands through TMA descriptors built once per program, outside the K loop.

    The weight storage is seen as one 2-d matrix [E * W_ROWS, W_COLS]; group g's logical B is
    its rows g*W_ROWS.. (or their transpose). Tiles that run past a group read neighbouring rows;
    those only feed output rows or columns that the masked store drops.
    """
    tiles_m = tl.cdiv(M, BLOCK_M) + E
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _swizzle(tl.program_id(0), tiles_m, tiles_n, GROUP_M)
    group, row_start, row_end, tile, total, used_rows = _group_of_tile(offsets_ptr, pid_m, E, BLOCK_M, E_POW2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if pid_m >= total:
        rows = used_rows + (pid_m - total) * BLOCK_M + tl.arange(0, BLOCK_M)
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], zero, mask=(rows[:, None] < M) & col_mask[None, :])
    else:
        row0 = row_start + tile * BLOCK_M
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        if B_TRANSPOSED:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * W_ROWS, W_COLS], strides=[W_COLS, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * W_ROWS, W_COLS], strides=[W_COLS, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = x_desc.load([row0, k])
            if B_TRANSPOSED:
                b = w_desc.load([group * W_ROWS + pid_n * BLOCK_N, k])
                acc = tl.dot(a, b.T, acc)
            else:
                b = w_desc.load([group * W_ROWS + k, pid_n * BLOCK_N])
                acc = tl.dot(a, b, acc)
        rows = row0 + tl.arange(0, BLOCK_M)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < row_end) & col_mask[None, :])


def _wgrad_tma_configs():
    if INTERPRETED:
        return [triton.Config({"BLOCK_K": 16, "BLOCK_N": 32, "BLOCK_M": 16}, num_warps=4, num_stages=1)]
    configs = []
    for block_k, block_n, block_m, warps, stages in [
        (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
        (64, 128, 64, 4, 5), (128, 64, 64, 4, 5), (128, 128, 128, 8, 3), (64, 256, 64, 8, 4),
    ]:
        configs.append(triton.Config({"BLOCK_K": block_k, "BLOCK_N": block_n, "BLOCK_M": block_m},
                                     num_warps=warps, num_stages=stages))
    return configs


@triton.autotune(configs=_wgrad_tma_configs(), key=["N", "K", "E", "OUT_NK"])
@triton.jit
def _grouped_wgrad_tma_kernel(
    x_ptr, dout_ptr, dw_ptr, offsets_ptr,
    M, K, N, E, stride_wg, stride_wk, stride_wn,
    OUT_NK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dW[g] = x_g.T @ dout_g with both operands through TMA; rows of the next group that a tile
    reads are zeroed in x, so they add nothing. With OUT_NK the tile is computed transposed
    ([N, K]) so the store runs along the contiguous K of an [E, N, K] weight."""
    group = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_k = tl.program_id(1) // tiles_n
    pid_n = tl.program_id(1) % tiles_n
    row_end = tl.load(offsets_ptr + group)
    row_start = tl.load(offsets_ptr + group - 1, mask=group > 0, other=0)
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    d_desc = tl.make_tensor_descriptor(dout_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    ms = tl.arange(0, BLOCK_M)
    if OUT_NK:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m in range(row_start, row_end, BLOCK_M):
        a = x_desc.load([m, pid_k * BLOCK_K])
        b = d_desc.load([m, pid_n * BLOCK_N])
        a = tl.where((m + ms < row_end)[:, None], a, tl.zeros_like(a))
        if OUT_NK:
            acc = tl.dot(b.T, a, acc)
        else:
            acc = tl.dot(a.T, b, acc)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    base = dw_ptr + group.to(tl.int64) * stride_wg
    if OUT_NK:
        tl.store(base + cols[:, None] * stride_wn + ks[None, :] * stride_wk, acc.to(dw_ptr.dtype.element_ty),
                 mask=(cols[:, None] < N) & (ks[None, :] < K))
    else:
        tl.store(base + ks[:, None] * stride_wk + cols[None, :] * stride_wn, acc.to(dw_ptr.dtype.element_ty),
                 mask=(ks[:, None] < K) & (cols[None, :] < N))


_ALLOCATOR_SET = False


def _ensure_allocator() -> None:
    """Device-side TMA descriptors live in global scratch memory that Triton asks the host for."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def _tma_eligible(x: torch.Tensor, w: torch.Tensor) -> bool:
    if INTERPRETED or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if os.environ.get("SHARDGRAPH_GROUPED_MM_TMA", "1") == "0" or not hasattr(tl, "make_tensor_descriptor"):
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    element = x.element_size()
    # TMA needs contiguous rows whose byte strides are multiples of 16.
    return (x.is_contiguous() and w.is_contiguous() and (x.shape[1] * element) % 16 == 0
            and (w.shape[2] * element) % 16 == 0)


def _tma_grouped_mm(x, w, offsets, b_transposed, n, k, out):
    _ensure_allocator()
    m, experts = x.shape[0], w.shape[0]
    grid = lambda meta: ((triton.cdiv(m, meta["BLOCK_M"]) + experts) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _grouped_mm_tma_kernel[grid](
        x, w, out, offsets, m, n, k, experts, w.shape[1], w.shape[2], out.stride(0),
        B_TRANSPOSED=b_transposed, E_POW2=_next_power_of_two(experts),
    )
    return out


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def _logical_strides(w: torch.Tensor, w_layout: str):
    """(K, N, stride_k, stride_n) of the logical [K, N] matrix of each group."""
    if w_layout == "ekn":
        return w.shape[1], w.shape[2], w.stride(1), w.stride(2)
    return w.shape[2], w.shape[1], w.stride(2), w.stride(1)


def triton_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, w_layout: str = "ekn",
                      transpose_weight: bool = False, out: torch.Tensor | None = None,
                      use_tma: bool | None = None) -> torch.Tensor:
    """``x @ W[g]`` per group, or ``x @ W[g].T`` with ``transpose_weight`` (dgrad).

    ``out`` may be given (tests pass it filled with NaN to prove every element is written).
    ``use_tma``: None picks the Hopper TMA kernel where it applies; False forces the portable one.
    """
    k, n, stride_k, stride_n = _logical_strides(w, w_layout)
    if transpose_weight:
        k, n, stride_k, stride_n = n, k, stride_n, stride_k
    m, experts = x.shape[0], w.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if use_tma is not False and _tma_eligible(x, w) and out.is_contiguous():
        # Logical B is the storage rows (ekn forward, enk dgrad) or their transpose.
        b_transposed = (w_layout == "enk") != transpose_weight
        return _tma_grouped_mm(x, w, offsets, b_transposed, n, k, out)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) + experts, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _grouped_mm_kernel[grid](
        x, w, out, offsets, m, n, k, experts,
        x.stride(0), x.stride(1), w.stride(0), stride_k, stride_n, out.stride(0), out.stride(1),
        W_TRANSPOSED=(w_layout == "enk") != transpose_weight, E_POW2=_next_power_of_two(experts),
        IEEE=x.dtype == torch.float32, UPCAST=INTERPRETED and x.dtype != torch.float32,
    )
    return out


def triton_grouped_mm_wgrad(x: torch.Tensor, dout: torch.Tensor, offsets: torch.Tensor, num_groups: int,
                            w_layout: str = "ekn", out: torch.Tensor | None = None,
                            use_tma: bool | None = None) -> torch.Tensor:
    """``dW[g] = x_g.T @ dout_g`` written in the weight's storage layout (empty groups: zeros)."""
    k, n = x.shape[1], dout.shape[1]
    shape = (num_groups, k, n) if w_layout == "ekn" else (num_groups, n, k)
    dw = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
    stride_k, stride_n = (dw.stride(1), dw.stride(2)) if w_layout == "ekn" else (dw.stride(2), dw.stride(1))
    if num_groups == 0:
        return dw
    if (use_tma is not False and _tma_eligible(x, dout.reshape(1, *dout.shape)) and dout.is_contiguous()
            and (dout.shape[1] * dout.element_size()) % 16 == 0):
        _ensure_allocator()
        grid = lambda meta: (num_groups, triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _grouped_wgrad_tma_kernel[grid](x, dout, dw, offsets, x.shape[0], k, n, num_groups, dw.stride(0), stride_k,
                                        stride_n, OUT_NK=w_layout == "enk")
        return dw
    grid = lambda meta: (num_groups, triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _grouped_wgrad_kernel[grid](
        x, dout, dw, offsets, k, n, num_groups,
        x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), dw.stride(0), stride_k, stride_n,
        IEEE=x.dtype == torch.float32, UPCAST=INTERPRETED and x.dtype != torch.float32,
    )
    return dw
