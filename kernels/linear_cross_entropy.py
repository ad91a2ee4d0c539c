"""``shardgraph::linear_cross_entropy``: an output projection and its cross-entropy loss, forward and
backward in one op, chunked over rows so the ``[rows, vocab]`` logits never exist whole.

    loss_sum, grad_hidden, grad_weight = linear_cross_entropy(hidden, weight, target, grad_scale,
                                                              ignore_index, chunk_rows, loss_dtype)

with ``hidden [N, H]``, ``weight [V, H]`` (``logits = hidden @ weight.T``), ``target [N]`` int64, and
``grad_scale`` a 0-dim tensor: the derivative of whatever the graph makes of ``loss_sum`` (for a
mean over counted rows, ``d loss / d loss_sum = 1 / count``). It returns

    loss_sum     sum over rows with ``target != ignore_index`` of ``logsumexp(logits[n]) - logits[n, target[n]]``
    grad_hidden  grad_scale * d loss_sum / d hidden            (hidden's dtype)
    grad_weight  grad_scale * d loss_sum / d weight            (weight's dtype)

Per chunk of ``chunk_rows`` rows: the logits in the operands' dtype (half precision with float32
accumulation, as ``mm``), then in float32 the row's log-sum-exp, the loss and at once the logits'
gradient ``(softmax - onehot(target)) * grad_scale`` (zero on ignored rows), which is multiplied
back through the weight (the chunk's rows of ``grad_hidden``) and into the weight's gradient
(accumulated in float32 over chunks). Only one chunk's logits are held at a time.

The softmax / gradient step of a chunk runs as one Triton kernel on a CUDA device (two reads of the
logits, one write of their gradient in place), and as torch ops elsewhere. Why the gradient is
computed in the forward: the loss of a row and its gradient need the same log-sum-exp, so one
pass over the logits serves both, and nothing of size ``[N, V]`` has to wait for the backward.
"""

from __future__ import annotations

import torch

from . import op_bodies
from .reference import sgd_step_

__all__ = ["linear_cross_entropy", "linear_cross_entropy_sgd_", "linear_cross_entropy_reference",
           "chunk_rows_for_budget", "DEFAULT_CHUNK_BYTES", "TRITON_ENABLED", "use_triton"]

# False sends every chunk through the torch ops (to compare the two paths on a GPU).
TRITON_ENABLED = True
# Bytes a chunk's logits and their float32 work buffers may take (the op's temporary memory).
DEFAULT_CHUNK_BYTES = 2048 << 20


def _work_bytes_per_element(dtype: torch.dtype, triton_path: bool) -> int:
    """Bytes one logit of a chunk costs while the chunk is worked on."""
    if triton_path:
        return dtype.itemsize  # the logits buffer, its gradient written in place
    # torch ops: the logits, a float32 copy turned into the gradient, its cast back, a temporary
    return dtype.itemsize + 4 + 4 + dtype.itemsize


