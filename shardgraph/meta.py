"""What ``node.meta`` holds between passes: typed records and the only readers and writers.

Every pass talks to the next through the records below, never through string keys of its own,
as fx's ``TensorMetadata`` sits in ``node.meta["tensor_meta"]`` and DTensor's ``OpSpec`` travels
with each op. The keys themselves are private to this module; a test checks that no other
library file reads or writes ``node.meta`` directly.

=====================  ===========================  ============================================
record                 written by                   read by
=====================  ===========================  ============================================
``GraphInput``         trace (placeholders),        propagate (seeds), program (argument order),
                       add_communicator             every pass that needs the communicator
``Phase``              trace                        report (forward / backward columns)
``PlacedValue``        propagate; lowering passes   lower_*, report, dump, program
                       for the nodes they insert
``Collective``         lower_redistribute,          bucket_gradient_sync, report, dump
                       lower_moe, bucket_...
``CollectivePart``     lower_collectives            report (a collective's waits and layout steps)
``MoeStep``            lower_moe                    report, dump (which MoE layer a node serves)
``OutputRole`` list    trace (on the graph module)  propagate (what each output must be)
``Padding``            pad_parameters               propagate (the logical shape of a placeholder
                       (placeholders held padded)   whose value is held padded)
=====================  ===========================  ============================================

Values that fx and make_fx write themselves (``val``, ``stack_trace``, ``nn_module_stack``) are
read here too, so a change in how torch names them touches one file.
"""

from __future__ import annotations

import enum
import operator
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch
from torch.fx import GraphModule, Node

from .mesh import DENSE_AXES, EXPERT_AXES, MeshSpec
from .placement import Sharding, local_shape

__all__ = [
    "View",
    "InputKind",
    "GraphInput",
    "Phase",
    "PlacedValue",
    "CollectiveKind",
    "Purpose",
    "Collective",
    "CollectivePart",
    "collective_part",
    "set_collective_part",
    "collective_or_part",
    "moved_tensor",
    "collective_source",
    "MoeStep",
    "OutputRole",
    "graph_input",
    "set_graph_input",
    "graph_inputs",
    "communicator_node",
    "phase",
    "set_phase",
    "placed",
    "set_placed",
    "sharding",
    "view",
    "collective",
    "set_collective",
    "moe_step",
    "set_moe_step",
    "output_roles",
    "gradient_of",
    "set_gradient_of",
    "clear_gradient_of",
    "padding",
    "set_padding",
    "set_output_roles",
    "value",
    "has_value",
    "set_value",
    "copy_source_info",
    "copy_source_location",
    "source_line",
    "is_library_frame",
    "layer",
    "local_bytes",
    "MetadataError",
]

# The keys. fx copies node.meta when graphs are copied (deepcopy, Transformer, make_fx with
# preserve_node_meta), so one namespaced key per record keeps them together through every copy.
class _Key:
    """One record's slot in ``node.meta``."""

    def __init__(self, key: str):
        self.key = key

    def get(self, node: Node):
        return node.meta.get(self.key)

    def set(self, node: Node, record) -> None:
        node.meta[self.key] = record


_INPUT = _Key("shardgraph.input")
_PHASE = _Key("shardgraph.phase")
_PLACED = _Key("shardgraph.placed")
_COLLECTIVE = _Key("shardgraph.collective")
_MOE_STEP = _Key("shardgraph.moe_step")
_COLLECTIVE_PART = _Key("shardgraph.collective_part")
_PADDING = _Key("shardgraph.padding")
_OUTPUT_ROLES = "shardgraph.output_roles"
# Written by make_fx / fx; read only here.
_VALUE = "val"
_STACK_TRACE = "stack_trace"
_MODULE_STACK = "nn_module_stack"

_LAYER = re.compile(r"layers[._](\d+)")
# Frames in these folders are torch's or shardgraph's own, never the model's line.
_LIBRARY_DIRS = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
                 os.path.dirname(os.path.abspath(__file__)) + os.sep)


