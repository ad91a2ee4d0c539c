"""RMSNorm (``shardgraph.rms_norm`` and its backward).

The norm reduces over the last dim, so that dim must be whole; every other dim is rows, which are
independent: input, output and ``rstd`` (the input's shape without its last dim) are split alike
on any leading dim, the weight whole. The weight's gradient sums over rows, so with rows split
each rank holds the sum over its own: ``Partial("sum")``. The backward is linear in the incoming
gradient, so a partial gradient gives partial gradients of both input and weight (but for a
float64 input normalised in float32, whose gradient is rounded to float32 on the way).
"""

from __future__ import annotations

import torch

from shardgraph.placement import InterleavedShard, Partial, Replicate, Shard

from . import AxisCandidate, register, value_of

R = Replicate()


def _normalised_dims(placement, ndim):
    if isinstance(placement, InterleavedShard):
        return InterleavedShard(placement.dim % ndim, placement.stripes)
    return Shard(placement.dim % ndim)


@register("shardgraph.rms_norm", family="rms_norm")
def rule_rms_norm(ctx, axis, placements):
    x, _weight = placements
    ndim = len(value_of(ctx.inputs[0]).shape)
    candidates = [AxisCandidate((R, R), (R, R), "whole")]
    if isinstance(x, (Shard, InterleavedShard)) and x.dim % ndim != ndim - 1:
        rows = _normalised_dims(x, ndim)
        candidates.append(AxisCandidate((rows, R), (rows, rows), "rows split: each row is normalised alone"))
    return candidates


@register("shardgraph.rms_norm_backward", family="rms_norm_backward")
def rule_rms_norm_backward(ctx, axis, placements):
    grad_out, x, _weight, _rstd = placements
    ndim = len(value_of(ctx.inputs[1]).shape)
    candidates = [AxisCandidate((R, R, R, R), (R, R), "whole")]
    for placement in (grad_out, x):
        if isinstance(placement, (Shard, InterleavedShard)) and placement.dim % ndim != ndim - 1:
            rows = _normalised_dims(placement, ndim)
            candidates.append(AxisCandidate((rows, rows, R, rows), (rows, Partial("sum")),
                                            "rows split: each rank sums the weight's gradient over its rows"))
            break
    # The backward rounds the gradient to float32 where ``upcast`` normalises a float64 input in
    # float32: the sum of the ranks' rounded pieces is then not the rounded sum.
    linear = not (ctx.arg(4, "upcast", True) and value_of(ctx.inputs[1]).dtype == torch.float64)
    for op in ("sum", "avg") if linear else ():
        if grad_out == Partial(op):
            candidates.append(AxisCandidate((grad_out, R, R, R), (grad_out, grad_out),
                                            "linear in the incoming gradient"))
    return candidates
