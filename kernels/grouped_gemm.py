"""Triton grouped GEMM for MoE experts: forward, dgrad and wgrad, group boundaries read on the device.

Every kernel computes, for each group ``g`` spanning rows ``offsets[g-1]:offsets[g]`` (int32 end
offsets, cumulative, on the device, never read by the host):

* ``grouped product``  ``out[rows of g] = a[rows of g] @ B_g``  (forward, and dgrad with ``B_g``
  the transposed weight: both are one kernel over two views of the same weight storage),
* ``grouped wgrad``    ``dW[g] = left[rows of g].T @ right[rows of g]``.

Two implementations of each, chosen per call by :func:`select_path`:

``"tma"``       Hopper (sm_90+) bf16/fp16 path. The grouped product is a persistent kernel: one
                program per SM slot (or two, where half the shared memory is enough) walks a
                flattened loop over (tile, reduction step) so the software pipeliner keeps loads
                of the next tile in flight during the epilogue; operands come through host-built
                TMA descriptors (loop-invariant, so the pipeliner accepts them); each tile finds
                its group with one vectorised comparison against a per-group prefix sum. Whole
                row tiles store through TMA (asynchronous: the store drains while the next tile
                computes); each group's last, partial tile comes in a second loop and stores
                through a row mask, since a TMA box cannot stop at a group boundary; the rows
                after the last offset come in a third, as zeros with no products. Partial
                tiles load rows of the next group (harmless: those rows are masked at the store).
                On sm_90 with the Triton release it was written for, a second schedule of the
                same product (``kernels.grouped_gemm_pingpong``: a loader warp and two consumer
                warp groups in ping-pong) is timed against this one once per problem, and the
                faster kept (:func:`use_schedule` fixes one).
                wgrad loads whole row blocks of a group through TMA and the last partial block with
                masked loads, so rows of neighbouring groups never enter the sum.
``"portable"``  plain masked ``tl.load``/``tl.store``, any dtype (fp32 uses IEEE products, no TF32),
                any strides; what the CPU interpreter (``TRITON_INTERPRET=1``) and older GPUs run.

Rows after ``offsets[-1]`` are written with zeros by the grouped product, so the whole output is
always defined; wgrad writes zeros for empty groups. ``offsets`` must be non-decreasing with
``offsets[-1] <= M``; the kernels clamp what they read to ``[0, M]`` so a violation cannot write
outside the output.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import grouped_gemm_pingpong as _pingpong
from .launch import launcher

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: portable path only
    TensorDescriptor = None

__all__ = [
    "triton_grouped_mm",
    "triton_grouped_mm_wgrad",
    "select_path",
    "use_config",
    "use_schedule",
    "SCHEDULES",
    "product_tma_config",
    "launch_counts",
    "INTERPRETED",
    "PATHS",
]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
PATHS = ("auto", "tma", "portable")
# Schedules of the Hopper grouped product: Triton's software pipeline (``_grouped_product_tma_kernel``)
# or the warp-specialised ping-pong kernel of ``kernels.grouped_gemm_pingpong``; "auto" times both
# once per problem where the second can run, and keeps the faster.
SCHEDULES = ("auto", "pipelined", "pingpong")

# Kernel launches per implementation, so tests and users can see which code really ran.
launch_counts: collections.Counter = collections.Counter()

_TMA_DTYPES = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------


def _set_product_blocks(nargs):
    """Give the host TMA descriptors the block shapes of the configuration being launched."""
    block_m, block_p, block_r = nargs["BLOCK_M"], nargs["BLOCK_P"], nargs["BLOCK_R"]
    nargs["a_desc"].block_shape = [block_m, block_r]
    nargs["b_desc"].block_shape = [block_p, block_r] if nargs["B_TRANSPOSED"] else [block_r, block_p]
    nargs["out_desc"].block_shape = [block_m, block_p // nargs["EPILOGUE_SPLIT"]]


def _set_wgrad_blocks(nargs):
    nargs["left_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_P1"]]
    nargs["right_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_P2"]]


def product_tma_config(block_m, block_p, block_r, warps, stages, programs_per_sm=1, tma_store=True,
                       epilogue_split=1, warp_specialize=False) -> triton.Config:
    """One configuration of the Hopper grouped product (tests and the tuning sweep build their
    own through this). ``warp_specialize`` gives the loads and the products warps of their own;
    Triton does that on Hopper for loops it does not flatten, so the tile loop is left unflattened
    there."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_P": block_p, "BLOCK_R": block_r, "PROGRAMS_PER_SM": programs_per_sm,
         "TMA_STORE": tma_store, "EPILOGUE_SPLIT": epilogue_split, "WARP_SPECIALIZE": warp_specialize,
         "FLATTEN": not warp_specialize},
        num_warps=warps, num_stages=stages, pre_hook=_set_product_blocks)


