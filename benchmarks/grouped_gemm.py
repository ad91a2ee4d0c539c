"""Grouped GEMM throughput: ours vs torch._grouped_mm vs a per-expert loop vs a dense mm ceiling.

One table, one run, one GPU: TFLOP/s for forward, dgrad and wgrad on MoE shapes (N, K) with
weights stored as HF does (``[E, N, K]``, ``w_layout="enk"``), over several token distributions.
Every variant is checked against an fp32 reference before it is timed. Medians from
``triton.testing.do_bench``. Writes JSON with the device name and versions.

    python benchmarks/grouped_gemm.py [--out benchmarks/results/grouped_gemm.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

from kernels.grouped_gemm import triton_grouped_mm, triton_grouped_mm_wgrad  # noqa: E402

SHAPES = [(384, 2048), (2048, 192), (1536, 2048), (2048, 768)]


def distributions():
    skewed = [0] * 32
    rows = 32 * 2048
    hot = [0, 1, 2, 3]
    for expert in hot:
        skewed[expert] = rows // 8  # half of all rows on four experts
    cold = [e for e in range(32) if e not in hot and e % 4 != 3]  # every fourth expert gets nothing
    remaining = rows - sum(skewed)
    for i, expert in enumerate(cold):
        skewed[expert] = remaining // len(cold) + (1 if i < remaining % len(cold) else 0)
    return {"8x2048": [2048] * 8, "32x2048": [2048] * 32, "64x512": [512] * 64, "skewed32": skewed}


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def relative(value, reference) -> float:
    return ((value.float() - reference).norm() / reference.norm()).item()


def loop_forward(x, w, sizes):
    return torch.cat([chunk @ w[g].T for g, chunk in enumerate(torch.split(x, sizes))])


def loop_dgrad(dout, w, sizes):
    return torch.cat([chunk @ w[g] for g, chunk in enumerate(torch.split(dout, sizes))])


def loop_wgrad(x, dout, sizes):
    return torch.stack([d.T @ a for a, d in zip(torch.split(x, sizes), torch.split(dout, sizes))])


def bench_case(n, k, sizes, dtype):
    device = "cuda"
    experts, m = len(sizes), sum(sizes)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=generator)
    w = torch.randn(experts, n, k, device=device, dtype=dtype, generator=generator) * k**-0.5
    dout = torch.randn(m, n, device=device, dtype=dtype, generator=generator)
    offsets = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
    flops = 2.0 * m * n * k
    dense_w = torch.randn(k, n, device=device, dtype=dtype, generator=generator)

    reference = loop_forward(x.float(), w.float(), sizes)
    reference_dx = loop_dgrad(dout.float(), w.float(), sizes)
    reference_dw = loop_wgrad(x.float(), dout.float(), sizes)
    variants = {
        "forward": {
            "ours": lambda: triton_grouped_mm(x, w, offsets, "enk"),
            "portable": lambda: triton_grouped_mm(x, w, offsets, "enk", use_tma=False),
            "torch": lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offsets),
            "loop": lambda: loop_forward(x, w, sizes),
            "dense": lambda: x @ dense_w,
        },
        "dgrad": {
            "ours": lambda: triton_grouped_mm(dout, w, offsets, "enk", transpose_weight=True),
            "portable": lambda: triton_grouped_mm(dout, w, offsets, "enk", transpose_weight=True, use_tma=False),
            "torch": lambda: torch._grouped_mm(dout, w, offs=offsets),
            "loop": lambda: loop_dgrad(dout, w, sizes),
            "dense": lambda: dout @ dense_w.T,
        },
        "wgrad": {
            "ours": lambda: triton_grouped_mm_wgrad(x, dout, offsets, experts, "enk"),
            "portable": lambda: triton_grouped_mm_wgrad(x, dout, offsets, experts, "enk", use_tma=False),
            "torch": lambda: torch._grouped_mm(dout.t(), x, offs=offsets),
            "loop": lambda: loop_wgrad(x, dout, sizes),
            "dense": lambda: x.T @ dout,
        },
    }
    references = {"forward": reference, "dgrad": reference_dx, "wgrad": reference_dw}
    rows = []
    for kind, fns in variants.items():
        row = {"kind": kind, "n": n, "k": k, "m": m, "experts": experts}
        for name, fn in fns.items():
            if name != "dense":
                error = relative(fn(), references[kind])
                row[f"{name}_rel_err"] = error
                if not error < 2e-2:
                    raise AssertionError(f"{kind} {name} n={n} k={k} sizes={sizes[:4]}...: relative error {error}")
            row[f"{name}_tflops"] = flops / (median_ms(fn) * 1e-3) / 1e12
        rows.append(row)
    return rows


def geomean(values):
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "grouped_gemm.json"))
    parser.add_argument("--quick", action="store_true", help="one shape and one distribution")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/grouped_gemm.py needs a CUDA GPU")
    dtype = torch.bfloat16
    shapes = SHAPES[:1] if args.quick else SHAPES
    cases = distributions()
    if args.quick:
        cases = {"32x2048": cases["32x2048"]}
    rows = []
    for n, k in shapes:
        for label, sizes in cases.items():
            for row in bench_case(n, k, sizes, dtype):
                row["distribution"] = label
                rows.append(row)
                print(f"{row['kind']:<7} N={n:<5} K={k:<5} {label:<9} ours {row['ours_tflops']:6.1f}  portable {row['portable_tflops']:6.1f}  torch {row['torch_tflops']:6.1f}  "
                      f"loop {row['loop_tflops']:6.1f}  dense {row['dense_tflops']:6.1f}  ours/torch {row['ours_tflops'] / row['torch_tflops']:.3f}",
                      flush=True)
    summary = {}
    for kind in ("forward", "dgrad", "wgrad"):
        selected = [r for r in rows if r["kind"] == kind]
        summary[kind] = {
            "geomean_ours_over_torch": geomean([r["ours_tflops"] / r["torch_tflops"] for r in selected]),
            "min_ours_over_torch": min(r["ours_tflops"] / r["torch_tflops"] for r in selected),
            "geomean_ours_over_dense": geomean([r["ours_tflops"] / r["dense_tflops"] for r in selected]),
        }
    properties = torch.cuda.get_device_properties(0)
    result = {
        "device": torch.cuda.get_device_name(0), "multiprocessors": properties.multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda, "dtype": str(dtype),
        "weight_layout": "enk ([E, N, K], HF)", "rows": rows, "summary": summary,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    print()
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}  bf16, TFLOP/s (median)")
    print(f"{'kind':<7} {'N':>5} {'K':>5} {'dist':<9} {'ours':>7} {'torch':>7} {'loop':>7} {'dense':>7} {'ours/torch':>10} {'ours/dense':>10}")
    for r in rows:
        print(f"{r['kind']:<7} {r['n']:>5} {r['k']:>5} {r['distribution']:<9} {r['ours_tflops']:>7.1f} {r['torch_tflops']:>7.1f} "
              f"{r['loop_tflops']:>7.1f} {r['dense_tflops']:>7.1f} {r['ours_tflops'] / r['torch_tflops']:>10.3f} "
              f"{r['ours_tflops'] / r['dense_tflops']:>10.3f}")
    for kind, values in summary.items():
        print(f"{kind}: geomean ours/torch {values['geomean_ours_over_torch']:.3f}, min {values['min_ours_over_torch']:.3f}, "
              f"geomean ours/dense {values['geomean_ours_over_dense']:.3f}")


if __name__ == "__main__":
    main()
