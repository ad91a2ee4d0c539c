"""Reduce each gradient as soon as the backward has produced it.

Reads
    a lowered graph whose gradient reductions, and the local steps of the same chains
    (``local_slice`` of a reduced gradient, the casts ``cast_gradient_reductions`` puts around
    them), carry a ``meta.Collective`` with purpose ``GRADIENT_SYNC`` or are such casts.
Writes
    the same nodes, moved to right after the last of their inputs, in graph order; nothing
    else moves. A bucket (``bucket_gradient_sync``'s flatten / all-reduce / unflatten) already
    sits after its last member and is left where it is.
Assumes
    every rank runs the same graph, so moving a collective keeps the ranks' order of
    collectives identical; a node moved earlier still comes after all of its inputs and before
    all of its users, so the program computes the same values.

Why: lowering puts a gradient's reduction before its first consumer, which in a training step is
the gradient norm after the whole backward, so every layer's full partial gradient lived to the
end of the backward. Reduced where it is produced, a gradient that is reduce-scattered (zero=1)
shrinks to its slice at once: the memory of ZeRO stage 2. It also puts each reduction where a
scheduler that overlaps communication wants it, as early as its input allows.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from shardgraph import meta
from shardgraph.meta import Purpose

from .bucket_gradient_sync import flatten, unflatten

__all__ = ["schedule_gradient_sync"]


def _is_gradient_sync(node: Node) -> bool:
    record = meta.collective(node)
    return record is not None and record.purpose is Purpose.GRADIENT_SYNC


def _moves(node: Node) -> bool:
    if node.op != "call_function" or node.target in (flatten, unflatten):
        return False
    if _is_gradient_sync(node):
        return not any(isinstance(a, Node) and a.target is flatten for a in node.args)
    # The casts around a reduction in reduce_dtype travel with it.
    if node.target is torch.ops.prims.convert_element_type.default:
        return any(_is_gradient_sync(user) for user in node.users) or \
            any(_is_gradient_sync(source) for source in node.all_input_nodes)
    return False


def schedule_gradient_sync(gm: GraphModule) -> GraphModule:
    graph = gm.graph
    # Positions in graph order; a moved node takes a place between its anchor and the node after
    # it, so the order stays exact without renumbering.
    position = {node: float(index) for index, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if not _moves(node):
            continue
        # The communicator is a placeholder; the value inputs decide how early the node can run.
        sources = [source for source in node.all_input_nodes if source.op != "placeholder"]
        if not sources:
            continue
        anchor = max(sources, key=position.__getitem__)
        if anchor.next is node:
            continue
        anchor.append(node)
        position[node] = (position[anchor] + position[node.next]) / 2
    gm.recompile()
    return gm
