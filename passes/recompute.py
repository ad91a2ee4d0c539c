"""Activation recomputation: recompute a layer's activations in the backward instead of keeping them.

Reads
    a traced joint graph: the ``Phase`` of every op (forward: what the loss depends on) and
    the transformer layer each op belongs to (``meta.layer``).
Writes
    for every layer, copies of the forward ops whose values the layer's backward reads, inserted
    right before the first backward op that reads one; the backward reads the copies, so the
    forward's values die with the forward. What is kept instead of recomputed:
      every policy   the layer's boundary (values from outside the layer, the layer's values read
                     by another layer's forward or by the output) and the inputs of each
                     ``moe_experts`` op (its backward is paired with its forward by them, so the
                     routing is computed once);
      ``selective``  also the outputs of matrix products (``mm``, ``addmm``, ``bmm``,
                     ``moe_experts``, ``attention``): only the cheap elementwise, norm and
                     routing ops are recomputed;
      ``full``       nothing else: the whole layer is recomputed from its input.
    Copies carry the original's records (source line, module path) and the backward phase.
Assumes
    the forward is deterministic (the frontend's random draws are functions of a threaded
    generator state, ``shardgraph/ops/random.py``), so a copy computes the value it replaces;
    placement and lowering see the copies as ordinary ops, so collectives inside a recomputed
    region are recomputed too.

Why: a layer's saved activations are most of a training step's memory at long sequences;
recomputing them costs a second forward of the recomputed ops.
"""

from __future__ import annotations

from collections import defaultdict

import operator

from torch.fx import GraphModule, Node

from shardgraph import meta
from shardgraph.fx_graph import ancestors
from shardgraph.meta import Phase

from .lower_moe import is_moe_forward

__all__ = ["RECOMPUTE_POLICIES", "check_recompute_policy", "recompute"]

RECOMPUTE_POLICIES = ("none", "selective", "full")


def check_recompute_policy(policy, where: str = "recompute") -> None:
    if policy not in RECOMPUTE_POLICIES:
        raise ValueError(f"{where} must be one of {RECOMPUTE_POLICIES} (none; selective: elementwise, norm and "
                         f"routing ops recomputed, matrix products kept; full: each layer recomputed from its "
                         f"input), got {policy!r}")

_PRODUCTS = ("aten.mm.", "aten.addmm.", "aten.bmm.", "aten.baddbmm.", "shardgraph.moe_experts.",
             "shardgraph.attention.")


def _is_product(node: Node) -> bool:
    return str(node.target).startswith(_PRODUCTS)


def recompute(gm: GraphModule, policy: str) -> GraphModule:
    check_recompute_policy(policy)
    if policy == "none":
        return gm
    graph = gm.graph
    forward_of_layer: dict[str, set[Node]] = defaultdict(set)
    for node in graph.nodes:
        if node.op == "call_function" and meta.phase(node) is Phase.FORWARD:
            name = meta.layer(node)
            if name is not None:
                forward_of_layer[name].add(node)
    kept = _kept(graph, forward_of_layer, policy)
    order = {node: index for index, node in enumerate(graph.nodes)}
    for forward in forward_of_layer.values():
        _recompute_layer(graph, forward, kept, order)
    gm.recompile()
    return gm


def _kept(graph, forward_of_layer: dict[str, set[Node]], policy: str) -> set[Node]:
    kept: set[Node] = set()
    for forward in forward_of_layer.values():
        for node in forward:
            # Read by another layer's forward, or by nothing of the forward at all (the output):
            # the boundary the layer is recomputed from.
            if any(user.op == "output" or (meta.phase(user) is Phase.FORWARD and user not in forward)
                   for user in node.users):
                kept.add(node)
            if policy == "selective" and (_is_product(node) or (
                    node.target is operator.getitem and _is_product(node.args[0]))):
                kept.add(node)
            if is_moe_forward(node):
                kept.update(arg for arg in node.args if isinstance(arg, Node))
    return kept


def _recompute_layer(graph, forward: set[Node], kept: set[Node], order: dict[Node, int]) -> None:
    # Only readers after the layer's whole forward read copies: an op the loss does not depend on
    # may sit inside the forward (a value only a gradient needs, computed where its inputs are),
    # and copies placed before it could read forward values not made yet.
    end_of_forward = max(order[node] for node in forward)

    def reads_copies(user: Node) -> bool:
        return meta.phase(user) is Phase.BACKWARD and order.get(user, -1) > end_of_forward

    saved = [node for node in forward if node not in kept and any(reads_copies(user) for user in node.users)]
    if not saved:
        return
    # What the saved values are computed from within the layer's forward, up to kept values.
    def outside(node: Node) -> bool:
        return node not in forward or node in kept

    needed = {node for node in ancestors(saved, stop=outside) if not outside(node)}
    readers = [user for node in saved for user in node.users if reads_copies(user)]
    first_reader = min(readers, key=order.__getitem__)
    copies: dict[Node, Node] = {}
    with graph.inserting_before(first_reader):
        for node in sorted(needed, key=order.__getitem__):
            copy = graph.node_copy(node, lambda source: copies.get(source, source))
            meta.set_phase(copy, Phase.BACKWARD)
            copies[node] = copy
    for node in saved:
        for user in list(node.users):
            if user not in copies.values() and reads_copies(user):
                user.replace_input_with(node, copies[node])