def _product_tma_configs():
    if INTERPRETED:
        return [product_tma_config(16, 32, 16, 4, 1, tma_store=True, epilogue_split=2)]
    # (BLOCK_M, BLOCK_P, BLOCK_R, warps, stages, programs per SM, epilogue split). On an H200,
    # benchmarks/grouped_gemm_configs.py found the best candidate of each of its 32 forward and
    # dgrad rows in this list (benchmarks/results/grouped_gemm_configs_h200.json). Two programs
    # per SM (each under half of the 228 KB of shared memory) let one's epilogue overlap the
    # other's main loop, which pays where the reduction is short (K = 192) and the output stores
    # dominate; 128 x 256 tiles with a four-deep pipeline win where it is long.
    return [product_tma_config(block_m, block_p, block_r, warps, stages, per_sm, epilogue_split=split)
            for block_m, block_p, block_r, warps, stages, per_sm, split in [
                (128, 128, 64, 4, 3, 2, 2),
                (128, 256, 64, 8, 4, 1, 2),
                (256, 128, 64, 8, 4, 1, 2),
                (128, 256, 64, 8, 3, 1, 2),
                (128, 128, 64, 8, 5, 1, 2),
                (128, 64, 64, 4, 4, 2, 1),
                (128, 64, 64, 4, 4, 2, 2),
                (64, 128, 64, 4, 4, 2, 1),
                (64, 256, 64, 4, 3, 1, 2),
            ]]


def _prune_product_tma(configs, named_args, **kwargs):
    """Keep tiles that fit the problem: an untransposed B needs R to be a multiple of BLOCK_R
    (its row blocks would otherwise reach into the next group's weights), and tiles far wider
    than P only waste work."""
    p, r = named_args["P"], named_args["R"]
    transposed = kwargs.get("B_TRANSPOSED", named_args.get("B_TRANSPOSED"))
    kept = [c for c in configs if transposed or r % c.kwargs["BLOCK_R"] == 0]
    narrow = [c for c in kept if c.kwargs["BLOCK_P"] <= max(64, triton.next_power_of_2(p))]
    return narrow or kept


def _wgrad_tma_configs():
    if INTERPRETED:
        return [triton.Config({"BLOCK_P1": 16, "BLOCK_P2": 16, "BLOCK_M": 16}, num_warps=4, num_stages=1,
                              pre_hook=_set_wgrad_blocks)]
    configs = []
    # The last three fit two programs per SM, so one's epilogue overlaps the other's loads.
    for block_p1, block_p2, block_m, warps, stages in [
        (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
        (128, 128, 128, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 2), (128, 128, 32, 4, 4),
    ]:
        configs.append(triton.Config({"BLOCK_P1": block_p1, "BLOCK_P2": block_p2, "BLOCK_M": block_m},
                                     num_warps=warps, num_stages=stages, pre_hook=_set_wgrad_blocks))
    return configs


def _prune_wgrad(configs, named_args, **kwargs):
    p1, p2 = named_args["P1"], named_args["P2"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_P1"] <= max(64, triton.next_power_of_2(p1))
            and c.kwargs["BLOCK_P2"] <= max(64, triton.next_power_of_2(p2))]
    return kept or configs


def _product_portable_configs():
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_R": 16}, num_warps=4, num_stages=1)]
    configs = []
    for block_m, block_p, block_r, warps, stages in [
        (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 32, 4, 4),
    ]:
        configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_P": block_p, "BLOCK_R": block_r},
                                     num_warps=warps, num_stages=stages))
    return configs


