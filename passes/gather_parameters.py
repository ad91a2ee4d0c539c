"""Where a parameter's readers get it from: with ZeRO-3 (FSDP) gathered over the data-parallel
axes right before the forward and again before the backward; at every level, cast again for the
backward rather than kept from the forward.

Reads
    a traced joint graph of a training step: parameter placeholders (``meta.GraphInput``), the
    ``Phase`` of every op, and the gradient nodes (``meta.gradient_of``; in a gradient program,
    which marks none, the ``grad`` outputs): what they are computed from is the backward.
Writes
    with zero=3, a ``gather_parameter`` node between each parameter and its forward readers, and (with
    ``reshard_after_forward``) a second one right before its first backward reader, whose
    readers it serves; views of the forward's gathered value that the backward reads (the
    transposed weight of a linear layer) are made again from the backward's gathered value. A
    narrowing dtype cast of a parameter (bf16 compute from fp32 master weights) is moved before
    the gather, so the wire carries the compute dtype, as FSDP's mixed precision does. The
    optimizer update (an op neither of the forward nor of any gradient's computation) reads
    the parameter as held: its own slice.
Assumes
    placement propagation places a ``gather_parameter`` node ``Replicate`` over dp and edp
    (``passes/rules/gather.py``) and the parameter placeholder split over them
    (``optimizer_state_sharding`` with ``zero=3``), so lowering inserts the all-gather on its
    input (``Purpose.PARAMETER_GATHER``) and then drops the node (``lower_localize``).

At every zero level, a narrowing cast of a parameter that the backward reads is made again right
before the backward's first reader (and views of it the backward reads, from the copy): with bf16
compute, a bf16 copy of every weight would otherwise live from its forward to its backward, which
for an MoE model is most of the expert weights' bytes again as activations. Casting again costs
one read of the fp32 weight.

Why a second gather for the backward: a gathered weight kept from the forward to the backward
is a whole layer's parameters alive for the whole step, which is the memory ZeRO-3 exists to
save; gathering again costs one more all-gather of the parameter bytes per step (FSDP's
``reshard_after_forward=True``). ``reshard_after_forward=False`` keeps the forward's copy.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from shardgraph import meta
from shardgraph.fx_graph import ancestors, output_values
from shardgraph.meta import InputKind, Phase

__all__ = ["gather_parameter", "gather_parameters", "is_parameter_gather"]

aten = torch.ops.aten


def gather_parameter(value: torch.Tensor) -> torch.Tensor:
    """Marks where a parameter held split over the data-parallel axes is needed whole over them.
    Placement gives its input the held sharding and its output the gathered one; lowering turns
    the difference into an all-gather and removes the node, so the function itself never runs in
    a lowered program (it is the identity, for a graph run before lowering)."""
    return value


def is_parameter_gather(node: Node) -> bool:
    return node.op == "call_function" and node.target is gather_parameter


# Ops that only look at their input differently: the backward may make them again from its own
# gathered copy instead of holding the forward's.
_VIEWS = {
    aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default, aten._unsafe_view.default,
    aten.reshape.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default,
    aten.alias.default, aten.detach.default, aten.slice.Tensor, aten.select.int, aten.split.Tensor,
    aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int, operator.getitem,
}
_CASTS = {aten._to_copy.default, torch.ops.prims.convert_element_type.default}


def _narrowing_cast(node: Node) -> bool:
    if node.op != "call_function" or node.target not in _CASTS:
        return False
    before, after = meta.value(node.args[0]), meta.value(node)
    return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
            and after.dtype.is_floating_point and after.dtype.itemsize < before.dtype.itemsize
            and tuple(after.shape) == tuple(before.shape))


def _gradient_cone(gm: GraphModule) -> set[Node]:
    """Every node some gradient is computed from (the forward included): the gradients of a
    training step (``meta.gradient_of``), or a gradient program's ``grad`` outputs."""
    graph = gm.graph
    pending = [node for node in graph.nodes if meta.gradient_of(node) is not None]
    pending += [found for found, role in zip(output_values(graph), meta.output_roles(gm))
                if role.kind == "grad" and isinstance(found, Node)]
    return ancestors(pending)


