"""Seeded random draws (``shardgraph/ops/random.py``): made whole on every rank.

``random_state(seed)`` and ``random_draw(state, ...)`` are replicated on every axis: every rank
holds the same generator state and draws the global tensor bit for bit as the unsharded model
does, and a consumer that works on its rows of the batch takes its rows of the draw (a local
slice, no communication). ``passes/check_random_draws.py`` refuses draws that a consumer reads
split on any other dim (the heads or hidden units of a model-parallel activation), where drawing
whole on every rank would cost the full tensor per rank.
"""

from __future__ import annotations

from shardgraph.placement import Replicate

from . import AxisCandidate, register

R = Replicate()


@register("shardgraph.random_state", family="random")
def rule_random_state(ctx, axis, placements):
    return [AxisCandidate((R,), R, "every rank seeds the same generator state")]


@register("shardgraph.random_draw", family="random")
def rule_random_draw(ctx, axis, placements):
    return [AxisCandidate((R,), (R, R), "every rank draws the whole tensor, as the unsharded model does")]
