"""Host cost of one grouped GEMM call: the Python work before a kernel starts.

A grouped GEMM of a small expert batch runs in tens of microseconds on the GPU, so the host work
of a call (argument checks, path choice, descriptors, the launch) decides whether an eager
training step keeps the GPU fed. This measures it per call, by layer:

``wrapper``  ``kernels.grouped_gemm.triton_grouped_mm`` / ``triton_grouped_mm_wgrad`` on the TMA
             and portable paths, with a configuration forced and the compiled kernel already
             cached, up to the call into Triton's launcher
``op``       ``torch.ops.shardgraph.grouped_mm`` (what lowered graphs call) with its arguments
             checked and dispatched, over the ``loop`` backend, less a direct call of that backend
``aten``     one ``torch.mm`` on the same small CPU tensors: the cost of one aten dispatch, the unit
             the others are read against in the same run
``torch``    on an sm_90+ device, ``torch._grouped_mm`` on the wrapper's operands: the host cost
             of torch's own grouped GEMM

On the CPU (no GPU needed) Triton's launcher is replaced by a recording stand-in, so ``wrapper``
is this module's Python alone; on a CUDA device (``--device cuda``) the real launcher runs and
``wrapper`` is the whole host cost of a launch. Where the compiled kernel is launched directly
(``kernels.launch``), the same calls are timed again launched the generic way (``generic us``).
Medians of ``--repeats`` timings of ``--calls`` calls each, on a small problem (512 rows, K = 128,
N = 256, 8 groups) so that on a GPU the kernels finish faster than the host issues them. ``--profile`` adds a cProfile of each case.
Writes JSON (``--out``).

    python benchmarks/grouped_gemm_host.py [--device cpu|cuda] [--profile] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

import kernels  # noqa: E402
from kernels import grouped_gemm  # noqa: E402
from kernels import triton_release as launch  # noqa: E402


class RecordingLauncher:
    """Stands in for a compiled Triton kernel: ``kernel[grid](*args)`` records the call."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args):
        self.launches += 1


@contextlib.contextmanager
def stubbed_compilation(kernel, launcher):
    """The JIT's compile-and-run entry returns ``launcher`` in place of a compiled kernel, which
    the module then caches and calls for every later launch; on leaving, the stand-ins are taken
    out of that cache again."""
    run, cached = kernel.fn.run, set(grouped_gemm._compiled)
    kernel.fn.run = lambda *args, **kwargs: launcher
    try:
        yield
    finally:
        kernel.fn.run = run
        for key in set(grouped_gemm._compiled) - cached:
            del grouped_gemm._compiled[key]


