"""Rotary embedding (``shardgraph.rotary`` and its backward).

The last dim's two halves are mixed, so that dim must be whole; every other dim is independent:
the input (or incoming gradient) and the output are split alike on it, and ``cos``/``sin`` too
where they are not broadcast on that dim (a table broadcast over heads stays whole when heads are
split). Both directions are linear in their first operand with the tables whole, so a partial
input gives a partial output.
"""

from __future__ import annotations

from shardgraph.placement import Partial, Replicate

from . import AxisCandidate, register, value_of
from .pointwise import _dim_map, _retarget

R = Replicate()


@register("shardgraph.rotary", "shardgraph.rotary_backward", family="rotary")
def rule_rotary(ctx, axis, placements):
    x = placements[0]
    ndim = len(ctx.output_shape)
    candidates = [AxisCandidate((R, R, R), R, "whole")]
    if x.is_shard() and x.dim % ndim != ndim - 1:
        dim = x.dim % ndim
        maps = _dim_map(ctx)
        wanted = [_retarget(x, dim)]
        for j in (1, 2):
            inner = dim - (ndim - len(value_of(ctx.inputs[j]).shape))
            wanted.append(_retarget(x, inner) if maps[j].get(inner) == dim else R)
        candidates.append(AxisCandidate(tuple(wanted), _retarget(x, dim), "rows split: each row rotates alone"))
    for op in ("sum", "avg"):
        if x == Partial(op):
            candidates.append(AxisCandidate((x, R, R), x, "linear in the first operand"))
    return candidates
