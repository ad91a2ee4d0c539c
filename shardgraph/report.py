"""Placement reports: where every value lives, what every collective moves, what each rank holds.

``build_report(program)`` returns a plain dict with a stable schema (``SCHEMA_VERSION``; see
docs/report.md):

``mesh``          sizes of every axis
``values``        one row per value of the placed joint graph: name, op, layer, block, phase
                  (forward / backward), global shape, dtype, view, placement per axis, local
                  shape, bytes per rank, reason
``collectives``   one row per collective of the lowered program: kind, axis, group size, bytes
                  sent per rank per step, the value it moves, what for (an op's input, the MoE
                  dispatch, or gradient synchronisation), its layer and block
``totals``        bytes per rank per step by axis; parameter, gradient, input and peak activation
                  memory per rank (activation peak from a liveness walk of the lowered program in
                  its execution order, counting local sizes); the same rows for what lies outside
                  the numbered layers
``layers``        per layer: parameter, gradient, activation and communication bytes, collectives

Where a node belongs: ``node_groups(gm)`` gives every node a layer (``layers.N`` or None) and a
block (``BLOCKS``). A node's own records say it where they can: a parameter's name, the module
path fx recorded in the forward, the expert steps of a MoE layer, and a gradient (named by the
program's output roles, or marked when a training step was traced) sits with its parameter. The
backward, the loss and the nodes lowering inserted carry no module path, so the rest is read from
the graph: a collective belongs where the value it moves does; a backward node where the forward
ops that read the same forward values do (the backward of an op reads that op's inputs and
outputs); any other node where its most recently computed input does, as a residual add belongs
to the layer it closes. Values that several blocks read (the residual stream) say nothing.

How much memory: ``memory_walk(gm, mesh, groups)`` walks the lowered program in execution order
with each value's local size and counts it from its definition to its last use. Views share
their base's storage (the base lives as long as any view of it). Activations are the
intermediate values; gradients (made and being synchronised) and the optimizer's temporaries
are held apart, and so are inputs (parameters, buffers, optimizer state, the batch) and the
program's outputs (the loss, the gradients, a training step's new state), which live to the end.
The expert steps of a MoE layer have no recorded value (their row counts depend on the routing);
their sizes are estimated for uniform routing, the assumption of their collectives' bytes too.

``format_report`` renders the text tables; ``ShardedProgram.report()`` uses both.
"""

from __future__ import annotations

import fnmatch
import math
import operator
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch.fx import GraphModule, Node

from . import meta
from .fx_graph import op_name, output_values
from .mesh import MeshSpec
from .meta import InputKind, Phase, Purpose, View
from .placement import local_shape
from .runtime import c10d

__all__ = ["SCHEMA_VERSION", "BLOCKS", "OUTSIDE_LAYERS", "NodeGroup", "node_groups", "sorted_layers", "local_pieces",
           "MemoryWalk", "memory_walk", "communication_by_layer", "build_report", "format_report", "format_summary"]

SCHEMA_VERSION = 1

# The kinds of block a node can belong to, in the order a layer runs them (inputs and the
# optimizer around them).
BLOCKS = ("inputs", "embedding", "norm", "attention", "router", "experts", "dense", "head", "gradient sync",
          "optimizer")
# The key of everything that belongs to no numbered layer (embedding, head and loss, buckets of
# several layers' gradients, the optimizer's global norm).
OUTSIDE_LAYERS = "outside layers"

GRADIENT_SYNC = "gradient sync"
OPTIMIZER = "optimizer"
INPUTS = "inputs"


def _op(node: Node) -> str:
    if node.op == "placeholder":
        record = meta.graph_input(node)
        return record.kind.value if record is not None else "placeholder"
    return op_name(node.target).removesuffix(".default")


def _phase(node: Node) -> str:
    if node.op == "placeholder":
        return "input"
    found = meta.phase(node)
    return found.value if found is not None else "forward"


def _placements(sharding, axes) -> dict[str, str]:
    if sharding is None:
        return {}
    return {axis: repr(sharding.placement(axis)) for axis in axes}


def _layer_number(layer: str) -> int:
    return int(layer.split(".")[1])


def sorted_layers(layers: Iterable[str]) -> list[str]:
    return sorted(layers, key=_layer_number)


# ---------------------------------------------------------------------------------- node groups
@dataclass(frozen=True)
class NodeGroup:
    """Where a node belongs: its layer (``layers.N``; None outside the numbered layers) and block."""

    layer: str | None
    block: str
    # It makes or synchronises a parameter's gradient: memory the report counts as gradients.
    gradient: bool = False


_CONTAINERS = {"", "<root>", "mlp", "moe", "ffn", "feed_forward", "block", "layer", "layers", "model"}


def _block_of_path(path: str) -> str | None:
    """The block a module path names; None for a container (``layers.0``, ``layers.0.mlp``) whose
    own ops (residual adds, the router's softmax) take their block from their inputs."""
    words = path.lower()
    last = words.rsplit(".", 1)[-1]
    if "norm" in last:  # before the others: ``post_attention_layernorm`` is a norm
        return "norm"
    if "shared_expert" in words:
        return "dense"  # a dense MLP every token runs, not a routed expert
    if "expert" in words:
        return "experts"
    if "attn" in words or "attention" in words:
        return "attention"
    if "router" in words or last == "gate":
        return "router"
    if "embed" in words:
        return "embedding"
    if "head" in last:
        return "head"
    if last.isdigit() or last in _CONTAINERS:
        return None
    return "dense"


