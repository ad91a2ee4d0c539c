"""Bucket the gradient all-reduces: one collective per (axis, op, dtype) bucket, not one per gradient.

Reads
    a graph after ``lower_redistribute``: each gradient output that was ``Partial`` over an axis
    is produced by an ``all_reduce`` node whose ``meta["collective"]["purpose"]`` marks it as a
    gradient (``"(grad)"``) and which has no other user. Only that last step of each gradient's
    chain is bucketed; where a gradient is reduced over two axes (dp, then a reduce-scatter over
    tp), the earlier step stays one collective per gradient.
Writes
    for every group of such all-reduces with the same axis, reduce op, dtype and device (in
    output order, cut into buckets of at most ``bucket_bytes`` local bytes): one ``flatten`` of
    the bucket's gradients, one ``all_reduce`` of the flat buffer and one ``unflatten`` whose
    pieces are views of it. The bucket's ``meta["collective"]`` carries the summed bytes, so
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

import operator

import torch
from torch.fx import GraphModule, Node

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
    output = next(n for n in graph.nodes if n.op == "output")
    outputs = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    found = []
    for value in outputs:
        if not isinstance(value, Node) or value.target is not collectives.all_reduce:
            continue
        info = value.meta.get("collective") or {}
        tensor = value.meta.get("val")
        if "(grad)" not in info.get("purpose", "") or len(value.users) != 1 or not isinstance(tensor, torch.Tensor):
            continue
        if value not in found:  # a gradient output twice (tied weights) is synced once
            found.append(value)
    return found


def bucket_gradient_sync(gm: GraphModule, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> GraphModule:
    graph = gm.graph
    groups: dict[tuple, list[Node]] = {}
    for node in _gradient_all_reduces(graph):
        _comm, _tensor = node.args[:2]
        axis = node.args[2] if len(node.args) > 2 else node.kwargs["axis"]
        op = node.args[3] if len(node.args) > 3 else node.kwargs["op"]
        value = node.meta["val"]
        groups.setdefault((axis, op, value.dtype, value.device.type), []).append(node)
    output = next(n for n in graph.nodes if n.op == "output")
    for (axis, op, _dtype, _device), members in groups.items():
        buckets, current, size = [], [], 0
        for node in members:
            local = float(node.meta["collective"]["bytes"])
            if current and size + local > bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(node)
            size += local
        buckets.append(current)
        for bucket in buckets:
            if len(bucket) < 2:
                continue
            comm = bucket[0].args[0]
            sources = [node.args[1] for node in bucket]
            with graph.inserting_before(output):
                flat = graph.call_function(flatten, (sources,))
                reduced = graph.call_function(collectives.all_reduce, (comm, flat, axis, op))
                pieces = graph.call_function(unflatten, (reduced, sources))
            first = bucket[0].meta["collective"]
            reduced.meta.update(view=bucket[0].meta.get("view"), sharding=None, collective={
                **first,
                "bytes": sum(float(node.meta["collective"]["bytes"]) for node in bucket),
                "of": ", ".join(str(node.meta["collective"].get("of")) for node in bucket[:3])
                + (f" and {len(bucket) - 3} more" if len(bucket) > 3 else ""),
                "purpose": f"gradient sync bucket (grad) of {len(bucket)} gradients",
                "members": [node.meta["collective"].get("of") for node in bucket],
            })
            reduced.meta["placement_reason"] = (f"all_reduce over {axis} of {len(bucket)} gradients in one "
                                                f"buffer: one collective's latency instead of {len(bucket)}")
            for index, node in enumerate(bucket):
                with graph.inserting_before(output):
                    piece = graph.call_function(operator.getitem, (pieces, index))
                piece.meta.update(val=node.meta["val"], sharding=node.meta.get("sharding"),
                                  view=node.meta.get("view"))
                node.replace_all_uses_with(piece)
                graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
