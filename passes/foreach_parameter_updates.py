"""Run a training step's per-parameter tail as foreach ops: the plain SGD updates and the
gradient norm's per-parameter norms, each a handful of aten ops per parameter, become one or a
few multi-tensor ops for all of them.

Reads
    a lowered training-step graph in execution order (``graph -> graph`` on a copy the caller
    owns), holding, as the optimizer's trace and ``donate_state`` leave them:

        n = pow(sum(pow(g32, 2)), 0.5)      # a parameter gradient's 2-norm (``vector_norm``), with
                                            # g32 = _to_copy(g, dtype=float32) for a 16-bit g
        n16 = _to_copy(n, dtype=g.dtype)    # and cast back for a 16-bit g (optional)

        lr_w = _to_copy(lr, dtype=W.dtype)  # the learning rate in the weight's dtype
        new = sub(W, mul(grad, lr_w))       # plain SGD: no momentum, no weight decay
        copy_(W, new)                       # the donated weight written in place

    each intermediate read by the next op alone.
Writes
    for each run of such chains that follow one another in the graph with nothing else between
    them: ``aten._foreach_norm(grads, 2[, dtype=float32])`` in the run's last place, its items
    in place of the norms; and per bucket of at most ``BUCKET_BYTES`` of gradients
    ``aten._foreach_sub_(weights, aten._foreach_mul(grads, lr_w))``, the weights' outputs the
    weights themselves (written in place, as ``copy_`` returned them).
Assumes
    the foreach ops compute what the per-tensor ops do: the product and the difference each
    rounded once to the weight's dtype (bit for bit the same weights), each norm accumulated in
    float32 and rounded to its dtype (the same value up to the order of the sum, as
    ``torch.nn.utils.clip_grad_norm_`` takes it with ``_foreach_norm``). Nothing else changes:
    a chain that is not exactly one of these, or whose result is read inside its run, stays.

Why: on four layers of Qwen3-30B-A3B the step's dense parameters take about 40 such chains,
9 aten ops each: some 350 of the step's 930 calls, each a kernel launch the host issues one by
one and a pass over the gradient (a float32 copy, its square, the sum, and the product, the
difference and the copy of the update). A foreach op launches a few kernels for all of them.
The buckets bound what the products hold at once (torch.optim's foreach SGD holds them all).
Run by the plain step (``ShardedProgram._plain_graph``); inductor fuses the same ops itself.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from shardgraph import meta

__all__ = ["foreach_parameter_updates", "BUCKET_BYTES"]

aten = torch.ops.aten
BUCKET_BYTES = 64 * 2**20
_HALF = (torch.float16, torch.bfloat16)


@dataclass(eq=False)
class _Chain:
    key: tuple                # ("norm" or "update", ...): chains of one key share one foreach op
    source: Node              # the gradient
    nodes: list[Node]         # the chain's own ops, in graph order
    result: Node              # what the rest of the graph reads
    weight: Node | None = None
    scale: Node | None = None
    bytes: int = 0


def _only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is(node, target) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target == target


def _cast(node: Node, dtype: torch.dtype) -> bool:
    return (_is(node, aten._to_copy.default) and len(node.args) == 1 and set(node.kwargs) == {"dtype"}
            and node.kwargs["dtype"] == dtype)


def _dtype(node: Node) -> torch.dtype | None:
    found = meta.tensor_value(node)
    return None if found is None else found.dtype


def _norm_chain(square: Node) -> _Chain | None:
    """The chain around ``pow(x, 2)``, or None where it is not a gradient's 2-norm."""
    if not (_is(square, aten.pow.Tensor_Scalar) and square.args[1] == 2 and not square.kwargs):
        return None
    start = square.args[0]
    cast_in = _cast(start, torch.float32) and _dtype(start.args[0]) in _HALF and _only_user(start) is square
    if cast_in:
        source, nodes = start.args[0], [start, square]
    elif _dtype(start) == torch.float32:
        source, nodes = start, [square]
    else:
        return None
    total = _only_user(square)
    if not (_is(total, aten.sum.dim_IntList) and total.args[1:] in ((None,), ([],)) and not total.kwargs):
        return None
    root = _only_user(total)
    if not (_is(root, aten.pow.Tensor_Scalar) and root.args[1] == 0.5 and not root.kwargs):
        return None
    nodes += [total, root]
    result, dtype = root, torch.float32
    back = _only_user(root)
    if cast_in and back is not None and _cast(back, _dtype(source)):
        nodes.append(back)
        result, dtype = back, _dtype(source)
    # _foreach_norm returns its input's dtype unless told one: a 16-bit gradient's float32 norm
    # asks for float32.
    key = ("norm", dtype, _dtype(source))
    return _Chain(key, source, nodes, result)


