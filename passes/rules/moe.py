"""The routed-expert ops: tokens on the dense view meet expert weights on the expert view.

``moe_experts(hidden [T, H], topk_ids [T, k], topk_weights [T, k], w_gate_up, w_down)``.

Tokens are asked for split over dp and tp (``Shard(0)`` on both, dp major): every token then
lives on exactly one rank of the stage and is dispatched once, so the EP all-to-all carries
1/tp of the bytes that dispatching the TP duplicates would, and each expert weight gradient is
the sum of its EDP replicas' pieces: ``Partial("sum")`` over edp and nothing else. Tokens that
arrive replicated are split by a free local slice; the result leaves split, and where a consumer
needs it whole redistribution inserts the all-gather that restores the replicated view.

The split is required whatever the batch sharding upstream was: a batch replicated over dp, split
along the sequence, or mixed across rows (``x - x.mean(0)``) reaches this op replicated over dp,
and dispatching those copies would count every token's gradient once per copy. Where the token
count does not divide, the most even split that does is taken and each token is processed by
``copies`` ranks; the lowering divides the weight gradients by ``copies`` (``token_copies``).

The weights are asked for in the layout the lowering computes with: ``Shard(0)`` over ep, and
with etp > 1 gate/up interleaved over etp (every etp rank holds the same part of gate and of up)
and down split on its intermediate dim. A plan that places them otherwise on the expert view is
redistributed (a replicated expert weight is sliced locally); one that places them on the dense
view cannot be, and is refused naming the parameter and its plan entry.

Both rules return exactly one strategy, so the backward sees the forward's token split and reuses
its routing.
"""

from __future__ import annotations

import math

from shardgraph import meta
from shardgraph.mesh import MeshSpec
from shardgraph.meta import View
from shardgraph.placement import InterleavedShard, Partial, Shard, Sharding, ShardingError, local_shape

from . import Strategy, register, value_of

__all__ = ["token_sharding", "token_copies", "expert_weight_shardings"]

_TOKEN_SPLITS = (("dp", "tp"), ("dp",), ("tp",), ())


def token_copies(tokens: Sharding, mesh: MeshSpec) -> int:
    """How many ranks of the stage hold (and so dispatch) each token under ``tokens``."""
    return math.prod(mesh.size(axis) for axis in ("dp", "tp") if not tokens.placement(axis).is_shard())


def token_sharding(shape: tuple[int, ...], mesh: MeshSpec) -> Sharding:
    """The token split with the fewest copies of each token that the token count allows."""
    options = []
    for axes in _TOKEN_SPLITS:
        sharding = Sharding.of(**{axis: Shard(0) for axis in axes if mesh.size(axis) > 1})
        try:
            local_shape(shape, sharding, mesh)
        except ShardingError:
            continue
        options.append((token_copies(sharding, mesh), _TOKEN_SPLITS.index(axes), sharding))
    return min(options, key=lambda option: option[:2])[2]


def expert_weight_shardings(mesh: MeshSpec) -> tuple[Sharding, Sharding]:
    """(w_gate_up, w_down) as the lowering computes with them."""
    if mesh.etp == 1:
        return Sharding.of(ep=Shard(0)), Sharding.of(ep=Shard(0))
    return (Sharding.of(ep=Shard(0), etp=InterleavedShard(1, stripes=2)),
            Sharding.of(ep=Shard(0), etp=Shard(2)))


def _check_weight(ctx, position: int) -> None:
    node, have = ctx.inputs[position], ctx.input_shardings[position]
    if View.of_sharding(have) is View.DENSE:
        record = meta.placed(node)
        how = f" ({record.reason})" if record is not None and record.reason else ""
        raise ShardingError(
            f"expert weight {meta.display_name(node)!r} of {ctx.node.name} is placed {have!r} on the dense view"
            f"{how}; routed-expert weights live on the expert view: give their plan entry an expert style "
            f"(expert_colwise for gate/up, expert_rowwise for down) or leave them unmatched"
        )


def _parameter_behind(node):
    """The parameter a weight input is read from (through views and the adapter's getitems)."""
    for _ in range(8):
        if meta.graph_input(node) is not None or not node.all_input_nodes:
            break
        node = node.all_input_nodes[0]
    return meta.display_name(node)


def _check_layout_divides(ctx, positions, shardings) -> None:
    """The expert layout must split every weight evenly: refused here, naming the parameter, rather
    than as a ragged piece of an internal node later."""
    for position, wanted in zip(positions, shardings):
        weight = ctx.inputs[position]
        shape = tuple(value_of(weight).shape)
        try:
            local_shape(shape, wanted, ctx.mesh)
        except ShardingError:
            raise ShardingError(
                f"expert weight {_parameter_behind(weight)!r} of {ctx.node.name} has shape {shape} "
                f"({shape[0]} experts); the expert layout {wanted!r} needs the experts divisible by "
                f"ep={ctx.mesh.ep}" + (f" and the intermediate size by etp={ctx.mesh.etp}" if ctx.mesh.etp > 1 else "")
                + f"; {meta.source_line(ctx.node)}") from None


def _weight_gradient(mesh: MeshSpec, weight: Sharding) -> Sharding:
    if mesh.edp == 1:
        return weight
    placements = dict(weight.items())
    # Each token reaches one EDP replica of its expert: the replicas' gradients are pieces of a sum.
    placements["edp"] = Partial("sum")
    return Sharding(tuple(placements), tuple(placements.values()))


def _note(tokens: Sharding, mesh: MeshSpec) -> str:
    copies = token_copies(tokens, mesh)
    if copies == 1:
        return f"tokens {tokens!r}: every token on one rank, dispatched once"
    return (f"tokens {tokens!r}: the token count does not divide further, each token on {copies} ranks "
            f"(weight gradients divided by {copies})")


@register("shardgraph.moe_experts", family="moe_experts", whole=True)
def rule_moe_experts(ctx):
    _check_weight(ctx, 3)
    _check_weight(ctx, 4)
    tokens = token_sharding(tuple(value_of(ctx.inputs[0]).shape), ctx.mesh)
    gate_up, down = expert_weight_shardings(ctx.mesh)
    _check_layout_divides(ctx, (3, 4), (gate_up, down))
    return [Strategy((tokens, tokens, tokens, gate_up, down), tokens, view=View.DENSE, note=_note(tokens, ctx.mesh))]


@register("shardgraph.moe_experts_backward", family="moe_experts_backward", whole=True)
def rule_moe_experts_backward(ctx):
    _check_weight(ctx, 4)
    _check_weight(ctx, 5)
    tokens = token_sharding(tuple(value_of(ctx.inputs[1]).shape), ctx.mesh)
    gate_up, down = expert_weight_shardings(ctx.mesh)
    _check_layout_divides(ctx, (4, 5), (gate_up, down))
    outputs = (tokens, tokens, _weight_gradient(ctx.mesh, gate_up), _weight_gradient(ctx.mesh, down))
    return [Strategy((tokens, tokens, tokens, tokens, gate_up, down), outputs, view=View.DENSE,
                     note=_note(tokens, ctx.mesh) + "; weight gradients partial over edp")]
