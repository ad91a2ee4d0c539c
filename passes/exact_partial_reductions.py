"""Partial products on the way into a routing decision: formed in float32, reduced, rounded once.

Reads
    a graph after ``lower_redistribute`` (collectives typed with ``meta.Collective``, placements
    on every node) that still holds its MoE ops, so ``routing_path`` can find the router.
Writes
    for every reduction (``all_reduce`` / ``reduce_scatter``, not a gradient's) whose input is a
    low-precision (bf16, fp16) matrix product on the routing path: the product computed from its
    operands cast to float32, the reduction in float32 (its ``Collective`` bytes rescaled), and
    one cast back to the product's dtype after it. Reductions in a row over several axes stay in
    float32 until the last. The low-precision product is removed where nothing else reads it.
Assumes
    propagation kept every op on the routing path from reading a ``Partial`` input
    (``propagate``'s routing constraint), so a partial value on the path is reduced right where
    its product made it: no rounding, addition or cast sits between the two.

Why: an unsharded bf16 matrix product accumulates in float32 and rounds once. A row-parallel
one rounds each rank's partial product to bf16 and sums the roundings, which differs in the
last bit for about a third of the elements; a router downstream then picks other experts for
some tokens. Products of bf16 values are exact in float32, so the float32 partial products,
summed and rounded once, equal the unsharded product up to the order of float32 additions: a
bf16 result differs only where the float32 sum lies within float32 rounding of a bf16 rounding
boundary (as often as a float32 product of the same operands differs from the bf16 one).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from shardgraph import meta
from shardgraph.meta import CollectiveKind, Purpose

from .routing_path import routing_path

__all__ = ["exact_partial_reductions"]

aten = torch.ops.aten
_CONTRACTIONS = frozenset({aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default})
_LOW_PRECISION = frozenset({torch.bfloat16, torch.float16})
_WIDE = torch.float32
_CAST = torch.ops.prims.convert_element_type.default


def _reduction(node: Node) -> bool:
    record = meta.collective(node)
    return (record is not None and record.purpose is not Purpose.GRADIENT_SYNC
            and record.kind in (CollectiveKind.ALL_REDUCE, CollectiveKind.REDUCE_SCATTER))


def _widened_value(found: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(found.shape), dtype=_WIDE, device="meta")


def _cast(graph, source: Node, dtype: torch.dtype, like: Node, placed, shape_of: torch.Tensor) -> Node:
    cast = graph.call_function(_CAST, (source, dtype))
    meta.copy_source_location(like, cast)
    if placed is not None:
        meta.set_placed(cast, placed)
    meta.set_value(cast, torch.empty(tuple(shape_of.shape), dtype=dtype, device="meta"))
    return cast


def _widened_product(graph, product: Node) -> Node:
    """``product`` recomputed from float32 copies of its tensor operands (inserted at the
    graph's current insertion point)."""
    args = []
    for argument in product.args:
        if isinstance(argument, Node) and meta.tensor_value(argument) is not None \
                and meta.tensor_value(argument).dtype in _LOW_PRECISION:
            argument = _cast(graph, argument, _WIDE, product, meta.placed(argument), meta.tensor_value(argument))
        args.append(argument)
    wide = graph.call_function(product.target, tuple(args), dict(product.kwargs))
    meta.copy_source_location(product, wide)
    meta.set_placed(wide, meta.placed(product))
    meta.set_value(wide, _widened_value(meta.tensor_value(product)))
    return wide


def _rescale(node: Node, dtype: torch.dtype) -> None:
    record = meta.collective(node)
    meta.set_collective(node, dataclasses.replace(
        record, bytes=record.bytes * _WIDE.itemsize / dtype.itemsize,
        detail=f"{record.detail}, in float32 (exact routing)"))
    if meta.tensor_value(node) is not None:
        meta.set_value(node, _widened_value(meta.tensor_value(node)))


def exact_partial_reductions(gm: GraphModule) -> GraphModule:
    graph = gm.graph
    on_path = routing_path(gm)
    widened: dict[Node, Node] = {}
    for node in list(graph.nodes):
        if not _reduction(node):
            continue
        product = node.args[1]
        if not (isinstance(product, Node) and product in on_path and product.target in _CONTRACTIONS):
            continue
        dtype = meta.tensor_value(product).dtype if meta.tensor_value(product) is not None else None
        if dtype not in _LOW_PRECISION:
            continue
        if product not in widened:
            with graph.inserting_before(node):
                widened[product] = _widened_product(graph, product)
        node.replace_input_with(product, widened[product])
        _rescale(node, dtype)
        # Further reductions of the same value over other axes stay in float32.
        last = node
        while len(last.users) == 1 and _reduction(next(iter(last.users))) \
                and next(iter(last.users)).args[1] is last:
            last = next(iter(last.users))
            _rescale(last, dtype)
        with graph.inserting_after(last):
            back = _cast(graph, last, dtype, product, meta.placed(last), meta.tensor_value(last))
        last.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
    for product in widened:
        if not product.users:
            graph.erase_node(product)
    gm.recompile()
    return gm