def _wgrad_portable_configs():
    if INTERPRETED:
        return [triton.Config({"BLOCK_P1": 16, "BLOCK_P2": 32, "BLOCK_M": 16}, num_warps=4, num_stages=1)]
    configs = []
    for block_p1, block_p2, block_m, warps, stages in [
        (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
    ]:
        configs.append(triton.Config({"BLOCK_P1": block_p1, "BLOCK_P2": block_p2, "BLOCK_M": block_m},
                                     num_warps=warps, num_stages=stages))
    return configs


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


@triton.autotune(configs=_product_tma_configs(), key=["P", "R", "E", "M_BUCKET", "B_TRANSPOSED"],
                 prune_configs_by={"early_config_prune": _prune_product_tma})
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
    # costs the pipelined forward loop 3-9% on an H200.
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


@triton.autotune(configs=_product_portable_configs(), key=["P", "R", "E", "M_BUCKET", "B_TRANSPOSED"])
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


@triton.autotune(configs=_wgrad_tma_configs(), key=["P1", "P2", "E", "M_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_wgrad})
@triton.jit
def _grouped_wgrad_tma_kernel(
    left_desc, right_desc, left_ptr, right_ptr, dw_ptr, offsets_ptr,
    M, P1, P2, E, M_BUCKET,
    stride_lm, stride_rm, stride_dg, stride_d1,
    UPCAST: tl.constexpr,
    BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr, BLOCK_M: tl.constexpr,
):
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
    # The last partial block through masked loads: rows of the next group must not enter the sum.
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
    rows1 = p1_start + tl.arange(0, BLOCK_P1)
    cols2 = p2_start + tl.arange(0, BLOCK_P2)
    tl.store(dw_ptr + group.to(tl.int64) * stride_dg + rows1[:, None] * stride_d1 + cols2[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=(rows1[:, None] < P1) & (cols2[None, :] < P2))


@triton.autotune(configs=_wgrad_portable_configs(), key=["P1", "P2", "E", "M_BUCKET"])
@triton.jit
def _grouped_wgrad_kernel(
    left_ptr, right_ptr, dw_ptr, offsets_ptr,
    M, P1, P2, E, M_BUCKET,
    stride_lm, stride_l1, stride_rm, stride_r2, stride_dg, stride_d1, stride_d2,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr, BLOCK_M: tl.constexpr,
):
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
    tl.store(dw_ptr + group.to(tl.int64) * stride_dg + cols1[:, None] * stride_d1 + cols2[None, :] * stride_d2,
             acc.to(dw_ptr.dtype.element_ty), mask=mask1[:, None] & mask2[None, :])


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def _cdiv(numerator: int, denominator: int) -> int:
    # Plain integer arithmetic: triton.cdiv is a JIT-aware function, several times dearer per
    # call on the host, and the grid is computed on every launch.
    return -(-numerator // denominator)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    return TensorDescriptor is not None and torch.cuda.get_device_capability(device_index)[0] >= 9


def _device_index(tensor: torch.Tensor) -> int:
    return tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()


def _aligned(tensor: torch.Tensor) -> bool:
    return tensor.data_ptr() % 16 == 0


def _row_major(tensor: torch.Tensor) -> bool:
    """2-D with unit column stride and a 16-byte row stride: what a TMA descriptor can address."""
    row_stride, column_stride = tensor.stride()
    return column_stride == 1 and (row_stride * tensor.element_size()) % 16 == 0 and _aligned(tensor)


@functools.lru_cache(maxsize=None)
def _min_block_r() -> int:
    return min(c.kwargs["BLOCK_R"] for c in _product_tma_configs())


def _weight_rows(w: torch.Tensor, r: int, p: int, stride_r: int, stride_p: int):
    """The weight as one 2-D row-major matrix a TMA descriptor can walk: ``(shape, strides,
    transposed)`` where each group's ``B_g`` [R, P] is stored transposed (``[P, R]``, rows
    ``g*P + p``) or not (rows ``g*R + r``); ``None`` where the storage is not such a matrix."""
    element, stride_g = w.element_size(), w.stride(0)
    if stride_r == 1 and stride_p * element % 16 == 0 and stride_g == p * stride_p and stride_p >= r:
        return [w.shape[0] * p, r], [stride_p, 1], True
    if stride_p == 1 and stride_r * element % 16 == 0 and stride_g == r * stride_r and stride_r >= p:
        return [w.shape[0] * r, p], [stride_r, 1], False
    return None


def select_path(kind: str, tensors, requested: str = "auto") -> str:
    """``"tma"`` where the Hopper kernels can run on these tensors, else ``"portable"``.

    ``requested="tma"`` is honoured on any device where descriptors can be built (the CPU
    interpreter included) so tests can run the Hopper kernels' code; it raises when the layout
    rules out TMA.
    """
    if requested not in PATHS:
        raise ValueError(f"unknown grouped GEMM kernel path {requested!r}; choose one of {', '.join(PATHS)}")
    if requested == "portable":
        return "portable"
    if requested == "auto":
        device = tensors[0].device
        if device.type != "cuda" or not _has_tma(_device_index(tensors[0])):
            return "portable"
    reason = _tma_refusal(kind, tensors)
    if reason is None:
        return "tma"
    if requested == "tma":
        raise ValueError(f"grouped GEMM {kind}: the TMA path cannot run here: {reason}")
    return "portable"


def _tma_refusal(kind, tensors):
    if TensorDescriptor is None:
        return "this Triton has no host tensor descriptors"
    if tensors[0].dtype not in _TMA_DTYPES:
        return f"dtype {tensors[0].dtype} (TMA kernels take bfloat16 or float16)"
    if kind == "product":
        a, w, out, r, p, stride_r, stride_p = tensors
        if not _row_major(a):
            return "the activations are not row-major with 16-byte aligned rows"
        if not (_row_major(out) and out.stride(0) == p):
            return f"the output is not a contiguous, 16-byte aligned [M, {p}] matrix"
        rows = _weight_rows(w, r, p, stride_r, stride_p)
        if rows is None or not _aligned(w):
            return "the weight is not stored as contiguous 16-byte aligned rows"
        if not rows[2] and r % _min_block_r():
            return f"the reduction length {r} of an untransposed weight is not a multiple of {_min_block_r()}"
        return None
    left, right, dw = tensors
    for name, tensor in (("left", left), ("right", right)):
        if not _row_major(tensor):
            return f"the {name} operand is not row-major with 16-byte aligned rows"
    if dw.stride(2) != 1:
        return "the weight gradient has no unit column stride"
    return None


# Launching. Each kernel is autotuned once per problem key (shape class, dtype); later calls skip
# the autotuner (its per-call bookkeeping and the descriptor pre-hooks), and once the JIT has
# compiled a kernel for a given argument specialization, that compiled kernel is launched
# directly (``kernels.launch``). Host time per call matters: a grouped GEMM of a small expert
# batch runs in tens of microseconds, about what the generic launch path costs on a slow host.
_chosen: dict = {}
_forced: dict = {}
_compiled: dict = {}


@contextlib.contextmanager
def use_config(kernel, config: triton.Config):
    """Launch ``kernel`` (one of this module's autotuned kernels) with ``config`` inside the block,
    without tuning: tests and benchmarks use it to check every configuration."""
    _forced[kernel] = config
    try:
        yield
    finally:
        del _forced[kernel]


_forced_schedule: list = []  # innermost use_schedule() last
_schedules: dict = {}        # product tuning key -> the schedule "auto" chose


@contextlib.contextmanager
def use_schedule(schedule: str):
    """Run the Hopper grouped product with ``schedule`` (one of :data:`SCHEDULES`) inside the block.
    ``"pingpong"`` raises where that kernel cannot run (another Triton release, a device other
    than sm_90, an untransposed weight whose reduction is not a multiple of its block)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown grouped product schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    _forced_schedule.append(schedule)
    try:
        yield
    finally:
        _forced_schedule.pop()


def _product_schedule(plan: _Plan, tune_key, m: int, run_pipelined, run_pingpong) -> str:
    """The schedule of this TMA product launch; under "auto", the first launch of a problem times
    both (after the pipelined kernel has tuned its configuration) and the faster is kept."""
    requested = _forced_schedule[-1] if _forced_schedule else "auto"
    fits = plan.pingpong and m < 2**31
    if requested == "pingpong":
        if not fits:
            raise ValueError("grouped product: the ping-pong schedule cannot run here (it needs Triton "
                             f"{_pingpong.TRITON_RELEASE}x, an sm_90 device, M < 2**31, and a transposed weight "
                             f"or a reduction that is a multiple of {_pingpong.BLOCK_R})")
        return requested
    # A configuration forced through use_config is one of the pipelined kernel's.
    if requested == "pipelined" or not fits or plan.kernel in _forced:
        return "pipelined"
    chosen = _schedules.get(tune_key)
    if chosen is None:
        from triton.testing import do_bench

        run_pipelined()
        times = {"pipelined": do_bench(run_pipelined), "pingpong": do_bench(run_pingpong)}
        chosen = _schedules[tune_key] = min(times, key=times.get)
    return chosen


def _descriptor(base: torch.Tensor, shape, strides, block_shape):
    """A host TMA descriptor, built without the constructor's checks: ``select_path`` has checked
    the layout rules (16-byte aligned base and row stride, unit last stride, non-empty shape) and
    every block shape comes from this module's configurations."""
    descriptor = object.__new__(TensorDescriptor)
    descriptor.base, descriptor.shape, descriptor.strides = base, shape, strides
    descriptor.block_shape, descriptor.padding = block_shape, "zero"
    return descriptor


def _specialization(args) -> tuple:
    """Everything about the runtime arguments a compiled kernel may have been specialized on
    (a superset of what Triton's JIT looks at: dtypes, 16-byte alignment, integers equal to one
    or divisible by 16, integer width), and the tensors' device, on which a compiled kernel is
    loaded; so a compiled kernel is reused only where it is valid."""
    key = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            key.append((arg.dtype, arg.device, arg.data_ptr() % 16 == 0))
        elif isinstance(arg, bool) or arg is None:
            key.append(arg)
        elif isinstance(arg, int):
            key.append((arg % 16 == 0, arg == 1, -(2**31) <= arg < 2**31))
        elif TensorDescriptor is not None and isinstance(arg, TensorDescriptor):
            key.append((arg.base.dtype, arg.base.data_ptr() % 16 == 0, tuple(arg.block_shape),
                        tuple(value % 16 == 0 for value in (*arg.shape, *arg.strides))))
        else:
            key.append(arg)
    return tuple(key)


def _launch(kernel, key, grid_of, make_descriptors, args, constexprs, specialization):
    """Launch ``kernel`` for problem ``key``. ``specialization`` holds every argument property the
    compiled kernel may depend on that ``key`` does not already fix: the row count's, and those
    of the launch plan, worked out once per operand layout."""
    config = _forced.get(kernel) or _chosen.get((kernel, key))
    if config is None:
        # First call for this key: autotune, the configurations' pre-hooks sizing the descriptors.
        kernel[lambda meta: grid_of(meta)](*make_descriptors(None), *args, **constexprs)
        _chosen[(kernel, key)] = kernel.best_config
        return
    blocks = config.kwargs
    descriptors = make_descriptors(blocks)
    runtime_args = (*descriptors, *args)
    grid = (*grid_of(blocks), 1, 1)[:3]
    if INTERPRETED:
        kernel.fn.run(*runtime_args, grid=grid, warmup=False, **constexprs, **config.all_kwargs())
        return
    # One compiled kernel per (kernel, problem, specialization), valid for the configuration it
    # was compiled with: comparing that configuration by identity costs nothing, where hashing
    # a triton.Config on every call costs more than the rest of this function.
    compiled_key = (kernel, key, specialization)
    cached = _compiled.get(compiled_key)
    if cached is None or cached[0] is not config:
        compiled = kernel.fn.run(*runtime_args, grid=grid, warmup=False, **constexprs, **config.all_kwargs())
        # The compiled kernel takes every parameter in signature order, constexprs included (as
        # the JIT passes them): runtime arguments, then the constexprs, then the configuration's.
        trailing = (*constexprs.values(), *blocks.values())
        names = kernel.fn.arg_names
        if list(names[len(runtime_args):]) == [*constexprs, *blocks]:
            device_index = next(arg for arg in args if isinstance(arg, torch.Tensor)).device.index
            _compiled[compiled_key] = (config, launcher(compiled, len(descriptors), device_index), trailing)
        return
    _, launch, trailing = cached
    launch(grid, (*runtime_args, *trailing))


class _Plan(NamedTuple):
    """What a launch derives from its operands' layout (strides, widths, groups, dtype, device,
    16-byte alignment), computed once per layout: the kernel and path, the compile-time
    arguments, the runtime integers after the row count and its bucket, and the part of the
    compiled kernel's specialization they fix. The row count M (which varies from call to call
    with routing) stays out of it."""

    path: str
    kernel: object
    constexprs: dict
    trailing_ints: tuple
    specialization: tuple
    weight_rows: tuple | None = None  # TMA product: (shape, strides, stored transposed) of the weight matrix
    slots: int = 0                    # TMA product: persistent programs per configuration's PROGRAMS_PER_SM
    pingpong: bool = False            # TMA product: the ping-pong schedule can run these operands


# Plans by operand layout; bounded by the distinct layer shapes of a model, cleared if a caller
# somehow produces more.
_plans: dict = {}
_MAX_PLANS = 4096


def _remember(key, plan: _Plan) -> _Plan:
    if len(_plans) >= _MAX_PLANS:
        _plans.clear()
    _plans[key] = plan
    return plan


def _product_plan(x, w, out, offsets, r, p, stride_r, stride_p, experts, requested) -> _Plan:
    chosen = select_path("product", (x, w, out, r, p, stride_r, stride_p), requested)
    # One compiled variant serves every expert count up to 128 (a 128-lane vector costs what a
    # 64-lane one does at 4+ warps).
    e_pow2 = max(128, _next_power_of_two(experts))
    upcast = INTERPRETED and x.dtype != torch.float32
    if chosen == "tma":
        weight_rows = _weight_rows(w, r, p, stride_r, stride_p)
        slots = _multiprocessors(_device_index(x)) if x.is_cuda else 4  # the interpreter: a few, to exercise striding
        # The ping-pong kernel's untransposed weight blocks are BLOCK_R rows deep, as the pipelined kernel's are.
        pingpong = (x.is_cuda and _pingpong.available(_device_index(x))
                    and (weight_rows[2] or r % _pingpong.BLOCK_R == 0))
        # The tuning key fixes P, R, E, the bucket and the layout; select_path checked the
        # alignment of x, w and out. What is left: M, the row stride of x, the alignment of
        # offsets, and the device (a compiled kernel is loaded on one).
        return _Plan("tma", _grouped_product_tma_kernel,
                     dict(B_TRANSPOSED=weight_rows[2], E_POW2=e_pow2, UPCAST=upcast), (out.stride(0),),
                     (x.stride(0) % 16, weight_rows[1][0] % 16, offsets.data_ptr() % 16, x.device), weight_rows, slots,
                     pingpong)
    runtime_ints = (x.stride(0), x.stride(1), w.stride(0), stride_r, stride_p, out.stride(0), out.stride(1))
    return _Plan("portable", _grouped_product_kernel,
                 dict(B_TRANSPOSED=stride_r == 1, E_POW2=e_pow2, IEEE=x.dtype == torch.float32, UPCAST=upcast),
                 runtime_ints, _specialization((x, w, out, offsets, p, r, experts, *runtime_ints)))


def triton_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, w_layout: str = "ekn",
                      transpose_weight: bool = False, out: torch.Tensor | None = None,
                      path: str = "auto") -> torch.Tensor:
    """``x @ W[g]`` per group (``W[g]`` read as ``[K, N]`` from either layout), or ``x @ W[g].T``
    with ``transpose_weight`` (dgrad). Rows after ``offsets[-1]`` are zeros.

    ``out`` may be given (``[M, P]``); tests pass it filled with NaN to prove every element is
    written.
    """
    # B_g is the logical [R, P] operand: R reduced over, P the output width.
    experts, rows_w, cols_w = w.shape
    w_strides = w.stride()
    if w_layout == "ekn":
        r, p, stride_r, stride_p = rows_w, cols_w, w_strides[1], w_strides[2]
    else:
        r, p, stride_r, stride_p = cols_w, rows_w, w_strides[2], w_strides[1]
    if transpose_weight:
        r, p, stride_r, stride_p = p, r, stride_p, stride_r
    m = x.shape[0]
    if out is None:
        out = torch.empty((m, p), dtype=x.dtype, device=x.device)
    if m == 0 or p == 0:
        return out
    if experts == 0 or r == 0:
        return out.zero_()
    x_strides, out_strides = x.stride(), out.stride()
    plan_key = ("product", x_strides, w_strides, out_strides, r, p, stride_r, stride_p, experts, x.dtype, x.device,
                path, x.data_ptr() % 16, w.data_ptr() % 16, out.data_ptr() % 16, offsets.data_ptr() % 16)
    plan = _plans.get(plan_key) or _remember(plan_key, _product_plan(x, w, out, offsets, r, p, stride_r, stride_p,
                                                                    experts, path))
    launch_counts[f"product_{plan.path}"] += 1
    m_bucket = _next_power_of_two(m)
    specialization = (m % 16 == 0, m == 1, m >> 31, m_bucket, *plan.specialization)
    if plan.path == "tma":
        weight_shape, weight_strides, transposed = plan.weight_rows
        slots = plan.slots

        def make_descriptors(blocks):
            if blocks is None:  # sized by the configuration's pre-hook
                block_m = block_p = block_r = 16
                split = 1
            else:
                block_m, block_p, block_r = blocks["BLOCK_M"], blocks["BLOCK_P"], blocks["BLOCK_R"]
                split = blocks["EPILOGUE_SPLIT"]
            return (_descriptor(x, [m, r], [x_strides[0], 1], [block_m, block_r]),
                    _descriptor(w, weight_shape, weight_strides, [block_p, block_r] if transposed else [block_r, block_p]),
                    _descriptor(out, [m, p], [p, 1], [block_m, block_p // split]))

        def grid_of(meta):
            upper = (_cdiv(m, meta["BLOCK_M"]) + experts) * _cdiv(p, meta["BLOCK_P"])
            return (max(1, min(slots * meta["PROGRAMS_PER_SM"], upper)),)

        tune_key = (p, r, experts, m_bucket, transposed, x.dtype)
        pipelined_args = (out, offsets, m, p, r, experts, m_bucket, *plan.trailing_ints)
        # Only where the ping-pong kernel can run (or a schedule is forced) is there a choice:
        # elsewhere the launch costs the host what it did before that kernel existed.
        if plan.pingpong or _forced_schedule:
            run_pipelined = functools.partial(_launch, plan.kernel, tune_key, grid_of, make_descriptors, pipelined_args,
                                              plan.constexprs, specialization)
            run_pingpong = functools.partial(_pingpong.grouped_product, make_descriptors, grid_of, out, offsets, m, r,
                                             p, experts, transposed, (p, r, experts, transposed, specialization))
            if _product_schedule(plan, tune_key, m, run_pipelined, run_pingpong) == "pingpong":
                launch_counts["product_tma_pingpong"] += 1
                run_pingpong()
                return out
        _launch(plan.kernel, tune_key, grid_of, make_descriptors, pipelined_args, plan.constexprs, specialization)
        return out

    def portable_grid(meta):
        return (_cdiv(m, meta["BLOCK_M"]) + experts, _cdiv(p, meta["BLOCK_P"]))

    _launch(plan.kernel, (p, r, experts, m_bucket, stride_r == 1, x.dtype), portable_grid, _no_descriptors,
            (x, w, out, offsets, m, p, r, experts, m_bucket, *plan.trailing_ints), plan.constexprs, specialization)
    return out


def _no_descriptors(blocks):
    return ()


def _wgrad_plan(left, right, dw, offsets, num_groups, requested) -> _Plan:
    chosen = select_path("wgrad", (left, right, dw), requested)
    upcast = INTERPRETED and left.dtype != torch.float32
    if chosen == "tma":
        runtime_ints = (left.stride(0), right.stride(0), dw.stride(0), dw.stride(1))
        kernel, constexprs = _grouped_wgrad_tma_kernel, dict(UPCAST=upcast)
    else:
        runtime_ints = (left.stride(0), left.stride(1), right.stride(0), right.stride(1), *dw.stride())
        kernel, constexprs = _grouped_wgrad_kernel, dict(IEEE=left.dtype == torch.float32, UPCAST=upcast)
    return _Plan(chosen, kernel, constexprs, runtime_ints,
                 _specialization((left, right, dw, offsets, left.shape[1], right.shape[1], num_groups, *runtime_ints)))


def triton_grouped_mm_wgrad(x: torch.Tensor, dout: torch.Tensor, offsets: torch.Tensor, num_groups: int,
                            w_layout: str = "ekn", out: torch.Tensor | None = None,
                            path: str = "auto") -> torch.Tensor:
    """``dW[g] = x_g.T @ dout_g`` written in the weight's storage layout (empty groups: zeros)."""
    m, k = x.shape
    n = dout.shape[1]
    shape = (num_groups, k, n) if w_layout == "ekn" else (num_groups, n, k)
    dw = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
    if num_groups == 0 or k == 0 or n == 0:
        return dw
    if m == 0:
        return dw.zero_()
    # Each dW[g] is written as left.T @ right: its rows come from `left`, its columns from `right`.
    left, right = (x, dout) if w_layout == "ekn" else (dout, x)
    p1, p2 = left.shape[1], right.shape[1]
    left_strides, right_strides = left.stride(), right.stride()
    plan_key = ("wgrad", left_strides, right_strides, dw.stride(), p1, p2, num_groups, x.dtype, x.device, path,
                left.data_ptr() % 16, right.data_ptr() % 16, dw.data_ptr() % 16, offsets.data_ptr() % 16)
    plan = _plans.get(plan_key) or _remember(plan_key, _wgrad_plan(left, right, dw, offsets, num_groups, path))
    launch_counts[f"wgrad_{plan.path}"] += 1
    m_bucket = _next_power_of_two(m)
    specialization = (m % 16 == 0, m == 1, m >> 31, m_bucket, *plan.specialization)

    def grid_of(meta):
        return (_cdiv(p1, meta["BLOCK_P1"]) * _cdiv(p2, meta["BLOCK_P2"]), num_groups)

    make_descriptors = _no_descriptors
    if plan.path == "tma":
        def make_descriptors(blocks):
            block_m, block_1, block_2 = (16, 16, 16) if blocks is None else (
                blocks["BLOCK_M"], blocks["BLOCK_P1"], blocks["BLOCK_P2"])
            return (_descriptor(left, [m, p1], [left_strides[0], 1], [block_m, block_1]),
                    _descriptor(right, [m, p2], [right_strides[0], 1], [block_m, block_2]))

    _launch(plan.kernel, (p1, p2, num_groups, m_bucket, x.dtype), grid_of, make_descriptors,
            (left, right, dw, offsets, m, p1, p2, num_groups, m_bucket, *plan.trailing_ints), plan.constexprs,
            specialization)
    return dw