def print_profile(label, fn, calls, lines=14):
    """Where one call's host time goes: cProfile over ``calls`` calls, by own time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print(f"--- {label}: {calls} calls")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(lines)


def per_call_us(fn, calls, repeats) -> float:
    for _ in range(min(calls, 200)):
        fn()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        timings.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(timings)


def operands(device, m=512, k=128, n=256, experts=8):
    # Small on purpose: on a GPU each kernel must finish faster than the host can issue the next,
    # or the launch queue fills and the host waits on the device, timing the kernels instead.
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=generator).to(torch.bfloat16)
    w = torch.randn(experts, n, k, device=device, generator=generator).to(torch.bfloat16)  # [E, N, K]
    dout = torch.randn(m, n, device=device, generator=generator).to(torch.bfloat16)
    offsets = (torch.arange(1, experts + 1, device=device) * (m // experts)).to(torch.int32)
    return x, w, dout, offsets


def wrapper_rows(device, calls, repeats, profile=False):
    x, w, dout, offsets = operands(device)
    experts = w.shape[0]
    out = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=device)
    dx = torch.empty_like(x)
    dw = torch.empty_like(w)
    cases = [
        ("forward", "tma", grouped_gemm._grouped_product_tma_kernel,
         lambda: grouped_gemm.triton_grouped_mm(x, w, offsets, "enk", out=out, path="tma")),
        ("dgrad", "tma", grouped_gemm._grouped_product_tma_kernel,
         lambda: grouped_gemm.triton_grouped_mm(dout, w, offsets, "enk", transpose_weight=True, out=dx, path="tma")),
        ("wgrad", "tma", grouped_gemm._grouped_wgrad_tma_kernel,
         lambda: grouped_gemm.triton_grouped_mm_wgrad(x, dout, offsets, experts, "enk", out=dw, path="tma")),
        ("forward", "portable", grouped_gemm._grouped_product_kernel,
         lambda: grouped_gemm.triton_grouped_mm(x, w, offsets, "enk", out=out, path="portable")),
        ("wgrad", "portable", grouped_gemm._grouped_wgrad_kernel,
         lambda: grouped_gemm.triton_grouped_mm_wgrad(x, dout, offsets, experts, "enk", out=dw, path="portable")),
    ]
    rows = []
    for kind, path, kernel, fn in cases:
        if path == "tma" and device == "cuda" and not grouped_gemm._has_tma(torch.cuda.current_device()):
            continue  # a GPU without TMA: the Hopper path cannot launch there
        with grouped_gemm.use_config(kernel, kernel.configs[0]), contextlib.ExitStack() as stack:
            launcher = None
            if device == "cpu":
                launcher = RecordingLauncher()
                stack.enter_context(stubbed_compilation(kernel, launcher))
            fn()  # compiles (or, on the CPU, caches the stand-in)
            direct = any(entry[1].direct for key, entry in grouped_gemm._compiled.items() if key[0] is kernel)
            us = per_call_us(fn, calls, repeats)
            row = {"layer": "wrapper", "kind": kind, "path": path, "launch": "direct" if direct else "generic", "us": us}
            if direct:
                with launch.generic_launch():
                    row["generic_us"] = per_call_us(fn, calls, repeats)
            if device == "cuda":
                torch.cuda.synchronize()
            if profile:
                print_profile(f"{kind} {path}", fn, calls)
        if launcher is not None and launcher.launches < calls * repeats:
            raise SystemExit(f"{kind} {path}: the cached launch was not taken ({launcher.launches} launches)")
        rows.append(row)
    if device == "cuda" and torch.cuda.get_device_capability() >= (9, 0):
        # torch's own grouped GEMM on the same operands: the host cost our launch is read against.
        rows.append({"layer": "torch", "kind": "forward", "path": "_grouped_mm", "launch": "aten", "us": per_call_us(
            lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offsets), calls, repeats)})
    return rows


def op_rows(calls, repeats):
    """The custom op's own cost: dispatch and checks over the loop backend, on tiny tensors."""
    x = torch.randn(8, 16)
    w = torch.randn(2, 24, 16)  # [E, N, K]
    offsets = torch.tensor([4, 8], dtype=torch.int32)
    grad = torch.randn(8, 24)
    with kernels.use_backend("loop"):
        direct = per_call_us(lambda: kernels._forward(x, w, offsets, "enk"), calls, repeats)
        rows = [{"layer": "op", "kind": "forward", "path": "loop", "us": per_call_us(
            lambda: torch.ops.shardgraph.grouped_mm.default(x, w, offsets, "enk"), calls, repeats) - direct}]
        direct = per_call_us(lambda: kernels._dgrad(grad, w, offsets, "enk"), calls, repeats)
        rows.append({"layer": "op", "kind": "dgrad", "path": "loop", "us": per_call_us(
            lambda: torch.ops.shardgraph.grouped_mm_dgrad.default(grad, w, offsets, "enk"), calls, repeats) - direct})
        direct = per_call_us(lambda: kernels._wgrad(x, grad, offsets, 2, "enk"), calls, repeats)
        rows.append({"layer": "op", "kind": "wgrad", "path": "loop", "us": per_call_us(
            lambda: torch.ops.shardgraph.grouped_mm_wgrad.default(x, grad, offsets, 2, "enk"), calls, repeats) - direct})
    rows.append({"layer": "aten", "kind": "torch.mm", "path": "cpu", "us": per_call_us(lambda: torch.mm(x, w[0].T), calls,
                                                                                      repeats)})
    return rows


def processor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of each wrapper case")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "grouped_gemm_host.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU")
    if args.device == "cpu" and grouped_gemm.INTERPRETED:
        raise SystemExit("unset TRITON_INTERPRET: the interpreter runs kernels in Python, which is not the launch path")
    rows = wrapper_rows(args.device, args.calls, args.repeats, args.profile) + op_rows(args.calls, args.repeats)
    aten = next(row["us"] for row in rows if row["layer"] == "aten")
    for row in rows:
        row["over_aten"] = row["us"] / aten
    result = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else processor(),
              "launcher": "triton" if args.device == "cuda" else "recording stand-in (CPU)",
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "calls": args.calls, "repeats": args.repeats, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}  launcher: {result['launcher']}")
    print(f"{'layer':<8} {'kind':<9} {'path':<11} {'launch':<8} {'us/call':>8} {'x torch.mm':>10} {'generic us':>10}")
    for row in rows:
        generic = f"{row['generic_us']:>10.2f}" if "generic_us" in row else ""
        print(f"{row['layer']:<8} {row['kind']:<9} {row['path']:<11} {row.get('launch', ''):<8} {row['us']:>8.2f} "
              f"{row['over_aten']:>10.2f} {generic}")
    return result


if __name__ == "__main__":
    main()
