"""The device code of the grouped GEMM: Triton kernels for the grouped product and the grouped
wgrad, each in a Hopper (TMA) and a portable version, and the ``@triton.jit`` helpers they share.

Every kernel computes, for each group ``g`` spanning rows ``offsets[g-1]:offsets[g]`` (int32 end
offsets, cumulative, read on the device only):

* grouped product  ``out[rows of g] = a[rows of g] @ B_g``  (forward, and dgrad with ``B_g`` the
  transposed weight: both are one kernel over two views of the same weight storage),
* grouped wgrad    ``dW[g] = left[rows of g].T @ right[rows of g]``.

The grouped product writes zeros to the rows after ``offsets[-1]`` and wgrad writes zeros for
empty groups, so every output element is defined. Offsets are clamped to ``[0, M]`` where they
are read, so offsets that break the contract cannot make a kernel write outside its output.

Hopper (TMA) kernels, bf16/fp16. The grouped product is persistent: one program per SM slot (or
two, where half the shared memory is enough) walks a flattened loop over (tile, reduction step),
so the software pipeliner keeps the next tile's loads in flight during the epilogue. Operands come
through host-built TMA descriptors (loop-invariant, which the pipeliner needs), and each tile finds
its group with one vector comparison against a per-group prefix sum. Whole row tiles store through
TMA, asynchronously; each group's last, partial tile comes in a second loop and stores through a
row mask, since a TMA box cannot stop at a group boundary; the rows after the last offset come in a
third, as zeros with no products. Partial tiles load rows of the next group, which the store masks
out. wgrad runs one program per (output tile, group), loads whole row blocks through TMA and the
last partial block with masked loads, so rows of neighbouring groups never enter the sum.

Portable kernels: plain masked ``tl.load``/``tl.store``, any dtype (fp32 with IEEE products, no
TF32), any strides; what the CPU interpreter (``TRITON_INTERPRET=1``) and pre-Hopper GPUs run.

The four autotuned kernels keep private names (they are also the names profilers show): only
the host side, :mod:`kernels.grouped_gemm`, launches them, choosing the kernel, its operands and
its grid. Each wgrad kernel has an SGD twin (``_grouped_wgrad_sgd*``) whose tiles, instead of
being stored, update the parameter they are the gradient of in place (``_sgd_epilogue``); the
twins run with the configuration tuned for the plain kernel. The configurations each kernel is
tuned over are in :mod:`kernels.grouped_gemm_configs`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .grouped_gemm_configs import (product_portable_configs, product_tma_configs, prune_product_tma, prune_wgrad,
                                   wgrad_portable_configs, wgrad_tma_configs)

# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


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
def _store_rows(out_ptr, value, row_start, row_end, col_start, P, stride_om,
                BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    """Masked store of one output tile: rows past ``row_end`` belong to the next group."""
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = col_start + tl.arange(0, BLOCK_P)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], value,
             mask=(rows[:, None] < row_end) & (cols[None, :] < P))


# ----------------------------------------------------------------------------------------------
# Grouped product, Hopper path: persistent, TMA operands
# ----------------------------------------------------------------------------------------------


@triton.jit
def _group_sizes(offsets_ptr, M, E, E_POW2: tl.constexpr):
    """Rows per group (clamped to ``[0, M]``), zero in lanes past E."""
    groups = tl.arange(0, E_POW2)
    valid = groups < E
    ends = tl.minimum(tl.maximum(tl.load(offsets_ptr + groups, mask=valid, other=0), 0), M)
    starts = tl.minimum(tl.maximum(tl.load(offsets_ptr + groups - 1, mask=valid & (groups > 0), other=0), 0), M)
    return tl.where(valid, tl.maximum(ends - starts, 0), 0)


@triton.jit
def _find_group(index, counts, E, E_POW2: tl.constexpr):
    """(group, position within the group) of item ``index`` of a list holding ``counts[g]`` items of
    each group in group order; group E for an index past the list."""
    ends = tl.where(tl.arange(0, E_POW2) < E, tl.cumsum(counts, 0), 0x7FFFFFFF)
    before = ends <= index
    return tl.sum(before.to(tl.int32), 0), index - tl.sum(tl.where(before, counts, 0), 0)


@triton.jit
def _group_bounds(offsets_ptr, group, M):
    start = tl.minimum(tl.maximum(tl.load(offsets_ptr + group - 1, mask=group > 0, other=0), 0), M)
    end = tl.minimum(tl.maximum(tl.load(offsets_ptr + group), start), M)
    return start, end


@triton.jit
def _locate_row_tile(offsets_ptr, row_tile, tiles_per_group, used_rows, M, E,
                     BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """(group, first row, end row, padding) of row tile ``row_tile`` in a list of
    ``tiles_per_group[g]`` BLOCK_M-row tiles from each group's first row, in group order, then the
    tiles of rows ``[offsets[-1], M)``: those report group E-1 (so every operand coordinate stays
    valid) and ``padding`` (their output is stored as zeros)."""
    group, position = _find_group(row_tile, tiles_per_group, E, E_POW2)
    padding = group >= E
    group = tl.minimum(group, E - 1)
    start, end = _group_bounds(offsets_ptr, group, M)
    row_start = tl.where(padding, used_rows + (row_tile - tl.sum(tiles_per_group, 0)) * BLOCK_M,
                         start + position * BLOCK_M)
    return group, row_start, tl.where(padding, M, end), padding


@triton.jit
def _store_tile_tma(out_desc, value, row_start, col_start,
                    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr):
    """Store one output tile through TMA, in ``EPILOGUE_SPLIT`` column slices: a slice needs a
    shared-memory staging buffer of its own size only, which leaves room for deeper pipelines."""
    if EPILOGUE_SPLIT == 2:
        halves = tl.permute(tl.reshape(value, (BLOCK_M, 2, BLOCK_P // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        out_desc.store([row_start, col_start], left)
        out_desc.store([row_start, col_start + BLOCK_P // 2], right)
    else:
        out_desc.store([row_start, col_start], value)


@triton.jit
def _tile_product(a_desc, b_desc, group, row_start, col_start, P, R, steps,
                  B_TRANSPOSED: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for step in range(steps):
        r = step * BLOCK_R
        a = a_desc.load([row_start, r])
        if B_TRANSPOSED:
            b = b_desc.load([group * P + col_start, r])
            acc = _dot(a, b.T, acc, False, UPCAST)
        else:
            b = b_desc.load([group * R + r, col_start])
            acc = _dot(a, b, acc, False, UPCAST)
    return acc


@triton.autotune(configs=product_tma_configs(), key=["P", "R", "E", "M_BUCKET", "B_TRANSPOSED"],
                 prune_configs_by={"early_config_prune": prune_product_tma})
@triton.jit
def _grouped_product_tma_kernel(
    a_desc, b_desc, out_desc, out_ptr, offsets_ptr,
    M, P, R, E, M_BUCKET, stride_om,
    B_TRANSPOSED: tl.constexpr, E_POW2: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
    TMA_STORE: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr,
):
    # Three lists of tiles, walked one after the other by the same persistent programs. The first
    # holds every whole row tile of a group: those store through TMA, whose box cannot stop at a
    # group boundary. The second holds each group's last, partial row tile, stored through a row
    # mask. The third holds the tiles of rows after offsets[-1], stored as zeros with no products.
    # Loops rather than branches in one: the pipeliner of some Triton releases cannot flatten a
    # loop whose epilogue branches, and a select on the accumulator (zeros for padding tiles)
    # costs the pipelined forward loop 3-9% on an H200. The three loops stay in this one function,
    # long as it is, because each continues the round-robin of the one before it.
    sizes = _group_sizes(offsets_ptr, M, E, E_POW2)
    whole_tiles = sizes // BLOCK_M
    partial_tiles = (sizes % BLOCK_M != 0).to(tl.int32)
    used_rows = tl.minimum(tl.maximum(tl.load(offsets_ptr + E - 1), 0), M)
    padding_tiles = (M - used_rows + BLOCK_M - 1) // BLOCK_M
    tiles_p = (P + BLOCK_P - 1) // BLOCK_P
    first_list = tl.sum(whole_tiles, 0) * tiles_p
    second_list = tl.sum(partial_tiles, 0) * tiles_p
    steps = (R + BLOCK_R - 1) // BLOCK_R
    first = tl.program_id(0)
    stride = tl.num_programs(0)

    # The epilogue recomputes its tile from its own counter: sharing values between the
    # flattened loop's prologue and epilogue defeats the pipeliner.
    tile_out = first - stride
    for tile in tl.range(first, first_list, stride, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        group, row_start, _, _ = _locate_row_tile(offsets_ptr, tile // tiles_p, whole_tiles, used_rows, M, E, BLOCK_M,
                                                  E_POW2)
        acc = _tile_product(a_desc, b_desc, group, row_start, (tile % tiles_p) * BLOCK_P, P, R, steps,
                            B_TRANSPOSED, UPCAST, BLOCK_M, BLOCK_P, BLOCK_R)
        tile_out += stride
        _, row_start_out, _, _ = _locate_row_tile(offsets_ptr, tile_out // tiles_p, whole_tiles, used_rows, M, E,
                                                  BLOCK_M, E_POW2)
        col_start_out = (tile_out % tiles_p) * BLOCK_P
        value = acc.to(out_ptr.dtype.element_ty)
        if TMA_STORE:
            _store_tile_tma(out_desc, value, row_start_out, col_start_out, BLOCK_M, BLOCK_P, EPILOGUE_SPLIT)
        else:
            _store_rows(out_ptr, value, row_start_out, M, col_start_out, P, stride_om, BLOCK_M, BLOCK_P)

    # The second list continues the first's round-robin, so programs left short there go first.
    second_first = (first - first_list % stride + stride) % stride
    tile_out = second_first - stride
    for tile in tl.range(second_first, second_list, stride, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        group, _ = _find_group(tile // tiles_p, partial_tiles, E, E_POW2)
        start, end = _group_bounds(offsets_ptr, group, M)
        acc = _tile_product(a_desc, b_desc, group, end - (end - start) % BLOCK_M, (tile % tiles_p) * BLOCK_P, P, R,
                            steps, B_TRANSPOSED, UPCAST, BLOCK_M, BLOCK_P, BLOCK_R)
        tile_out += stride
        group_out, _ = _find_group(tile_out // tiles_p, partial_tiles, E, E_POW2)
        start_out, end_out = _group_bounds(offsets_ptr, group_out, M)
        _store_rows(out_ptr, acc.to(out_ptr.dtype.element_ty), end_out - (end_out - start_out) % BLOCK_M, end_out,
                    (tile_out % tiles_p) * BLOCK_P, P, stride_om, BLOCK_M, BLOCK_P)

    # The third list continues the second's round-robin in the same way.
    third_first = (second_first - second_list % stride + stride) % stride
    zeros = tl.zeros((BLOCK_M, BLOCK_P), dtype=out_ptr.dtype.element_ty)
    for tile in range(third_first, padding_tiles * tiles_p, stride):
        _store_rows(out_ptr, zeros, used_rows + (tile // tiles_p) * BLOCK_M, M, (tile % tiles_p) * BLOCK_P, P,
                    stride_om, BLOCK_M, BLOCK_P)


# ----------------------------------------------------------------------------------------------
# Grouped product, portable path
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=product_portable_configs(), key=["P", "R", "E", "M_BUCKET", "B_TRANSPOSED"])
@triton.jit
def _grouped_product_kernel(
    a_ptr, b_ptr, out_ptr, offsets_ptr,
    M, P, R, E, M_BUCKET,
    stride_am, stride_ar, stride_bg, stride_br, stride_bp, stride_om, stride_op,
    B_TRANSPOSED: tl.constexpr, E_POW2: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Grid: (row tiles + E) x column tiles, enough for any split of M into E groups (each group
    # adds at most one partial tile), so launching needs no host read of the group sizes.
    row_tiles = (_group_sizes(offsets_ptr, M, E, E_POW2) + BLOCK_M - 1) // BLOCK_M
    used_rows = tl.minimum(tl.maximum(tl.load(offsets_ptr + E - 1), 0), M)
    padding_tiles = (M - used_rows + BLOCK_M - 1) // BLOCK_M
    row_tile = tl.program_id(0)
    if row_tile < tl.sum(row_tiles, 0) + padding_tiles:
        group, row_start, row_end, padding = _locate_row_tile(offsets_ptr, row_tile, row_tiles, used_rows, M, E,
                                                              BLOCK_M, E_POW2)
        rows = row_start + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        row_mask = rows < row_end
        col_mask = cols < P
        acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        ks = tl.arange(0, BLOCK_R)
        a_tile = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ar
        b_tile = b_ptr + group.to(tl.int64) * stride_bg + ks[:, None] * stride_br + cols[None, :] * stride_bp
        steps = tl.cdiv(R, BLOCK_R)
        if padding:  # rows after the last group: no products, zeros stored
            steps = 0
        for step in range(0, steps):
            k_mask = ks < R - step * BLOCK_R
            a = tl.load(a_tile, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_tile, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = _dot(a, b, acc, IEEE, UPCAST)
            a_tile += BLOCK_R * stride_ar
            b_tile += BLOCK_R * stride_br
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_op,
                 acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Grouped wgrad
# ----------------------------------------------------------------------------------------------


@triton.jit
def _wgrad_tma_tile(left_desc, right_desc, left_ptr, right_ptr, offsets_ptr, M, P1, P2, stride_lm, stride_rm,
                    UPCAST: tl.constexpr, BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's (group, output tile): the tile's float32 sum over the group's rows (whole row
    blocks through TMA, the last partial block through masked loads: rows of the next group must
    not enter it), the group, and the tile's rows and columns."""
    # Tile index fastest, group slowest: programs running together share one group's rows in L2.
    tiles_p2 = tl.cdiv(P2, BLOCK_P2)
    group = tl.program_id(1)
    p1_start = (tl.program_id(0) // tiles_p2) * BLOCK_P1
    p2_start = (tl.program_id(0) % tiles_p2) * BLOCK_P2
    row_start, row_end = _group_bounds(offsets_ptr, group, M)
    whole_blocks = (row_end - row_start) // BLOCK_M
    acc = tl.zeros((BLOCK_P1, BLOCK_P2), dtype=tl.float32)
    for block in range(whole_blocks):
        row = row_start + block * BLOCK_M
        left = left_desc.load([row, p1_start])
        right = right_desc.load([row, p2_start])
        acc = _dot(left.T, right, acc, False, UPCAST)
    tail = row_start + whole_blocks * BLOCK_M
    if tail < row_end:
        rows = tail + tl.arange(0, BLOCK_M)
        cols1 = p1_start + tl.arange(0, BLOCK_P1)
        cols2 = p2_start + tl.arange(0, BLOCK_P2)
        row_mask = rows < row_end
        left = tl.load(left_ptr + rows[:, None].to(tl.int64) * stride_lm + cols1[None, :],
                       mask=row_mask[:, None] & (cols1[None, :] < P1), other=0.0)
        right = tl.load(right_ptr + rows[:, None].to(tl.int64) * stride_rm + cols2[None, :],
                        mask=row_mask[:, None] & (cols2[None, :] < P2), other=0.0)
        acc = _dot(left.T, right, acc, False, UPCAST)
    return acc, group, p1_start + tl.arange(0, BLOCK_P1), p2_start + tl.arange(0, BLOCK_P2)


@triton.jit
def _wgrad_portable_tile(left_ptr, right_ptr, offsets_ptr, M, P1, P2, stride_lm, stride_l1, stride_rm, stride_r2,
                         IEEE: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """As ``_wgrad_tma_tile``, through masked loads only."""
    tiles_p2 = tl.cdiv(P2, BLOCK_P2)
    group = tl.program_id(1)
    cols1 = (tl.program_id(0) // tiles_p2) * BLOCK_P1 + tl.arange(0, BLOCK_P1)
    cols2 = (tl.program_id(0) % tiles_p2) * BLOCK_P2 + tl.arange(0, BLOCK_P2)
    row_start, row_end = _group_bounds(offsets_ptr, group, M)
    mask1 = cols1 < P1
    mask2 = cols2 < P2
    acc = tl.zeros((BLOCK_P1, BLOCK_P2), dtype=tl.float32)
    ms = tl.arange(0, BLOCK_M)
    for m in range(row_start, row_end, BLOCK_M):
        rows = m + ms
        row_mask = rows < row_end
        left = tl.load(left_ptr + rows[None, :].to(tl.int64) * stride_lm + cols1[:, None] * stride_l1,
                       mask=mask1[:, None] & row_mask[None, :], other=0.0)
        right = tl.load(right_ptr + rows[:, None].to(tl.int64) * stride_rm + cols2[None, :] * stride_r2,
                        mask=row_mask[:, None] & mask2[None, :], other=0.0)
        acc = _dot(left, right, acc, IEEE, UPCAST)
    return acc, group, cols1, cols2


@triton.jit
def _sgd_epilogue(acc, param_ptr, lr_ptr, partial_ptr, group, cols1, cols2, P1, P2, stride_pg, stride_p1, stride_p2):
    """``param -= lr * grad`` on one tile, ``grad`` the tile's sum rounded to the parameter's dtype,
    and the tile's share of ``sum(grad ** 2)`` written to its own slot of ``partial_ptr``.

    Rounded as the unfused graph rounds (``param - grad * lr`` with ``lr`` already in the
    parameter's dtype, every op's result in that dtype; the squares of the rounded gradient in
    float32, as ``vector_norm`` takes them), so the fused step gives the unfused one's values up
    to the order of the norm's sum."""
    dtype = param_ptr.dtype.element_ty
    mask = (cols1[:, None] < P1) & (cols2[None, :] < P2)
    pointers = param_ptr + group.to(tl.int64) * stride_pg + cols1[:, None] * stride_p1 + cols2[None, :] * stride_p2
    grad = acc.to(dtype).to(tl.float32)
    step = (grad * tl.load(lr_ptr).to(tl.float32)).to(dtype).to(tl.float32)
    param = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    tl.store(pointers, (param - step).to(dtype), mask=mask)
    square = tl.where(mask, grad * grad, 0.0)
    slot = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    tl.store(partial_ptr + slot, tl.sum(tl.sum(square, axis=1), axis=0))


@triton.autotune(configs=wgrad_tma_configs(), key=["P1", "P2", "E", "M_BUCKET"],
                 prune_configs_by={"early_config_prune": prune_wgrad})
@triton.jit
def _grouped_wgrad_tma_kernel(
    left_desc, right_desc, left_ptr, right_ptr, dw_ptr, offsets_ptr,
    M, P1, P2, E, M_BUCKET,
    stride_lm, stride_rm, stride_dg, stride_d1,
    UPCAST: tl.constexpr,
    BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr, BLOCK_M: tl.constexpr,
):
    acc, group, rows1, cols2 = _wgrad_tma_tile(left_desc, right_desc, left_ptr, right_ptr, offsets_ptr, M, P1, P2,
                                               stride_lm, stride_rm, UPCAST, BLOCK_P1, BLOCK_P2, BLOCK_M)
    tl.store(dw_ptr + group.to(tl.int64) * stride_dg + rows1[:, None] * stride_d1 + cols2[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=(rows1[:, None] < P1) & (cols2[None, :] < P2))


@triton.jit
def _grouped_wgrad_sgd_tma_kernel(
    left_desc, right_desc, left_ptr, right_ptr, param_ptr, lr_ptr, partial_ptr, offsets_ptr,
    M, P1, P2, E, M_BUCKET,
    stride_lm, stride_rm, stride_pg, stride_p1,
    UPCAST: tl.constexpr,
    BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``_grouped_wgrad_tma_kernel`` whose tile, instead of being stored, takes an SGD step on the
    parameter it is the gradient of (``_sgd_epilogue``); launched with the configuration tuned for
    the plain kernel (tuning an in-place update would apply it once per trial)."""
    acc, group, rows1, cols2 = _wgrad_tma_tile(left_desc, right_desc, left_ptr, right_ptr, offsets_ptr, M, P1, P2,
                                               stride_lm, stride_rm, UPCAST, BLOCK_P1, BLOCK_P2, BLOCK_M)
    _sgd_epilogue(acc, param_ptr, lr_ptr, partial_ptr, group, rows1, cols2, P1, P2, stride_pg, stride_p1, 1)


@triton.autotune(configs=wgrad_portable_configs(), key=["P1", "P2", "E", "M_BUCKET"])
@triton.jit
def _grouped_wgrad_kernel(
    left_ptr, right_ptr, dw_ptr, offsets_ptr,
    M, P1, P2, E, M_BUCKET,
    stride_lm, stride_l1, stride_rm, stride_r2, stride_dg, stride_d1, stride_d2,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr, BLOCK_M: tl.constexpr,
):
    acc, group, cols1, cols2 = _wgrad_portable_tile(left_ptr, right_ptr, offsets_ptr, M, P1, P2, stride_lm, stride_l1,
                                                    stride_rm, stride_r2, IEEE, UPCAST, BLOCK_P1, BLOCK_P2, BLOCK_M)
    tl.store(dw_ptr + group.to(tl.int64) * stride_dg + cols1[:, None] * stride_d1 + cols2[None, :] * stride_d2,
             acc.to(dw_ptr.dtype.element_ty), mask=(cols1[:, None] < P1) & (cols2[None, :] < P2))


@triton.jit
def _grouped_wgrad_sgd_kernel(
    left_ptr, right_ptr, param_ptr, lr_ptr, partial_ptr, offsets_ptr,
    M, P1, P2, E, M_BUCKET,
    stride_lm, stride_l1, stride_rm, stride_r2, stride_pg, stride_p1, stride_p2,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The portable wgrad with the SGD step as its epilogue (see ``_grouped_wgrad_sgd_tma_kernel``)."""
    acc, group, cols1, cols2 = _wgrad_portable_tile(left_ptr, right_ptr, offsets_ptr, M, P1, P2, stride_lm, stride_l1,
                                                    stride_rm, stride_r2, IEEE, UPCAST, BLOCK_P1, BLOCK_P2, BLOCK_M)
    _sgd_epilogue(acc, param_ptr, lr_ptr, partial_ptr, group, cols1, cols2, P1, P2, stride_pg, stride_p1, stride_p2)
