"""Hopper grouped product with a warp-specialised "ping-pong" schedule, written in Gluon.

The grouped product of :mod:`kernels.grouped_gemm` (``out[rows of g] = a[rows of g] @ B_g``, group
ends read from ``offsets`` on the device, rows after ``offsets[-1]`` written as zeros), with another
schedule. The pipelined TMA kernel there is software-pipelined by Triton: each program's warps both
issue the loads and run the products, so a tile's epilogue stalls its own products. Here each
persistent program has three partitions: one loader warp streams operand tiles through a ring of
shared-memory stages, and two consumer warp groups take alternate 128 x 128 output tiles, their
main loops in strict turn, so one's epilogue (convert, store, TMA store) runs while the other
multiplies. That is the schedule of CUTLASS's ping-pong kernels. It pays where the reduction is
short (K = 192, three steps a tile) and the epilogue would otherwise be exposed;
:func:`kernels.grouped_gemm.triton_grouped_mm` times both schedules once per problem and keeps the
faster.

Gluon is Triton's experimental tile-level dialect and its API moves between releases, so the kernel
is defined only under the release it was written and checked against
(:data:`kernels.triton_release.GLUON`), outside the interpreter, and runs on sm_90 devices only;
:func:`available` says whether it can run here.

Operands, as the TMA path of ``kernels.grouped_gemm`` checks them: bf16 or fp16 activations and
output, row-major with 16-byte aligned rows, the output contiguous; the weight as one row-major
matrix of every group's ``B_g`` stored transposed (``[P, R]`` blocks, rows ``g*P + p``) or not
(``[R, P]`` blocks, rows ``g*R + r``, then R a multiple of ``BLOCK_R`` so that no block reaches
into the next group's weights).
"""

from __future__ import annotations

import torch

from .caches import CACHES
from .grouped_gemm_configs import INTERPRETED
from .triton_release import GLUON, TRITON_RELEASE, launcher

__all__ = ["available", "grouped_product", "TRITON_RELEASE", "BLOCK_R", "BLOCKS"]

BLOCK_M, BLOCK_P, BLOCK_R, STAGES = 128, 128, 64, 4
# The interpreter runs no Gluon kernels.
_DEFINED = GLUON and not INTERPRETED
if _DEFINED:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor


def available(device_index: int) -> bool:
    """Whether the ping-pong kernel can run on this CUDA device with this Triton."""
    return _DEFINED and torch.cuda.get_device_capability(device_index) == (9, 0)