def _update_chain(write: Node) -> _Chain | None:
    """The chain ending in ``copy_(W, sub(W, mul(grad, lr_w)))``, or None."""
    if not (_is(write, aten.copy_.default) and len(write.args) == 2 and not write.kwargs):
        return None
    weight, new = write.args
    if not (isinstance(weight, Node) and weight.op == "placeholder" and _only_user(new) is write):
        return None
    if not (_is(new, aten.sub.Tensor) and len(new.args) == 2 and not new.kwargs and new.args[0] is weight):
        return None
    product = new.args[1]
    if not (_is(product, aten.mul.Tensor) and len(product.args) == 2 and not product.kwargs
            and _only_user(product) is new):
        return None
    grad, scale = product.args
    value = meta.tensor_value(grad) if isinstance(grad, Node) else None
    scale_value = meta.tensor_value(scale) if isinstance(scale, Node) else None
    dtype = _dtype(weight)
    if not (value is not None and scale_value is not None and scale_value.dim() == 0
            and value.dtype == dtype and _cast(scale, dtype)):
        return None
    nodes = [product, new, write]
    if _only_user(scale) is product:
        nodes.insert(0, scale)
    # One lr_w per key: the casts of one learning rate to one dtype are the same value.
    key = ("update", dtype, scale.args[0])
    return _Chain(key, grad, nodes, write, weight, scale, value.numel() * value.element_size())


def _chains(graph) -> dict[Node, _Chain]:
    """Every chain, by each of its nodes."""
    by_node: dict[Node, _Chain] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node in by_node:
            continue
        chain = _norm_chain(node) or _update_chain(node)
        if chain is not None:
            for member in chain.nodes:
                by_node[member] = chain
    return by_node


def _runs(graph, by_node: dict[Node, _Chain]) -> list[list[Node]]:
    """Maximal stretches of the graph made of chain nodes alone."""
    runs, current = [], []
    for node in graph.nodes:
        if node in by_node:
            current.append(node)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _buckets(chains: list[_Chain]) -> list[list[_Chain]]:
    buckets, current, held = [], [], 0
    for chain in chains:
        if current and held + chain.bytes > BUCKET_BYTES:
            buckets.append(current)
            current, held = [], 0
        current.append(chain)
        held += chain.bytes
    return buckets + [current] if current else buckets


def _replace_norms(graph, chains: list[_Chain], dtype: torch.dtype, source_dtype) -> None:
    kwargs = {"dtype": torch.float32} if dtype != source_dtype else {}
    norms = graph.call_function(aten._foreach_norm.Scalar, ([c.source for c in chains], 2), kwargs)
    for index, chain in enumerate(chains):
        item = graph.call_function(operator.getitem, (norms, index))
        meta.set_value(item, meta.value(chain.result))
        chain.result.replace_all_uses_with(item)


def _replace_updates(graph, chains: list[_Chain]) -> None:
    for bucket in _buckets(chains):
        products = graph.call_function(aten._foreach_mul.Tensor, ([c.source for c in bucket], bucket[0].scale))
        graph.call_function(aten._foreach_sub_.List, ([c.weight for c in bucket], products))
        for chain in bucket:
            # copy_ returned the weight it wrote: the weight is the new value.
            chain.result.replace_all_uses_with(chain.weight)


def foreach_parameter_updates(gm: GraphModule) -> GraphModule:
    """``gm`` with each run of per-parameter norm and SGD update chains as foreach ops (see the
    module's docstring); ``gm`` unchanged where there is no run of two or more."""
    graph = gm.graph
    by_node = _chains(graph)
    changed = False
    for run in _runs(graph, by_node):
        inside = set(run)
        groups: dict[tuple, list[_Chain]] = {}
        for chain in dict.fromkeys(by_node[node] for node in run):
            # Whole in the run, and nothing in the run reads its result: the foreach op comes last.
            if set(chain.nodes) <= inside and not set(chain.result.users) & inside:
                groups.setdefault(chain.key, []).append(chain)
        groups = {key: chains for key, chains in groups.items() if len(chains) > 1}
        if not groups:
            continue
        # Before the node after the run: what is inserted keeps its order.
        with graph.inserting_before(run[-1].next):
            for key, chains in groups.items():
                if key[0] == "norm":
                    _replace_norms(graph, chains, key[1], key[2])
                else:
                    # The first chain's cast of the learning rate serves the group; the others' go.
                    if chains[0].scale in chains[0].nodes:
                        chains[0].nodes.remove(chains[0].scale)
                    _replace_updates(graph, chains)
        for chains in groups.values():
            for chain in chains:
                for node in reversed(chain.nodes):
                    if not node.users:
                        graph.erase_node(node)
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return gm
