"""Prototype: a warp-specialised ping-pong grouped product in Gluon (Hopper), timed against the kept kernel.

The kept TMA kernel (``kernels/grouped_gemm.py``) is software-pipelined by Triton: each program's
warps both issue the loads and run the products, and a tile's epilogue stalls its own products.
This prototype splits each persistent program into three partitions: one loader warp streams
operand tiles through a ring of shared-memory stages, and two consumer warp groups take
alternate output tiles, so one's epilogue (convert, store to shared memory, TMA store) runs while
the other multiplies. It is the schedule of CUTLASS's "ping-pong" kernels, in Triton's Gluon
dialect.

It takes the operands of ``kernels.grouped_gemm.triton_grouped_mm``: any group sizes (empty
groups, a partial last tile per group, stored through a row mask; rows after the last offset
written as zeros), weights ``[E, K, N]`` or ``[E, N, K]``, forward or dgrad, bf16 or fp16. A run
first checks every such case against float64 with outputs poisoned with NaN, then times the
forward rows of ``benchmarks/grouped_gemm.py`` against the kept kernel and torch, eager and from
CUDA graphs. It is not wired into ``kernels``. Written against
the Gluon of Triton 3.6 (the GPU machines' release); Gluon is experimental and its API moves
between releases (3.9's ``warp_specialize`` takes other arguments), so nothing in the test suite
imports this file.

    python benchmarks/grouped_gemm_pingpong.py [--out benchmarks/results/grouped_gemm_pingpong.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from kernels.grouped_gemm import _device_index, _multiprocessors  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)


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
    tiles share stages)."""
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
def pingpong_kernel(a_desc, b_desc, out_desc, out_ptr, offsets_ptr, M, P, R, E, stride_om, upper_tiles, tiles_p,
                    B_TRANSPOSED: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_P: gl.constexpr, BLOCK_R: gl.constexpr,
                    STAGES: gl.constexpr):
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


GLUON_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def shared_layout(block_shape, dtype):
    return gl.NVMMASharedLayout.get_default_for(block_shape, GLUON_DTYPES[dtype])


