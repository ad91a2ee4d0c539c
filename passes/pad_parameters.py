"""Parameters whose data-parallel split divides none of their dims: held padded with zeros, so
that one graph gives every rank a piece of the same shape.

With ``zero=1`` a parameter's optimizer state, and with ``zero=3`` the parameter itself, is split
over ``dp`` (dense) or ``edp`` (experts) on a dim no other axis splits
(``optimizer_state_sharding``). Where that axis divides none of those dims (a vocabulary of
151936 rows over dp=3), the first of them is held padded to a multiple of the axis size, with
zeros at its end, and split like the others. Every value that holds the padding is a value of
the graph with the padded shape, and where the padding comes and goes is a node:

Reads
    a traced joint graph after ``gather_parameters``: the parameter and optimizer-state
    placeholders (``meta.GraphInput``), the gradient nodes (``meta.gradient_of``) of a training
    step or the ``grad`` outputs of a gradient program, the ``gather_parameter`` nodes, the
    ``Phase`` of every op and the output roles; the mesh, the plan and the zero level.
Writes
    for every padded parameter (a ``placement.Padding``: the dim, its size and padded size):

    * its optimizer-state placeholders hold the padded shape (their fake value, and a
      ``meta.Padding`` record naming the padding);
    * its gradient is padded by a ``constant_pad_nd`` node right after it, which carries the
      gradient mark from then on and which every reader of the gradient reads (the norm, the
      clip, the update; in a gradient program, the ``grad`` output), so the gradient is
      reduce-scattered padded;
    * ``zero=1``: the update reads the parameter through a ``constant_pad_nd``, and the new
      parameter leaves the program through a ``slice`` back to the logical shape, after it is
      all-gathered whole over the axis;
    * ``zero=3``: the parameter placeholder holds the padded shape (with a ``meta.Padding``
      record); each ``gather_parameter`` gathers the padded value (a narrowing cast before it
      casts the padded value) and a ``slice`` right after it, marked with the padding it drops,
      gives its readers the logical shape. The update reads and writes the padded value as held.

    The fake value of every node whose inputs changed shape is computed again.
Assumes
    propagation decides the same (``_seed`` calls ``optimizer_state_sharding`` with the logical
    shapes and checks every placeholder's ``meta.Padding`` against it); the optimizer maps
    zeros to zeros (SGD, and AdamW with ``eps > 0``; ``compile`` refuses ``eps=0`` with padding).

Why the update is exact: the padded gradient, parameter and state are zero in the padding, and
every update (weight decay, AdamW's moments and ``exp_avg / (sqrt(exp_avg_sq) + eps)``, SGD's
momentum, the clip's product) maps zeros to zeros, so the padding never holds anything else and
the logical elements see exactly the arithmetic of the unpadded model. The global gradient norm
reads the padded gradients: each is a sum of squares, to which the zeros add exactly nothing.
"""

from __future__ import annotations

import contextlib

import torch
from torch.fx import GraphModule, Node

from shardgraph import meta
from shardgraph.fx_graph import output_node, output_values, set_output_values
from shardgraph.mesh import MeshSpec
from shardgraph.meta import InputKind, Phase
from shardgraph.placement import Padding

from .gather_parameters import _CASTS, _gradient_cone, is_parameter_gather
from .optimizer_sharding import optimizer_state_sharding
from .plan import parameter_placements

__all__ = ["PaddingError", "pad_parameters", "padded_parameters"]

aten = torch.ops.aten


class PaddingError(ValueError):
    """A parameter whose padding cannot be made exact."""


def padded_parameters(gm: GraphModule, mesh: MeshSpec, plan, zero: int) -> dict[str, Padding]:
    """``{parameter: its padding}`` for every parameter (``zero=3``) or parameter with optimizer
    state (``zero=1``) whose split over the data-parallel axis needs one."""
    if zero == 0:
        return {}
    graph = gm.graph
    with_state = {record.parameter for _, record in meta.graph_inputs(graph, InputKind.OPTIMIZER_STATE)}
    placements = parameter_placements(gm, mesh, plan)
    found = {}
    for node, record in meta.graph_inputs(graph, InputKind.PARAMETER):
        if zero != 3 and record.name not in with_state or meta.padding(node) is not None:
            continue
        placement = placements[record.name]
        _, _, padding = optimizer_state_sharding(record.name, tuple(meta.value(node).shape), placement.sharding,
                                                 placement.view, mesh, zero)
        if padding is not None:
            found[record.name] = padding
    return found


