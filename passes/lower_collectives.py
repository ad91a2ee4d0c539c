"""Lower every collective to torch's distributed IR: a ``_c10d_functional`` op and its wait.

Reads
    a lowered graph whose collectives are calls of ``shardgraph.runtime.collectives``
    (``all_gather``, ``interleaved_all_gather``, ``reduce_scatter``, ``all_reduce``,
    ``all_to_all``, ``shard_to_shard``) and of the MoE exchange steps of
    ``shardgraph.runtime.moe`` (``exchange_counts``, ``etp_sizes``, ``etp_gather``,
    ``etp_reduce_own``), each with the communicator first and (except the count exchanges of
    etp) a ``meta.Collective`` record.
Writes
    for each: the local steps that put the tensor in the layout a dim-0 collective reads
    (``runtime/c10d.py``: ``dim_to_front``, ``split_for_all_to_all``, ``repeat_for_members``), one
    ``torch.ops._c10d_functional`` op (``all_gather_into_tensor``, ``reduce_scatter_tensor``,
    ``all_reduce``, ``all_to_all_single``) on the group ``c10d.group_name(mesh, axis)``, its
    ``wait_tensor`` right after it, and the local steps that give the value its layout back
    (``front_to_dim``, ``interleaved_from_front``, ``join_after_all_to_all``,
    ``own_rows``, a division for an average). The op node carries the ``Collective`` record
    (the count exchanges of etp get one, purpose ``MOE_COUNTS``); the other nodes carry a
    ``CollectivePart`` naming it; the last node takes the replaced node's value, placement and
    source records, and its users.
Assumes
    every rank runs this graph (the group names do not depend on the rank); an average is a sum
    divided by the group size (gloo and NCCL's c10d ops reduce by sum or max only in common).

Why one pass: every collective of the program, whichever pass made it, becomes c10d here, so
the simulator, torch.distributed and torch.compile see one IR, and the passes before keep
working on one call per collective (bucketing, casting, moving a whole reduction). The wait
sits right after its op here; ``schedule_collectives`` moves ops early and waits late.
"""

from __future__ import annotations

import inspect

import torch
from torch.fx import GraphModule, Node

from shardgraph import meta
from shardgraph.mesh import MeshSpec
from shardgraph.meta import Collective, CollectiveKind, CollectivePart, Purpose
from shardgraph.runtime import c10d, collectives
from shardgraph.runtime import moe as moe_steps

__all__ = ["lower_collectives", "CALL_FORM"]

# Every function that communicates in the call form, the intermediate IR of the passes before.
CALL_FORM = frozenset({*collectives.COLLECTIVE_FUNCTIONS, moe_steps.exchange_counts, moe_steps.etp_sizes,
                       moe_steps.etp_gather, moe_steps.etp_reduce_own})


class _Expansion:
    """The nodes that replace one call-form collective, inserted before it."""

    def __init__(self, graph, old: Node, mesh: MeshSpec, axis, record: Collective):
        self.graph, self.old, self.mesh, self.axis, self.record = graph, old, mesh, axis, record
        self.name = c10d.group_name(mesh, axis)
        self.size = mesh.size(axis)
        self.issue: Node | None = None
        self.parts: list[tuple[Node, str]] = []

    def local(self, target, *args) -> Node:
        with self.graph.inserting_before(self.old):
            node = self.graph.call_function(target, args)
        self.parts.append((node, "before" if self.issue is None else "after"))
        return node

    def collective(self, target, *args) -> Node:
        """The c10d op and its wait; returns the wait."""
        with self.graph.inserting_before(self.old):
            issue = self.graph.call_function(target, args)
            wait = self.graph.call_function(c10d.WAIT, (issue,))
        self.issue = issue
        self.parts.append((wait, "wait"))
        return wait

    def finish(self, result: Node) -> None:
        old = self.old
        meta.set_collective(self.issue, self.record)
        for node in (self.issue, *(n for n, _ in self.parts)):
            meta.copy_source_location(old, node)
            if meta.moe_step(old) is not None:
                meta.set_moe_step(node, meta.moe_step(old))
            if meta.placed(old) is not None:
                meta.set_placed(node, meta.placed(old))
        for node, role in self.parts:
            meta.set_collective_part(node, CollectivePart(self.issue.name, self.record, role))
        if meta.has_value(old):
            meta.copy_source_info(old, result)
        old.replace_all_uses_with(result)
        self.graph.erase_node(old)


def _arguments(node: Node) -> dict:
    bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _count_record(node: Node, mesh: MeshSpec, axis, what: str, nbytes: float) -> Collective:
    step = meta.moe_step(node)
    return Collective(CollectiveKind.ALL_GATHER, axis, mesh.size(axis), nbytes, Purpose.MOE_COUNTS,
                      of=step.layer if step is not None else node.name, detail=what, data_dependent=True)


