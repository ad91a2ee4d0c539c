"""Reduce gradients in a chosen dtype (``reduce_dtype``), as FSDP's mixed-precision policy does.

Reads
    a lowered graph whose gradient reductions (``all_reduce`` / ``reduce_scatter`` nodes,
    bucketed or not) carry a ``meta.Collective`` with purpose ``GRADIENT_SYNC``.
Writes
    around each reduction of a floating-point gradient in another dtype: a cast to
    ``reduce_dtype`` before it and a cast back to the gradient's dtype after it. Where one
    gradient is reduced over two axes in a row (dp, then tp, or a bucket of such), the cast back
    and the next cast cancel and are left out, so the whole chain runs in ``reduce_dtype`` and
    rounds once at the end; an all-gather that follows a reduction in the chain (into a
    parameter's split) runs in ``reduce_dtype`` as well, its values being rounded already. The reduction's ``Collective`` bytes are rescaled to the dtype it now sends, so the
    report and the simulator's byte records agree.
Assumes
    a reduction is elementwise, so casting before and after changes only the precision of the
    sum, not which elements meet.

Why: with ``compute_dtype=torch.bfloat16`` the backward's gradients arrive in the master
weights' dtype (fp32) and are reduced there; ``reduce_dtype=torch.bfloat16`` halves the bytes of
the gradient synchronisation at the cost of summing in bf16, and ``torch.float32`` makes fp32
sums explicit for a program whose gradients are bf16.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from shardgraph import meta
from shardgraph.meta import CollectiveKind, Purpose

from .bucket_gradient_sync import flatten

__all__ = ["cast_gradient_reductions"]

_REDUCTIONS = (CollectiveKind.ALL_REDUCE, CollectiveKind.REDUCE_SCATTER)
_GATHERS = (CollectiveKind.ALL_GATHER, CollectiveKind.INTERLEAVED_ALL_GATHER)


def _dtype(node: Node) -> torch.dtype | None:
    """The dtype ``node`` holds: its recorded value's, a cast's target, a bucket's members'."""
    found = meta.tensor_value(node)
    if found is not None:
        return found.dtype
    if node.op == "call_function" and node.target is torch.ops.prims.convert_element_type.default:
        return node.args[1]
    if node.op == "call_function" and node.target is flatten:
        return _dtype(node.args[0][0])
    if meta.collective(node) is not None:
        return _dtype(node.args[1])
    return None


def _still_reduced(graph, source: Node, restores: dict) -> tuple[Node, torch.dtype] | None:
    """Where ``source`` is only the cast back of an earlier reduction (or a bucket of such),
    drop the cast and return ``(the value still in reduce_dtype, the dtype it restored)``."""
    if source in restores and len(source.users) == 1:
        low, dtype = restores.pop(source)
        source.replace_all_uses_with(low)
        graph.erase_node(source)
        return low, dtype
    if source.op == "call_function" and source.target is flatten:
        members = source.args[0]
        dtypes = {restores[m][1] for m in members if m in restores}
        if len(dtypes) == 1 and all(m in restores and len(m.users) == 1 for m in members):
            lows = [restores.pop(m)[0] for m in members]
            source.args = (lows,)
            for member in members:
                graph.erase_node(member)
            return source, dtypes.pop()
    return None


def _is_gradient_reduction(node: Node) -> bool:
    record = meta.collective(node)
    return record is not None and record.purpose is Purpose.GRADIENT_SYNC and record.kind in _REDUCTIONS


def _is_gradient_gather(node: Node) -> bool:
    # An all-gather after a gradient's reduction (a gradient reduced over dp, then gathered over
    # tp into its parameter's sharding) moves values already rounded to reduce_dtype: it runs in
    # reduce_dtype too, with no second rounding.
    record = meta.collective(node)
    return record is not None and record.purpose is Purpose.GRADIENT_SYNC and record.kind in _GATHERS


def _cast(graph, source: Node, dtype: torch.dtype, like: Node) -> Node:
    """``source`` in ``dtype``, placed as ``source`` is, attributed to the reduction ``like``."""
    cast = graph.call_function(torch.ops.prims.convert_element_type.default, (source, dtype))
    meta.copy_source_location(like, cast)
    if meta.placed(source) is not None:
        meta.set_placed(cast, meta.placed(source))
    return cast


def cast_gradient_reductions(gm: GraphModule, reduce_dtype: torch.dtype | None) -> GraphModule:
    if reduce_dtype is None:
        return gm
    graph = gm.graph
    restores: dict[Node, tuple[Node, torch.dtype]] = {}  # cast back -> (reduced node, dtype it restores)
    for node in list(graph.nodes):
        gathered_after_reduction = _is_gradient_gather(node) and node.args[1] in restores
        if not (_is_gradient_reduction(node) or gathered_after_reduction):
            continue
        source = node.args[1]
        found = _still_reduced(graph, source, restores)
        if gathered_after_reduction and found is None:
            continue
        if found is not None:
            # Reduced over a previous axis already: keep going in reduce_dtype.
            dtype = found[1]
        else:
            dtype = _dtype(source)
            if dtype is None or not dtype.is_floating_point or dtype == reduce_dtype:
                continue
            with graph.inserting_before(node):
                node.replace_input_with(source, _cast(graph, source, reduce_dtype, node))
        record = meta.collective(node)
        scale = reduce_dtype.itemsize / dtype.itemsize
        meta.set_collective(node, dataclasses.replace(record, bytes=record.bytes * scale,
                                                      detail=f"{record.detail}, in {str(reduce_dtype).split('.')[-1]}"))
        with graph.inserting_after(node):
            back = _cast(graph, node, dtype, node)
        node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
        restores[back] = (node, dtype)
    gm.recompile()
    return gm
