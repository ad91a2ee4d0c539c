"""Elementwise ops, with broadcasting: placements follow dims right-aligned.

A dim sharded on one input shards the same output dim; inputs that broadcast along it
(size 1 or missing) stay replicated. ``Partial`` survives only ops that are linear in the
partial input: a sum of partials is partial, a partial times a replicated factor is partial,
but ``exp(partial)`` or ``partial + 1`` is not (the 1 would be added once per rank).
"""

from __future__ import annotations

import torch

from shardgraph.placement import InterleavedShard, Partial, Replicate, Shard

from . import AxisCandidate, register, value_of

aten = torch.ops.aten

# Ops linear in every tensor input jointly (sum of partials is partial).
_ADDITIVE = {aten.add.Tensor, aten.sub.Tensor}
# Ops linear in one designated tensor input when the others are replicated.
_MULTIPLICATIVE = {aten.mul.Tensor: (0, 1), aten.div.Tensor: (0,), torch.ops.prims.div.default: (0,)}
# Unary ops that are linear (or plain copies): a partial input gives a partial output, unless a
# dtype conversion truncates it (``_truncates``).
_LINEAR_UNARY = {
    aten.neg.default, aten.clone.default, aten._to_copy.default, aten.alias.default, aten.detach.default,
    aten.lift_fresh_copy.default, aten.mul.Scalar, aten.div.Scalar, aten.contiguous.default,
    aten.to.dtype, aten.to.dtype_layout, aten.type_as.default, aten.view_as.default,
    torch.ops.prims.convert_element_type.default,
}

_POINTWISE = [
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode,
    aten.neg.default, aten.abs.default, aten.exp.default, aten.log.default, aten.log1p.default, aten.expm1.default,
    aten.sqrt.default, aten.rsqrt.default, aten.reciprocal.default, aten.pow.Tensor_Scalar,
    aten.pow.Tensor_Tensor, aten.pow.Scalar, aten.sin.default, aten.cos.default, aten.tanh.default,
    aten.sigmoid.default, aten.silu.default, aten.gelu.default, aten.relu.default, aten.erf.default,
    aten.silu_backward.default, aten.sigmoid_backward.default, aten.tanh_backward.default,
    aten.gelu_backward.default, aten.threshold_backward.default,
    aten.clone.default, aten._to_copy.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten.contiguous.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default,
    torch.ops.prims.convert_element_type.default,
    aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor, aten.lt.Scalar,
    aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar, aten.ge.Tensor, aten.ge.Scalar,
    aten.logical_not.default, aten.logical_and.default, aten.logical_or.default, aten.bitwise_not.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.clamp.default, aten.clamp_min.default,
    aten.clamp_max.default, aten.maximum.default, aten.minimum.default, aten.fill.Scalar, aten.sign.default,
    aten.floor_divide.default, aten.remainder.Scalar, aten.isnan.default, aten.isinf.default,
    aten.nan_to_num.default, aten.copy.default, aten.fmod.Scalar,
    # LayerNorm's decomposition divides with prims; routers clamp by a tensor bound; rotary
    # embeddings in complex form build and conjugate unit phasors.
    torch.ops.prims.div.default, aten.clamp.Tensor, aten._conj.default, aten.polar.default,
    # Llama 4's attention temperature of positions without rotary embeddings; the backward of
    # abs (DBRX normalises its top-k weights by their L1 norm).
    aten.floor.default, aten.sgn.default,
]


def _dim_map(ctx):
    """For each input, a function input dim -> output dim, or None where the input broadcasts."""
    out_shape = ctx.output_shape
    maps = []
    for node in ctx.inputs:
        shape = tuple(value_of(node).shape)
        offset = len(out_shape) - len(shape)
        mapping = {}
        for d, size in enumerate(shape):
            out_d = d + offset
            mapping[d] = out_d if 0 <= out_d < len(out_shape) and size == out_shape[out_d] and size != 1 else None
        maps.append(mapping)
    return maps


def _truncates(ctx) -> bool:
    """A float -> integer or bool conversion rounds every piece: trunc(a) + trunc(b) != trunc(a + b)."""
    return value_of(ctx.inputs[0]).dtype.is_floating_point and not ctx.output_value.dtype.is_floating_point


def _retarget(placement, dim):
    if isinstance(placement, InterleavedShard):
        return InterleavedShard(dim, placement.stripes)
    return Shard(dim)


@register(*_POINTWISE, family="pointwise")
def rule_pointwise(ctx, axis, placements):
    target = ctx.node.target
    n = len(placements)
    candidates = [AxisCandidate(tuple(Replicate() for _ in range(n)), Replicate())]
    maps = _dim_map(ctx)
    # Shard: follow any sharded input dim to its output dim.
    for i, placement in enumerate(placements):
        if not placement.is_shard():
            continue
        out_dim = maps[i].get(placement.dim % len(value_of(ctx.inputs[i]).shape))
        if out_dim is None:
            continue
        wanted = []
        for j, node in enumerate(ctx.inputs):
            shape = tuple(value_of(node).shape)
            in_dim = out_dim - (len(ctx.output_shape) - len(shape))
            if 0 <= in_dim < len(shape) and maps[j].get(in_dim) == out_dim:
                wanted.append(_retarget(placement, in_dim))
            else:
                wanted.append(Replicate())
        candidate = AxisCandidate(tuple(wanted), _retarget(placement, out_dim))
        if candidate not in candidates:
            candidates.append(candidate)
    # Partial: only through linear ops.
    partial_ops = {p.op for p in placements if isinstance(p, Partial)}
    for op in sorted(partial_ops):
        partial = Partial(op)
        if target in _LINEAR_UNARY and n == 1 and not _truncates(ctx):
            candidates.append(AxisCandidate((partial,), partial))
        elif target in _ADDITIVE and n == 2:
            # Both operands are tensors (a python scalar would be added once per rank). A
            # replicated operand joins the sum as a partial held by one rank (free).
            candidates.append(AxisCandidate(tuple(partial for _ in range(n)), partial))
        elif target in _MULTIPLICATIVE:
            for linear_index in _MULTIPLICATIVE[target]:
                if linear_index < n:
                    wanted = tuple(partial if j == linear_index else Replicate() for j in range(n))
                    candidates.append(AxisCandidate(wanted, partial))
    return candidates
