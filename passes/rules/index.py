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


@register(aten.select_scatter.default, aten.slice_scatter.default, family="scatter_into")
def rule_scatter_into(ctx, axis, placements):
    """``self[..., index, ...] = src`` along ``dim``: pieces of self and src line up on any other
    dim; the written dim must be whole. Linear in both, so partial sums stay partial."""
    self_placement, source_placement = placements
    ndim = len(ctx.output_shape)
    dim = ctx.arg(2, "dim", 0) % ndim
    selecting = ctx.node.target == aten.select_scatter.default
    candidates = [AxisCandidate((R, R), R)]
    offered = set()
    if isinstance(self_placement, Shard) and type(self_placement) is Shard:
        offered.add(self_placement.dim % ndim)
    if isinstance(source_placement, Shard) and type(source_placement) is Shard:
        # Following src's split: self is cut to match (a local slice where it is whole), as a
        # slice assignment into a fresh ``new_empty`` (DeepSeek's MLA key) needs.
        source_dim = source_placement.dim % len(ctx.input_shapes[1])
        offered.add(source_dim + (1 if selecting and source_dim >= dim else 0))
    for self_dim in sorted(offered):
        if self_dim != dim and (selecting or _aligned(ctx, self_dim)):
            # select_scatter's src lacks the selected dim: dims after it shift down by one.
            source_dim = self_dim - (1 if selecting and self_dim > dim else 0)
            candidates.append(AxisCandidate((Shard(self_dim), Shard(source_dim)), Shard(self_dim)))
    for op in ("sum", "avg"):
        if Partial(op) in placements:
            candidates.append(AxisCandidate((Partial(op), Partial(op)), Partial(op), "writing a slice is linear"))
    return candidates


@register(aten.fill.Tensor, aten.fill.Scalar, family="fill")
def rule_fill(ctx, axis, placements):
    """Every element becomes the value: a piece of the filled tensor is the filled piece. A
    partial input is not (each rank would hold the value, summing to n times it)."""
    candidates = [AxisCandidate((R,) * len(placements), R)]
    first = placements[0]
    if first.is_shard():
        candidates.append(AxisCandidate((first,) + (R,) * (len(placements) - 1), first))
    return candidates


@register(aten.index_put.default, family="index_put")
def rule_index_put(ctx, axis, placements):
    """``self[mask] = values`` with one boolean mask shaped like self and a scalar value is
    elementwise: self and mask split alike. Other indexing is offered whole."""
    candidates = [AxisCandidate((R,) * len(placements), R)]
    indices = ctx.arg(1, "indices", ())
    accumulate = ctx.arg(3, "accumulate", False)
    mask_only = (len(indices) == 1 and indices[0] is not None and value_of(indices[0]).dtype == torch.bool
                 and tuple(value_of(indices[0]).shape) == ctx.output_shape)
    values_scalar = len(ctx.inputs) == 3 and value_of(ctx.inputs[2]).dim() == 0
    first = placements[0]
    if mask_only and values_scalar and not accumulate and type(first) is Shard:
        candidates.append(AxisCandidate((first, first, R), first))
    return candidates
