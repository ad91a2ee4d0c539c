"""Reductions, softmax, top-k: what happens when the reduced dim is sharded.

Summing a sharded dim leaves each rank a partial sum (``Partial("sum")``); a mean over a dim
split into equal blocks is the mean of the block means (``Partial("avg")``). Max, softmax,
top-k and sort have no partial form here: their dim must be whole on every rank. The softmax
backward ops are linear in the incoming gradient, so a partial gradient stays partial.
"""

from __future__ import annotations

import torch

from shardgraph.placement import InterleavedShard, Partial, Replicate, Shard

from . import AxisCandidate, register, value_of

aten = torch.ops.aten
R = Replicate()


def _reduced_dims(ctx, dims_arg, ndim):
    if dims_arg is None or (isinstance(dims_arg, (list, tuple)) and len(dims_arg) == 0):
        return set(range(ndim))
    if isinstance(dims_arg, int):
        return {dims_arg % ndim}
    return {d % ndim for d in dims_arg}


def _kept_dim(dim, reduced, keepdim):
    if keepdim:
        return dim
    return dim - sum(1 for r in reduced if r < dim)


def _moved(placement, dim):
    return Shard(dim) if isinstance(placement, Shard) else InterleavedShard(dim, placement.stripes)


def _reduction(ctx, placement, reduced, keepdim, partial_kind):
    ndim = len(value_of(ctx.inputs[0]).shape)
    if placement.is_partial():
        if partial_kind in ("sum", "avg"):
            return [AxisCandidate((placement,), placement, "reduction is linear")]
        return [AxisCandidate((R,), R)]
    if not placement.is_shard():
        return [AxisCandidate((placement,), placement)]
    dim = placement.dim % ndim
    if dim in reduced:
        if partial_kind is None or isinstance(placement, InterleavedShard) and partial_kind == "avg":
            return [AxisCandidate((R,), R, "reducing a sharded dim needs the whole dim")]
        return [AxisCandidate((placement,), Partial(partial_kind), f"each rank reduces its block: partial {partial_kind}"),
                AxisCandidate((R,), R)]
    return [AxisCandidate((placement,), _moved(placement, _kept_dim(dim, reduced, keepdim))), AxisCandidate((R,), R)]


def _dims_and_keepdim(ctx, whole_op):
    """(reduced dims, keepdim) of ``sum``/``mean``: the ``.default`` overloads reduce everything."""
    ndim = len(value_of(ctx.inputs[0]).shape)
    if ctx.node.target == whole_op:
        return _reduced_dims(ctx, None, ndim), False
    return _reduced_dims(ctx, ctx.arg(1, "dim", None), ndim), bool(ctx.arg(2, "keepdim", False))


@register(aten.sum.dim_IntList, aten.sum.default, family="sum")
def rule_sum(ctx, axis, placements):
    return _reduction(ctx, placements[0], *_dims_and_keepdim(ctx, aten.sum.default), "sum")


@register(aten.mean.dim, aten.mean.default, family="mean")
def rule_mean(ctx, axis, placements):
    # Blocks are equal (uneven shards are refused), so the mean of block means is the mean.
    return _reduction(ctx, placements[0], *_dims_and_keepdim(ctx, aten.mean.default), "avg")


@register(torch.ops.prims.sum.default, torch.ops.prims.var.default, family="prims_reduction")
def rule_prims_reduction(ctx, axis, placements):
    """``prims.sum(x, dims)`` and ``prims.var(x, dims, correction)`` (LayerNorm's decomposition):
    the dims go, never kept; a sum of a sharded dim is partial, a variance needs the whole dim."""
    ndim = len(value_of(ctx.inputs[0]).shape)
    reduced = _reduced_dims(ctx, ctx.arg(1, "dims", None), ndim)
    kind = "sum" if ctx.node.target == torch.ops.prims.sum.default else None
    return _reduction(ctx, placements[0], reduced, False, kind)


@register(aten.amax.default, aten.amin.default, aten.argmax.default, aten.argmin.default, aten.any.dim,
          aten.all.dim, aten.max.dim, aten.min.dim, aten.var.correction, family="max")
def rule_max(ctx, axis, placements):
    ndim = len(value_of(ctx.inputs[0]).shape)
    dims = ctx.arg(1, "dim", None)
    keepdim = bool(ctx.arg(2, "keepdim", False))
    candidates = _reduction(ctx, placements[0], _reduced_dims(ctx, dims, ndim), keepdim, None)
    if isinstance(ctx.output_value, (tuple, list)):  # max.dim / min.dim: (values, indices)
        return [AxisCandidate(c.inputs, (c.output, c.output), c.note) for c in candidates]
    return candidates


def _along_dim(ctx, placement, dim, outputs):
    ndim = len(value_of(ctx.inputs[0]).shape)
    whole = AxisCandidate((R,) * len(ctx.inputs), R if outputs == 1 else (R,) * outputs)
    if placement.is_shard() and placement.dim % ndim != dim % ndim:
        out = placement if outputs == 1 else (placement,) * outputs
        return [AxisCandidate((placement,) * len(ctx.inputs), out), whole]
    return [whole]


@register(aten._softmax.default, aten._log_softmax.default, aten.cumsum.default, family="softmax")
def rule_softmax(ctx, axis, placements):
    return _along_dim(ctx, placements[0], ctx.args[1], 1)


@register(aten._softmax_backward_data.default, aten._log_softmax_backward_data.default, family="softmax_backward")
def rule_softmax_backward(ctx, axis, placements):
    grad, _output = placements
    dim = ctx.args[2]
    candidates = _along_dim(ctx, grad if grad.is_shard() else placements[1], dim, 1)
    for op in ("sum", "avg"):
        if grad == Partial(op):
            candidates.append(AxisCandidate((grad, R), grad, "linear in the incoming gradient"))
    return candidates


@register(aten.topk.default, aten.sort.default, aten.sort.stable, family="topk")
def rule_topk(ctx, axis, placements):
    if ctx.node.target == aten.topk.default:
        dim = ctx.arg(2, "dim", -1)
    elif ctx.node.target == aten.sort.stable:
        dim = ctx.kwargs.get("dim", -1)
    else:
        dim = ctx.arg(1, "dim", -1)
    return _along_dim(ctx, placements[0], dim, 2)
