"""Hardware-counter profile of grouped GEMM rows: ours, torch._grouped_mm and a dense mm, under Nsight Compute.

For each profiled row of ``benchmarks/grouped_gemm.py`` (same operands, weights ``[E, N, K]``),
every column runs in a child process under ``ncu``; the third call is the one profiled (the first
two compile, tune and warm up), and of the kernels it launches the longest is kept (torch's
grouped GEMM launches a short set-up kernel first). ncu leaves the clocks alone
(``--clock-control none``), so the SM clock each kernel ran at is part of the result.

Per kernel: duration, SM clock, the speed-of-light percentages (SM, memory, DRAM, L2), L2 hit
rate, issue-slot use, DRAM bytes against the least the problem must move (operands once, output
once), and TFLOP/s over the profiled duration. ``bound`` names whichever of SM and memory
throughput is the higher fraction of its peak.

    python benchmarks/grouped_gemm_profile.py [--out benchmarks/results/grouped_gemm_profile.json]
                                              [--rows forward:1536x2048:64x512 ...]

Needs ``ncu`` on the PATH and a runtime that lets it read the counters.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# kind, N, K, distribution: the forward rows furthest from the targets and one of each shape family,
# and the host-bound dgrad row.
ROWS = ["forward:1536x2048:64x512", "forward:2048x768:32x2048", "forward:384x2048:8x2048",
        "forward:2048x192:8x2048", "dgrad:2048x192:8x2048"]
COLUMNS = ("ours", "torch", "dense")
METRICS = {
    "Duration": "duration_us",
    "SM Frequency": "sm_clock_ghz",
    "Compute (SM) Throughput": "sm_pct",
    "Memory Throughput": "memory_pct",
    "DRAM Throughput": "dram_pct",
    "L2 Cache Throughput": "l2_pct",
    "L2 Hit Rate": "l2_hit_pct",
    "Issue Slots Busy": "issue_pct",
    "Registers Per Thread": "registers",
    "Grid Size": "grid",
    "Block Size": "block",
    "dram__bytes_read.sum": "dram_read_bytes",
    "dram__bytes_write.sum": "dram_write_bytes",
}
SCALE = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "nsecond": 1e-3,
         "hz": 1e-9, "khz": 1e-6, "mhz": 1e-3, "ghz": 1.0, "cycle/nsecond": 1.0,
         "byte": 1.0, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9}


@functools.lru_cache(maxsize=None)
def _timing_module():
    spec = importlib.util.spec_from_file_location("grouped_gemm_benchmark", os.path.join(ROOT, "benchmarks",
                                                                                          "grouped_gemm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_row(text: str):
    kind, shape, distribution = text.split(":")
    n, k = (int(v) for v in shape.split("x"))
    if kind not in ("forward", "dgrad"):
        raise SystemExit(f"--rows {text}: kind must be forward or dgrad (the grouped product)")
    return kind, n, k, distribution


def column_fn(kind, n, k, distribution, column):
    """The callable of one column, built on the timing benchmark's operands."""
    import torch
    from kernels.grouped_gemm import triton_grouped_mm

    timing = _timing_module()
    sizes = timing.distributions()[distribution]
    x, w, dout, offsets, flops, generator = timing.timing_operands(n, k, sizes, torch.bfloat16)
    dense_w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16, generator=generator)
    fns = {
        "forward": {"ours": lambda: triton_grouped_mm(x, w, offsets, "enk"),
                    "torch": lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offsets),
                    "dense": lambda: x @ dense_w},
        "dgrad": {"ours": lambda: triton_grouped_mm(dout, w, offsets, "enk", transpose_weight=True),
                  "torch": lambda: torch._grouped_mm(dout, w, offs=offsets),
                  "dense": lambda: dout @ dense_w.T},
    }
    return fns[kind][column]


def problem_size(n, k, distribution):
    """FLOPs of the row, and the least bytes a grouped and a dense kernel must move: each operand
    read once, the output written once (bf16). The product's three matrices have the same sizes
    in forward and dgrad."""
    sizes = _timing_module().distributions()[distribution]
    m = sum(sizes)
    return 2.0 * m * n * k, 2 * (m * k + len(sizes) * k * n + m * n), 2 * (m * k + k * n + m * n)