if _DEFINED:
    @gluon.jit
    def _group_end(offsets_ptr, group, start, M, E):
        """End row of ``group`` (offsets clamped to ``[start, M]``, as the kept kernel reads them);
        past the last group, the padding rows ``[offsets[-1], M)`` act as one more group."""
        if group < E:
            end = gl.minimum(gl.maximum(gl.load(offsets_ptr + group), start), M)
        else:
            end = M
        return end

    @gluon.jit
    def _walk_start(offsets_ptr, M, E):
        """The walk's state before its first tile: group 0, its first row tile, its rows."""
        return 0, 0, 0, _group_end(offsets_ptr, 0, 0, M, E)

    @gluon.jit
    def _walk(offsets_ptr, row_tile, group, first, start, end, M, E, BLOCK_M: gl.constexpr):
        """Advance (group, its first row tile, its rows [start, end)) to the group holding
        ``row_tile``. Each partition asks for its row tiles in increasing order, so over a whole
        program the walk visits each group once."""
        while (group < E) & (row_tile >= first + gl.cdiv(end - start, BLOCK_M)):
            first += gl.cdiv(end - start, BLOCK_M)
            group += 1
            start = end
            end = _group_end(offsets_ptr, group, start, M, E)
        return group, first, start, end

    @gluon.jit
    def _loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, offsets_ptr, M, P, R, E, upper_tiles, tiles_p,
                B_TRANSPOSED: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_P: gl.constexpr, BLOCK_R: gl.constexpr,
                STAGES: gl.constexpr):
        """Loads every k-step of this program's tiles, in tile order, into the ring."""
        steps = gl.cdiv(R, BLOCK_R)
        counter = 0
        group, first, start, end = _walk_start(offsets_ptr, M, E)
        for tile in range(gl.program_id(0), upper_tiles, gl.num_programs(0)):
            row_tile = tile // tiles_p
            group, first, start, end = _walk(offsets_ptr, row_tile, group, first, start, end, M, E, BLOCK_M)
            row_start = start + (row_tile - first) * BLOCK_M
            # Padding tiles (rows after offsets[-1], stored as zeros) and tiles past M, which exist
            # only in the upper bound the grid was sized by, need no operands. Both come after every
            # group's tiles, so skipping them keeps the ring's count the consumers expect.
            if (row_start < M) & (group < E):
                col = (tile % tiles_p) * BLOCK_P
                for step in range(steps):
                    index = counter % STAGES
                    # A stage is free once the consumer that read it last has arrived; the first pass
                    # through the ring waits on the phase before the barrier's first, which has completed.
                    mbarrier.wait(empty.index(index), ((counter // STAGES) & 1) ^ 1)
                    mbarrier.expect(ready.index(index), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(a_desc, [row_start, step * BLOCK_R], ready.index(index),
                                                    a_bufs.index(index))
                    if B_TRANSPOSED:
                        tma.async_copy_global_to_shared(b_desc, [group * P + col, step * BLOCK_R], ready.index(index),
                                                        b_bufs.index(index))
                    else:
                        tma.async_copy_global_to_shared(b_desc, [group * R + step * BLOCK_R, col], ready.index(index),
                                                        b_bufs.index(index))
                    counter += 1

    @gluon.jit
    def _consumer(out_desc, out_ptr, a_bufs, b_bufs, ready, empty, turn, c_smem, offsets_ptr, M, P, R, E, stride_om,
                  upper_tiles, tiles_p, WHICH: gl.constexpr, B_TRANSPOSED: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_P: gl.constexpr, BLOCK_R: gl.constexpr, STAGES: gl.constexpr):
        """Multiplies this program's tiles of parity WHICH and stores them.

        The two consumers' main loops strictly alternate (``turn``): one multiplies while the other
        runs its epilogue. That order is also what makes the ring's parity waits sound: a stage's
        fill for round r is waited on only after round r - 1 was consumed, so no barrier is ever
        two phases from its waiter (with STAGES not a multiple of the steps per tile, consecutive
        tiles share stages).

        One function, long as it is: the turn-taking, the main loop and the epilogue all work on
        one tile's accumulator, ring counter and group walk, which helpers would each have to take
        and hand back."""
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_P, 16])
        steps = gl.cdiv(R, BLOCK_R)
        stride = gl.num_programs(0)
        local = 0
        group, first, start, end = _walk_start(offsets_ptr, M, E)
        for tile in range(gl.program_id(0) + WHICH * stride, upper_tiles, 2 * stride):
            row_tile = tile // tiles_p
            group, first, start, end = _walk(offsets_ptr, row_tile, group, first, start, end, M, E, BLOCK_M)
            row_start = start + (row_tile - first) * BLOCK_M
            if (row_start < M) & (group < E):
                col = (tile % tiles_p) * BLOCK_P
                counter = (WHICH + 2 * local) * steps  # the loader's count of k-steps before this tile
                acc = gl.zeros([BLOCK_M, BLOCK_P], gl.float32, layout)
                # Consumer 0's k-th main loop follows consumer 1's (k-1)-th, consumer 1's k-th follows
                # consumer 0's k-th; consumer 0's first passes on the fresh barrier's completed phase.
                mbarrier.wait(turn.index(WHICH), (local & 1) ^ (1 - WHICH))
                previous = 0
                for step in range(steps):
                    index = counter % STAGES
                    mbarrier.wait(ready.index(index), (counter // STAGES) & 1)
                    if B_TRANSPOSED:
                        acc = warpgroup_mma(a_bufs.index(index), b_bufs.index(index).permute((1, 0)), acc, is_async=True)
                    else:
                        acc = warpgroup_mma(a_bufs.index(index), b_bufs.index(index), acc, is_async=True)
                    # One product in flight: the one before it has read its stage, which goes back.
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                    mbarrier.arrive(empty.index(previous), count=1, pred=step > 0)
                    previous = index
                    counter += 1
                mbarrier.arrive(turn.index(1 - WHICH), count=1)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(empty.index(previous), count=1)
                # The accumulator goes out as it is: selecting on it (say, zeros for padding tiles)
                # costs a third of the throughput, so padding tiles take the branch below instead.
                value = acc.to(out_desc.dtype)
                if end - row_start < BLOCK_M:
                    # A group's last, partial tile: a TMA box cannot stop at a group boundary, so its
                    # rows are stored through a mask, straight from the registers.
                    rows = row_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
                    cols = col + gl.arange(0, BLOCK_P, layout=gl.SliceLayout(0, layout))
                    gl.store(out_ptr + rows[:, None].to(gl.int64) * stride_om + cols[None, :], value,
                             mask=(rows[:, None] < end) & (cols[None, :] < P))
                else:
                    tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
                    c_smem.store(value)
                    fence_async_shared()
                    tma.async_copy_shared_to_global(out_desc, [row_start, col], c_smem)
                local += 1
            elif row_start < M:
                # Padding rows (after offsets[-1]) are written as zeros, with no products; every row
                # from row_start to M is padding, so the TMA box clipped at M stores exactly them.
                tma.store_wait(pendings=0)
                c_smem.store(gl.zeros([BLOCK_M, BLOCK_P], out_desc.dtype, layout))
                fence_async_shared()
                tma.async_copy_shared_to_global(out_desc, [row_start, (tile % tiles_p) * BLOCK_P], c_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _pingpong_product_kernel(a_desc, b_desc, out_desc, out_ptr, offsets_ptr, M, P, R, E, stride_om,
                                 B_TRANSPOSED: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_P: gl.constexpr,
                                 BLOCK_R: gl.constexpr, STAGES: gl.constexpr):
        tiles_p = gl.cdiv(P, BLOCK_P)
        # Every group's row tiles, partial ones included, and the padding rows' fit in this bound.
        upper_tiles = (gl.cdiv(M, BLOCK_M) + E) * tiles_p
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_R], a_desc.layout)
        if B_TRANSPOSED:
            b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_P, BLOCK_R], b_desc.layout)
        else:
            b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_R, BLOCK_P], b_desc.layout)
        c_smem0 = gl.allocate_shared_memory(out_desc.dtype, [BLOCK_M, BLOCK_P], out_desc.layout)
        c_smem1 = gl.allocate_shared_memory(out_desc.dtype, [BLOCK_M, BLOCK_P], out_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        gl.warp_specialize([
            (_consumer, (out_desc, out_ptr, a_bufs, b_bufs, ready, empty, turn, c_smem0, offsets_ptr, M, P, R, E, stride_om,
                         upper_tiles, tiles_p, 0, B_TRANSPOSED, BLOCK_M, BLOCK_P, BLOCK_R, STAGES)),
            (_consumer, (out_desc, out_ptr, a_bufs, b_bufs, ready, empty, turn, c_smem1, offsets_ptr, M, P, R, E, stride_om,
                         upper_tiles, tiles_p, 1, B_TRANSPOSED, BLOCK_M, BLOCK_P, BLOCK_R, STAGES)),
            (_loader, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, offsets_ptr, M, P, R, E, upper_tiles, tiles_p,
                       B_TRANSPOSED, BLOCK_M, BLOCK_P, BLOCK_R, STAGES)),
        ], [4, 1], [232, 40])


