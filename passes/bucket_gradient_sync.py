"""Bucket the gradient all-reduces: one collective per (axis, op, dtype) bucket, not one per gradient.

Reads
    a graph after ``lower_redistribute``: each gradient output that was ``Partial`` over an axis
    is produced by an ``all_reduce`` node whose ``meta.Collective`` has the purpose
    ``GRADIENT_SYNC`` and which has no other user. Only that last step of each gradient's
    chain is bucketed; where a gradient is reduced over two axes (dp, then a reduce-scatter over
    tp), the earlier step stays one collective per gradient.
Writes
    for every group of such all-reduces with the same axis, reduce op, dtype and device (in
    output order, cut into buckets of at most ``bucket_bytes`` local bytes): one ``flatten`` of
    the bucket's gradients, one ``all_reduce`` of the flat buffer and one ``unflatten`` whose
    pieces are views of it. The bucket's ``Collective`` carries the summed bytes and its members, so
    reports and the simulator's byte records agree as before.
Assumes
    all-reduce is elementwise over the buffer, so reducing the concatenation reduces each piece
    exactly as reducing it alone would (same ranks, same op, same order of summation per element).

Why: a step of a model with hundreds of parameters would otherwise issue hundreds of small
all-reduces; each pays the collective's latency (tens of microseconds over NVLink, milliseconds
over gloo), which dominates the gradient sync of small and medium models, as bucketed data
parallelism (DDP's buckets) has long done.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import GraphModule, Node

from shardgraph import meta
from shardgraph.fx_graph import output_node, output_values
from shardgraph.meta import PlacedValue, Purpose
from shardgraph.runtime import collectives

__all__ = ["bucket_gradient_sync", "flatten", "unflatten", "DEFAULT_BUCKET_BYTES"]

DEFAULT_BUCKET_BYTES = 64 * 2**20


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' elements, one after another, in one contiguous buffer."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Views of ``flat`` shaped like ``like`` (the inverse of ``flatten``). Shapes are read at run
    time: they are each rank's local shapes, which the graph's metadata (global) does not hold."""
    pieces = flat.split([t.numel() for t in like])
    return tuple(piece.view(t.shape) for piece, t in zip(pieces, like))


def _gradient_all_reduces(graph) -> list[Node]:
    found = []
    for found_value in output_values(graph):
        if not isinstance(found_value, Node) or found_value.target is not collectives.all_reduce:
            continue
        record = meta.collective(found_value)
        if record is None or record.purpose is not Purpose.GRADIENT_SYNC or len(found_value.users) != 1:
            continue
        if meta.tensor_value(found_value) is None:
            continue
        if found_value not in found:  # a gradient output twice (tied weights) is synced once
            found.append(found_value)
    return found


def _buckets(members: list[Node], bucket_bytes: int) -> list[list[Node]]:
    """Consecutive members, cut where the next would push a bucket past ``bucket_bytes``."""
    buckets, current, size = [], [], 0.0
    for node in members:
        local = meta.collective(node).bytes
        if current and size + local > bucket_bytes:
            buckets.append(current)
            current, size = [], 0.0
        current.append(node)
        size += local
    buckets.append(current)
    return buckets


def _replace_by_bucket(graph, bucket: list[Node], axis: str, op: str) -> None:
    output = output_node(graph)
    comm = bucket[0].args[0]
    sources = [node.args[1] for node in bucket]
    with graph.inserting_before(output):
        flat = graph.call_function(flatten, (sources,))
        reduced = graph.call_function(collectives.all_reduce, (comm, flat, axis, op))
        pieces = graph.call_function(unflatten, (reduced, sources))
    records = [meta.collective(node) for node in bucket]
    names = [record.of for record in records]
    meta.set_collective(reduced, dataclasses.replace(
        records[0], bytes=sum(record.bytes for record in records),
        of=", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else ""),
        detail=f"bucket of {len(bucket)} gradients", members=tuple(names)))
    for node in (flat, reduced, pieces):
        meta.copy_source_location(bucket[-1], node)
        meta.set_placed(node, PlacedValue(None, meta.view(bucket[0]), (),
                                          f"all_reduce over {axis} of {len(bucket)} gradients in one buffer: "
                                          f"one collective's latency instead of {len(bucket)}"))
    for index, node in enumerate(bucket):
        with graph.inserting_before(output):
            piece = graph.call_function(operator.getitem, (pieces, index))
        meta.copy_source_info(node, piece)
        meta.set_placed(piece, meta.placed(node))
        node.replace_all_uses_with(piece)
        graph.erase_node(node)


def bucket_gradient_sync(gm: GraphModule, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> GraphModule:
    graph = gm.graph
    groups: dict[tuple, list[Node]] = {}
    for node in _gradient_all_reduces(graph):
        axis = node.args[2] if len(node.args) > 2 else node.kwargs["axis"]
        op = node.args[3] if len(node.args) > 3 else node.kwargs["op"]
        found = meta.value(node)
        groups.setdefault((axis, op, found.dtype, found.device.type), []).append(node)
    for (axis, op, _dtype, _device), members in groups.items():
        for bucket in _buckets(members, bucket_bytes):
            if len(bucket) >= 2:
                _replace_by_bucket(graph, bucket, axis, op)
    gm.recompile()
    return gm
