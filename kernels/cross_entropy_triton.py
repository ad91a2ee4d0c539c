"""The softmax / cross-entropy gradient step of ``linear_cross_entropy`` as one Triton kernel.

For each row ``n`` of a logits chunk ``[rows, V]`` (any float dtype, contiguous rows):

    lse        = logsumexp(logits[n])                            (float32, online max and sum)
    loss[n]    = (lse - logits[n, target[n]]) if coefficient[n] != 0 else 0
    logits[n]  = (exp(logits[n] - lse) - onehot(target[n])) * coefficient[n]   (in place)

One program per row: a first sweep over the row keeps a running maximum and sum of exponentials,
a second writes the gradient over the logits. Two reads and one write of the chunk, against about
seven passes over a float32 copy for the same work as torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["softmax_cross_entropy_grad_", "sgd_from_accumulator_"]


@triton.jit
def _softmax_cross_entropy_grad_kernel(logits_ptr, row_stride, target_ptr, coefficient_ptr, loss_ptr, vocab,
                                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    target = tl.load(target_ptr + row)
    coefficient = tl.load(coefficient_ptr + row).to(tl.float32)
    offsets = tl.arange(0, BLOCK)
    running_max = tl.full([BLOCK], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        columns = start + offsets
        x = tl.load(base + columns, mask=columns < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, x)
        # A lane that has seen only -inf (masked columns) subtracts 0, not -inf: its terms are
        # exp(-inf) = 0 instead of exp(-inf - -inf) = nan.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.exp(x - shift)
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    lane_sum = running_sum * tl.exp(running_max - row_max)
    lse = row_max + tl.log(tl.sum(lane_sum, axis=0))
    picked = tl.load(base + target).to(tl.float32)
    loss = tl.where(coefficient != 0.0, lse - picked, 0.0)
    tl.store(loss_ptr + row, loss)
    for start in range(0, vocab, BLOCK):
        columns = start + offsets
        mask = columns < vocab
        x = tl.load(base + columns, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(columns == target, 1.0, 0.0)
        tl.store(base + columns, (grad * coefficient).to(logits_ptr.dtype.element_ty), mask=mask)


def softmax_cross_entropy_grad_(logits: torch.Tensor, target: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """Overwrite ``logits [rows, V]`` with their gradient; return each row's loss (float32).

    ``target`` holds a valid column for every row (ignored rows carry any column and a zero
    ``coefficient``)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"softmax_cross_entropy_grad_: logits need contiguous rows, got strides {logits.stride()}")
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    block = min(8192, triton.next_power_of_2(vocab))
    _softmax_cross_entropy_grad_kernel[(rows,)](logits, logits.stride(0), target.contiguous(),
                                                coefficient.to(torch.float32).contiguous(), loss, vocab,
                                                BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return loss


@triton.jit
def _sgd_from_accumulator_kernel(accumulator_ptr, param_ptr, lr_ptr, partial_ptr, numel, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    dtype = param_ptr.dtype.element_ty
    # Rounded as the unfused graph rounds: the gradient to the parameter's dtype, then
    # ``param - grad * lr`` with every op's result in that dtype.
    grad = tl.load(accumulator_ptr + offsets, mask=mask, other=0.0).to(dtype).to(tl.float32)
    step = (grad * tl.load(lr_ptr).to(tl.float32)).to(dtype).to(tl.float32)
    param = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(param_ptr + offsets, (param - step).to(dtype), mask=mask)
    tl.store(partial_ptr + block, tl.sum(grad * grad, axis=0))


def sgd_from_accumulator_(param: torch.Tensor, accumulator: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """``param -= lr * grad`` in place with ``grad = accumulator`` rounded to ``param``'s dtype;
    returns ``sum(float32(grad) ** 2)``. One pass: the float32 accumulator and the parameter read
    once, the parameter written once (contiguous tensors of one shape)."""
    if not (param.is_contiguous() and accumulator.is_contiguous()) or param.shape != accumulator.shape:
        raise ValueError(f"sgd_from_accumulator_: param {tuple(param.shape)} and accumulator "
                         f"{tuple(accumulator.shape)} must be contiguous and of one shape")
    numel = param.numel()
    block = 4096
    partial = torch.empty(triton.cdiv(numel, block), dtype=torch.float32, device=param.device)
    if numel:
        # No floating-point contraction: fused into an FMA, ``param - round(grad * lr)`` would
        # skip the product's rounding, and the step would differ from the unfused ops' in the last bit.
        _sgd_from_accumulator_kernel[(partial.numel(),)](accumulator, param, lr, partial, numel, BLOCK=block,
                                                         num_warps=8, enable_fp_fusion=False)
    return partial.sum()
