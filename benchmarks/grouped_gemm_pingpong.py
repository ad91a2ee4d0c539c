"""The two schedules of the Hopper grouped product, side by side: pipelined and ping-pong.

``kernels.grouped_gemm.triton_grouped_mm`` times both schedules once per problem and keeps the
faster (``kernels/grouped_gemm_pingpong.py`` says what the ping-pong kernel is). This script shows
the choice's inputs. It first checks the ping-pong kernel alone (``pingpong_sweep`` of
``benchmarks/grouped_gemm.py``: uneven groups, both weight layouts, forward and dgrad, bf16 and
fp16, outputs poisoned with NaN, against float64); then times the forward rows of that benchmark
for each schedule and for torch, eager and from CUDA graphs.

    python benchmarks/grouped_gemm_pingpong.py [--check-only] [--out benchmarks/results/grouped_gemm_pingpong.json]
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

import grouped_gemm as timing  # noqa: E402  (benchmarks/grouped_gemm.py, beside this script)
from kernels import grouped_gemm_pingpong  # noqa: E402
from kernels.grouped_gemm import triton_grouped_mm, use_schedule  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "grouped_gemm_pingpong.json"))
    parser.add_argument("--check-only", action="store_true", help="run the float64 check, skip the timing")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and grouped_gemm_pingpong.available(torch.cuda.current_device())):
        raise SystemExit(f"the ping-pong kernel needs an sm_90 GPU and Triton {grouped_gemm_pingpong.TRITON_RELEASE}x "
                         f"(this is Triton {triton.__version__})")
    checked = timing.pingpong_sweep()
    failed = [row for row in checked if not row["ok"]]
    for row in failed:
        print("CORRECTNESS FAILURE", json.dumps(row), flush=True)
    refused = sum("refused" in row and row["ok"] for row in checked)
    print(f"check: {len(checked) - len(failed)} of {len(checked)} cases passed ({refused} of them refused, as the "
          "layout rule requires)", flush=True)
    if args.check_only or failed:
        raise SystemExit(1 if failed else 0)
    warm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(300):
        warm @ warm
    rows = []
    for n, k in timing.SHAPES:
        for distribution, sizes in timing.distributions().items():
            x, w, _, offsets, flops, _ = timing.timing_operands(n, k, sizes, torch.bfloat16)
            reference = torch._grouped_mm(x, w.transpose(1, 2), offs=offsets).float()
            fns = {"torch": lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)}
            for schedule in ("pipelined", "pingpong"):
                def run(schedule=schedule):
                    with use_schedule(schedule):
                        return triton_grouped_mm(x, w, offsets, "enk")
                fns[schedule] = run
            row = {"n": n, "k": k, "distribution": distribution}
            for name, fn in fns.items():
                row[f"{name} rel_err"] = ((fn().float() - reference).norm() / reference.norm()).item()
            for name, value in timing.interleaved_ms(fns, rounds=3)[0].items():
                row[f"{name} tflops"] = flops / (value * 1e-3) / 1e12
            graphs = {name: timing.captured(fn).replay for name, fn in fns.items()}
            for name, value in timing.interleaved_ms(graphs, rounds=3)[0].items():
                row[f"{name} graph tflops"] = flops / (value * 1e-3) / 1e12
            rows.append(row)
            print(f"N={n:<5} K={k:<5} {distribution:<9} pingpong/pipelined {row['pingpong tflops'] / row['pipelined tflops']:.3f} "
                  f"(graph {row['pingpong graph tflops'] / row['pipelined graph tflops']:.3f})  "
                  f"pingpong/torch {row['pingpong tflops'] / row['torch tflops']:.3f}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "check": checked, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
