"""Rewrite mean-reduced NLL losses as sum / count, so a batch-sharded loss is exact.

Reads
    a joint graph containing ``aten.nll_loss_forward(self, target, weight, reduction=mean, ...)``.
Writes
    ``nll_loss_forward(..., reduction=sum)`` followed by ``div(loss_sum, total_weight)``; the
    ``total_weight`` output (which the backward reads) now comes from the sum-reduced node and is
    the count of counted rows, the same value the mean-reduced node returned.
Assumes
    nothing else reads the mean-reduced loss except through ``getitem``.

Why: with the batch split over dp, each rank may count a different number of non-ignored rows,
so the mean of local means is not the global mean. Sum and count are both exact partial sums;
the division then happens once, on the reduced values.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule
from torch.fx._lazy_graph_module import _LazyGraphModule

from shardgraph import meta

__all__ = ["decompose_loss"]

aten = torch.ops.aten
_MEAN, _SUM = 1, 2


def decompose_loss(gm: GraphModule) -> GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.nll_loss_forward.default:
            continue
        args = list(node.args)
        reduction = args[3] if len(args) > 3 else node.kwargs.get("reduction", _MEAN)
        if reduction != _MEAN:
            continue
        args[3] = _SUM
        node.args = tuple(args)
        value = meta.value(node) if meta.has_value(node) else None
        loss_users = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        weight_users = [u for u in node.users if u.target is operator.getitem and u.args[1] == 1]
        with graph.inserting_after(node):
            total_weight = graph.call_function(operator.getitem, (node, 1))
        meta.copy_source_info(node, total_weight)
        if value is not None:
            meta.set_value(total_weight, value[1])
        for user in weight_users:
            user.replace_all_uses_with(total_weight)
            graph.erase_node(user)
        for user in loss_users:
            with graph.inserting_after(user):
                mean = graph.call_function(aten.div.Tensor, (user, total_weight))
            meta.copy_source_info(user, mean)
            user.replace_all_uses_with(mean, delete_user_cb=lambda use: use is not mean)
        if meta.has_value(total_weight) and not weight_users and not loss_users:
            graph.erase_node(total_weight)
    return _with_deferred_code(gm)


def _with_deferred_code(gm: GraphModule) -> GraphModule:
    """``gm`` as a graph module that writes its Python code when first run or read, not on every
    ``recompile``: the passes after this one each rewrite the graph and recompile, and only the
    program at the end of the pipeline is ever run."""
    if isinstance(gm, _LazyGraphModule):
        gm.recompile()
        return gm
    deferred = _LazyGraphModule(gm, gm.graph)
    meta.copy_module_records(gm, deferred)
    return deferred
