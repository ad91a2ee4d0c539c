"""Scaled dot-product attention (``shardgraph.attention`` and its backward).

Attention mixes positions along the sequence and features along head_dim, so neither may be
split; batch and heads are independent. Query, key and value are ``[batch, heads, seq, dim]``:
on each axis they are all split on batch (``Shard(0)``), all split on heads (``Shard(1)``), or all
whole. Splitting heads is right with grouped key/value heads too: a contiguous block of
``heads / n`` query heads uses exactly the contiguous block of ``kv_heads / n`` key/value heads
that the same split gives, as long as both divide. The output (and each gradient) is split like
the inputs. No ``Partial``: attention is not linear in its inputs.
"""

from __future__ import annotations

from shardgraph.placement import Replicate, Shard

from . import AxisCandidate, register, value_of


def _splittable(ctx, axis, dim, operands) -> bool:
    size = ctx.size(axis)
    return all(value_of(node).shape[dim] % size == 0 for node in operands)


def _candidates(ctx, axis, inputs, outputs):
    candidates = [AxisCandidate(tuple(Replicate() for _ in inputs), outputs(Replicate()), "whole")]
    for dim, what in ((0, "batch"), (1, "heads")):
        if _splittable(ctx, axis, dim, inputs):
            candidates.append(AxisCandidate(tuple(Shard(dim) for _ in inputs), outputs(Shard(dim)),
                                            f"{what} split: attention is independent per {what}"))
    return candidates


@register("shardgraph.attention", family="attention")
def rule_attention(ctx, axis, placements):
    return _candidates(ctx, axis, ctx.inputs, lambda placement: placement)


@register("shardgraph.attention_backward", family="attention_backward")
def rule_attention_backward(ctx, axis, placements):
    return _candidates(ctx, axis, ctx.inputs, lambda placement: (placement, placement, placement))