def pad_parameters(gm: GraphModule, mesh: MeshSpec, plan=None, zero: int = 0) -> GraphModule:
    paddings = padded_parameters(gm, mesh, plan, zero)
    if not paddings:
        return gm
    graph = gm.graph
    cone = _gradient_cone(gm)
    order = {node: index for index, node in enumerate(graph.nodes)}
    parameters = {record.name: node for node, record in meta.graph_inputs(graph, InputKind.PARAMETER)}
    states: dict[str, list[Node]] = {}
    for node, record in meta.graph_inputs(graph, InputKind.OPTIMIZER_STATE):
        states.setdefault(record.parameter, []).append(node)
    # Nodes this pass inserted, each with the signature of the value it stands in for (the
    # readers it took over read that value before): where the new value differs, so do theirs.
    inserted: dict[Node, tuple] = {}
    changed: set[Node] = set()

    def insert(before: Node, target, args, stands_for: Node, padding: Padding) -> Node:
        with graph.inserting_before(before):
            node = graph.call_function(target, args)
        meta.copy_source_location(stands_for if stands_for.op != "placeholder" else before, node)
        meta.set_padding(node, padding)
        inserted[node] = _signature(meta.value(stands_for))
        return node

    for name, padding in paddings.items():
        parameter = parameters[name]
        for placeholder in states.get(name, []):
            _hold_padded(placeholder, padding)
            changed.add(placeholder)
        for gradient in [node for node in graph.nodes if meta.gradient_of(node) == name]:
            padded = insert(gradient.next, aten.constant_pad_nd.default,
                            (gradient, padding.pad_argument(meta.value(gradient).dim()), 0.0), gradient, padding)
            gradient.replace_all_uses_with(padded, delete_user_cb=lambda user: user is not padded)
            meta.clear_gradient_of(gradient)
            meta.set_gradient_of(padded, name)
        if zero == 3:
            _hold_padded(parameter, padding)
            changed.add(parameter)
            for gather in _gathers_of(graph, parameter):
                sliced = insert(gather.next, aten.slice.Tensor, (gather, padding.dim, 0, padding.size), gather,
                                padding)
                gather.replace_all_uses_with(sliced, delete_user_cb=lambda user: user is not sliced)
            _refuse_ungathered_readers(name, parameter, cone)
            continue
        # zero=1: the update (an op neither of the forward nor of any gradient's computation)
        # reads the parameter padded, on the pieces of its state.
        readers = [user for user in parameter.users
                   if user.op == "call_function" and meta.phase(user) is not Phase.FORWARD and user not in cone]
        if readers:
            first = min(readers, key=order.__getitem__)
            padded = insert(first, aten.constant_pad_nd.default,
                            (parameter, padding.pad_argument(meta.value(parameter).dim()), 0.0), parameter, padding)
            for reader in readers:
                reader.replace_input_with(parameter, padded)
    _pad_outputs(gm, paddings, zero, insert)
    _recompute_values(graph, inserted, changed)
    gm.recompile()
    return gm


def _pad_outputs(gm: GraphModule, paddings: dict[str, Padding], zero: int, insert) -> None:
    """A gradient program's gradients leave padded (as the parameter is held, zero=3); a zero=1
    step's new parameters leave unpadded (as the parameter is held there)."""
    graph = gm.graph
    out = output_node(graph)
    values = output_values(graph)
    replaced = list(values)
    for index, (found, role) in enumerate(zip(values, meta.output_roles(gm))):
        padding = paddings.get(role.parameter)
        if padding is None or not isinstance(found, Node):
            continue
        if role.kind == "grad" and meta.padding(found) != padding:
            replaced[index] = insert(out, aten.constant_pad_nd.default,
                                     (found, padding.pad_argument(meta.value(found).dim()), 0.0), found, padding)
        elif role.kind == "param" and zero != 3:
            replaced[index] = insert(out, aten.slice.Tensor, (found, padding.dim, 0, padding.size), found, padding)
    if replaced != values:
        set_output_values(graph, replaced)


def _hold_padded(placeholder: Node, padding: Padding) -> None:
    found = meta.value(placeholder)
    with _fake_mode_of([found]):
        meta.set_value(placeholder, aten.constant_pad_nd.default(found, padding.pad_argument(found.dim()), 0.0))
    meta.set_padding(placeholder, padding)


def _gathers_of(graph, parameter: Node) -> list[Node]:
    """The ``gather_parameter`` nodes that gather ``parameter`` (directly or cast)."""
    found = []
    for node in graph.nodes:
        if not is_parameter_gather(node):
            continue
        source = node.args[0]
        while source.op == "call_function" and source.target in _CASTS:
            source = source.args[0]
        if source is parameter:
            found.append(node)
    return found


def _refuse_ungathered_readers(name: str, parameter: Node, cone: set[Node]) -> None:
    """With zero=3 every forward and backward reader reads the parameter through a gather (and a
    cast before it): any other would read the padded value as if it were the logical one."""
    pending = list(parameter.users)
    while pending:
        user = pending.pop()
        if user.op != "call_function" or is_parameter_gather(user):
            continue
        if user.target in _CASTS:
            pending.extend(user.users)
            continue
        if meta.phase(user) is Phase.FORWARD or user in cone:
            raise PaddingError(f"parameter {name!r} is held padded (zero=3) but {user.name} "
                               f"({user.target}) at {meta.source_line(user)} reads it without a gather_parameter; "
                               f"padding it would change what that op computes")


def _signature(found) -> tuple:
    if isinstance(found, torch.Tensor):
        return ("tensor", tuple(found.shape), found.dtype)
    if isinstance(found, (tuple, list)):
        return tuple(_signature(item) for item in found)
    return ("other", type(found).__name__)


def _fake_mode_of(values):
    mode = next((v.fake_mode for v in torch.utils._pytree.tree_leaves(values) if hasattr(v, "fake_mode")), None)
    return mode if mode is not None else contextlib.nullcontext()


def _recompute_values(graph, inserted: dict[Node, tuple], changed: set[Node]) -> None:
    """Compute again, on the fake values, every inserted node and every node that reads a value
    whose shape changed; a node whose value keeps its shape stops the change there."""
    for node in graph.nodes:
        if node.op != "call_function" or (node not in inserted and not any(n in changed for n in node.all_input_nodes)):
            continue
        before = inserted.get(node, _signature(meta.value(node)) if meta.has_value(node) else None)
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), meta.value)
        try:
            with _fake_mode_of((args, kwargs)):
                found = node.target(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - named and re-raised with the node
            raise PaddingError(f"{node.name} ({node.target}) at {meta.source_line(node)} cannot read the padded "
                               f"values it is given: {type(error).__name__}: {error}") from error
        meta.set_value(node, found)
        if _signature(found) != before:
            changed.add(node)