def gather_parameters(gm: GraphModule, zero: int, reshard_after_forward: bool = True) -> GraphModule:
    gather = zero >= 3
    graph = gm.graph
    cone = _gradient_cone(gm)
    order = {node: index for index, node in enumerate(graph.nodes)}

    def phase_of(user: Node) -> Phase | None:
        if user.op != "call_function":
            return None
        if meta.phase(user) is Phase.FORWARD:
            return Phase.FORWARD
        return Phase.BACKWARD if user in cone else None  # None: the optimizer update

    for placeholder, record in meta.graph_inputs(graph, InputKind.PARAMETER):
        roots: list[tuple[Node, Node | None]] = []  # (value gathered, the cast it comes from)
        for user in list(placeholder.users):
            if _narrowing_cast(user) and phase_of(user) is not None:
                roots.append((user, user))
        if gather and any(phase_of(user) is not None for user in placeholder.users if (user, user) not in roots):
            roots.append((placeholder, None))
        for root, cast in roots:
            _gather_root(graph, root, cast, phase_of, order, reshard_after_forward or not gather, gather)
    gm.recompile()
    return gm


def _insert_gather(graph, source: Node, before: Node, phase: Phase) -> Node:
    with graph.inserting_before(before):
        node = graph.call_function(gather_parameter, (source,))
    # The reader's source line and module path: the gather belongs to the layer that uses it.
    meta.copy_source_info(before, node)
    meta.set_value(node, meta.value(source))
    meta.set_phase(node, phase)
    return node


def _gather_root(graph, root: Node, cast: Node | None, phase_of, order, reshard: bool, gather: bool) -> None:
    """Give the forward and the backward readers of ``root`` their own copies of it: gathered
    (``gather``, zero=3) and, for the backward, made again from the held parameter."""
    # The placeholder's readers other than its narrowing casts (each cast is a root of its own).
    users = [u for u in root.users if not (cast is None and _narrowing_cast(u) and phase_of(u) is not None)]
    forward = [u for u in users if phase_of(u) is Phase.FORWARD]
    backward = [u for u in users if phase_of(u) is Phase.BACKWARD]
    first = lambda users: min(users, key=order.__getitem__)  # noqa: E731
    held_forward = None
    if forward:
        held_forward = _insert_gather(graph, root, first(forward), Phase.FORWARD) if gather else root
        for user in forward:
            user.replace_input_with(root, held_forward)
    if not reshard and held_forward is not None:
        for user in backward:
            user.replace_input_with(root, held_forward)
        return
    # Forward views of the forward's copy that the backward reads: made again from the
    # backward's own copy.
    saved_views = _views_read_by_backward(held_forward, phase_of) if held_forward is not None else []
    readers = backward + [u for view in saved_views for u in view.users if phase_of(u) is Phase.BACKWARD]
    if not readers:
        return
    before = first(readers)
    source = root
    if cast is not None and phase_of(cast) is Phase.FORWARD:
        # The cast of the held parameter is made again: holding the forward's would keep a
        # compute-dtype copy of every parameter alive from its forward to its backward.
        with graph.inserting_before(before):
            source = graph.node_copy(cast)
        meta.set_phase(source, Phase.BACKWARD)
    held_backward = _insert_gather(graph, source, before, Phase.BACKWARD) if gather else source
    if held_backward is root:
        return
    for user in backward:
        user.replace_input_with(root, held_backward)
    copies = {held_forward: held_backward}
    with graph.inserting_before(before):
        for view in sorted(_with_view_ancestors(saved_views, held_forward), key=order.__getitem__):
            copy = graph.node_copy(view, lambda source_node: copies.get(source_node, source_node))
            meta.set_phase(copy, Phase.BACKWARD)
            copies[view] = copy
    for view in saved_views:
        for user in list(view.users):
            if phase_of(user) is Phase.BACKWARD and user not in copies.values():
                user.replace_input_with(view, copies[view])


def _views_read_by_backward(start: Node, phase_of) -> list[Node]:
    found, pending, seen = [], [start], set()
    while pending:
        node = pending.pop()
        for user in node.users:
            if user in seen or user.op != "call_function" or user.target not in _VIEWS:
                continue
            if phase_of(user) is not Phase.FORWARD or len(user.all_input_nodes) != 1:
                continue
            seen.add(user)
            pending.append(user)
            if any(phase_of(reader) is Phase.BACKWARD for reader in user.users):
                found.append(user)
    return found


def _with_view_ancestors(views: list[Node], start: Node) -> set[Node]:
    return ancestors(views, stop=lambda node: node is start) - {start}
