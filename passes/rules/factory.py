"""Tensor factories: values made from nothing are replicated; ``*_like`` follow their input.

A factory's local semantics are trivial (every rank builds its piece at the local shape), so a
``ones_like`` of a sharded tensor is sharded the same way and costs nothing. ``triu``/``tril``
act on the last two dims; leading dims may stay sharded.
"""

from __future__ import annotations

import torch

from shardgraph.placement import Replicate

from . import AxisCandidate, register

aten = torch.ops.aten


@register(
    aten.ones.default, aten.zeros.default, aten.full.default, aten.empty.memory_format, aten.arange.default,
    aten.arange.start, aten.arange.start_step, aten.scalar_tensor.default, aten.empty_strided.default,
    aten.randn.default, aten.rand.default, aten.eye.default, aten.linspace.default,
    family="factory",
)
def rule_factory(ctx, axis, placements):
    return [AxisCandidate((), Replicate())]


@register(
    aten.ones_like.default, aten.zeros_like.default, aten.full_like.default, aten.empty_like.default,
    aten.rand_like.default, aten.randn_like.default, aten.new_zeros.default, aten.new_ones.default,
    aten.new_full.default, aten.new_empty.default, aten.new_empty_strided.default,
    family="factory_like",
)
def rule_factory_like(ctx, axis, placements):
    source = placements[0]
    same_shape = ctx.node.target in (
        aten.ones_like.default, aten.zeros_like.default, aten.full_like.default, aten.empty_like.default,
        aten.rand_like.default, aten.randn_like.default,
    )
    # A same-shape factory builds its output at its input's local shape, so a replicated output
    # needs the input whole; the new_* ops take their size as an argument and read only dtype.
    whole = Replicate() if same_shape and source.is_shard() else None
    candidates = [AxisCandidate((whole,), Replicate())]
    if same_shape and source.is_shard():
        candidates.insert(0, AxisCandidate((source,), source, "follows its input's shards"))
    return candidates


@register(aten.triu.default, aten.tril.default, family="triangle")
def rule_triangle(ctx, axis, placements):
    ndim = len(ctx.output_shape)
    candidates = [AxisCandidate((Replicate(),), Replicate())]
    placement = placements[0]
    if placement.is_shard() and placement.dim % ndim < ndim - 2:
        candidates.append(AxisCandidate((placement,), placement))
    return candidates
