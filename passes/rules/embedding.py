"""Embedding lookup and its backward.

A replicated table looked up with batch-sharded ids gives batch-sharded rows; a table split on
its hidden dim gives rows split the same way. The backward scatters gradient rows into a
``[vocab, hidden]`` table: with batch-sharded rows every rank scatters only its tokens, so the
table gradient is ``Partial("sum")`` until something needs it whole.
"""

from __future__ import annotations

import torch

from shardgraph.placement import Partial, Replicate, Shard

from . import AxisCandidate, register, value_of

aten = torch.ops.aten
R = Replicate()


@register(aten.embedding.default, family="embedding")
def rule_embedding(ctx, axis, placements):
    weight, indices = placements
    index_ndim = len(value_of(ctx.inputs[1]).shape)
    candidates = [AxisCandidate((R, R), R)]
    if isinstance(indices, Shard):
        candidates.append(AxisCandidate((R, indices), Shard(indices.dim % index_ndim), "batch-sharded ids"))
    if isinstance(weight, Shard) and weight.dim % 2 == 1:
        candidates.append(AxisCandidate((weight, R), Shard(index_ndim), "hidden-sharded table"))
    return candidates


@register(aten.embedding_dense_backward.default, family="embedding_backward")
def rule_embedding_backward(ctx, axis, placements):
    grad, indices = placements
    index_ndim = len(value_of(ctx.inputs[1]).shape)
    candidates = [AxisCandidate((R, R), R)]
    if isinstance(indices, Shard) and indices.dim % index_ndim < index_ndim:
        candidates.append(AxisCandidate((Shard(indices.dim % index_ndim), indices), Partial("sum"),
                                        "each rank scatters its own tokens"))
    if isinstance(grad, Shard) and grad.dim % (index_ndim + 1) == index_ndim:
        candidates.append(AxisCandidate((grad, R), Shard(1), "hidden-sharded rows"))
    for op in ("sum", "avg"):
        if grad == Partial(op):
            candidates.append(AxisCandidate((grad, R), grad, "scatter is linear in the gradient"))
    return candidates
