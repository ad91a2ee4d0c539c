"""Time every candidate configuration of the Hopper grouped product on the benchmark shapes.

The tuning sweep behind the configuration list in ``kernels/grouped_gemm.py``: for forward
(``x @ W[g].T``, weights ``[E, N, K]``) and dgrad (``dout @ W[g]``), each candidate is forced
with ``use_config``, checked against an fp32 reference (output poisoned with NaN first) and timed
with ``triton.testing.do_bench`` (median, L2 cleared before each call) next to
``torch._grouped_mm`` and a dense mm of the same FLOPs, all in the same run. A candidate that
does not compile (shared memory, an unsupported loop schedule) is recorded with its error.

Prints, per row, the best candidate of each epilogue kind and its ratio to torch; writes every
timing to JSON.

    python benchmarks/grouped_gemm_configs.py [--kinds forward,dgrad] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.grouped_gemm import (  # noqa: E402
    geomean, loop_dgrad, loop_forward, parse_shapes, relative, select_distributions, timing_operands)
from kernels import grouped_gemm  # noqa: E402
from kernels.grouped_gemm import product_tma_config, triton_grouped_mm  # noqa: E402

# (BLOCK_M, BLOCK_P, BLOCK_R, warps, stages, programs per SM, TMA store, epilogue split[, warp-specialised])
CANDIDATES = [
    (128, 256, 64, 8, 4, 1, False, 1),
    (128, 256, 64, 8, 3, 1, False, 1),
    (64, 128, 64, 4, 4, 2, False, 1),
    (128, 128, 64, 4, 3, 2, True, 2),
    (128, 128, 64, 8, 3, 2, True, 2),
    (128, 128, 64, 4, 2, 2, True, 1),
    (128, 128, 32, 4, 6, 2, True, 2),
    (128, 64, 64, 4, 4, 2, True, 1),
    (128, 64, 64, 4, 4, 2, True, 2),
    (64, 128, 64, 4, 2, 3, True, 1),
    (128, 256, 64, 8, 4, 1, True, 2),
    (128, 256, 64, 8, 3, 1, True, 2),
    (128, 256, 64, 8, 3, 1, True, 1),
    (256, 128, 64, 8, 4, 1, True, 2),
    (128, 128, 64, 8, 5, 1, True, 2),
    # For the compute-bound shapes (K = 2048, or N = 2048 with K = 768): a longer or shorter
    # reduction step at the same pipeline depth in bytes, and 256-row tiles with three stages.
    (128, 256, 32, 8, 6, 1, True, 2),
    (128, 256, 128, 8, 2, 1, True, 2),
    (256, 128, 64, 8, 3, 1, True, 2),
    (256, 128, 64, 8, 3, 1, True, 1),
    # Warp-specialised: loads and products on warps of their own, the tile loop not flattened.
    (128, 256, 64, 8, 3, 1, True, 2, True),
    (128, 256, 64, 8, 4, 1, True, 2, True),
    (256, 128, 64, 8, 3, 1, True, 2, True),
    (128, 128, 64, 4, 4, 1, True, 2, True),
    (128, 128, 64, 8, 4, 1, True, 2, True),
]


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def describe(candidate) -> str:
    block_m, block_p, block_r, warps, stages, per_sm, tma_store, split, *specialized = candidate
    store = f"tma/{split}" if tma_store else "masked"
    return f"{block_m}x{block_p}x{block_r} w{warps} s{stages} p{per_sm} {store}{' ws' if any(specialized) else ''}"


def sweep_row(kind, n, k, sizes, kernel, broken):
    device, dtype = "cuda", torch.bfloat16
    experts, m = len(sizes), sum(sizes)
    x, w, dout, offsets, flops, generator = timing_operands(n, k, sizes, dtype, device)
    if kind == "forward":
        source, width, transpose = x, n, False
        reference = loop_forward(x.float(), w.float(), sizes)
        torch_fn = lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)  # noqa: E731
        dense_w = torch.randn(k, n, device=device, dtype=dtype, generator=generator)
        dense_fn = lambda: x @ dense_w  # noqa: E731
    else:
        source, width, transpose = dout, k, True
        reference = loop_dgrad(dout.float(), w.float(), sizes)
        torch_fn = lambda: torch._grouped_mm(dout, w, offs=offsets)  # noqa: E731
        dense_w = torch.randn(n, k, device=device, dtype=dtype, generator=generator)
        dense_fn = lambda: dout @ dense_w  # noqa: E731
    row = {"kind": kind, "n": n, "k": k, "m": m, "experts": experts,
           "torch_tflops": flops / median_ms(torch_fn) / 1e9, "dense_tflops": flops / median_ms(dense_fn) / 1e9,
           "candidates": {}}
    for candidate in CANDIDATES:
        name = describe(candidate)
        if name in broken:
            continue
        config = product_tma_config(*candidate)
        # The kernel's own pruning rule: an untransposed weight needs R to be a multiple of BLOCK_R.
        if not grouped_gemm._prune_product_tma([config], {"P": width, "R": n if transpose else k},
                                               B_TRANSPOSED=not transpose):
            continue
        out = torch.full((m, width), float("nan"), dtype=dtype, device=device)
        try:
            with grouped_gemm.use_config(kernel, config):
                triton_grouped_mm(source, w, offsets, "enk", transpose_weight=transpose, out=out, path="tma")
                torch.cuda.synchronize()
                error = relative(out, reference)
                unwritten = int(out.isnan().sum())
                ms = median_ms(lambda: triton_grouped_mm(source, w, offsets, "enk", transpose_weight=transpose,
                                                         out=out, path="tma"))
                error_after = relative(out, reference)
        except Exception as failure:  # noqa: BLE001 - a candidate that cannot compile is skipped, with its reason
            broken[name] = f"{type(failure).__name__}: {str(failure).splitlines()[0][:200] if str(failure) else ''}"
            continue
        row["candidates"][name] = {"tflops": flops / ms / 1e9, "rel_err": max(error, error_after),
                                   "unwritten": unwritten,
                                   "ok": unwritten == 0 and max(error, error_after) < 2e-2}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="forward,dgrad")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "grouped_gemm_configs.json"))
    parser.add_argument("--shapes", help="'large' (DeepSeek-V3 / GPT-OSS experts) or N:K,N:K (default: the MoE set)")
    parser.add_argument("--distributions", help="comma-separated token distributions (default: all)")
    args = parser.parse_args()
    started = time.time()
    kernel = grouped_gemm._grouped_product_tma_kernel
    broken: dict = {}
    rows = []
    for kind in args.kinds.split(","):
        for n, k in parse_shapes(args.shapes):
            for distribution, sizes in select_distributions(args.distributions).items():
                row = sweep_row(kind, n, k, sizes, kernel, broken)
                row["distribution"] = distribution
                rows.append(row)
                good = {name: c for name, c in row["candidates"].items() if c["ok"]}
                bad = [name for name, c in row["candidates"].items() if not c["ok"]]
                best_masked = max((c["tflops"], name) for name, c in good.items() if "masked" in name)
                best_tma = max(((c["tflops"], name) for name, c in good.items() if "tma/" in name), default=(0, "-"))
                print(f"{kind:7s} N={n:5d} K={k:5d} {distribution:8s} torch {row['torch_tflops']:6.1f} "
                      f"dense {row['dense_tflops']:6.1f} | masked {best_masked[0]:6.1f} ({best_masked[1]}) "
                      f"x{best_masked[0] / row['torch_tflops']:.3f} | tma {best_tma[0]:6.1f} ({best_tma[1]}) "
                      f"x{best_tma[0] / row['torch_tflops']:.3f}{' WRONG: ' + ', '.join(bad) if bad else ''}",
                      flush=True)
    # The best single configuration set: per kind, the per-row best over all candidates.
    summary = {}
    for kind in args.kinds.split(","):
        kind_rows = [r for r in rows if r["kind"] == kind]
        best = [max(c["tflops"] for c in r["candidates"].values() if c["ok"]) for r in kind_rows]
        summary[kind] = {
            "geomean_best_over_torch": geomean([b / r["torch_tflops"] for b, r in zip(best, kind_rows)]),
            "min_best_over_torch": min(b / r["torch_tflops"] for b, r in zip(best, kind_rows)),
            "geomean_best_over_dense": geomean([b / r["dense_tflops"] for b, r in zip(best, kind_rows)]),
        }
        print(kind, json.dumps(summary[kind]))
    print("did not compile:", json.dumps(broken, indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "seconds": time.time() - started, "broken": broken, "summary": summary, "rows": rows}, handle,
                  indent=1)
    print(f"wrote {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