# The kernel's tiles, in the form the pipelined kernel's launch helpers in ``kernels.grouped_gemm``
# take (its descriptor builder and grid): one program per SM, the output stored in one piece.
BLOCKS = {"BLOCK_M": BLOCK_M, "BLOCK_P": BLOCK_P, "BLOCK_R": BLOCK_R, "EPILOGUE_SPLIT": 1, "PROGRAMS_PER_SM": 1}


def grouped_product(make_descriptors, grid_of, out, offsets, m, r, p, experts, transposed, key) -> None:
    """Launch the ping-pong grouped product into ``out`` ([m, p], contiguous).

    ``make_descriptors(BLOCKS)`` gives the host TMA descriptors of the activations, the weight as
    one row-major matrix (stored ``transposed`` or not) and the output, built by
    ``kernels.grouped_gemm``, which checked the operands' layout; ``grid_of(BLOCKS)`` gives the
    persistent grid. ``key`` is everything the compiled kernel may be specialized on besides the
    output's dtype and device (problem sizes other than M, M's divisibility, the operands'
    16-byte alignment)."""
    grid = (*grid_of(BLOCKS), 1, 1)
    descriptors = make_descriptors(BLOCKS)
    # The first launch of a problem goes through Gluon's JIT, which binds the arguments in Python
    # on every call (tens of microseconds, as long as a small expert batch's product); later ones
    # call the compiled kernel through kernels.triton_release.launcher.
    compiled_key = (key, out.dtype, out.device)
    cached = CACHES.pingpong.get(compiled_key)
    if cached is None:
        # Compiling binds Gluon descriptors: their shared-memory layouts are part of the kernel's
        # signature. The compiled kernel's launcher reads only base, shape, strides and padding,
        # which the host descriptors have too.
        gl_dtype = gl.bfloat16 if out.dtype == torch.bfloat16 else gl.float16
        checked = [GluonTensorDescriptor(d.base, d.shape, d.strides, d.block_shape,
                                         gl.NVMMASharedLayout.get_default_for(d.block_shape, gl_dtype))
                   for d in descriptors]
        compiled = _pingpong_product_kernel.run(
            *checked, out, offsets, m, p, r, experts, p, grid=grid, warmup=False, B_TRANSPOSED=transposed,
            BLOCK_M=BLOCK_M, BLOCK_P=BLOCK_P, BLOCK_R=BLOCK_R, STAGES=STAGES, num_warps=4)
        CACHES.pingpong[compiled_key] = launcher(compiled, len(descriptors), out.device.index)
        return
    cached(grid, (*descriptors, out, offsets, m, p, r, experts, p, transposed, BLOCK_M, BLOCK_P, BLOCK_R, STAGES))
