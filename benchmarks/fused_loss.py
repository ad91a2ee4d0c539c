"""The fused output projection + cross-entropy (``shardgraph.linear_cross_entropy``): the op alone
and in the training step, against the unfused ops.

Part 1, the op alone, forward + backward at Qwen3-30B-A3B's output layer (hidden 2048, vocab
151936, ``--tokens`` rows, bf16, one target in 10 ignored):

  unfused            ``mm`` -> ``log_softmax`` -> ``nll_loss`` in bf16 and autograd's backward: the
                     aten ops the unfused program runs (logits, log-probabilities and their
                     gradients held whole)
  unfused_fp32       the same with the logits cast to float32 before the loss (HF's loss does this)
  fused              the op, Triton softmax / gradient kernel, chunk from the default budget
  fused_<MiB>        the same with another chunk budget
  fused_torch        the op with the softmax / gradient step as torch ops instead of Triton
  liger              liger-kernel's ``LigerFusedLinearCrossEntropyLoss`` (where importable)

  with median ms, peak memory above the operands (``max_memory_allocated`` minus what was
  allocated before), and the loss's and both gradients' relative errors against a float32
  computation from the same bf16 operands.

Part 2, the training step of ``benchmarks/train_step.py``'s ``ours`` model at the Qwen3-30B-A3B
shape (``--layers`` layers, batch ``--batch`` x ``--seq``, bf16, SGD), compiled with
``fused_loss=True`` and ``False``, run as the plain graph module and under ``torch.compile``:
median step ms, peak memory, the report's planned activation peak, and the first loss.

    python benchmarks/fused_loss.py                      # one H100 / H200: benchmarks/results/fused_loss.json
    python benchmarks/fused_loss.py --device cpu --tiny  # the same on a CPU in seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels.linear_cross_entropy as lce  # noqa: E402
import shardgraph as sg  # noqa: E402
from passes.fuse_linear_cross_entropy import FUSED_OP  # noqa: E402
from shardgraph.report import build_report  # noqa: E402

OP = torch.ops.shardgraph.linear_cross_entropy
IGNORE = -100


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, steps: int, warmup: int) -> dict:
    """Median / min ms of ``fn()`` and its peak memory above what was allocated before."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    row = {"median_ms": statistics.median(times), "min_ms": min(times), "steps_ms": times}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_above_inputs_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return row


def relative(value, reference) -> float:
    value, reference = value.double(), reference.double()
    return ((value - reference).norm() / reference.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------- the op alone
def unfused(hidden, weight, target, upcast: bool):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    logits = hidden @ weight.t()
    if upcast:
        logits = logits.float()
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), grad_hidden, grad_weight


def fused(hidden, weight, target, chunk_rows):
    count = (target != IGNORE).sum()
    scale = 1.0 / count.to(torch.float32)
    loss_sum, grad_hidden, grad_weight = OP(hidden, weight, target, scale, IGNORE, chunk_rows, torch.float32)
    return loss_sum * scale, grad_hidden, grad_weight


def float32_reference(hidden, weight, target):
    """Loss and gradients in float32 from the bf16 operands, in row chunks (no [N, V] fp64)."""
    h, w = hidden.float(), weight.float()
    count = (target != IGNORE).sum().item()
    loss = torch.zeros((), dtype=torch.float64, device=h.device)
    grad_hidden = torch.empty_like(h)
    grad_weight = torch.zeros_like(w)
    for start in range(0, h.shape[0], 1024):
        rows = slice(start, start + 1024)
        logits = h[rows] @ w.t()
        t = target[rows]
        valid = t != IGNORE
        safe = torch.where(valid, t, torch.zeros_like(t))
        lse = torch.logsumexp(logits, 1)
        loss += ((lse - logits.gather(1, safe[:, None]).squeeze(1)) * valid).double().sum()
        grad = torch.softmax(logits, 1)
        grad[torch.arange(grad.shape[0], device=grad.device), safe] -= 1
        grad *= valid[:, None] / count
        grad_hidden[rows] = grad @ w
        grad_weight += grad.t() @ h[rows]
    return loss / count, grad_hidden, grad_weight


