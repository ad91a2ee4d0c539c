"""Write a norm whose features the plan splits as the aten ops it stands for.

Reads
    a traced graph; the plan's placement of every parameter (``parameter_placements``, the default
    plan where none is given).
Writes
    each ``shardgraph.rms_norm`` whose weight the plan splits, and the ``rms_norm_backward`` that
    reads its ``rstd``, replaced by their aten form (``shardgraph.ops.norm.ATEN_FORMS``: the same
    values, op for op), with the node's source line and phase.
Assumes
    the weight is the norm's second argument, read from its placeholder directly or through casts.

Why: the op normalises whole rows, so its placement rule keeps the last dim whole. A norm over
every head's features (OLMoE's ``q_norm`` over ``heads * head_dim``) runs on heads split over tp
only as aten ops: the mean of squares is then a partial sum over the ranks' features, which
propagation all-reduces (a float per row) instead of gathering the whole activation. The
attention plan splits such a norm's weight with the features it scales
(``passes/attention_plan.py``), as a hand-written plan may, and this pass gives that plan the ops
it needs. Norms whose weight stays whole keep the op (one kernel each way).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from shardgraph import meta
from shardgraph.fx_graph import inline_aten_form
from shardgraph.mesh import MeshSpec
from shardgraph.meta import InputKind

from .gather_parameters import _CASTS

__all__ = ["decompose_split_norms", "split_norms"]


def _weight_parameter(node: Node) -> Node | None:
    weight = node.args[1]
    while isinstance(weight, Node) and weight.op == "call_function" and weight.target in _CASTS:
        weight = weight.args[0]
    return weight if isinstance(weight, Node) and weight.op == "placeholder" else None


def split_norms(gm: GraphModule, mesh: MeshSpec, plan=None) -> list[Node]:
    """The ``rms_norm`` nodes whose weight the plan splits on some mesh axis."""
    norms = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.shardgraph.rms_norm.default]
    if not norms or mesh.world == 1:
        return []
    from .plan import parameter_placements

    names = {node: record.name for node, record in meta.graph_inputs(gm.graph, InputKind.PARAMETER)}
    placements = parameter_placements(gm, mesh, plan)
    found = []
    for norm in norms:
        name = names.get(_weight_parameter(norm))
        placement = placements.get(name)
        if placement is not None and any(p.is_shard() for p in (placement.gathered or placement.sharding).placements):
            found.append(norm)
    return found


def decompose_split_norms(gm: GraphModule, mesh: MeshSpec, plan=None) -> GraphModule:
    from shardgraph.ops.norm import ATEN_FORMS

    norms = split_norms(gm, mesh, plan)
    backward = torch.ops.shardgraph.rms_norm_backward.default
    for norm in norms:
        readers = [user for getter in norm.users if getter.target is operator.getitem and getter.args[1] == 1
                   for user in getter.users if user.target is backward]
        for reader in readers:
            inline_aten_form(gm.graph, reader, ATEN_FORMS[backward])
        inline_aten_form(gm.graph, norm, ATEN_FORMS[norm.target])
    if norms:
        gm.recompile()
    return gm