class MetadataError(KeyError):
    """A node lacks a record an earlier pass should have written: a broken pass contract."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------- views
class View(enum.Enum):
    """Which view of the folded mesh a value lives on."""

    DENSE = "dense"  # dp x tp: attention, norms, router, shared experts, the loss
    EXPERT = "expert"  # edp x ep x etp: routed-expert weights and their gradients

    @property
    def axes(self) -> tuple[str, ...]:
        return EXPERT_AXES if self is View.EXPERT else DENSE_AXES

    @classmethod
    def of_axes(cls, axes: Iterable[str]) -> "View | None":
        """The view that the non-trivial axes belong to; None when there are none."""
        names = set(axes)
        expert, dense = names & set(EXPERT_AXES), names & set(DENSE_AXES)
        if expert and dense:
            raise ValueError(f"axes {sorted(names)} mix the dense view {DENSE_AXES} and the expert view {EXPERT_AXES}")
        if expert:
            return cls.EXPERT
        if dense:
            return cls.DENSE
        return None

    @classmethod
    def of_sharding(cls, sharding: Sharding | None) -> "View | None":
        """The view a sharding's non-replicated axes name (None for a replicated value)."""
        if sharding is None:
            return None
        return cls.of_axes(a for a, p in sharding.items() if not p.is_replicate())

    @classmethod
    def of_shardings(cls, *shardings: Sharding) -> "View":
        """The one view several shardings share (dense when all are replicated)."""
        names: set[str] = set()
        for item in shardings:
            names |= {a for a, p in item.items() if not p.is_replicate()}
        return cls.of_axes(names) or cls.DENSE

    def __repr__(self) -> str:
        return f"View.{self.name}"


# ----------------------------------------------------------------------------- inputs
class InputKind(enum.Enum):
    PARAMETER = "parameter"
    BUFFER = "buffer"
    INPUT = "input"  # a batch tensor
    OPTIMIZER_STATE = "optimizer state"  # one slot of a parameter's optimizer state (exp_avg, ...)
    SCALAR = "scalar"  # a per-step number every rank shares (the learning rate, the step count)
    COMMUNICATOR = "communicator"  # the rank's collectives, added by the add_communicator pass
    SEED = "seed"  # the 0-d int64 seed of a step's random draws (shardgraph/ops/random.py), every rank the same


@dataclass(frozen=True)
class GraphInput:
    """A placeholder's meaning: a named parameter, buffer or batch input, an optimizer state
    slot of ``parameter``, a shared scalar, or the communicator."""

    kind: InputKind
    name: str
    parameter: str | None = None


# Reader and writer of the record (``graph_input(node)``, ``set_graph_input(node, record)``).
graph_input = _INPUT.get
set_graph_input = _INPUT.set


def graph_inputs(graph: torch.fx.Graph, kind: InputKind | None = None) -> list[tuple[Node, GraphInput]]:
    """Placeholders with their records, in graph order (optionally of one kind only)."""
    found = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        record = graph_input(node)
        if record is None:
            raise MetadataError(f"placeholder {node.name} has no GraphInput record (trace with shardgraph.frontend.trace)")
        if kind is None or record.kind is kind:
            found.append((node, record))
    return found


def communicator_node(graph: torch.fx.Graph) -> Node:
    """The communicator placeholder; a pass that emits collectives requires it."""
    found = [node for node, _ in graph_inputs(graph, InputKind.COMMUNICATOR)]
    if len(found) != 1:
        raise MetadataError(f"the graph has {len(found)} communicator placeholders; the add_communicator pass "
                            f"adds exactly one before any collective is emitted")
    return found[0]