def chunk_rows_for_budget(rows: int, vocab: int, dtype: torch.dtype, budget_bytes: int = DEFAULT_CHUNK_BYTES,
                          triton_path: bool = False) -> int:
    """Rows per chunk so one chunk's logits and work buffers fit ``budget_bytes``: a multiple of
    64 (whole GEMM tiles) where more than 64 rows fit, never more than ``rows``, at least 1.

    Of the chunk sizes that need the fewest chunks, the smallest multiple of 64: the rows split
    into near-equal chunks rather than full ones and a small remainder, since every chunk pays
    a full pass over the float32 weight-gradient accumulator whatever its rows."""
    fit = budget_bytes // max(1, vocab * _work_bytes_per_element(dtype, triton_path))
    if fit < 64:
        return int(max(1, min(rows, fit)))
    fit -= fit % 64
    if fit >= rows:
        return int(rows)
    chunks = -(-rows // fit)
    even = -(-rows // chunks)
    even += -even % 64
    return int(min(fit, even))


def use_triton(logits: torch.Tensor) -> bool:
    """The Triton softmax / gradient kernel runs on CUDA tensors (where Triton is importable)."""
    if not TRITON_ENABLED or logits.device.type != "cuda" or logits.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check(hidden, weight, target, grad_scale, chunk_rows) -> None:
    op = "shardgraph.linear_cross_entropy"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden {tuple(hidden.shape)} must be [N, H] and weight {tuple(weight.shape)} [V, H]")
    if target.shape != (hidden.shape[0],) or target.dtype != torch.int64:
        raise ValueError(f"{op}: target {tuple(target.shape)} {target.dtype} must be [N] = [{hidden.shape[0]}] int64")
    if hidden.dtype != weight.dtype or not hidden.dtype.is_floating_point:
        raise TypeError(f"{op}: hidden {hidden.dtype} and weight {weight.dtype} must share a floating-point dtype")
    if grad_scale.dim() != 0:
        raise ValueError(f"{op}: grad_scale must be 0-dim, got shape {tuple(grad_scale.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"{op}: chunk_rows must be at least 1, got {chunk_rows}")


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_torch(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, coefficient: torch.Tensor):
    """(per-row loss, logits' gradient in the logits' dtype) with torch ops, in float32 (float64
    for float64 logits)."""
    work = logits.to(_accumulate_dtype(logits.dtype))
    lse = torch.logsumexp(work, dim=1)
    picked = work.gather(1, target[:, None]).squeeze(1)
    row_loss = torch.where(valid, lse - picked, torch.zeros_like(lse))
    grad = work.sub_(lse[:, None]).exp_()
    grad.scatter_add_(1, target[:, None], torch.full_like(picked[:, None], -1.0))
    grad.mul_(coefficient[:, None])
    return row_loss, grad.to(logits.dtype)


def _chunk(logits, target, valid, coefficient):
    if use_triton(logits):
        from .cross_entropy_triton import softmax_cross_entropy_grad_

        row_loss = softmax_cross_entropy_grad_(logits, target, coefficient)
        return row_loss, logits
    return _chunk_torch(logits, target, valid, coefficient)


def _weight_grad_into(accumulator: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor, first: bool) -> None:
    """accumulator += grad_logits^T @ hidden (``=`` for the ``first`` chunk), the product
    accumulated in the accumulator's dtype.

    The first chunk writes the accumulator without reading it: no zero fill and no read of
    zeros, two passes over a ``[V, H]`` float32 tensor (1.2 GB at Qwen3's vocabulary) saved."""
    if grad_logits.dtype == accumulator.dtype:
        if first:
            torch.mm(grad_logits.t(), hidden, out=accumulator)
        else:
            accumulator.addmm_(grad_logits.t(), hidden)
    elif accumulator.device.type == "cuda":
        # Half-precision operands into a float32 accumulator, in place: cuBLAS adds into C.
        if first:
            torch.ops.aten.mm.dtype_out(grad_logits.t(), hidden, accumulator.dtype, out=accumulator)
        else:
            torch.ops.aten.addmm.dtype_out(accumulator, grad_logits.t(), hidden, accumulator.dtype, out=accumulator)
    elif first:
        accumulator.copy_(torch.mm(grad_logits.t(), hidden))
    else:
        accumulator.add_(torch.mm(grad_logits.t(), hidden))


def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                          grad_scale: torch.Tensor, ignore_index: int, chunk_rows: int):
    """(loss sum, grad_hidden, the weight's gradient in its float32 (float64) accumulator)."""
    rows = hidden.shape[0]
    accumulate = _accumulate_dtype(hidden.dtype)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.empty(weight.shape, dtype=accumulate, device=weight.device)
    if rows == 0:
        grad_weight.zero_()
    loss_sum = torch.zeros((), dtype=accumulate, device=hidden.device)
    scale = grad_scale.to(accumulate)
    for start in range(0, rows, chunk_rows):
        end = min(rows, start + chunk_rows)
        rows_in = hidden[start:end]
        chunk_target = target[start:end]
        valid = chunk_target != ignore_index
        safe_target = torch.where(valid, chunk_target, torch.zeros_like(chunk_target))
        coefficient = valid.to(accumulate) * scale
        logits = torch.mm(rows_in, weight.t())
        row_loss, grad_logits = _chunk(logits, safe_target, valid, coefficient)
        loss_sum += row_loss.sum(dtype=accumulate)
        torch.mm(grad_logits, weight, out=grad_hidden[start:end])
        _weight_grad_into(grad_weight, grad_logits, rows_in, first=start == 0)
        del logits, grad_logits
    return loss_sum, grad_hidden, grad_weight


@op_bodies.custom_op("shardgraph::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, grad_scale: torch.Tensor,
                         ignore_index: int, chunk_rows: int,
                         loss_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(hidden, weight, target, grad_scale, chunk_rows)
    loss_sum, grad_hidden, grad_weight = _linear_cross_entropy(hidden, weight, target, grad_scale, ignore_index,
                                                               chunk_rows)
    return loss_sum.to(loss_dtype), grad_hidden, grad_weight.to(weight.dtype)


@linear_cross_entropy.register_fake
def _(hidden, weight, target, grad_scale, ignore_index, chunk_rows, loss_dtype):
    _check(hidden, weight, target, grad_scale, chunk_rows)
    return hidden.new_empty((), dtype=loss_dtype), torch.empty_like(hidden), torch.empty_like(weight)


def _check_lr(weight, lr):
    if lr.dim() != 0 or lr.dtype != weight.dtype:
        raise ValueError(f"shardgraph.linear_cross_entropy_sgd_: lr must be a 0-dim tensor in the weight's dtype "
                         f"{weight.dtype}, got {lr.dtype} of shape {tuple(lr.shape)}")


def _sgd_step(weight: torch.Tensor, accumulator: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """``weight -= lr * grad`` (``grad`` the accumulator in the weight's dtype) and
    ``sum(float32(grad) ** 2)``: one Triton pass on a GPU, the unfused graph's ops elsewhere."""
    if use_triton(weight) and weight.is_contiguous() and accumulator.is_contiguous():
        from .cross_entropy_triton import sgd_from_accumulator_

        return sgd_from_accumulator_(weight, accumulator, lr)
    return sgd_step_(weight, accumulator.to(weight.dtype), lr)


# ``after``: tensors the step is ordered after and does not read (the other readers of the old
# weight), as for ``grouped_mm_wgrad_sgd_``.
@op_bodies.custom_op("shardgraph::linear_cross_entropy_sgd_", mutates_args=("weight",))
def linear_cross_entropy_sgd_(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                              grad_scale: torch.Tensor, ignore_index: int, chunk_rows: int, loss_dtype: torch.dtype,
                              lr: torch.Tensor, after: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """``linear_cross_entropy`` with a plain SGD step on ``weight`` taken in place once every
    chunk has read it: returns ``(loss_sum, grad_hidden, sum(float32(grad_weight) ** 2))``. The
    weight's gradient goes from its float32 accumulator into the step in one pass, never
    written in the weight's dtype (where the unfused graph casts it, reads it for the step and
    again for the norm)."""
    _check(hidden, weight, target, grad_scale, chunk_rows)
    _check_lr(weight, lr)
    loss_sum, grad_hidden, accumulator = _linear_cross_entropy(hidden, weight, target, grad_scale, ignore_index,
                                                               chunk_rows)
    return loss_sum.to(loss_dtype), grad_hidden, _sgd_step(weight, accumulator, lr)


@linear_cross_entropy_sgd_.register_fake
def _(hidden, weight, target, grad_scale, ignore_index, chunk_rows, loss_dtype, lr, after):
    _check(hidden, weight, target, grad_scale, chunk_rows)
    _check_lr(weight, lr)
    return (hidden.new_empty((), dtype=loss_dtype), torch.empty_like(hidden),
            hidden.new_empty((), dtype=torch.float32))


def linear_cross_entropy_reference(hidden, weight, target, grad_scale, ignore_index):
    """The same three values through whole logits and autograd, for tests."""
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    logits = hidden @ weight.t()
    loss_sum = torch.nn.functional.cross_entropy(logits.to(_accumulate_dtype(logits.dtype)), target,
                                                 ignore_index=ignore_index, reduction="sum")
    grad_hidden, grad_weight = torch.autograd.grad(loss_sum * grad_scale, (hidden, weight))
    return loss_sum.detach(), grad_hidden, grad_weight
