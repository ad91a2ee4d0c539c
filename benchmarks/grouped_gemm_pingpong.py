"""Prototype: a warp-specialised ping-pong grouped product in Gluon (Hopper), timed against the kept kernel.

The kept TMA kernel (``kernels/grouped_gemm.py``) is software-pipelined by Triton: each program's
warps both issue the loads and run the products, and a tile's epilogue stalls its own products.
This prototype splits each persistent program into three partitions: one loader warp streams
operand tiles through a ring of shared-memory stages, and two consumer warp groups take
alternate output tiles, so one's epilogue (convert, store to shared memory, TMA store) runs while
the other multiplies. It is the schedule of CUTLASS's "ping-pong" kernels, in Triton's Gluon
dialect.

Scope, to measure the schedule before building it out: forward products with weights stored
``[E, N, K]`` (as the benchmark's), groups of equal size divisible by BLOCK_M (so a row tile's
group is its index over the tiles per group). It is not wired into ``kernels``. Written against
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
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)


@gluon.jit
def _tile_coordinates(tile, tiles_p, tiles_per_group, BLOCK_M: gl.constexpr, BLOCK_P: gl.constexpr):
    row_tile = tile // tiles_p
    return row_tile // tiles_per_group, row_tile * BLOCK_M, (tile % tiles_p) * BLOCK_P


@gluon.jit
def _loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, tiles_p, tiles_per_group, P, R,
            BLOCK_M: gl.constexpr, BLOCK_P: gl.constexpr, BLOCK_R: gl.constexpr, STAGES: gl.constexpr):
    """Loads every k-step of this program's tiles, in tile order, into the ring."""
    steps = gl.cdiv(R, BLOCK_R)
    counter = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        group, row_start, col = _tile_coordinates(tile, tiles_p, tiles_per_group, BLOCK_M, BLOCK_P)
        for step in range(steps):
            index = counter % STAGES
            # A stage is free once the consumer that read it last has arrived; the first pass
            # through the ring waits on the phase before the barrier's first, which has completed.
            mbarrier.wait(empty.index(index), ((counter // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(index), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [row_start, step * BLOCK_R], ready.index(index),
                                            a_bufs.index(index))
            tma.async_copy_global_to_shared(b_desc, [group * P + col, step * BLOCK_R], ready.index(index),
                                            b_bufs.index(index))
            counter += 1


@gluon.jit
def _consumer(out_desc, a_bufs, b_bufs, ready, empty, turn, c_smem, num_tiles, tiles_p, tiles_per_group, R,
              WHICH: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_P: gl.constexpr, BLOCK_R: gl.constexpr,
              STAGES: gl.constexpr):
    """Multiplies this program's tiles of parity WHICH and stores them.

    The two consumers' main loops strictly alternate (``turn``): one multiplies while the other
    runs its epilogue. That order is also what makes the ring's parity waits sound: a stage's
    fill for round r is waited on only after round r - 1 was consumed, so no barrier is ever
    two phases from its waiter (with STAGES not a multiple of the steps per tile, consecutive
    tiles share stages)."""
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, BLOCK_P, 16])
    steps = gl.cdiv(R, BLOCK_R)
    first = gl.program_id(0)
    stride = gl.num_programs(0)
    local = 0
    for tile in range(first + WHICH * stride, num_tiles, 2 * stride):
        _, row_start, col = _tile_coordinates(tile, tiles_p, tiles_per_group, BLOCK_M, BLOCK_P)
        counter = (WHICH + 2 * local) * steps  # the loader's count of k-steps before this tile
        acc = gl.zeros([BLOCK_M, BLOCK_P], gl.float32, layout)
        # Consumer 0's k-th main loop follows consumer 1's (k-1)-th, consumer 1's k-th follows
        # consumer 0's k-th; consumer 0's first passes on the fresh barrier's completed phase.
        mbarrier.wait(turn.index(WHICH), (local & 1) ^ (1 - WHICH))
        previous = 0
        for step in range(steps):
            index = counter % STAGES
            mbarrier.wait(ready.index(index), (counter // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(index), b_bufs.index(index).permute((1, 0)), acc, is_async=True)
            # One product in flight: the one before it has read its stage, which goes back.
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(empty.index(previous), count=1, pred=step > 0)
            previous = index
            counter += 1
        mbarrier.arrive(turn.index(1 - WHICH), count=1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index(previous), count=1)
        tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
        c_smem.store(acc.to(out_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [row_start, col], c_smem)
        local += 1
    tma.store_wait(pendings=0)


@gluon.jit
def pingpong_kernel(a_desc, b_desc, out_desc, num_tiles, tiles_p, tiles_per_group, P, R,
                    BLOCK_M: gl.constexpr, BLOCK_P: gl.constexpr, BLOCK_R: gl.constexpr, STAGES: gl.constexpr):
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_R], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_P, BLOCK_R], b_desc.layout)
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
        (_consumer, (out_desc, a_bufs, b_bufs, ready, empty, turn, c_smem0, num_tiles, tiles_p, tiles_per_group, R, 0,
                     BLOCK_M, BLOCK_P, BLOCK_R, STAGES)),
        (_consumer, (out_desc, a_bufs, b_bufs, ready, empty, turn, c_smem1, num_tiles, tiles_p, tiles_per_group, R, 1,
                     BLOCK_M, BLOCK_P, BLOCK_R, STAGES)),
        (_loader, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, tiles_p, tiles_per_group, P, R,
                   BLOCK_M, BLOCK_P, BLOCK_R, STAGES)),
    ], [4, 1], [232, 40])