# ----------------------------------------------------------------------------- phase
class Phase(enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


# Reader and writer of the record (``phase(node)``, ``set_phase(node, record)``).
phase = _PHASE.get
set_phase = _PHASE.set


# ----------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class PlacedValue:
    """Where a value lives and why; what its op needs each tensor input to be.

    ``sharding`` is one ``Sharding`` (or a tuple of them, or of None, for multi-output ops;
    None for values that are not tensors, like the communicator). ``input_shardings`` lines up
    with the node's tensor inputs (``fx_graph.tensor_inputs``; the output node's flat outputs);
    where an entry differs from the producer's sharding, lowering inserts the collective.
    ``alternatives`` lists the candidates considered as ``(description, seconds)``.
    """

    sharding: Any
    view: View | None = View.DENSE
    input_shardings: tuple = ()
    reason: str = ""
    alternatives: tuple = ()

    def with_inputs(self, input_shardings) -> "PlacedValue":
        return replace(self, input_shardings=tuple(input_shardings))


# Reader and writer of the record (``placed(node)``, ``set_placed(node, record)``).
placed = _PLACED.get
set_placed = _PLACED.set


def sharding(node: Node) -> Any:
    """The value's sharding (None when unplaced or not a tensor)."""
    record = placed(node)
    return record.sharding if record is not None else None


def view(node: Node) -> View | None:
    record = placed(node)
    return record.view if record is not None else None


# ----------------------------------------------------------------------------- collectives
class CollectiveKind(enum.Enum):
    ALL_REDUCE = "all_reduce"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_GATHER = "all_gather"
    INTERLEAVED_ALL_GATHER = "interleaved_all_gather"
    ALL_TO_ALL = "all_to_all"
    # Local steps of a redistribution: no bytes leave the rank.
    LOCAL_SLICE = "local_slice"
    LOCAL_INTERLEAVED_SLICE = "local_interleaved_slice"
    KEEP_ON_FIRST = "keep_on_first"
    PAD_TO_PARTIAL = "pad_to_partial"
    SCALE = "scale"

    @property
    def communicates(self) -> bool:
        return self in (CollectiveKind.ALL_REDUCE, CollectiveKind.REDUCE_SCATTER, CollectiveKind.ALL_GATHER,
                        CollectiveKind.INTERLEAVED_ALL_GATHER, CollectiveKind.ALL_TO_ALL)


class Purpose(enum.Enum):
    """Why a collective runs: the families the report sums communication by."""

    REDISTRIBUTE = "redistribute"  # an op's input needs another placement
    OUTPUT = "output"  # a program output (the loss) made whole
    GRADIENT_SYNC = "gradient sync"  # a partial gradient reduced to its parameter's sharding
    MOE_COUNTS = "moe counts"  # tokens per expert, exchanged before the dispatch
    MOE_DISPATCH = "moe dispatch"  # tokens (or output gradients) to their experts
    MOE_RETURN = "moe return"  # expert outputs (or token gradients) back to their ranks
    MOE_ETP = "moe etp"  # expert tokens gathered over etp, partial sums reduced over etp
    PARAMETER_GATHER = "parameter gather"  # zero=3: a parameter held split over dp/edp, gathered for its readers

    @property
    def family(self) -> str:
        if self is Purpose.GRADIENT_SYNC:
            return "gradient sync"
        if self is Purpose.PARAMETER_GATHER:
            return "parameter gather"
        if self.name.startswith("MOE_"):
            return "moe"
        return "redistribute"


@dataclass(frozen=True)
class Collective:
    """A communication step of the lowered program and its predicted bytes sent per rank."""

    kind: CollectiveKind
    axis: str
    group_size: int
    bytes: float
    purpose: Purpose
    of: str = ""  # the value it moves
    detail: str = ""  # a human word on what for (the consumer, "dispatch of output gradients")
    members: tuple[str, ...] = ()  # the values a bucket moves together
    data_dependent: bool = False  # bytes are an estimate (routing decides them at run time)

    @property
    def communicates(self) -> bool:
        return self.kind.communicates


# Reader and writer of the record (``collective(node)``, ``set_collective(node, record)``).
collective = _COLLECTIVE.get
set_collective = _COLLECTIVE.set


@dataclass(frozen=True)
class CollectivePart:
    """A node of a collective's expansion into torch's c10d IR other than the one that issues it
    (``passes/lower_collectives.py``): a local layout step before or after it, or its
    ``wait_tensor``. ``issue`` names the node that carries the ``Collective`` record;
    ``collective`` is that record, so readers that walk a value through its synchronisation
    (the report's gradient walk) see the same purpose on every node of it."""

    issue: str
    collective: Collective
    role: str  # "before" | "wait" | "after"


collective_part = _COLLECTIVE_PART.get
set_collective_part = _COLLECTIVE_PART.set


def collective_or_part(node: Node) -> Collective | None:
    """The ``Collective`` a node issues, or the one whose expansion it belongs to."""
    record = _COLLECTIVE.get(node)
    if record is not None:
        return record
    part = _COLLECTIVE_PART.get(node)
    return part.collective if part is not None else None


def collective_source(node: Node) -> Node | None:
    """The value a collective moves, read from any node of it (its op, its wait, a layout step):
    its tensor input before the layout steps of its own expansion. None for other nodes."""
    record, part = _COLLECTIVE.get(node), _COLLECTIVE_PART.get(node)
    if record is None and part is None:
        return None
    issue = node.name if record is not None else part.issue

    def own(candidate) -> bool:
        if not isinstance(candidate, Node):
            return False
        found = _COLLECTIVE_PART.get(candidate)
        return candidate.name == issue or (found is not None and found.issue == issue)

    source = moved_tensor(node)
    while own(source):
        source = moved_tensor(source)
    return source


def moved_tensor(node: Node) -> Node | None:
    """The tensor input a collective (or a step of its expansion) moves: the first tensor node
    argument that is not the communicator placeholder."""
    for argument in node.args:
        if isinstance(argument, Node) and not (argument.op == "placeholder"
                                                and (graph_input(argument) is not None
                                                     and graph_input(argument).kind is InputKind.COMMUNICATOR)):
            return argument
        if isinstance(argument, (list, tuple)):
            return None
    return None


# ----------------------------------------------------------------------------- MoE steps
@dataclass(frozen=True)
class MoeStep:
    """A node that lower_moe emitted for the MoE op ``layer`` (its forward or backward node)."""

    layer: str


# Reader and writer of the record (``moe_step(node)``, ``set_moe_step(node, record)``).
moe_step = _MOE_STEP.get
set_moe_step = _MOE_STEP.set


# ----------------------------------------------------------------------------- gradients
# Kept inside fx's "custom" entry, which fx copies to the nodes that replace a node when a graph is
# re-traced (functionalization, seeding random ops), so the mark survives where the other records
# are rewritten. A re-trace makes the ``getitem`` nodes of a multi-output op (the gradients out of
# ``moe_experts_backward``) afresh, under the op's own records, not the old getitems': so the mark
# of an output is also kept on its producer, by output index, and a getitem reads it from there
# (its own copy of the producer's entry, after a re-trace).
_CUSTOM = "custom"
_GRADIENT_OF = "shardgraph.gradient_of"
_GRADIENT_OF_OUTPUTS = "shardgraph.gradient_of_outputs"


def _output_index(node: Node) -> int | None:
    """The output index a ``getitem`` node takes of a multi-output node; None for any other node."""
    if (node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2
            and isinstance(node.args[0], Node) and isinstance(node.args[1], int)):
        return node.args[1]
    return None


def _custom(node: Node) -> dict:
    return node.meta.get(_CUSTOM) or {}


def gradient_of(node: Node) -> str | None:
    """The parameter whose gradient the node computes (in a traced training step)."""
    custom = _custom(node)
    if _GRADIENT_OF in custom:
        return custom[_GRADIENT_OF]
    index = _output_index(node)
    if index is None:
        return None
    return (custom.get(_GRADIENT_OF_OUTPUTS) or {}).get(index)


def _set_output_mark(producer: Node, index: int, parameter: str | None) -> None:
    custom = _custom(producer)
    outputs = {key: value for key, value in (custom.get(_GRADIENT_OF_OUTPUTS) or {}).items() if key != index}
    if parameter is not None:
        outputs[index] = parameter
    producer.meta[_CUSTOM] = {**custom, _GRADIENT_OF_OUTPUTS: outputs}


def set_gradient_of(node: Node, parameter: str) -> None:
    node.meta[_CUSTOM] = {**_custom(node), _GRADIENT_OF: parameter}
    index = _output_index(node)
    if index is not None:
        _set_output_mark(node.args[0], index, parameter)


def clear_gradient_of(node: Node) -> None:
    """The node no longer is the gradient (a pass moved the mark to the gradient as held)."""
    node.meta[_CUSTOM] = {key: value for key, value in _custom(node).items() if key != _GRADIENT_OF}
    index = _output_index(node)
    if index is not None:
        _set_output_mark(node, index, None)
        _set_output_mark(node.args[0], index, None)


# ----------------------------------------------------------------------------- padding
# A placeholder whose value is held padded (``placement.Padding``): its logical shape is the
# value's shape without the padding.
padding = _PADDING.get
set_padding = _PADDING.set


# ----------------------------------------------------------------------------- outputs
@dataclass(frozen=True)
class OutputRole:
    """What one graph output is: the ``loss``, the ``grad`` of ``parameter``, a forward
    ``output``; in a training step the new value of ``parameter`` (``param``), of one of its
    optimizer ``state`` slots (``path`` names the slot), or a ``metric`` (``path`` names it)."""

    kind: str
    parameter: str | None = None
    path: str | None = None  # forward outputs: where in the model's output; state: the slot; metric: its name


def output_roles(gm: GraphModule) -> tuple[OutputRole, ...]:
    roles = gm.meta.get(_OUTPUT_ROLES)
    if roles is None:
        raise MetadataError("the graph module has no output roles (trace with shardgraph.frontend.trace)")
    return roles


def set_output_roles(gm: GraphModule, roles: Iterable[OutputRole]) -> None:
    gm.meta[_OUTPUT_ROLES] = tuple(roles)


def copy_node_records(source: Node, target: Node) -> None:
    """Give ``target``, a copy of ``source``, every record ``source`` holds (fx's own and ours),
    as fx's node copy does: the records themselves are shared, not copied."""
    target.meta.update(source.meta)


def copy_module_records(source: GraphModule, target: GraphModule) -> None:
    """Carry the graph module's own records (output roles) to a copy of it."""
    target.meta.update(source.meta)


# ----------------------------------------------------------------------------- fx's own
def value(node: Node) -> Any:
    """The fake tensor (or tuple of them) make_fx recorded for the node."""
    found = node.meta.get(_VALUE)
    if found is None:
        raise MetadataError(f"node {node.name} has no recorded value; trace with make_fx so every value has a fake tensor")
    return found


def has_value(node: Node) -> bool:
    return node.meta.get(_VALUE) is not None


def tensor_value(node: Node) -> torch.Tensor | None:
    found = node.meta.get(_VALUE)
    return found if isinstance(found, torch.Tensor) else None


def set_value(node: Node, found: Any) -> None:
    node.meta[_VALUE] = found


def copy_source_location(source: Node, target: Node) -> None:
    """Give ``target`` the source line, module path and phase of ``source`` (a node it serves)."""
    for key in (_STACK_TRACE, _MODULE_STACK, _PHASE.key):
        if key in source.meta:
            target.meta[key] = source.meta[key]


def copy_source_info(source: Node, target: Node) -> None:
    """Give ``target`` the value and source location of ``source`` (a node it replaces or moves)."""
    copy_source_location(source, target)
    if _VALUE in source.meta:
        target.meta[_VALUE] = source.meta[_VALUE]


_FUSED_MOE = "shardgraph_fused_moe"


def set_fused_moe_choice(node: Node, choice: str) -> None:
    """Whether an MoE layer's forward node took the fused expert kernels: ``"fused"``, or why
    not (``kernels.fused_moe.fused_moe_refusal``'s answer)."""
    node.meta[_FUSED_MOE] = choice


def fused_moe_choice(node: Node) -> str | None:
    return node.meta.get(_FUSED_MOE)


def set_module_stack(node: Node, stack: dict) -> None:
    node.meta[_MODULE_STACK] = stack


def module_stack(node: Node) -> dict:
    return node.meta.get(_MODULE_STACK) or {}


def stack_trace(node: Node) -> str:
    return node.meta.get(_STACK_TRACE) or ""


def is_library_frame(filename: str) -> bool:
    """A frame of Python itself, torch or shardgraph (not of the user's model)."""
    return filename.startswith("<frozen") or os.path.abspath(filename).startswith(_LIBRARY_DIRS)


def source_line(node: Node) -> str:
    """``file:line: code`` of the innermost frame outside torch and shardgraph in the node's
    recorded stack trace: the model's line that produced it."""
    lines = [line.strip() for line in stack_trace(node).strip().splitlines()]
    for index in range(len(lines) - 1, -1, -1):
        match = re.match(r'File "(.+)", line (\d+)', lines[index])
        if match and not is_library_frame(match.group(1)):
            code = lines[index + 1] if index + 1 < len(lines) and not lines[index + 1].startswith("File ") else ""
            return f"{match.group(1)}:{match.group(2)}: {code}"
    return "(no source line recorded)"


def layer(node: Node) -> str | None:
    """``layers.N`` when the node belongs to a numbered transformer layer."""
    record, step = graph_input(node), moe_step(node)
    for text in (record.name if record else None, step.layer if step else None, stack_trace(node)):
        if text:
            match = _LAYER.search(str(text))
            if match:
                return f"layers.{match.group(1)}"
    for path, _ in reversed(list(module_stack(node).values())):
        match = _LAYER.search(str(path))
        if match:
            return f"layers.{match.group(1)}"
    return None


def display_name(node: Node) -> str:
    """A placeholder's model name (``layers.0.attn.wq``); the node's own name otherwise."""
    record = graph_input(node)
    return record.name if record is not None else node.name


# ----------------------------------------------------------------------------- sizes
def local_bytes(found: Any, item_sharding: Sharding | None, mesh: MeshSpec, name: str = "value") -> int:
    """Bytes of one rank's piece of a tensor value under ``item_sharding`` (0 for non-tensors)."""
    if not isinstance(found, torch.Tensor):
        return 0
    if item_sharding is None or found.dim() == 0:
        return found.numel() * found.element_size()
    numel = 1
    for size in local_shape(tuple(found.shape), item_sharding, mesh, name=name):
        numel *= int(size)
    return numel * found.element_size()


def node_local_bytes(node: Node, mesh: MeshSpec) -> int:
    """Bytes of one rank's piece of every tensor the node produces."""
    found = node.meta.get(_VALUE)
    item_shardings = sharding(node)
    values = found if isinstance(found, (tuple, list)) else (found,)
    shardings = item_shardings if isinstance(item_shardings, tuple) else (item_shardings,) * len(values)
    return sum(local_bytes(v, s, mesh, node.name) for v, s in zip(values, shardings))

