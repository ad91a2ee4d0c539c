"""Rewrite shape arguments from global to local sizes.

Reads
    a placed graph (a ``meta.PlacedValue`` and the global fake value on every node).
Writes
    for ops that carry sizes in their arguments (``view``, ``reshape``, ``expand``, ``slice_backward``,
    ``select_backward``, ``unfold_backward``, factories), the sizes of this rank's piece, and a sharded ``view`` becomes a
    ``reshape`` (a piece may be strided where the whole was not); for ``slice`` and ``split`` on
    an interleaved dim, the stripe boundaries divided by the axis size. ``gather_parameter``
    nodes (zero=3) are removed: lower_redistribute put their all-gather on their input.
Assumes
    the rules only placed a value sharded where its op's local form is exact (the rule registry's
    contract), so rewriting sizes is all that is left to make the op local.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from shardgraph import meta
from shardgraph.mesh import MeshSpec
from shardgraph.placement import InterleavedShard, local_shape

from .gather_parameters import is_parameter_gather

__all__ = ["lower_localize"]

aten = torch.ops.aten

# op -> index of the argument that holds the output shape
_SHAPE_ARGUMENT = {
    aten.view.default: 1,
    aten._unsafe_view.default: 1,
    aten.reshape.default: 1,
    aten.view_copy.default: 1,
    aten.expand.default: 1,
    aten.slice_backward.default: 1,
    aten.select_backward.default: 1,
    aten.unfold_backward.default: 1,
    aten.ones.default: 0,
    aten.zeros.default: 0,
    aten.full.default: 0,
    aten.empty.memory_format: 0,
    aten.new_zeros.default: 1,
    aten.new_ones.default: 1,
    aten.new_full.default: 1,
    aten.new_empty.default: 1,
    # LayerNorm's decomposition broadcasts its statistics and affine parameters with it.
    torch.ops.prims.broadcast_in_dim.default: 1,
}


_VIEWS = (aten.view.default, aten._unsafe_view.default)


def _local(node, mesh):
    sharding = meta.sharding(node)
    if sharding is None or sharding.is_replicated():
        return None
    return [int(s) for s in local_shape(tuple(meta.value(node).shape), sharding, mesh, name=node.name)]


def _interleaved_divisor(node, dim, mesh) -> int:
    """How many ways ``dim`` of ``node``'s input is split by interleaved placements."""
    source = node.args[0]
    sharding = meta.sharding(source)
    divisor = 1
    if sharding is None:
        return 1
    ndim = meta.value(source).dim()
    for axis, placement in sharding.items():
        if isinstance(placement, InterleavedShard) and placement.dim % ndim == dim % ndim:
            divisor *= mesh.size(axis)
    return divisor


def lower_localize(gm: GraphModule, mesh: MeshSpec) -> GraphModule:
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        if is_parameter_gather(node):
            # Its all-gather is on its input now (lower_redistribute): the node itself is the identity.
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            continue
        if target in _SHAPE_ARGUMENT:
            local = _local(node, mesh)
            if local is None:
                continue
            index = _SHAPE_ARGUMENT[target]
            args = list(node.args)
            if target == aten.expand.default:
                local = [-1 if s == -1 else l for s, l in zip(args[1], local)] if len(args[1]) == len(local) else local
            args[index] = local
            node.args = tuple(args)
            if target in _VIEWS:
                # A piece need not be laid out as the whole was (a slice of a transposed value
                # is strided where the whole was contiguous): reshape is the same view where one
                # exists and a copy of the same elements where it does not.
                node.target = aten.reshape.default
        elif target == aten.slice.Tensor:
            dim = node.args[1] if len(node.args) > 1 else 0
            divisor = _interleaved_divisor(node, dim, mesh)
            if divisor > 1:
                args = list(node.args)
                size = meta.value(node.args[0]).shape[dim]
                start = args[2] if len(args) > 2 and args[2] is not None else 0
                end = args[3] if len(args) > 3 and args[3] is not None else size
                args[2], args[3] = start // divisor, min(end, size) // divisor
                node.args = tuple(args)
        elif target in (aten.split.Tensor, aten.split_with_sizes.default):
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            divisor = _interleaved_divisor(node, dim, mesh)
            if divisor > 1:
                args = list(node.args)
                sizes = args[1]
                args[1] = [s // divisor for s in sizes] if isinstance(sizes, (list, tuple)) else sizes // divisor
                node.args = tuple(args)
    gm.recompile()
    return gm
