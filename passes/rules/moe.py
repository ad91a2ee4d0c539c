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
``copies`` ranks; the lowering divides the weight gradients by ``copies`` (``token_copies``), and
the per-token results are ``Partial("avg")`` over the copying axes (the copies agree to rounding
only), so every rank reads the same average.

The weights are asked for in the layout the lowering computes with: ``Shard(0)`` over ep, and
with etp > 1 gate/up split over etp so that every etp rank holds the gate and the up columns of
the same intermediate units (``InterleavedShard(1, 2)`` of concatenated gate/up rows, ``Shard(1)``
of interleaved ones, whose pairs stay whole when the intermediate size divides by etp, and of the
``I`` up rows of ungated experts) and down
split on its intermediate dim. The optional biases follow their products: the gate/up bias
``[E, 2I]`` splits as the gate/up rows do, the down bias ``[E, H]`` only over ep (it is added
once, after the etp reduction). A plan that places them otherwise on the expert view is
redistributed (a replicated expert weight is sliced locally); one that places them on the dense
view cannot be, and is refused naming the parameter and its plan entry.

Both rules return exactly one strategy, so the backward sees the forward's token split and reuses
its routing.
"""

from __future__ import annotations

import math

from shardgraph import meta
from shardgraph.mesh import MeshSpec
from shardgraph.ops.moe import GatedActivation
from shardgraph.meta import View
from shardgraph.placement import InterleavedShard, Partial, Shard, Sharding, ShardingError, local_shape

from . import Strategy, register, value_of

__all__ = ["token_sharding", "token_copies", "expert_weight_shardings", "expert_bias_shardings", "moe_layout"]

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


def _gate_up_columns(layout: str):
    """The etp split of dim 1 of the gate/up weight ``[E, 2I, H]`` and of its bias ``[E, 2I]``
    that gives every etp rank the gate and the up of the same intermediate units: two stripes of
    concatenated gate/up rows; a block of interleaved ones (whole (gate, up) pairs) or of the up
    rows of ungated experts (``[E, I, H]``, one row per unit)."""
    return InterleavedShard(1, stripes=2) if layout == "concatenated" else Shard(1)


def expert_weight_shardings(mesh: MeshSpec, layout: str = "concatenated") -> tuple[Sharding, Sharding]:
    """(w_gate_up, w_down) as the lowering computes with them; ``layout``: how the gate/up rows hold
    each intermediate unit, the activation spec's (``ops.moe.GatedActivation.layout``)."""
    if mesh.etp == 1:
        return Sharding.of(ep=Shard(0)), Sharding.of(ep=Shard(0))
    return (Sharding.of(ep=Shard(0), etp=_gate_up_columns(layout)),
            Sharding.of(ep=Shard(0), etp=Shard(2)))


def expert_bias_shardings(mesh: MeshSpec, layout: str = "concatenated") -> tuple[Sharding, Sharding]:
    """(gate_up_bias ``[E, 2I]``, down_bias ``[E, H]``): the gate/up bias splits as the gate/up
    rows; the down bias only over ep, since it is added once after the etp reduction."""
    if mesh.etp == 1:
        return Sharding.of(ep=Shard(0)), Sharding.of(ep=Shard(0))
    return Sharding.of(ep=Shard(0), etp=_gate_up_columns(layout)), Sharding.of(ep=Shard(0))


def moe_layout(node) -> tuple[str, bool, bool]:
    """``(layout of the gate/up rows, has gate_up bias, has down bias)`` of a ``moe_experts`` or
    ``moe_experts_backward`` node, read from its arguments."""
    shift = 1 if "backward" in str(node.target) else 0

    def argument(position, name, default=None):
        position += shift
        return node.args[position] if position < len(node.args) else node.kwargs.get(name, default)

    activation = GatedActivation.parse(argument(5, "activation") or "silu")
    return (activation.layout, argument(6, "gate_up_bias") is not None,
            argument(7, "down_bias") is not None)


