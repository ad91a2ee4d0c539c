"""The values a routing decision reads: the router's logits, scores and everything before them.

Reads
    a joint graph (traced, placed or partly lowered) that still holds its MoE ops
    (``shardgraph.moe_experts`` and its backward).
Writes
    nothing: ``routing_path(gm)`` returns the set of op nodes whose values flow into a routing
    decision, ``routing_decisions(gm)`` the decisions themselves.
Assumes
    a routing decision is an order-selecting op (top-k, sort, max / min with indices, argmax /
    argmin) upstream of an MoE op. Routing is found by these ops and the graph's structure,
    never by parameter or module names, so any router that selects experts this way is covered.

Why: a top-k turns a difference in the last bit of a score into a different expert. The
sharded program must select exactly the experts the unsharded one does, so every value on the
way into a decision must be computed as the unsharded program computes it: placement
propagation never lets an op on this path read a ``Partial`` value (a partial sum would be
rounded, added to and cast before it is reduced, as no unsharded program does), and
``exact_partial_reductions`` forms the partial products of the contractions on it in float32 and
rounds once after the reduction, as an unsharded matrix product does.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from shardgraph.fx_graph import ancestors

__all__ = ["DECISION_OPS", "is_routing_decision", "routing_decisions", "routing_path"]

aten = torch.ops.aten

# Ops whose result depends on the order of their input's values: a top-k, a sort, an argmax.
DECISION_OPS = frozenset({
    aten.topk.default, aten.sort.default, aten.sort.stable, aten.argsort.default, aten.argsort.stable,
    aten.max.dim, aten.min.dim, aten.argmax.default, aten.argmin.default, aten.kthvalue.default,
})


def _is_moe_op(node: Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith(
        ("shardgraph.moe_experts.", "shardgraph.moe_experts_backward."))


def is_routing_decision(node: Node) -> bool:
    return node.op == "call_function" and node.target in DECISION_OPS




def routing_decisions(gm: GraphModule) -> list[Node]:
    """The order-selecting ops upstream of an MoE op, in graph order."""
    upstream = ancestors(source for node in gm.graph.nodes if _is_moe_op(node) for source in node.all_input_nodes)
    return [node for node in gm.graph.nodes if node in upstream and is_routing_decision(node)]


def routing_path(gm: GraphModule) -> set[Node]:
    """Every op node a routing decision depends on, the decisions included."""
    return {node for node in ancestors(routing_decisions(gm)) if node.op == "call_function"}