def _input_group(node: Node) -> NodeGroup:
    record = meta.graph_input(node)
    if record is None or record.kind in (InputKind.COMMUNICATOR, InputKind.INPUT):
        return NodeGroup(None, INPUTS)
    if record.kind in (InputKind.OPTIMIZER_STATE, InputKind.SCALAR):
        return NodeGroup(meta.layer(node), OPTIMIZER)
    # A parameter's name is its module path and its own leaf name (``...q_proj.weight``).
    return NodeGroup(meta.layer(node), _block_of_path(record.name.rsplit(".", 1)[0]) or "dense")


def _common_layer(groups: Iterable[NodeGroup | None], skip_outside: bool = False) -> str | None:
    """The one layer all the groups share; None when they are in several or none. With
    ``skip_outside``, groups outside the layers (the learning rate, the global gradient norm)
    say nothing."""
    layers = {group.layer for group in groups if group is not None and not (skip_outside and group.layer is None)}
    return layers.pop() if len(layers) == 1 else None


def _is_gradient_sync(node: Node) -> bool:
    """A gradient's synchronisation: the collective, its wait or a layout step of it."""
    record = meta.collective_or_part(node)
    return record is not None and record.purpose is Purpose.GRADIENT_SYNC


def _forward_anchor(node: Node) -> bool:
    """A value the forward made (an activation a backward node reads) or a parameter or buffer."""
    if node.op == "placeholder":
        record = meta.graph_input(node)
        return record is not None and record.kind in (InputKind.PARAMETER, InputKind.BUFFER)
    return meta.phase(node) is Phase.FORWARD


def _bucket_piece_source(node: Node) -> Node | None:
    """For one piece of a gradient bucket's reduced buffer (``unflatten(reduced, sources)[i]``),
    the gradient it came from; None for any other node."""
    if node.target is not operator.getitem or not isinstance(node.args[0], Node):
        return None
    unflatten, index = node.args[0], node.args[1]
    if len(unflatten.args) < 2 or not isinstance(unflatten.args[0], Node) or not _is_gradient_sync(unflatten.args[0]):
        return None
    sources = unflatten.args[1]
    if not isinstance(sources, (list, tuple)) or not isinstance(index, int) or index >= len(sources):
        return None
    return sources[index]


def _is_bucket_flatten(node: Node) -> bool:
    """A gradient bucket's flatten: it takes the list of gradients and feeds only their sync."""
    listed = node.args[0] if node.args else None
    return (isinstance(listed, (list, tuple)) and bool(listed) and all(isinstance(a, Node) for a in listed)
            and bool(node.users) and all(_is_gradient_sync(u) for u in node.users))


def _bucket_members(node: Node) -> list[Node]:
    """The gradients a bucket's all-reduce reduces (read from its flatten, as the names its
    record keeps may belong to nodes a later pass replaced); [] for any other node."""
    flat = meta.collective_source(node)
    return list(flat.args[0]) if isinstance(flat, Node) and _is_bucket_flatten(flat) else []