def _wanted(ctx) -> tuple[list[int], list[Sharding], bool]:
    """Positions (among the node's tensor inputs) and wanted shardings of its expert weights and
    biases, and the layout of the gate/up rows."""
    layout, has_gate_up_bias, has_down_bias = moe_layout(ctx.node)
    first = 4 if "backward" in str(ctx.node.target) else 3
    gate_up, down = expert_weight_shardings(ctx.mesh, layout)
    gate_up_bias, down_bias = expert_bias_shardings(ctx.mesh, layout)
    positions, wanted = [first, first + 1], [gate_up, down]
    for present, sharding in ((has_gate_up_bias, gate_up_bias), (has_down_bias, down_bias)):
        if present:
            positions.append(first + len(positions))
            wanted.append(sharding)
    return positions, wanted, layout


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


def _check_layout_divides(ctx, positions, shardings, layout: str = "concatenated") -> None:
    """The expert layout must split every weight evenly: refused here, naming the parameter, rather
    than as a ragged piece of an internal node later. Interleaved gate/up rows split over etp keep
    their (gate, up) pairs whole only if the intermediate size divides by etp."""
    gate_up = ctx.inputs[positions[0]]
    two_intermediate = tuple(value_of(gate_up).shape)[1]
    if layout == "interleaved" and ctx.mesh.etp > 1 and (two_intermediate // 2) % ctx.mesh.etp:
        raise ShardingError(
            f"expert weight {_parameter_behind(gate_up)!r} of {ctx.node.name} holds interleaved gate/up rows of "
            f"intermediate size {two_intermediate // 2}, which does not divide by etp={ctx.mesh.etp}: a piece "
            f"would part a gate row from its up row; {meta.source_line(ctx.node)}")
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


def _copies_output(tokens: Sharding, mesh: MeshSpec) -> Sharding:
    """The placement of what the op computes per token (its output, the token and routing-weight
    gradients). Where each token is on several ranks, every rank computes its own copy: its copies
    reach other ranks' experts in other rows of other grouped products, so they agree to rounding,
    not bit for bit. They are declared ``Partial("avg")`` over the axes the tokens are copied on,
    and a consumer that needs them whole gets one all-reduce that makes every replica the same;
    left as replicas they would drift apart step by step (a replicated norm weight and its
    optimizer state included)."""
    if token_copies(tokens, mesh) == 1:
        return tokens
    placements = dict(tokens.items())
    for axis in ("dp", "tp"):
        if mesh.size(axis) > 1 and not tokens.placement(axis).is_shard():
            placements[axis] = Partial("avg")
    return Sharding(tuple(placements), tuple(placements.values()))


def _note(tokens: Sharding, mesh: MeshSpec) -> str:
    copies = token_copies(tokens, mesh)
    if copies == 1:
        return f"tokens {tokens!r}: every token on one rank, dispatched once"
    return (f"tokens {tokens!r}: the token count does not divide further, each token on {copies} ranks "
            f"(weight gradients divided by {copies}; the copies' results averaged where read whole)")


@register("shardgraph.moe_experts", family="moe_experts", whole=True)
def rule_moe_experts(ctx):
    positions, wanted, layout = _wanted(ctx)
    for position in positions:
        _check_weight(ctx, position)
    tokens = token_sharding(tuple(value_of(ctx.inputs[0]).shape), ctx.mesh)
    _check_layout_divides(ctx, positions, wanted, layout)
    return [Strategy((tokens, tokens, tokens, *wanted), _copies_output(tokens, ctx.mesh), view=View.DENSE,
                     note=_note(tokens, ctx.mesh))]


@register("shardgraph.moe_experts_backward", family="moe_experts_backward", whole=True)
def rule_moe_experts_backward(ctx):
    positions, wanted, layout = _wanted(ctx)
    for position in positions:
        _check_weight(ctx, position)
    tokens = token_sharding(tuple(value_of(ctx.inputs[1]).shape), ctx.mesh)
    _check_layout_divides(ctx, positions, wanted, layout)
    # Weight and bias gradients come out as their operands are held, partial over edp. The down
    # bias's gradient is whole on every etp rank: it sums output gradients gathered over etp.
    copied = _copies_output(tokens, ctx.mesh)
    outputs = (copied, copied, *(_weight_gradient(ctx.mesh, sharding) for sharding in wanted))
    return [Strategy((tokens, tokens, tokens, tokens, *wanted), outputs, view=View.DENSE,
                     note=_note(tokens, ctx.mesh) + "; weight gradients partial over edp")]
