"""The routed-expert ops: tokens on the dense view meet expert weights on the expert view.

``moe_experts(hidden [T, H], topk_ids [T, k], topk_weights [T, k], w_gate_up, w_down)``.

Tokens are asked for split over tp as well as dp (``Shard(0)`` on both): a token replicated
across the TP lanes is then dispatched by exactly one lane, so the EP all-to-all carries 1/tp of
the bytes that dispatching the duplicates would. When the tokens arrive replicated over tp, the
split is a free local slice; the result leaves split over tp, and where a consumer needs it whole
redistribution inserts the all-gather that restores the replicated view.

The weights keep their plan placement (``Shard(0)`` over ep, gate/up interleaved over etp, down
split on its intermediate dim). In the backward every token contributes to the weight gradient
on exactly one EDP replica of its expert, so the weight gradients are ``Partial("sum")`` over edp
and nothing else: no factor of tp appears, because no token was processed twice.
"""

from __future__ import annotations

from shardgraph.placement import Partial, Replicate, Shard, Sharding, ShardingError, local_shape

from . import Strategy, register, value_of


def _token_shardings(ctx, hidden):
    """Candidate token shardings: split over dp and tp where the token count allows it."""
    dp_placement = hidden.placement("dp") if hidden.placement("dp") == Shard(0) else Replicate()
    tokens = tuple(value_of(ctx.inputs[0]).shape)
    options = []
    split = Sharding.of(dp=dp_placement, tp=Shard(0))
    try:
        local_shape(tokens, split, ctx.mesh)
        options.append((split, "tokens split over tp: each lane dispatches 1/tp of them"))
    except ShardingError:
        pass
    options.append((Sharding.of(dp=dp_placement), "tokens replicated over tp (token count not divisible by tp)"))
    return options


def _weight_gradient(ctx, weight_sharding: Sharding) -> Sharding:
    if ctx.mesh.edp == 1:
        return weight_sharding
    placements = dict(weight_sharding.items())
    placements["edp"] = Partial("sum")
    return Sharding(tuple(placements), tuple(placements.values()))


@register("shardgraph.moe_experts", family="moe_experts", whole=True)
def rule_moe_experts(ctx):
    hidden, _ids, _weights, w_gate_up, w_down = ctx.input_shardings
    return [
        Strategy((tokens, tokens, tokens, w_gate_up, w_down), tokens, view="dense", note=note)
        for tokens, note in _token_shardings(ctx, hidden)
    ]


@register("shardgraph.moe_experts_backward", family="moe_experts_backward", whole=True)
def rule_moe_experts_backward(ctx):
    _grad, hidden, _ids, _weights, w_gate_up, w_down = ctx.input_shardings
    strategies = []
    for tokens, note in _token_shardings(ctx, hidden):
        outputs = (tokens, tokens, _weight_gradient(ctx, w_gate_up), _weight_gradient(ctx, w_down))
        strategies.append(Strategy((tokens, tokens, tokens, tokens, w_gate_up, w_down), outputs, view="dense",
                                   note=note + "; weight gradients partial over edp"))
    return strategies