def layouts(block_m, block_p, block_r):
    return (gl.NVMMASharedLayout.get_default_for([block_m, block_r], gl.bfloat16),
            gl.NVMMASharedLayout.get_default_for([block_p, block_r], gl.bfloat16),
            gl.NVMMASharedLayout.get_default_for([block_m, block_p], gl.bfloat16))


def pingpong_forward(x, w, rows_per_group, block_m=128, block_p=128, block_r=64, stages=4, out=None):
    """``x @ W[g].T`` per group for ``w`` [E, N, K] and equal groups of ``rows_per_group`` rows."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    m, k = x.shape
    experts, n, _ = w.shape
    if rows_per_group % block_m or m != experts * rows_per_group:
        raise ValueError(f"the prototype needs {experts} equal groups of a multiple of {block_m} rows, got M={m}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    a_layout, b_layout, c_layout = layouts(block_m, block_p, block_r)
    a_desc = TensorDescriptor(x, [m, k], [k, 1], [block_m, block_r], a_layout)
    b_desc = TensorDescriptor(w, [experts * n, k], [k, 1], [block_p, block_r], b_layout)
    out_desc = TensorDescriptor(out, [m, n], [n, 1], [block_m, block_p], c_layout)
    tiles_p = triton.cdiv(n, block_p)
    num_tiles = (m // block_m) * tiles_p
    grid = (min(torch.cuda.get_device_properties(x.device).multi_processor_count, num_tiles), )
    pingpong_kernel[grid](a_desc, b_desc, out_desc, num_tiles, tiles_p, rows_per_group // block_m, n, k,
                          BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_R=block_r, STAGES=stages, num_warps=4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "grouped_gemm_pingpong.json"))
    args = parser.parse_args()
    from kernels.grouped_gemm import triton_grouped_mm

    spec = __import__("importlib.util").util.spec_from_file_location(
        "grouped_gemm_benchmark", os.path.join(ROOT, "benchmarks", "grouped_gemm.py"))
    timing = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    warm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(300):
        warm @ warm
    rows = []
    candidates = [(128, 128, 64, 4)]
    for n, k in timing.SHAPES:
        for distribution in ("8x2048", "32x2048", "64x512"):
            sizes = timing.distributions()[distribution]
            x, w, _, offsets, flops, _ = timing.timing_operands(n, k, sizes, torch.bfloat16)
            reference = torch._grouped_mm(x, w.transpose(1, 2), offs=offsets).float()
            fns = {"ours": lambda: triton_grouped_mm(x, w, offsets, "enk"),
                   "torch": lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)}
            row = {"n": n, "k": k, "distribution": distribution}
            for candidate in candidates:
                name = "pingpong {}x{}x{} s{}".format(*candidate)
                try:
                    value = pingpong_forward(x, w, sizes[0], *candidate)
                    row[f"{name} rel_err"] = ((value.float() - reference).norm() / reference.norm()).item()
                    fns[name] = lambda candidate=candidate: pingpong_forward(x, w, sizes[0], *candidate)
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
                   "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