def pingpong_product(x, w, offsets, w_layout="enk", transpose_weight=False, out=None, block_m=128, block_p=128,
                     block_r=64, stages=4):
    """``x @ W[g]`` per group, or ``x @ W[g].T`` with ``transpose_weight`` (dgrad), for contiguous
    weights stored ``[E, K, N]`` (``"ekn"``) or ``[E, N, K]`` (``"enk"``); the operands and
    results of ``kernels.grouped_gemm.triton_grouped_mm``, rows after ``offsets[-1]`` zeros."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    experts, rows_w, cols_w = w.shape
    # B_g is the logical [R, P] operand; stored transposed when its P index runs along the rows.
    r, p, stored_transposed = (rows_w, cols_w, False) if w_layout == "ekn" else (cols_w, rows_w, True)
    if transpose_weight:
        r, p, stored_transposed = p, r, not stored_transposed
    if not stored_transposed and r % block_r:
        raise ValueError(f"untransposed weights need the reduction ({r}) to be a multiple of BLOCK_R={block_r}: "
                         "a block past a group's rows would read the next group's weights")
    m = x.shape[0]
    out = torch.empty(m, p, dtype=x.dtype, device=x.device) if out is None else out
    weight = w.reshape(experts * rows_w, cols_w)
    b_block = [block_p, block_r] if stored_transposed else [block_r, block_p]
    a_desc = TensorDescriptor(x, [m, r], [x.stride(0), 1], [block_m, block_r], shared_layout([block_m, block_r], x.dtype))
    b_desc = TensorDescriptor(weight, [experts * rows_w, cols_w], [cols_w, 1], b_block, shared_layout(b_block, x.dtype))
    out_desc = TensorDescriptor(out, [m, p], [p, 1], [block_m, block_p], shared_layout([block_m, block_p], x.dtype))
    tiles_p = triton.cdiv(p, block_p)
    # Every group's row tiles, partial ones included, and the padding rows' fit in this bound.
    upper_tiles = (triton.cdiv(m, block_m) + experts) * tiles_p
    grid = (min(_multiprocessors(_device_index(x)), upper_tiles), )
    pingpong_kernel[grid](a_desc, b_desc, out_desc, out, offsets, m, p, r, experts, out.stride(0), upper_tiles, tiles_p,
                          B_TRANSPOSED=stored_transposed, BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_R=block_r,
                          STAGES=stages, num_warps=4)
    return out


def check(timing) -> list:
    """Uneven groups (empty ones, partial tiles, rows after the last offset), both layouts,
    forward and dgrad, bf16 and fp16, outputs poisoned with NaN, against float64."""
    rows = []
    generator = torch.Generator(device="cuda").manual_seed(4)
    for sizes, trailing, k, n in [([300, 0, 17, 1, 129, 640], 7, 256, 384), ([0, 700, 0, 5], 37, 192, 2048),
                                  ([2048] * 4, 0, 2048, 1536), ([513] * 3, 0, 2048, 384)]:
        m, experts = sum(sizes) + trailing, len(sizes)
        offsets = torch.tensor(sizes, device="cuda").cumsum(0).to(torch.int32)
        for dtype in (torch.bfloat16, torch.float16):
            for layout in ("ekn", "enk"):
                shape = (experts, k, n) if layout == "ekn" else (experts, n, k)
                w = torch.randn(shape, device="cuda", generator=generator).to(dtype)
                for transpose in (False, True):
                    r, p = (n, k) if transpose else (k, n)
                    x = torch.randn(m, r, device="cuda", generator=generator).to(dtype)
                    out = torch.full((m, p), float("nan"), device="cuda", dtype=dtype)
                    try:
                        pingpong_product(x, w, offsets, layout, transpose, out=out)
                    except ValueError as exc:  # a layout the kernel refuses, as the kept kernel's prune does
                        rows.append({"sizes": sizes, "layout": layout, "transpose": transpose, "refused": str(exc)})
                        continue
                    expected = timing.reference_product(x.double(), w.double(), sizes, layout, transpose)
                    error = timing.relative(out, expected)
                    ok = error < 1e-2 and not out.isnan().any() and bool((out[sum(sizes):] == 0).all())
                    rows.append({"sizes": sizes, "trailing": trailing, "k": k, "n": n, "dtype": str(dtype),
                                 "layout": layout, "transpose": transpose, "error": error, "ok": ok})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "grouped_gemm_pingpong.json"))
    parser.add_argument("--check-only", action="store_true", help="run the float64 check, skip the timing")
    args = parser.parse_args()
    import grouped_gemm as timing  # benchmarks/grouped_gemm.py, beside this script on sys.path
    from kernels.grouped_gemm import triton_grouped_mm
    checked = check(timing)
    failed = [row for row in checked if row.get("ok") is False]
    refused = sum("refused" in row for row in checked)
    print(f"check: {len(checked) - refused - len(failed)} of {len(checked) - refused} cases passed, "
          f"{refused} refused by the layout rule", flush=True)
    if args.check_only:
        raise SystemExit(1 if failed else 0)
    warm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(300):
        warm @ warm
    rows = []
    candidates = [(128, 128, 64, 4)]
    for n, k in timing.SHAPES:
        for distribution in ("8x2048", "32x2048", "64x512", "skewed32"):
            sizes = timing.distributions()[distribution]
            x, w, _, offsets, flops, _ = timing.timing_operands(n, k, sizes, torch.bfloat16)
            reference = torch._grouped_mm(x, w.transpose(1, 2), offs=offsets).float()
            fns = {"ours": lambda: triton_grouped_mm(x, w, offsets, "enk"),
                   "torch": lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)}
            row = {"n": n, "k": k, "distribution": distribution}
            for candidate in candidates:
                name = "pingpong {}x{}x{} s{}".format(*candidate)
                try:
                    value = pingpong_product(x, w, offsets, "enk", False, None, *candidate)
                    row[f"{name} rel_err"] = ((value.float() - reference).norm() / reference.norm()).item()
                    fns[name] = lambda candidate=candidate: pingpong_product(x, w, offsets, "enk", False, None, *candidate)
                except Exception as exc:  # a candidate that does not compile or fit is reported, not fatal
                    row[f"{name} error"] = repr(exc)[:300]
            medians, _ = timing.interleaved_ms(fns, rounds=3)
            for name, value in medians.items():
                row[f"{name} tflops"] = flops / (value * 1e-3) / 1e12
            # The prototype builds its descriptors and launches through Gluon's Python binder on
            # every call, so short kernels are host-bound in eager timing; graph replays time the
            # device alone, for every column alike.
            graphs = {name: timing.captured(fn).replay for name, fn in fns.items()}
            for name, value in timing.interleaved_ms(graphs, rounds=3)[0].items():
                row[f"{name} graph tflops"] = flops / (value * 1e-3) / 1e12
            rows.append(row)
            print(json.dumps({key: (round(value, 4) if isinstance(value, float) else value)
                              for key, value in row.items()}), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "check": checked, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