def _lower_one(graph, node: Node, mesh: MeshSpec) -> None:
    a = _arguments(node)
    target = node.target
    axis = a.get("axis") or a.get("ep_axis") or a.get("etp_axis")
    record = meta.collective(node)
    n = mesh.size(axis)
    if target is moe_steps.etp_sizes:
        record = record or _count_record(node, mesh, axis, "token rows per etp rank", 8.0 * (n - 1))
    elif target is moe_steps.etp_gather and record is None:
        record = _count_record(node, mesh, axis, "tokens per local expert to every etp rank", 0.0)
    if record is None:
        raise ValueError(f"lower_collectives: collective node {node.name} ({target.__name__}) has no Collective "
                         f"record")
    x = _Expansion(graph, node, mesh, axis, record)
    tensor = a.get("tensor", a.get("tokens_per_expert", a.get("rows")))
    if target is collectives.all_gather:
        front = x.local(c10d.dim_to_front, tensor, a["dim"])
        out = x.local(c10d.front_to_dim, x.collective(c10d.ALL_GATHER, front, n, x.name), a["dim"])
    elif target is collectives.interleaved_all_gather:
        front = x.local(c10d.dim_to_front, tensor, a["dim"])
        out = x.local(c10d.interleaved_from_front, x.collective(c10d.ALL_GATHER, front, n, x.name), a["dim"], n,
                      a["stripes"])
    elif target is collectives.reduce_scatter:
        front = x.local(c10d.dim_to_front, tensor, a["dim"])
        out = x.local(c10d.front_to_dim, x.collective(c10d.REDUCE_SCATTER, front, "sum", n, x.name), a["dim"])
        if a["op"] == "avg":
            out = x.local(torch.div, out, n)
        elif a["op"] != "sum":
            raise ValueError(f"lower_collectives: {node.name} reduce-scatters with op {a['op']!r}; sum or avg")
    elif target is collectives.all_reduce:
        op = a["op"]
        out = x.collective(c10d.ALL_REDUCE, x.local(c10d.contiguous, tensor), "sum" if op == "avg" else op,
                           x.name)
        if op == "avg":
            out = x.local(torch.div, out, n)
    elif target is collectives.all_to_all:
        if a["output_splits"] is None or a["dim"] != 0:
            raise ValueError(f"lower_collectives: all_to_all {node.name} needs output_splits and dim 0 "
                             f"(got dim {a['dim']})")
        out = x.collective(c10d.ALL_TO_ALL, x.local(c10d.contiguous, tensor), a["output_splits"],
                           a["input_splits"], x.name)
    elif target is collectives.shard_to_shard:
        blocks = x.local(c10d.split_for_all_to_all, tensor, a["dim"], n)
        out = x.local(c10d.join_after_all_to_all, x.collective(c10d.ALL_TO_ALL, blocks, [1] * n, [1] * n, x.name),
                      a["source_dim"])
    elif target is moe_steps.exchange_counts:
        local_experts = meta_local_experts(node, n)
        flat = x.local(c10d.contiguous, tensor)
        splits = [local_experts] * n if local_experts is not None else None
        if splits is None:
            raise ValueError(f"lower_collectives: {node.name}: the expert count of {tensor} is unknown")
        out = x.local(c10d.as_matrix, x.collective(c10d.ALL_TO_ALL, flat, splits, splits, x.name), n)
    elif target is moe_steps.etp_sizes:
        counted = x.local(c10d.row_count, tensor)
        out = x.local(c10d.host_list, x.collective(c10d.ALL_GATHER, counted, n, x.name))
    elif target is moe_steps.etp_gather:
        sizes = a["sizes"]
        if sizes is None:  # equal pieces (the count matrices)
            out = x.collective(c10d.ALL_GATHER, x.local(c10d.contiguous, tensor), n, x.name)
        else:
            # Pieces of different lengths: an all-to-all sending the whole piece to every member
            # moves exactly an uneven all-gather's bytes (no padding to the longest piece) and
            # reads no length on the host (a compiled graph is not specialised on the counts).
            repeated = x.local(c10d.repeat_for_members, tensor, n)
            out = x.collective(c10d.ALL_TO_ALL, repeated, sizes, x.local(c10d.piece_splits, tensor, n), x.name)
    elif target is moe_steps.etp_reduce_own:
        total = x.collective(c10d.ALL_REDUCE, x.local(c10d.contiguous, tensor), "sum", x.name)
        out = x.local(c10d.own_rows, a["comm"], total, axis, a["sizes"])
    else:  # pragma: no cover - CALL_FORM lists exactly the targets above
        raise AssertionError(target)
    x.finish(out)


def meta_local_experts(node: Node, group_size: int) -> int | None:
    """Experts per rank of an ``exchange_counts`` node: its input is ``sort_by_expert``'s count
    per expert, whose length is the second argument of that call."""
    source = node.args[1]
    if isinstance(source, Node) and source.target.__name__ == "getitem":
        sort = source.args[0]
        if isinstance(sort, Node) and sort.target is moe_steps.sort_by_expert:
            return int(sort.args[1]) // group_size
    found = meta.tensor_value(source) if isinstance(source, Node) else None
    return found.shape[0] // group_size if found is not None else None


def lower_collectives(gm: GraphModule, mesh: MeshSpec) -> GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in CALL_FORM:
            _lower_one(graph, node, mesh)
    gm.recompile()
    return gm