def op_rows(args, device) -> list[dict]:
    generator = torch.Generator(device=device).manual_seed(0)
    tokens, width, vocab = args.tokens, args.hidden, args.vocab
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = (torch.randn(tokens, width, device=device, generator=generator) * 0.5).to(dtype)
    weight = (torch.randn(vocab, width, device=device, generator=generator) * 0.02).to(dtype)
    target = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
    target[torch.rand(tokens, device=device, generator=generator) < 0.1] = IGNORE
    reference = float32_reference(hidden, weight, target)
    default_rows = lce.chunk_rows_for_budget(tokens, vocab, dtype, lce.DEFAULT_CHUNK_BYTES,
                                             triton_path=lce.use_triton(hidden))
    cases = {
        "unfused": lambda: unfused(hidden, weight, target, upcast=False),
        "unfused_fp32": lambda: unfused(hidden, weight, target, upcast=True),
        "fused": lambda: fused(hidden, weight, target, default_rows),
    }
    for mib in args.budgets_mib:
        rows = lce.chunk_rows_for_budget(tokens, vocab, dtype, mib << 20, triton_path=lce.use_triton(hidden))
        cases[f"fused_{mib}MiB"] = lambda rows=rows: fused(hidden, weight, target, rows)
    if device.type == "cuda":
        torch_rows = lce.chunk_rows_for_budget(tokens, vocab, dtype, lce.DEFAULT_CHUNK_BYTES, triton_path=False)

        def fused_torch():
            lce.TRITON_ENABLED = False
            try:
                return fused(hidden, weight, target, torch_rows)
            finally:
                lce.TRITON_ENABLED = True

        cases["fused_torch"] = fused_torch
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)

            def liger():
                h = hidden.detach().requires_grad_()
                w = weight.detach().requires_grad_()
                loss = liger_loss(w, h, target)
                grad_hidden, grad_weight = torch.autograd.grad(loss, (h, w))
                return loss.detach(), grad_hidden, grad_weight

            cases["liger"] = liger
        except ImportError as error:
            print(f"liger-kernel not importable: {error}")
    rows_out = []
    for name, fn in cases.items():
        row = {"case": name, "tokens": tokens, "hidden": width, "vocab": vocab, "dtype": str(dtype)}
        if name.startswith("fused") and name != "fused_torch":
            row["chunk_rows"] = default_rows if name == "fused" else None
        try:
            values = fn()
            row.update({f"err_{what}": relative(v, r) for what, v, r in
                        zip(("loss", "grad_hidden", "grad_weight"), values, reference)})
            del values
            row.update(measure(fn, device, args.op_steps, 2))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "oom"
        except Exception as error:  # noqa: BLE001 - one case failing leaves the others
            row["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        rows_out.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows_out


# ---------------------------------------------------------------------------------- train step
def train_rows(args, device) -> list[dict]:
    from benchmarks.train_step import build

    rows = []
    for variant in args.train_variants:
        for fused_loss in (False, True):
            row = {"variant": variant, "fused_loss": fused_loss, "layers": args.layers, "batch": args.batch,
                   "seq": args.seq}
            _train_row(row, build, variant, fused_loss, args, device)
            rows.append(row)
            print(json.dumps(row), flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _train_row(row, build, variant, fused_loss, args, device) -> None:
    """One step variant, measured into ``row``; its model and program are freed on return."""
    try:
        with torch.device(device):
            model, loss_fn = build("ours", args.layers, args.tiny, seed=0)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = model.to(dtype)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (args.batch, args.seq), device=device,
                            generator=torch.Generator(device=device).manual_seed(1))
        started = time.perf_counter()
        program = sg.compile(model, sg.MeshSpec(world=1), (ids,), loss_fn, fused_loss=fused_loss)
        row["compile_s"] = time.perf_counter() - started
        row["fused_ops"] = sum(1 for n in program.graph_module.graph.nodes if n.target == FUSED_OP)
        report = build_report(program)
        row["planned_peak_activation_gib"] = report["totals"]["peak_activation_bytes_per_rank"] / 2**30
        step = program.single_device_step(compile="inductor" if variant == "compile" else None)
        parameters = {name: p.detach() for name, p in model.named_parameters()}
        trainable = [parameters[name] for name in program.gradient_names]
        losses = []

        def train_step():
            loss, gradients = step(parameters, (ids,))
            with torch.no_grad():
                torch._foreach_add_(trainable, [gradients[n] for n in program.gradient_names], alpha=-1e-3)
            losses.append(loss.detach())

        row.update(measure(train_step, device, args.steps, args.warmup))
        row["first_loss"] = losses[0].item()
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            row["parameters_gib"] = sum(p.numel() * p.element_size() for p in parameters.values()) / 2**30
    except torch.cuda.OutOfMemoryError:
        row["error"] = "oom"
    except Exception as error:  # noqa: BLE001
        row["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()


def table(headers, rows) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def fmt(value, spec=".2f") -> str:
    return "" if value is None else format(value, spec)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU)")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--budgets-mib", type=int, nargs="*", default=[128, 2048])
    parser.add_argument("--op-steps", type=int, default=10)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--train-variants", nargs="*", default=["plain", "compile"], choices=["plain", "compile"])
    parser.add_argument("--skip-op", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "fused_loss.json"))
    args = parser.parse_args(argv)
    defaults = (dict(tokens=256, hidden=64, vocab=1000, layers=1, batch=2, seq=32) if args.tiny else
                dict(tokens=8192, hidden=2048, vocab=151936, layers=4, batch=2, seq=4096))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": vars(args), "op": [], "train_step": []}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)

    def save():  # after each part, so a run cut short keeps what it measured
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)

    if not args.skip_op:
        result["op"] = op_rows(args, device)
        save()
    if not args.skip_train:
        result["train_step"] = train_rows(args, device)
        save()
    print(f"\n{result['device']}, torch {torch.__version__}")
    if result["op"]:
        print(f"\nlinear + cross-entropy forward+backward, {args.tokens} x {args.hidden} -> {args.vocab}")
        print(table(["case", "ms", "peak GiB", "err loss", "err grad_h", "err grad_w", "error"],
                    [[r["case"], fmt(r.get("median_ms")), fmt(r.get("peak_above_inputs_gib")),
                      fmt(r.get("err_loss"), ".1e"), fmt(r.get("err_grad_hidden"), ".1e"),
                      fmt(r.get("err_grad_weight"), ".1e"), r.get("error", "")] for r in result["op"]]))
    if result["train_step"]:
        print(f"\ntrain step, ours at the Qwen3-30B-A3B shape, {args.layers} layers, {args.batch} x {args.seq}")
        print(table(["variant", "fused", "ms", "peak GiB", "planned act GiB", "loss", "error"],
                    [[r["variant"], str(r["fused_loss"]), fmt(r.get("median_ms")), fmt(r.get("peak_gib")),
                      fmt(r.get("planned_peak_activation_gib")), fmt(r.get("first_loss"), ".4f"),
                      r.get("error", "")] for r in result["train_step"]]))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
