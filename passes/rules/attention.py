"""Scaled dot-product attention (``shardgraph.attention`` and its backward).

Attention mixes positions along the sequence and features along head_dim, so neither may be
split; batch and heads are independent. Query, key and value are ``[batch, heads, seq, dim]``:
on each axis they are all split on batch (``Shard(0)``), all split on heads (``Shard(1)``), or all
whole. Splitting heads is right with grouped key/value heads too: a contiguous block of
``heads / n`` query heads uses exactly the contiguous block of ``kv_heads / n`` key/value heads
that the same split gives, as long as both divide. The output (and each gradient) is split like
the inputs. No ``Partial``: attention is not linear in its inputs.

The forward's second output, the log-sum-exp of each query row ``[batch, heads, seq]``, is split
like the output (batch is dim 0 and heads dim 1 of both), and the backward reads it, with the
output, split like its other operands.

A split is offered only where every operand's dim divides, counting the batch and head splits
the operands already carry on the other axes (batch split over dp and tp at once needs
``dp * tp`` rows), so an uneven split falls back to another candidate instead of failing at
lowering.
"""

from __future__ import annotations

from shardgraph.placement import Replicate, Shard, Sharding, ShardingError, local_shape

from . import AxisCandidate, register, value_of


def _splittable(ctx, axis: str, dim: int) -> bool:
    for node, sharding in zip(ctx.inputs, ctx.input_shardings):
        # On the other axes only a batch or head split can reach attention; anything else is
        # redistributed first, so it does not count here.
        placements = {other: placement for other, placement in sharding.items()
                      if placement in (Shard(0), Shard(1))}
        placements[axis] = Shard(dim)
        try:
            local_shape(tuple(value_of(node).shape), Sharding(tuple(placements), tuple(placements.values())),
                        ctx.mesh, name=node.name)
        except ShardingError:
            return False
    return True


def _candidates(ctx, axis: str, outputs):
    candidates = [AxisCandidate(tuple(Replicate() for _ in ctx.inputs), outputs(Replicate()), "whole")]
    for dim, what in ((0, "batch"), (1, "heads")):
        if _splittable(ctx, axis, dim):
            candidates.append(AxisCandidate(tuple(Shard(dim) for _ in ctx.inputs), outputs(Shard(dim)),
                                            f"{what} split: attention is independent per {what}"))
    return candidates


@register("shardgraph.attention", family="attention")
def rule_attention(ctx, axis, placements):
    # (out, logsumexp): both [batch, heads, ...], split like query.
    return _candidates(ctx, axis, lambda placement: (placement, placement))


@register("shardgraph.attention_backward", family="attention_backward")
def rule_attention_backward(ctx, axis, placements):
    # grad_out, out and logsumexp are split like the output they are (the gradient of); the three
    # gradients like query, key and value.
    return _candidates(ctx, axis, lambda placement: (placement, placement, placement))
