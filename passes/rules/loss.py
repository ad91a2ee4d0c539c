"""Negative log-likelihood, forward and backward, on a batch-sharded set of rows.

With ``reduction=sum`` every rank sums its own rows: the loss and the count of counted rows are
``Partial("sum")``. ``reduction=mean`` has no exact local form (ranks may count different numbers
of non-ignored rows), so ``passes.decompose_loss`` rewrites it as sum / count before propagation.
The backward is exact on local rows once it is given the global count, replicated.
"""

from __future__ import annotations

import torch

from shardgraph.placement import Partial, Replicate, Shard

from . import AxisCandidate, register

aten = torch.ops.aten
R = Replicate()
NONE, MEAN, SUM = 0, 1, 2


def _weight_slot(ctx):
    # nll_loss_forward(self, target, weight, reduction, ignore_index): weight may be None.
    return 1 if len(ctx.inputs) == 3 else 0


@register(aten.nll_loss_forward.default, family="nll_loss")
def rule_nll_loss(ctx, axis, placements):
    reduction = ctx.arg(3, "reduction", MEAN)
    extra = (R,) * _weight_slot(ctx)
    candidates = [AxisCandidate((R, R) + extra, (R, R))]
    logits, target = placements[:2]
    if reduction == SUM and isinstance(logits, Shard) and logits.dim == 0:
        candidates.append(AxisCandidate((Shard(0), Shard(0)) + extra, (Partial("sum"), Partial("sum")),
                                        "each rank sums its own rows"))
    if reduction == SUM and isinstance(target, Shard) and target.dim == 0:
        candidates.append(AxisCandidate((Shard(0), Shard(0)) + extra, (Partial("sum"), Partial("sum"))))
    return candidates


@register(aten.nll_loss_backward.default, family="nll_loss_backward")
def rule_nll_loss_backward(ctx, axis, placements):
    # (grad_output, self, target, [weight], total_weight)
    count = len(ctx.inputs)
    extra = (R,) * (count - 4)
    candidates = [AxisCandidate((R,) * count, R)]
    logits = placements[1]
    target = placements[2]
    # With reduction=none the incoming gradient has one entry per row, split like the rows.
    grad = Shard(0) if ctx.arg(4, "reduction", MEAN) == NONE else R
    if (isinstance(logits, Shard) and logits.dim == 0) or (isinstance(target, Shard) and target.dim == 0):
        candidates.append(AxisCandidate((grad, Shard(0), Shard(0)) + extra + (R,), Shard(0),
                                        "rows are independent given the global count"))
    return candidates
