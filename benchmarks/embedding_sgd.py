"""One GPU: the embedding's sparse SGD step against the dense one, at a large vocabulary.

  sparse   ``torch.ops.shardgraph.embedding_sgd_(W, grad_output, indices, lr, -1, [])`` in its aten
           form: the looked-up rows summed per index and stepped, the norm's term returned; on a
           GPU also ``sparse_triton``, the one Triton kernel (the op's default there), which must
           give the aten form's weight bit for bit
  dense    what the unfused program runs: ``embedding_dense_backward``, ``W.copy_(W - grad * lr)``
           and ``sum(float32(grad) ** 2)``, under ``torch.compile`` (as the program runs under
           inductor) and as eager aten ops

Before timing, each step is taken once from the same weight and compared with the float64
definition (``embedding_dense_backward`` in float64, then ``W - lr * grad``), as the error of the
new weight relative to the step's size, and the sums of squares against each other; rows no
index names must come out bit for bit. Times are medians of CUDA-event timings of the step
alone (the weight is restored before each, outside the timed region).

    python benchmarks/embedding_sgd.py                       # Qwen3's vocabulary, 8192 and 32768 tokens
    python benchmarks/embedding_sgd.py --device cpu --tiny   # the same code on a CPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kernels  # noqa: E402,F401 - registers torch.ops.shardgraph.embedding_sgd_
from kernels import embedding_sgd  # noqa: E402

# name: (vocabulary rows, width); timed at each of --tokens
SHAPES = {"qwen3_vocab": (151936, 2048)}
TINY = {"tiny": (500, 32)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tiny", action="store_true", help="a small table and batch (a CPU run)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="indices per step (default 8192 and 32768; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "embedding_sgd.json"))
    return parser.parse_args(argv)


def dense_step(weight, grad_output, indices, lr):
    grad = torch.ops.aten.embedding_dense_backward(grad_output, indices, weight.shape[0], -1, False)
    weight.copy_(weight - grad * lr)
    return torch.sum(torch.pow(grad.float(), 2))


def sparse_step(weight, grad_output, indices, lr):
    with embedding_sgd.use_triton(False):
        return torch.ops.shardgraph.embedding_sgd_(weight, grad_output, indices, lr, -1, [])


def sparse_triton_step(weight, grad_output, indices, lr):
    with embedding_sgd.use_triton(True):
        return torch.ops.shardgraph.embedding_sgd_(weight, grad_output, indices, lr, -1, [])


def timed(step, weight, original, operands, device, steps) -> float:
    times = []
    for index in range(steps + 3):
        weight.copy_(original)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(weight, *operands)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            started = time.perf_counter()
            step(weight, *operands)
            elapsed = (time.perf_counter() - started) * 1e3
        if index >= 3:
            times.append(elapsed)
    return statistics.median(times)


def run_shape(name, rows, width, tokens, dtype, device, steps) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    original = torch.randn(rows, width, device=device, generator=generator).to(dtype)
    # A language's token counts are skewed: a few ids repeat often (power-law draw).
    uniform = torch.rand(tokens, device=device, generator=generator)
    indices = ((uniform ** 3) * rows).long().clamp_max(rows - 1)
    grad_output = (torch.randn(tokens, width, device=device, generator=generator) * 1e-2).to(dtype)
    lr = torch.tensor(0.5, dtype=dtype, device=device)
    operands = (grad_output, indices, lr)

    grad64 = torch.ops.aten.embedding_dense_backward(grad_output.double(), indices, rows, -1, False)
    exact = original.double() - grad64 * lr.double()
    step_size = (grad64 * lr.double()).norm().item()
    looked_up = torch.zeros(rows, dtype=torch.bool, device=device)
    looked_up[indices] = True
    row = {"shape": name, "rows": rows, "width": width, "tokens": tokens,
           "distinct_indices": int(looked_up.sum().item())}
    compiled = torch.compile(dense_step, dynamic=False) if device.type == "cuda" else dense_step
    terms = {}
    steps_timed = [("sparse", sparse_step), ("dense_compiled", compiled), ("dense_eager", dense_step)]
    if device.type == "cuda":
        steps_timed.insert(1, ("sparse_triton", sparse_triton_step))
    for label, step in steps_timed:
        weight = original.clone()
        terms[label] = step(weight, *operands).item()
        row[f"{label}_step_error"] = (weight.double() - exact).norm().item() / step_size
        row[f"{label}_untouched_equal"] = bool(torch.equal(weight[~looked_up], original[~looked_up]))
        row[f"{label}_ms"] = timed(step, weight, original, operands, device, steps)
        del weight
    row["squares_rel_diff"] = abs(terms["sparse"] - terms["dense_eager"]) / abs(terms["dense_eager"])
    row["agree"] = (row["sparse_untouched_equal"] and row["squares_rel_diff"] < 1e-3
                    and row["sparse_step_error"] <= max(1.5 * row["dense_eager_step_error"], 1e-6))
    if "sparse_triton" in terms:
        # The kernel must give the aten form's weight bit for bit (same sums in the same order).
        weight, triton_weight = original.clone(), original.clone()
        sparse_step(weight, *operands)
        sparse_triton_step(triton_weight, *operands)
        row["sparse_triton_equal_to_aten"] = bool(torch.equal(weight, triton_weight))
        row["sparse_triton_squares_rel_diff"] = abs(terms["sparse_triton"] - terms["sparse"]) / abs(terms["sparse"])
        row["dense_compiled_over_sparse_triton"] = row["dense_compiled_ms"] / row["sparse_triton_ms"]
        del weight, triton_weight
    row["dense_compiled_over_sparse"] = row["dense_compiled_ms"] / row["sparse_ms"]
    row["dense_eager_over_sparse"] = row["dense_eager_ms"] / row["sparse_ms"]
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": args.dtype, "steps": args.steps, "rows": []}
    print(f"{'shape':>18} {'distinct':>9} {'sparse ms':>10} {'triton ms':>10} {'dense compiled':>15} "
          f"{'dense eager':>12} {'ratio (compiled)':>17} {'agree':>6}", flush=True)
    token_counts = args.tokens or ([64] if args.tiny else [8192, 32768])
    for (name, (rows, width)), tokens in itertools.product((TINY if args.tiny else SHAPES).items(), token_counts):
        row = run_shape(f"{name}_{tokens}", rows, width, tokens, dtype, device, args.steps)
        result["rows"].append(row)
        triton_ms = f"{row['sparse_triton_ms']:>10.3f}" if "sparse_triton_ms" in row else f"{'-':>10}"
        print(f"{name:>18} {row['distinct_indices']:>9} {row['sparse_ms']:>10.3f} {triton_ms} "
              f"{row['dense_compiled_ms']:>15.3f} "
              f"{row['dense_eager_ms']:>12.3f} {row['dense_compiled_over_sparse']:>16.2f}x {str(row['agree']):>6}",
              flush=True)
    result["wall_s"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