def child(args) -> None:
    """Run one column three times, the third inside the profiler's capture range."""
    import torch

    from kernels import grouped_gemm

    kind, n, k, distribution = parse_row(args.child)
    fn = column_fn(kind, n, k, distribution, args.column)
    forced = contextlib.nullcontext()
    if args.config:
        forced = grouped_gemm.use_config(grouped_gemm._grouped_product_tma_kernel,
                                         grouped_gemm.product_tma_config(**json.loads(args.config)))
    with forced:
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def tuned_config(kind, n, k, distribution) -> dict:
    """The configuration our autotuner picks for the row, in this process (no profiler)."""
    from kernels import grouped_gemm

    column_fn(kind, n, k, distribution, "ours")()
    config = grouped_gemm._grouped_product_tma_kernel.best_config
    kwargs = config.kwargs
    return {"block_m": kwargs["BLOCK_M"], "block_p": kwargs["BLOCK_P"], "block_r": kwargs["BLOCK_R"],
            "warps": config.num_warps, "stages": config.num_stages, "programs_per_sm": kwargs["PROGRAMS_PER_SM"],
            "tma_store": kwargs["TMA_STORE"], "epilogue_split": kwargs["EPILOGUE_SPLIT"],
            "warp_specialize": kwargs["WARP_SPECIALIZE"]}


def _number(value: str, unit: str) -> float:
    number = float(value.replace(",", ""))
    return number * SCALE.get(unit.strip().lower(), 1.0)


def parse_ncu_csv(text: str) -> dict:
    """Metrics of the longest kernel in an ``ncu --csv --page details`` report."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    kernels: dict = {}
    for record in csv.DictReader(io.StringIO("\n".join(lines))):
        name = record.get("Metric Name")
        if name not in METRICS:
            continue
        entry = kernels.setdefault(record["ID"], {"kernel": record["Kernel Name"][:80]})
        entry.setdefault(METRICS[name], _number(record["Metric Value"], record.get("Metric Unit", "")))
    if not kernels:
        raise RuntimeError("ncu reported no kernel metrics")
    return max(kernels.values(), key=lambda entry: entry.get("duration_us", 0.0))


def profile_column(row_text, column, config) -> dict:
    command = ["ncu", "--clock-control", "none", "--profile-from-start", "off", "--csv", "--page", "details",
               "--section", "SpeedOfLight", "--section", "MemoryWorkloadAnalysis", "--section", "ComputeWorkloadAnalysis",
               "--section", "LaunchStats", "--metrics", "dram__bytes_read.sum,dram__bytes_write.sum",
               sys.executable, os.path.abspath(__file__), "--child", row_text, "--column", column]
    if config is not None:
        command += ["--config", json.dumps(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"ncu failed on {row_text} {column} (exit {done.returncode}): {done.stderr[-600:]}")
    return parse_ncu_csv(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "grouped_gemm_profile.json"))
    parser.add_argument("--rows", nargs="*", default=ROWS, help="kind:NxK:distribution, e.g. forward:1536x2048:64x512")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--column", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if shutil.which("ncu") is None:
        raise SystemExit("ncu (Nsight Compute) is not on the PATH: this benchmark reads hardware counters through it")
    import torch
    import triton

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "rows": []}
    header = (f"{'row':34s} {'column':6s} {'us':>8s} {'GHz':>5s} {'TFLOP/s':>8s} {'SM%':>5s} {'mem%':>5s} "
              f"{'DRAM%':>6s} {'L2%':>5s} {'L2hit':>6s} {'issue%':>6s} {'DRAM/least':>10s}  bound")
    print(header)
    for row_text in args.rows:
        kind, n, k, distribution = parse_row(row_text)
        config = tuned_config(kind, n, k, distribution)
        flops, least_grouped, least_dense = problem_size(n, k, distribution)
        for column in COLUMNS:
            entry = profile_column(row_text, column, config if column == "ours" else None)
            column_least = least_dense if column == "dense" else least_grouped
            entry.update(row=row_text, column=column, least_bytes=column_least,
                         tflops=flops / (entry["duration_us"] * 1e-6) / 1e12,
                         bound="compute" if entry.get("sm_pct", 0) >= entry.get("memory_pct", 0) else "memory")
            if "dram_read_bytes" in entry:
                entry["dram_over_least"] = (entry["dram_read_bytes"] + entry.get("dram_write_bytes", 0)) / column_least
            if column == "ours":
                entry["config"] = config
            results["rows"].append(entry)
            print(f"{row_text:34s} {column:6s} {entry['duration_us']:8.1f} {entry.get('sm_clock_ghz', 0):5.2f} "
                  f"{entry['tflops']:8.1f} {entry.get('sm_pct', 0):5.1f} {entry.get('memory_pct', 0):5.1f} "
                  f"{entry.get('dram_pct', 0):6.1f} {entry.get('l2_pct', 0):5.1f} {entry.get('l2_hit_pct', 0):6.1f} "
                  f"{entry.get('issue_pct', 0):6.1f} {entry.get('dram_over_least', float('nan')):10.2f}  "
                  f"{entry['bound']}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