class _Grouper:
    """Walks a graph in execution order and gives each node its ``NodeGroup``."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.groups: dict[Node, NodeGroup] = {}
        self.last_backward: NodeGroup | None = None  # the group of the latest backward node
        kinds = {record.kind for _, record in meta.graph_inputs(gm.graph)} if self.nodes else set()
        self.training_step = bool(kinds & {InputKind.OPTIMIZER_STATE, InputKind.SCALAR})

    def _moved(self, node: Node) -> Node | None:
        """The value a collective moves: the node its record names or, where a later pass
        replaced that node, its tensor input (through the layout steps of its c10d expansion).
        None for others (a collective's wait and layout steps count as the collective)."""
        record = meta.collective_or_part(node)
        if record is None:
            return None
        found = self.by_name.get(record.of)
        if found is None:
            found = meta.collective_source(node)
        return found if found in self.groups else None

    def _anchor_group(self, node: Node) -> NodeGroup | None:
        """Where the backward of an op that read forward value ``node`` belongs: with the forward
        ops that read it (a backward op needs the inputs of the forward op it differentiates).
        None when several blocks read it, as the next norm and the next residual add read the
        residual stream."""
        base = self._moved(node) or node
        if base.op == "placeholder":
            return self.groups[base]
        readers: set[NodeGroup] = set()
        pending = list(base.users)
        while pending:  # through the redistributions of the value to the ops that read them
            user = pending.pop()
            if user not in self.groups or meta.phase(user) is not Phase.FORWARD:
                continue
            if meta.collective_or_part(user) is not None:
                pending.extend(user.users)
            else:
                readers.add(self.groups[user])
        if len(readers) > 1:
            return None
        return readers.pop() if readers else self.groups[base]

    def _inherited(self, node: Node) -> NodeGroup:
        groups = self.groups
        record = meta.collective_or_part(node)
        inputs = [n for n in node.all_input_nodes if n in groups and groups[n].block != INPUTS]
        moved = self._moved(node)
        if record is not None and record.purpose is Purpose.GRADIENT_SYNC:
            members = _bucket_members(node) or [moved]
            return NodeGroup(_common_layer(groups.get(m) for m in members if m is not None), GRADIENT_SYNC, True)
        if moved is not None:
            return groups[moved]  # a redistribution sits with the value it moves
        if inputs and (_is_bucket_flatten(node)
                       or (groups[inputs[0]].block == GRADIENT_SYNC
                           and (node.target is operator.getitem or not meta.has_value(node)))):
            # A gradient bucket's flatten, its unflatten (no value of its own) and its pieces.
            return NodeGroup(_common_layer(groups[n] for n in inputs), GRADIENT_SYNC, True)
        if self.training_step and any(groups[n].block in (OPTIMIZER, GRADIENT_SYNC) or meta.gradient_of(n)
                                      for n in inputs):
            # What a training step computes from finished gradients: clipping and the update.
            return NodeGroup(_common_layer((groups[n] for n in inputs), skip_outside=True), OPTIMIZER)
        if meta.phase(node) is Phase.BACKWARD:
            anchored = [(n, self._anchor_group(n)) for n in inputs if _forward_anchor(n)]
            found = [(n, group) for n, group in anchored if group is not None]
            if found:
                return max(found, key=lambda item: self.position[item[0]])[1]
            inputs = [n for n in inputs if not _forward_anchor(n)]
            if not inputs and self.last_backward is not None:
                # It reads only the residual stream: it runs where the backward has got to.
                return self.last_backward
        if not inputs:
            return NodeGroup(None, "dense")
        # The most recently computed input; a redistribution counts where its value was made,
        # not where lowering put it (just before its reader).
        return groups[max(inputs, key=lambda n: self.position[self._moved(n) or n])]

    def _gradients(self) -> dict[Node, str]:
        """The nodes that make each parameter's gradient, and its synchronisation up to the
        program's output, by parameter name: a training step marks them when it traces; a joint
        graph names them by its output roles."""
        found = {n: meta.gradient_of(n) for n in self.nodes if meta.gradient_of(n)}
        try:
            roles = meta.output_roles(self.gm)
        except meta.MetadataError:
            roles = ()
        for value, role in zip(output_values(self.gm.graph), roles):
            node = value if role.kind == "grad" else None
            while isinstance(node, Node):
                found[node] = role.parameter
                record = meta.collective_or_part(node)
                if record is not None and record.purpose is Purpose.GRADIENT_SYNC:
                    node = meta.collective_source(node)  # through the collective to what it moves
                elif _bucket_piece_source(node) is not None:
                    node = _bucket_piece_source(node)
                else:
                    break
        return found

    def run(self) -> dict[Node, NodeGroup]:
        gradients = self._gradients()
        parameters = {record.name: node for node, record in meta.graph_inputs(self.gm.graph, InputKind.PARAMETER)}
        for node in self.nodes:
            if node.op == "placeholder":
                group = _input_group(node)
            elif gradients.get(node) in parameters:
                # A gradient sits with its parameter, its synchronisation in that layer.
                group = self.groups[parameters[gradients[node]]]
                syncs = _is_gradient_sync(node) or _bucket_piece_source(node) is not None
                group = NodeGroup(group.layer, GRADIENT_SYNC if syncs else group.block, gradient=True)
            else:
                group = self._group(node)
            self.groups[node] = group
            if meta.phase(node) is Phase.BACKWARD:
                self.last_backward = group
        self._share_expert_layers()
        return self.groups

    def _group(self, node: Node) -> NodeGroup:
        inherited = self._inherited(node)
        stack = list(meta.module_stack(node).values())
        if inherited.block in (GRADIENT_SYNC, OPTIMIZER) or (not stack and meta.moe_step(node) is None):
            return inherited
        # The forward's own module path says the layer (none for the embedding or the head).
        own_block = "experts" if meta.moe_step(node) is not None else _block_of_path(str(stack[-1][0]))
        return NodeGroup(meta.layer(node) if stack else inherited.layer, own_block or inherited.block)

    def _share_expert_layers(self) -> None:
        """Every step of one MoE layer (forward and backward) sits in that layer."""
        votes: dict[str, Counter] = defaultdict(Counter)
        for node, group in self.groups.items():
            step = meta.moe_step(node)
            if step is not None and group.layer is not None:
                votes[step.layer][group.layer] += 1
        for node in self.nodes:
            step = meta.moe_step(node)
            if step is not None and votes[step.layer]:
                self.groups[node] = replace(self.groups[node], layer=votes[step.layer].most_common(1)[0][0],
                                            block="experts")


def node_groups(gm: GraphModule) -> dict[Node, NodeGroup]:
    """Every node's layer and block (the output node excluded), read as the module docstring says."""
    return _Grouper(gm).run()


# ---------------------------------------------------------------------------------- local sizes
Piece = tuple[tuple[int, ...], torch.dtype]  # one tensor of a rank: local shape and dtype


def _piece_bytes(piece: Piece | None) -> int:
    if piece is None:
        return 0
    shape, dtype = piece
    return math.prod(shape) * dtype.itemsize


def _recorded_pieces(node: Node, mesh: MeshSpec) -> list[Piece | None]:
    found = meta.value(node)
    values = found if isinstance(found, (tuple, list)) else (found,)
    record = meta.sharding(node)
    shardings = record if isinstance(record, tuple) else (record,) * len(values)
    pieces: list[Piece | None] = []
    for item, item_sharding in zip(values, shardings):
        if not isinstance(item, torch.Tensor):
            pieces.append(None)
            continue
        shape = tuple(item.shape)
        if item_sharding is not None and item.dim():
            shape = local_shape(shape, item_sharding, mesh, name=node.name)
        pieces.append((tuple(int(s) for s in shape), item.dtype))
    return pieces


def _argument_piece(node: Node, position: int, pieces: dict[Node, list]) -> Piece | None:
    argument = node.args[position] if position < len(node.args) else None
    return pieces[argument][0] if isinstance(argument, Node) and pieces.get(argument) else None


def _first_piece(node: Node, pieces: dict[Node, list]) -> list[Piece | None]:
    for argument in node.all_input_nodes:
        found = pieces.get(argument) or []
        if found and found[0] is not None:
            return [found[0]]
    return [None]


def _rows(piece: Piece, rows: int, width: int | None = None) -> Piece:
    shape, dtype = piece
    return ((rows, *(shape[1:] if width is None else (*shape[1:-1], width))), dtype)


def _estimated_pieces(node: Node, pieces: dict[Node, list], mesh: MeshSpec) -> list[Piece | None]:
    """Local sizes of a node without a recorded value: the expert steps of a MoE layer under
    uniform routing (every rank receives as many token copies as it sends), and a gradient
    bucket's flat buffer. Any other step is taken to keep its first input's size."""
    kind = op_name(node.target).removeprefix("shardgraph.").removesuffix(".default")

    def arg(position: int) -> Piece | None:
        return _argument_piece(node, position, pieces)

    if node.target is operator.getitem:
        found = pieces.get(node.args[0]) or []
        index = node.args[1]
        return [found[index]] if isinstance(index, int) and index < len(found) else [None]
    if kind in c10d.HOST_LIST_STEPS:
        return [None]  # host lists of row counts
    if kind == "_c10d_functional.all_gather_into_tensor" and arg(0):  # every member's rows
        return [_rows(arg(0), arg(0)[0][0] * int(node.args[1]))]
    if kind == "_c10d_functional.reduce_scatter_tensor" and arg(0):  # this member's block of rows
        return [_rows(arg(0), arg(0)[0][0] // int(node.args[2]))]
    if kind == "as_matrix" and arg(0):  # copies from each ep peer for each local expert
        peers = int(node.args[1])
        return [((peers, arg(0)[0][0] // peers), arg(0)[1])]
    if kind == "sort_by_expert" and arg(0):  # (token copy order, copies per expert)
        copies = math.prod(arg(0)[0])
        return [((copies,), torch.int64), ((int(node.args[1]),), torch.int64)]
    if kind == "gather_copies" and arg(0) and arg(1):  # one row of hidden per token copy
        return [_rows(arg(0), arg(1)[0][0])]
    if kind == "group_by_local_expert" and arg(0) and arg(1):  # (rows, permutation, offsets)
        rows = arg(0)[0][0]
        return [arg(0), ((rows,), torch.int64), ((arg(1)[0][-1],), torch.int32)]
    if kind == "token_of_copies" and arg(0):
        return [arg(0)]
    if kind == "local_expert_order" and arg(0) and arg(1):  # (permutation, offsets)
        return [((arg(0)[0][0],), torch.int64), ((arg(1)[0][-1],), torch.int32)]
    if kind == "gather_glu_grouped_mm" and arg(1) and arg(2):  # (h [rows, I], gate_up [rows, 2I])
        rows, weight = arg(1)[0][0], arg(2)
        two_i = weight[0][1 if node.args[6] == "enk" else 2]
        return [((rows, two_i // 2), weight[1]), ((rows, two_i), weight[1])]
    if kind == "glu_grouped_mm_dgrad":  # the gradient of the saved gate_up
        return [arg(3)]
    if kind == "gather_grouped_mm_wgrad" and arg(0) and arg(2):  # one weight gradient per local expert
        n, k, groups = arg(2)[0][1], arg(0)[0][1], node.args[4]
        return [((groups, n, k) if node.args[5] == "enk" else (groups, k, n), arg(0)[1])]
    if kind == "glu" and arg(0):
        return [_rows(arg(0), arg(0)[0][0], arg(0)[0][-1] // 2)]
    if kind == "glu_backward":
        return [arg(1)]
    if kind == "combine_backward":  # (gradient of each copy, of each router weight)
        return [arg(1), arg(3)]
    if kind in ("grouped_mm", "grouped_mm_dgrad") and arg(0) and arg(1):
        # Weights are [experts, n, k] ("enk") or [experts, k, n]; the forward makes n columns per
        # row, the input gradient k.
        layout = node.args[3] if len(node.args) > 3 else node.kwargs.get("w_layout", "ekn")
        n_dim, k_dim = (1, 2) if layout == "enk" else (2, 1)
        width = arg(1)[0][n_dim if kind == "grouped_mm" else k_dim]
        return [_rows(arg(0), arg(0)[0][0], width)]
    if kind == "flatten" and node.args and isinstance(node.args[0], (list, tuple)):
        members = [pieces[n][0] for n in node.args[0] if isinstance(n, Node) and pieces.get(n)]
        members = [m for m in members if m is not None]
        return [((sum(math.prod(m[0]) for m in members),), members[0][1])] if members else [None]
    if kind == "unflatten" and len(node.args) > 1 and isinstance(node.args[1], (list, tuple)):
        return [pieces[n][0] if isinstance(n, Node) and pieces.get(n) else None for n in node.args[1]]
    return _first_piece(node, pieces)


def local_pieces(gm: GraphModule, mesh: MeshSpec) -> dict[Node, list[Piece | None]]:
    """One rank's pieces of every node's outputs (None for a non-tensor output), in graph order."""
    pieces: dict[Node, list[Piece | None]] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if meta.has_value(node):
            pieces[node] = _recorded_pieces(node, mesh)
        elif node.op == "call_function":
            pieces[node] = _estimated_pieces(node, pieces, mesh)
        else:
            pieces[node] = [None]
    return pieces


# ---------------------------------------------------------------------------------- liveness
@dataclass
class MemoryWalk:
    """What one rank holds while it runs the program (bytes)."""

    peak_activation_bytes: int  # most bytes of live intermediate values at once (gradients and
    # the optimizer's temporaries apart)
    peak_position: int  # the node (index in graph order) where that peak is reached
    peak_live_bytes: int  # most bytes of intermediate values, gradients and outputs at once
    gradient_bytes: int  # most bytes of gradients (made, synchronised) and optimizer temporaries at once
    output_bytes: int  # the loss and gradients (or the training step's new state)
    input_bytes: dict[str, int]  # by input kind: parameter, buffer, input, optimizer state, scalar
    activation_bytes_at_peak: dict[str | None, int]  # by layer: the share of the peak
    activation_peak_by_layer: dict[str | None, int]  # by layer: most bytes of its values live at once
    node_bytes: dict[Node, int]  # bytes each node allocates (0 for a view)


def _is_view(node: Node) -> bool:
    """A view, or an in-place op (``copy_`` writing a donated state): either returns its first
    input's memory, not memory of its own."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    returns = node.target._schema.returns
    return bool(returns) and returns[0].alias_info is not None


def _storages(nodes: list[Node], pieces) -> dict[Node, list[tuple[Node, int]]]:
    """The storages each node's outputs live in: its own, or its base's for a view or an item."""
    storages: dict[Node, list[tuple[Node, int]]] = {}
    for node in nodes:
        if node.target is operator.getitem and isinstance(node.args[1], int):
            base = storages.get(node.args[0], [])
            storages[node] = [base[node.args[1]]] if node.args[1] < len(base) else []
        elif _is_view(node) and node.all_input_nodes:
            storages[node] = storages[node.all_input_nodes[0]][:1]
        else:
            storages[node] = [(node, i) for i in range(len(pieces[node]))]
    return storages


def _input_bytes(gm: GraphModule, pieces) -> dict[str, int]:
    found: dict[str, int] = defaultdict(int)
    for node, record in meta.graph_inputs(gm.graph):
        found[record.kind.value] += sum(_piece_bytes(p) for p in pieces[node])
    return dict(found)


def memory_walk(gm: GraphModule, mesh: MeshSpec, groups: dict[Node, NodeGroup] | None = None,
                pieces: dict[Node, list[Piece | None]] | None = None) -> MemoryWalk:
    # One walk in execution order that tracks four running sums (activations, gradients, held
    # outputs, per layer) together: split, each part would re-derive the others' bookkeeping.
    groups = node_groups(gm) if groups is None else groups
    pieces = local_pieces(gm, mesh) if pieces is None else pieces
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    storages = _storages(nodes, pieces)
    last_use: dict[tuple[Node, int], int] = {}
    for index, node in enumerate(nodes):
        for source in node.all_input_nodes:
            for storage in storages.get(source, ()):
                last_use[storage] = index
    kept = {s for value in output_values(gm.graph) if isinstance(value, Node) for s in storages.get(value, ())}
    size = {(n, i): _piece_bytes(p) for n in nodes if n.op == "call_function" and storages[n][:1] == [(n, 0)]
            for i, p in enumerate(pieces[n])}
    frees: dict[int, list] = defaultdict(list)
    defined_at = {}
    for index, node in enumerate(nodes):
        for storage in storages[node]:
            if storage in size and storage[0] is node:
                defined_at[storage] = index
                if storage not in kept:
                    frees[max(index, last_use.get(storage, index))].append(storage)
    layer = {storage: groups[storage[0]].layer for storage in size}
    # Gradients and the optimizer's temporaries are held apart from the activations. A
    # gradient's storage is often made by a matmul whose transpose (a view) is the gradient.
    gradient = {storage for node in nodes if groups[node].gradient or groups[node].block == OPTIMIZER
                for storage in storages[node] if storage in size}
    live = gradients = held = peak = peak_live = peak_gradients = 0
    peak_position = -1
    layer_live: dict[str | None, int] = defaultdict(int)
    layer_peak: dict[str | None, int] = defaultdict(int)
    for index, node in enumerate(nodes):
        for storage in storages[node]:
            if defined_at.get(storage) != index:
                continue
            if storage in kept:
                held += size[storage]
            elif storage in gradient:
                gradients += size[storage]
            else:
                live += size[storage]
                layer_live[layer[storage]] += size[storage]
                layer_peak[layer[storage]] = max(layer_peak[layer[storage]], layer_live[layer[storage]])
        if live > peak:
            peak, peak_position = live, index
        peak_live = max(peak_live, live + gradients + held)
        peak_gradients = max(peak_gradients, gradients)
        for storage in frees.get(index, ()):
            if storage in gradient:
                gradients -= size[storage]
            else:
                live -= size[storage]
                layer_live[layer[storage]] -= size[storage]
    at_peak: dict[str | None, int] = defaultdict(int)
    for storage, start in defined_at.items():
        end = max(start, last_use.get(storage, start))
        if storage not in kept and storage not in gradient and start <= peak_position <= end:
            at_peak[layer[storage]] += size[storage]
    return MemoryWalk(
        peak_activation_bytes=peak, peak_position=peak_position, peak_live_bytes=peak_live,
        gradient_bytes=peak_gradients, output_bytes=sum(size[s] for s in kept if s in size),
        input_bytes=_input_bytes(gm, pieces),
        activation_bytes_at_peak=dict(at_peak), activation_peak_by_layer=dict(layer_peak),
        node_bytes={n: sum(size.get(s, 0) for s in storages[n] if s[0] is n) for n in nodes})


# ---------------------------------------------------------------------------------- rows
def _value_rows(program, groups: dict[Node, NodeGroup]) -> list[dict]:
    mesh = program.mesh
    nodes = [n for n in program.placed.graph_module.graph.nodes if n.op != "output"]
    rows = []
    for node in nodes:
        record = meta.placed(node)
        view = (record.view if record is not None else None) or View.DENSE
        found = meta.value(node) if meta.has_value(node) else None
        values = found if isinstance(found, (tuple, list)) else (found,)
        shardings = record.sharding if isinstance(record.sharding, tuple) else (record.sharding,)
        for k, (item, item_sharding) in enumerate(zip(values, shardings)):
            if not isinstance(item, torch.Tensor):
                continue
            name = meta.display_name(node) + (f"[{k}]" if len(values) > 1 else "")
            local = None
            if item_sharding is not None:
                shape = local_shape(tuple(item.shape), item_sharding, mesh, name=name) if item.dim() else ()
                local = [int(s) for s in shape]
            rows.append({
                "name": name,
                "op": _op(node),
                "layer": groups[node].layer,
                "block": groups[node].block,
                "phase": _phase(node),
                "global_shape": list(item.shape),
                "dtype": str(item.dtype).removeprefix("torch."),
                "view": view.value,
                "placement": _placements(item_sharding, view.axes),
                "local_shape": local,
                "bytes_per_rank": meta.local_bytes(item, item_sharding, mesh, name) if item_sharding is not None else 0,
                "reason": record.reason,
            })
    return rows


def _collective_rows(program, groups: dict[Node, NodeGroup]) -> list[dict]:
    rows = []
    for node in program.graph_module.graph.nodes:
        record = meta.collective(node)
        if record is None or not record.communicates:
            continue
        rows.append({
            "name": node.name,
            "kind": record.kind.value,
            "axis": record.axis if isinstance(record.axis, str) else "*".join(record.axis),
            "group_size": record.group_size,
            "bytes_per_rank": float(record.bytes),
            "of": record.of,
            # a gradient bucket reduces several values at once: their names
            "members": list(record.members or (record.of,)),
            "purpose": record.purpose.value + (f": {record.detail}" if record.detail else ""),
            "family": record.purpose.family,
            "layer": groups[node].layer,
            "block": groups[node].block,
            "data_dependent": record.data_dependent,
        })
    return rows


def communication_by_layer(gm: GraphModule, groups: dict[Node, NodeGroup],
                           pieces: dict[Node, list[Piece | None]]) -> dict[str | None, dict]:
    """Bytes sent per rank (in all and by family) and collectives, by layer (None: outside the
    layers). A gradient bucket's bytes are shared among the layers of its members in proportion
    to their sizes (an all-reduce's bytes are linear in what it reduces); it counts as one
    collective in each."""
    rows: dict[str | None, dict] = defaultdict(
        lambda: {"bytes": 0.0, "by_family": defaultdict(float), "collectives": 0})
    for node in gm.graph.nodes:
        record = meta.collective(node)
        if record is None or not record.communicates:
            continue
        shares: dict[str | None, float] = defaultdict(float)
        for member in _bucket_members(node):
            if member in groups:
                shares[groups[member].layer] += sum(_piece_bytes(p) for p in pieces.get(member, []))
        total = sum(shares.values())
        if not total:
            shares, total = {groups[node].layer: 1.0}, 1.0
        for layer, share in shares.items():
            sent = record.bytes * share / total
            rows[layer]["bytes"] += sent
            rows[layer]["by_family"][record.purpose.family] += sent
            rows[layer]["collectives"] += 1
    return rows


def _layer_row() -> dict:
    return {"parameter_bytes": 0, "gradient_bytes": 0, "optimizer_state_bytes": 0, "activation_bytes": 0,
            "activation_bytes_at_peak": 0,
            "communication_bytes": 0.0, "communication_bytes_by_family": {}, "collectives": 0}


def build_report(program, name_pattern: str | None = None, op: str | None = None, layer: str | None = None,
                 hardware="h100", link=None) -> dict:
    """The report of ``program``; ``hardware`` (a ``passes.cost.HARDWARE`` name or ``Hardware``)
    and ``link`` (a calibrated ``LinkModel``, optional) price its predicted step time."""
    from .predict import predict_step

    mesh = program.mesh
    lowered = program.graph_module
    groups = node_groups(lowered)
    pieces = local_pieces(lowered, mesh)
    memory = memory_walk(lowered, mesh, groups, pieces)
    prediction = predict_step(lowered, mesh, hardware, link=link, pieces=pieces)
    prediction_fused = predict_step(lowered, mesh, hardware, link=link, pieces=pieces, fused=True)
    values = _value_rows(program, node_groups(program.placed.graph_module))
    collectives = _collective_rows(program, groups)
    trained = set(getattr(program, "gradient_names", None) or program.parameter_names)
    parameters = [r for r in values if r["op"] == "parameter"]
    by_axis: dict[str, float] = defaultdict(float)
    by_family: dict[str, float] = defaultdict(float)
    for row in collectives:
        by_axis[row["axis"]] += row["bytes_per_rank"]
        by_family[row["family"]] += row["bytes_per_rank"]
    rows: dict[str | None, dict] = defaultdict(_layer_row)
    for row in parameters:
        rows[row["layer"]]["parameter_bytes"] += row["bytes_per_rank"]
        if row["name"] in trained:
            rows[row["layer"]]["gradient_bytes"] += row["bytes_per_rank"]
    for node, record in meta.graph_inputs(lowered.graph, InputKind.OPTIMIZER_STATE):
        rows[groups[node].layer]["optimizer_state_bytes"] += sum(_piece_bytes(p) for p in pieces[node])
    for key, nbytes in memory.activation_peak_by_layer.items():
        rows[key]["activation_bytes"] = nbytes
    for key, nbytes in memory.activation_bytes_at_peak.items():
        rows[key]["activation_bytes_at_peak"] = nbytes
    for key, sent in communication_by_layer(lowered, groups, pieces).items():
        rows[key]["communication_bytes"] = sent["bytes"]
        rows[key]["communication_bytes_by_family"] = dict(sent["by_family"])
        rows[key]["collectives"] = sent["collectives"]
    outside = rows.pop(None, _layer_row())
    parameter_bytes = sum(r["bytes_per_rank"] for r in parameters)
    input_bytes = memory.input_bytes

    def keep(row):
        return ((name_pattern is None or fnmatch.fnmatchcase(row["name"], name_pattern))
                and (op is None or row["op"] == op) and (layer is None or row["layer"] == layer))

    return {
        "schema_version": SCHEMA_VERSION,
        "mesh": {"world": mesh.world, "pp": mesh.pp, "dp": mesh.dp, "tp": mesh.tp, "edp": mesh.edp, "ep": mesh.ep,
                 "etp": mesh.etp},
        "values": [r for r in values if keep(r)],
        "collectives": collectives,
        "totals": {
            "communication_bytes_per_rank_by_axis": dict(by_axis),
            "communication_bytes_per_rank_by_family": dict(by_family),
            "communication_bytes_per_rank": float(sum(by_axis.values())),
            "parameter_bytes_per_rank": int(parameter_bytes),
            "gradient_bytes_per_rank": int(sum(r["bytes_per_rank"] for r in parameters if r["name"] in trained)),
            "optimizer_state_bytes_per_rank": int(input_bytes.get(InputKind.OPTIMIZER_STATE.value, 0)),
            "batch_bytes_per_rank": int(input_bytes.get(InputKind.INPUT.value, 0)),
            "peak_activation_bytes_per_rank": int(memory.peak_activation_bytes),
            "peak_memory_bytes_per_rank": int(sum(input_bytes.values()) + memory.peak_live_bytes),
            "predicted_step_seconds": prediction.step_seconds,
            "predicted_step_seconds_without_overlap": prediction.step_seconds_without_overlap,
            "communication_hidden_fraction": prediction.communication_hidden_fraction,
            "prediction": prediction.as_dict(),
            "predicted_step_seconds_fused": prediction_fused.step_seconds,
            "prediction_fused": prediction_fused.as_dict(),
            "outside_layers": outside,
            "unsplit_parameters": _unsplit_parameters(parameters, mesh),
            "padded": _padded(program),
            "partial_values": sum(1 for r in values if any("Partial" in p for p in r["placement"].values())),
            "values": len(values),
        },
        "layers": {k: rows[k] for k in sorted_layers(rows)},
    }


def _padded(program) -> list[dict]:
    """The tensors held padded so that dp/edp splits them evenly (``passes/pad_parameters.py``):
    which parameter, what is padded (its optimizer state; with zero=3 the parameter too), the
    dim, and its logical and padded sizes."""
    placed = program.placed
    found = []
    for name in sorted(set(placed.state_paddings) | {n for n, p in placed.parameters.items() if p.padding}):
        padding = placed.parameters[name].padding or placed.state_paddings.get(name)
        held = (["parameter"] if placed.parameters[name].padding else []) + (
            ["optimizer state"] if name in placed.state_paddings else [])
        found.append({"name": name, "held": held, "dim": padding.dim, "size": padding.size,
                      "padded": padding.padded})
    return found


def _unsplit_parameters(parameters: list[dict], mesh) -> dict:
    """Parameters whole on every rank of a mesh of several: what no plan entry split, largest
    first, so a user sees which weights cost full memory everywhere."""
    if mesh.world == 1:
        return {"count": 0, "bytes_per_rank": 0, "largest": []}
    whole = sorted((row for row in parameters if all(p == "Replicate()" for p in row["placement"].values())),
                   key=lambda row: -row["bytes_per_rank"])
    return {"count": len(whole), "bytes_per_rank": int(sum(row["bytes_per_rank"] for row in whole)),
            "largest": [[row["name"], int(row["bytes_per_rank"])] for row in whole[:5]]}


# ---------------------------------------------------------------------------------- text
def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _table(headers, rows) -> list[str]:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return lines


def format_summary(report: dict) -> str:
    mesh = report["mesh"]
    totals = report["totals"]
    lines = [
        f"mesh: world={mesh['world']} dp={mesh['dp']} tp={mesh['tp']} | edp={mesh['edp']} ep={mesh['ep']} etp={mesh['etp']}",
        f"values placed: {totals['values']} ({totals['partial_values']} partial before reduction)",
        f"per rank: parameters {_bytes(totals['parameter_bytes_per_rank'])}, gradients "
        f"{_bytes(totals['gradient_bytes_per_rank'])}"
        + (f", optimizer state {_bytes(totals['optimizer_state_bytes_per_rank'])}"
           if totals.get("optimizer_state_bytes_per_rank") else "")
        + f", peak activations {_bytes(totals['peak_activation_bytes_per_rank'])}"
        + (f", peak in all {_bytes(totals['peak_memory_bytes_per_rank'])}" if "peak_memory_bytes_per_rank" in totals else ""),
        f"communication per rank per step: {_bytes(totals['communication_bytes_per_rank'])}",
    ]
    if "prediction" in totals:
        lines += _prediction_lines(totals["prediction"], totals.get("prediction_fused"))
    unsplit = totals.get("unsplit_parameters") or {}
    if unsplit.get("count"):
        largest = ", ".join(f"{name} {_bytes(nbytes)}" for name, nbytes in unsplit["largest"])
        lines.append(f"whole on every rank (no plan entry splits them): {unsplit['count']} parameters, "
                     f"{_bytes(unsplit['bytes_per_rank'])} per rank; largest: {largest}")
    padded = totals.get("padded") or []
    if padded:
        shown = ", ".join(f"{row['name']} dim {row['dim']} {row['size']} -> {row['padded']}" for row in padded[:4])
        held = " and ".join(sorted({part for row in padded for part in row["held"]}, reverse=True))
        lines.append(f"held padded for an even dp/edp split ({held}): {len(padded)} parameters "
                     f"({shown}{', ...' if len(padded) > 4 else ''})")
    axis_rows = [(axis, _bytes(b)) for axis, b in sorted(totals["communication_bytes_per_rank_by_axis"].items())]
    family_rows = [(family, _bytes(b)) for family, b in sorted(totals["communication_bytes_per_rank_by_family"].items())]
    lines += [""] + _table(["axis", "bytes/rank/step"], axis_rows)
    lines += [""] + _table(["family", "bytes/rank/step"], family_rows)
    return "\n".join(lines)


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 10 else f"{value:.2f} s"


def _prediction_lines(found: dict, fused: dict | None = None) -> list[str]:
    """The predicted step: a model of the program on preset (or calibrated) rates, not a
    measurement; op by op as the program runs, and with elementwise ops fused."""
    by_kind = ", ".join(f"{kind} {_seconds(s)}" for kind, s in sorted(found["compute_seconds_by_kind"].items(),
                                                                     key=lambda item: -item[1]))
    by_axis = ", ".join(f"{axis} {_seconds(s)} ({found['links'].get(axis, '?')})"
                        for axis, s in sorted(found["communication_seconds_by_axis"].items()))
    return [
        f"predicted step on {found['hardware']} (a model, not a measurement): {_seconds(found['step_seconds'])} "
        f"with overlap, {_seconds(found['step_seconds_without_overlap'])} without; "
        f"{found['communication_hidden_fraction']:.0%} of communication hidden",
        f"  compute {_seconds(found['compute_seconds'])} ({by_kind or 'none'})",
        *([f"  elementwise ops fused (as inductor compiles the program): {_seconds(fused['step_seconds'])} with "
           f"overlap, {_seconds(fused['step_seconds_without_overlap'])} without, "
           f"{fused['communication_hidden_fraction']:.0%} hidden; compute {_seconds(fused['compute_seconds'])}"]
          if fused else []),
        f"  communication {_seconds(found['communication_seconds'])} in {found['collectives']} collectives"
        + (f" ({by_axis}), exposed {_seconds(found['exposed_communication_seconds'])}" if by_axis else ""),
    ]


def _layer_table(report: dict) -> list[str]:
    # Reports written before the per-layer memory columns have only some of them.
    rows = list(report["layers"].items())
    if "outside_layers" in report["totals"]:
        rows.append((OUTSIDE_LAYERS, report["totals"]["outside_layers"]))
    columns = [("parameters", "parameter_bytes"), ("gradients", "gradient_bytes")]
    if any(row.get("optimizer_state_bytes") for _, row in rows):
        columns.append(("optimizer state", "optimizer_state_bytes"))
    columns += [("activations", "activation_bytes"), ("at peak", "activation_bytes_at_peak"),
                ("communication", "communication_bytes")]
    return _table(["layer", *(title for title, _ in columns), "collectives"],
                  [(name, *(_bytes(row.get(key, 0)) for _, key in columns), row.get("collectives", 0))
                   for name, row in rows])


def format_report(report: dict, max_values: int | None = 60) -> str:
    lines = [format_summary(report), ""]
    collective_rows = [
        (c["name"], c["kind"], c["axis"], c["group_size"], _bytes(c["bytes_per_rank"]) + ("*" if c["data_dependent"] else ""),
         c["family"], c.get("layer") or "-", (c["purpose"] or "")[:40])
        for c in report["collectives"]
    ]
    lines += ["collectives (* = estimate for uniform routing; the simulator records real bytes)"]
    lines += _table(["node", "kind", "axis", "group", "bytes/rank", "family", "layer", "for"], collective_rows)
    values = report["values"] if max_values is None else report["values"][:max_values]
    value_rows = [
        (v["name"][:40], v["op"][:24], v["phase"], "x".join(map(str, v["global_shape"])) or "scalar",
         " ".join(f"{a}={p}" for a, p in v["placement"].items() if p != "Replicate()") or "replicated",
         "x".join(map(str, v["local_shape"] or [])) or "scalar", _bytes(v["bytes_per_rank"]))
        for v in values
    ]
    lines += ["", "values" + (f" (first {max_values} of {len(report['values'])})" if max_values and len(report["values"]) > max_values else "")]
    lines += _table(["value", "op", "phase", "global", "placement", "local", "bytes/rank"], value_rows)
    if report["layers"]:
        lines += ["", "per layer, per rank (activations: the layer's own peak; at peak: its share of the rank's peak)"]
        lines += _layer_table(report)
    return "\n".join(lines)
