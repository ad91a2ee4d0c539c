"""Small walks over fx graphs that every pass needs, built on ``torch.fx.node.map_arg``.

A node's *tensor inputs* are the graph nodes among its arguments whose recorded value is a
tensor, in argument order (``map_arg`` order: positional arguments, then keyword arguments,
nested lists and tuples flattened). Rules, placements (``PlacedValue.input_shardings``) and the
lowering all count inputs this way, so a producer used twice (``mul(x, x)``) has two positions.
"""

from __future__ import annotations

import copy
import itertools
import operator
from typing import Callable, Iterable

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx._lazy_graph_module import _make_graph_module, _use_lazy_graph_module
from torch.fx.node import map_arg

from . import meta

__all__ = ["ancestors", "descendants", "tensor_inputs", "map_tensor_inputs", "op_name", "output_node", "output_values", "is_getitem",
           "call_nodes", "append_copy", "copy_graph", "copy_graph_module", "inline_aten_form"]


def _is_tensor_node(node: Node) -> bool:
    return meta.tensor_value(node) is not None


def tensor_inputs(node: Node) -> list[Node]:
    """The node's tensor-valued inputs, in argument order (lists flattened)."""
    found: list[Node] = []

    def visit(item: Node) -> Node:
        if _is_tensor_node(item):
            found.append(item)
        return item

    map_arg((node.args, node.kwargs), visit)
    return found


def map_tensor_inputs(node: Node, replace: Callable[[int, Node], Node]) -> None:
    """Rewrite ``node``'s tensor inputs in place: ``replace(position, producer) -> Node``.

    Positions count as ``tensor_inputs`` lists them, so the two uses in ``mul(x, x)`` can get
    different replacements.
    """
    position = itertools.count()

    def visit(item: Node) -> Node:
        return replace(next(position), item) if _is_tensor_node(item) else item

    node.args = map_arg(node.args, visit)
    node.kwargs = map_arg(node.kwargs, visit)


def op_name(target) -> str:
    """``mm.default`` for aten overloads, ``shardgraph.moe_experts.default``, a function's name."""
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload):
        return str(target).removeprefix("aten.")
    return getattr(target, "__name__", str(target))


def is_getitem(node: Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def output_node(graph: Graph) -> Node:
    return next(node for node in reversed(graph.nodes) if node.op == "output")


def output_values(graph: Graph) -> list:
    """The program's outputs, flat (one per loss / gradient / forward output)."""
    outputs = output_node(graph).args[0]
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def set_output_values(graph: Graph, values: list) -> None:
    node = output_node(graph)
    node.args = (type(node.args[0])(values) if isinstance(node.args[0], (tuple, list)) else values[0],)


def append_copy(graph: Graph, node: Node, args: tuple, kwargs: dict) -> Node:
    """``graph.node_copy(node)`` reading ``args`` and ``kwargs`` (nodes of ``graph``): a node with
    ``node``'s op, target, name (made unique by ``graph``'s namespace) and type, and a shallow
    copy of its records, appended at ``graph``'s insert point.

    The node is created with no arguments and given them after: ``create_node`` walks every
    argument of a node it is handed (a pytree walk, half the time of a copy) only to warn of a raw
    symbolic size, which it did already when ``node`` itself was created.
    """
    copied = graph.create_node(node.op, node.target, (), None, node.name, node.type)
    if args:
        copied.args = args
    if kwargs:
        copied.kwargs = kwargs
    meta.copy_node_records(node, copied)
    return copied


def copy_graph(graph: Graph) -> Graph:
    """``copy.deepcopy(graph)``: every node copied in order (``append_copy``), same names, the
    records shallow-copied, the code generator copied."""
    copied = Graph(tracer_cls=graph._tracer_cls, tracer_extras=graph._tracer_extras)
    found: dict[Node, Node] = {}
    lookup = found.__getitem__
    for node in graph.nodes:
        found[node] = append_copy(copied, node, map_arg(node.args, lookup), map_arg(node.kwargs, lookup))
    copied._codegen = copy.deepcopy(graph._codegen)
    return copied


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A copy whose graph (nodes and their records) can be rewritten without touching ``gm``.

    The copy writes its Python code when first run or read: passes copy a graph to rewrite it,
    and code written for the copy's first state (a second per 10,000 nodes) would be thrown away.
    """
    with _use_lazy_graph_module(True):
        copied = _make_graph_module(gm, copy_graph(gm.graph))
    meta.copy_module_records(gm, copied)
    return copied


def call_nodes(graph: Graph) -> list[Node]:
    return [node for node in graph.nodes if node.op == "call_function"]


def ancestors(starts: Iterable[Node], stop: Callable[[Node], bool] = lambda node: False) -> set[Node]:
    """``starts`` and every node they are computed from, not walking past a node where ``stop``
    holds (that node is included)."""
    found: set[Node] = set()
    pending = list(starts)
    while pending:
        node = pending.pop()
        if node in found:
            continue
        found.add(node)
        if not stop(node):
            pending.extend(node.all_input_nodes)
    return found


def descendants(starts: Iterable[Node]) -> set[Node]:
    """``starts`` and every node computed from them."""
    found: set[Node] = set()
    pending = list(starts)
    while pending:
        node = pending.pop()
        if node not in found:
            found.add(node)
            pending.extend(node.users)
    return found



def inline_aten_form(graph: Graph, node: Node, form: Callable) -> None:
    """Replace ``node`` (a call) by the aten ops ``form`` runs on the node's arguments.

    ``form`` takes the node's arguments (tensors where the node reads graph values, the rest as
    they are) and returns what the node returns. It is traced with ``make_fx`` on the recorded
    fake values, and its ops are written into ``graph`` just before ``node``, each with its own
    recorded value and ``node``'s source location and phase. A node returning a tuple is read
    through ``getitem`` nodes: each is replaced by the matching output (and keeps the gradient
    mark it had). ``node`` and those ``getitem`` nodes are erased."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    inputs = tensor_inputs(node)
    values = [meta.value(n) for n in inputs]
    position = {n: i for i, n in enumerate(inputs)}

    def call(*tensors):
        return form(*map_arg(node.args, lambda n: tensors[position[n]]),
                    **map_arg(node.kwargs, lambda n: tensors[position[n]]))

    fake_mode = next((v.fake_mode for v in values if hasattr(v, "fake_mode")), None) or FakeTensorMode()
    with fake_mode:
        traced = make_fx(call, tracing_mode="fake")(*values)
    env: dict[Node, Node] = {}
    placeholders = iter(inputs)
    with graph.inserting_before(node):
        for inner in traced.graph.nodes:
            if inner.op == "placeholder":
                env[inner] = next(placeholders)
            elif inner.op == "output":
                results = map_arg(inner.args[0], env.__getitem__)
            else:
                copied = graph.node_copy(inner, env.__getitem__)
                meta.copy_source_location(node, copied)
                meta.set_value(copied, meta.value(inner))
                env[inner] = copied
    if isinstance(results, (tuple, list)):
        for user in list(node.users):
            if not is_getitem(user):
                raise ValueError(f"inline_aten_form: {user.name} reads {node.name}'s tuple other than by getitem")
            replacement = results[user.args[1]]
            parameter = meta.gradient_of(user)
            user.replace_all_uses_with(replacement)
            if parameter is not None:
                meta.set_gradient_of(replacement, parameter)
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(results)
    graph.erase_node(node)
