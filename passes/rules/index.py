"""Gather, scatter and index ops.

``gather``/``scatter_add`` along one dim keep any other dim's sharding (index and source are
sharded alike), where index and source are as long as the input on that dim. ``index_select``
keeps the source's sharding off the indexed dim, and a sharded index vector shards the indexed
dim of the result. Advanced indexing (``index.Tensor``) is offered replicated, or with the
source sharded on a dim that no index touches.
"""

from __future__ import annotations

import torch

from shardgraph.placement import Partial, Replicate, Shard

from . import AxisCandidate, register, value_of

aten = torch.ops.aten
R = Replicate()


def _aligned(ctx, dim: int) -> bool:
    """Whether every tensor input has the output's size on ``dim``. Index (and scatter's source)
    may be shorter than the input on any dim; then equal blocks of each would not line up."""
    return all(shape[dim] == ctx.output_shape[dim] for shape in ctx.input_shapes)


@register(aten.gather.default, family="gather")
def rule_gather(ctx, axis, placements):
    ndim = len(ctx.output_shape)
    dim = ctx.args[1] % ndim
    candidates = [AxisCandidate((R, R), R)]
    for placement in placements:
        if isinstance(placement, Shard) and placement.dim % ndim != dim and _aligned(ctx, placement.dim % ndim):
            candidates.append(AxisCandidate((placement, placement), placement))
    return candidates


@register(aten.scatter_add.default, aten.scatter.src, aten.scatter.value, family="scatter")
def rule_scatter(ctx, axis, placements):
    ndim = len(ctx.output_shape)
    dim = ctx.args[1] % ndim
    n = len(placements)
    candidates = [AxisCandidate((R,) * n, R)]
    for placement in placements:
        if isinstance(placement, Shard) and placement.dim % ndim != dim and _aligned(ctx, placement.dim % ndim):
            candidates.append(AxisCandidate((placement,) * n, placement))
    if ctx.node.target == aten.scatter_add.default:
        for op in ("sum", "avg"):
            if any(p == Partial(op) for p in placements):
                candidates.append(AxisCandidate((Partial(op), R, Partial(op)), Partial(op), "scatter_add is linear"))
    return candidates


@register(aten.index_select.default, family="index_select")
def rule_index_select(ctx, axis, placements):
    source, index = placements
    ndim = len(ctx.output_shape)
    dim = ctx.args[1] % ndim
    candidates = [AxisCandidate((R, R), R)]
    if isinstance(source, Shard) and source.dim % ndim != dim:
        candidates.append(AxisCandidate((source, R), source))
    if isinstance(index, Shard):
        candidates.append(AxisCandidate((R, index), Shard(dim), "sharded index vector"))
    if source.is_partial():
        candidates.append(AxisCandidate((source, R), source, "selection is linear"))
    return candidates


@register(aten.index.Tensor, family="index")
def rule_index(ctx, axis, placements):
    n = len(placements)
    candidates = [AxisCandidate((R,) * n, R)]
    source = placements[0]
    indices = ctx.args[1]
    touched = {d for d, index in enumerate(indices) if index is not None}
    if isinstance(source, Shard) and source.dim not in touched and touched and max(touched) < source.dim:
        # Indexed leading dims collapse into the index shape; later dims shift by the difference.
        index_ndim = max(len(value_of(i).shape) for i in indices if i is not None)
        shift = index_ndim - len(touched)
        candidates.append(AxisCandidate((source,) + (R,) * (n - 1), Shard(source.dim + shift)))
    return candidates
