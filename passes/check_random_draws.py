"""Refuse seeded random draws that a consumer reads split on a model-parallel dim.

Reads
    a placed graph (after ``propagate``) whose random ops are ``shardgraph.random_draw`` nodes
    (the frontend seeds every random op of a model, ``shardgraph/ops/random.py``).
Writes
    nothing: returns the graph, or raises ``ShardingError`` naming the draw, its source line,
    the consumer and the axis.
Assumes
    draws are made whole on every rank (``passes/rules/random_draws.py``), so every rank holds
    bit-identical numbers, the unsharded model's.

Why: a draw that a consumer reads split on dim 0 (its rows: tokens or batch rows, split over dp
and, where tokens are dispatched, tp) is a router's noise or sampling, made once per rank and
sliced for free. One read split on another dim, such as dropout on attention heads or hidden
units split over tp, would still be right, but every rank would draw the whole activation-sized
tensor to keep a 1/tp slice of it; such draws are refused rather than made at that cost.
"""

from __future__ import annotations

import operator

from torch.fx import GraphModule

from shardgraph import meta
from shardgraph.fx_graph import tensor_inputs
from shardgraph.placement import ShardingError

__all__ = ["check_random_draws", "is_random_draw"]


def is_random_draw(node) -> bool:
    return node.op == "call_function" and str(node.target) == "shardgraph.random_draw.default"


def _values_of(draw):
    """The getitem nodes that read a draw's values (output 0; output 1 is the next state)."""
    return [user for user in draw.users if user.target is operator.getitem and user.args[1] == 0]


def check_random_draws(gm: GraphModule) -> GraphModule:
    for draw in gm.graph.nodes:
        if not is_random_draw(draw):
            continue
        for values in _values_of(draw):
            for consumer in values.users:
                placed = meta.placed(consumer)
                if placed is None:
                    continue
                for position, producer in enumerate(tensor_inputs(consumer)):
                    if producer is not values or position >= len(placed.input_shardings):
                        continue
                    needed = placed.input_shardings[position]
                    for axis, placement in (needed.items() if needed is not None else ()):
                        if placement.is_shard() and placement.dim % max(1, len(draw.args[2])) != 0:
                            raise ShardingError(
                                f"random draw {draw.name} ({draw.args[1]}, shape {list(draw.args[2])}) at "
                                f"{meta.source_line(draw)} is read by {consumer.name} split over {axis} on dim "
                                f"{placement.dim} ({needed!r}); shardgraph draws random numbers whole on every rank "
                                f"(bit-identical to the unsharded model) and supports draws read whole or by rows "
                                f"(a router's noise or sampling), not on model-parallel activations such as "
                                f"dropout of heads or hidden units: set that rate to 0 or call model.eval()")
    return gm
