"""A predicted step time per rank: a critical path over the scheduled lowered program.

``predict_step(gm, mesh, hardware)`` walks the lowered program (after ``schedule_collectives``)
in program order with one compute stream and one communication stream, as a GPU rank runs it:

* a compute node starts when the compute stream is free (every node before it in program order
  has finished, which covers its inputs) and takes ``ComputeRates.seconds`` of its work
  (``node_work``): FLOPs at the matrix-product rate for matrix products, grouped GEMMs,
  attention and the fused output projection + loss, bytes read and written at the memory
  bandwidth for everything else, the larger of the two;
* a ``_c10d_functional`` op starts when the compute stream has reached it (its inputs are
  made: the c10d op waits on the compute stream's work enqueued before it) and the
  communication stream is free, and takes ``LinkModel.seconds(axis, bytes, kind, group)``
  (``passes/cost.py``: ``steps * alpha + bytes sent / bandwidth``, with bytes from its
  ``meta.Collective`` record);
* its ``wait_tensor`` holds the compute stream until the collective has finished.

Without overlap every collective is waited for at once (the compute stream stalls for each),
so that time is compute plus communication; the difference over the communication time is the
fraction the schedule hides.

Sizes are one rank's local pieces (``report.local_pieces``): MoE expert steps are estimated for
uniform routing, as their collectives' bytes are. Views and indexing are free, and so is
``runtime.c10d.contiguous`` before a collective (its input is contiguous in practice). Every
rank runs the same program on equal pieces; the links are the slowest ones an axis uses
(``passes.cost.link_model``), so the prediction holds for each rank. It is a model: kernel launch
overheads, the host's own time, fusion by a compiler (inductor removes most of the memory
traffic of elementwise chains), contention between the two streams and routing imbalance are
not in it. Rates come from ``passes.cost.HARDWARE`` presets or from calibration.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace

import torch
from torch.fx import GraphModule, Node

from passes.cost import HARDWARE, Hardware, LinkModel, axis_label, link_model

from . import meta
from .fx_graph import op_name
from .mesh import MeshSpec
from .runtime import c10d

__all__ = ["Work", "node_work", "Prediction", "predict_step", "simulate"]

_MATMULS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"}
_GROUPED = {"shardgraph.grouped_mm", "shardgraph.grouped_mm_dgrad", "shardgraph.grouped_mm_wgrad"}
# The fused MoE products (kernels/fused_moe.py): where each finds its rows and its two other dims.
_FUSED_GROUPED = {"shardgraph.gather_glu_grouped_mm": (1, 2), "shardgraph.glu_grouped_mm_dgrad": (0, 1),
                  "shardgraph.gather_grouped_mm_wgrad": (1, None)}
_ATTENTION_FORWARD = {"shardgraph.attention", "aten.scaled_dot_product_attention",
                      "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention",
                      "aten._scaled_dot_product_cudnn_attention", "aten._scaled_dot_product_flash_attention_for_cpu"}
_ATTENTION_BACKWARD = {"aten._scaled_dot_product_flash_attention_backward",
                       "aten._scaled_dot_product_efficient_attention_backward",
                       "aten._scaled_dot_product_cudnn_attention_backward",
                       "aten._scaled_dot_product_flash_attention_for_cpu_backward"}
# Host-side bookkeeping of the MoE exchange: a few integers.
_FREE = {"split_sizes", "host_list", "row_count", "contiguous"}


@dataclass(frozen=True)
class Work:
    """What one node computes on one rank: FLOPs, bytes it reads and writes, the dtype of a
    matrix product, and a kind for the breakdown (matmul, grouped_mm, attention, loss, memory)."""

    flops: float
    nbytes: float
    dtype: torch.dtype | None = None
    matmul: bool = False
    kind: str = "memory"


def _name(node: Node) -> str:
    """``aten.mm``, ``shardgraph.grouped_mm``: an op overload without its overload name; a
    Python function's name."""
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target).rsplit(".", 1)[0]
    return op_name(node.target)


def _piece_bytes(piece) -> int:
    if piece is None:
        return 0
    shape, dtype = piece
    return math.prod(shape) * dtype.itemsize


def _pieces_of(value, pieces) -> list:
    return [p for p in pieces.get(value, []) if p is not None] if isinstance(value, Node) else []


def _shape(value, pieces) -> tuple[int, ...] | None:
    found = _pieces_of(value, pieces)
    return found[0][0] if found else None


def _argument(node: Node, names: tuple[str, ...], position: int):
    """An argument by schema name (aten ops) or else by position."""
    for name in names:
        if name in node.kwargs:
            return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        for index, argument in enumerate(schema.arguments):
            if argument.name in names:
                return node.args[index] if index < len(node.args) else argument.default_value
    return node.args[position] if position < len(node.args) else None


def _is_view(node: Node) -> bool:
    if node.target is operator.getitem:
        return True
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    returns = node.target._schema.returns
    return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write


def _attention_flops(query, key, value, causal: bool, passes: float) -> float:
    """``passes`` times the two products of attention (scores and the weighted sum) of
    ``[batch, heads, seq, dim]`` pieces; half of them where causal."""
    if query is None or key is None or value is None:
        return 0.0
    batch, heads, seq_q, dim = query
    seq_k, dim_v = key[-2], value[-1]
    return passes * 2 * batch * heads * seq_q * seq_k * (dim + dim_v) * (0.5 if causal else 1.0)


def node_work(node: Node, pieces: dict) -> Work | None:
    """The work of a call node on one rank; None for what takes no time (views, indexing,
    host bookkeeping, the collectives themselves and their waits)."""
    if node.op != "call_function" or c10d.is_issue(node) or c10d.is_wait(node) or _is_view(node):
        return None
    name = _name(node)
    if name.rsplit(".", 1)[-1] in _FREE:
        return None
    inputs = [n for n in node.all_input_nodes]
    moved = sum(_piece_bytes(p) for n in inputs for p in _pieces_of(n, pieces))
    moved += sum(_piece_bytes(p) for p in pieces.get(node, []) if p is not None)
    first = next((p for n in inputs for p in _pieces_of(n, pieces)), None)
    dtype = first[1] if first is not None else None
    if name in _MATMULS:
        offset = 1 if name in ("aten.addmm", "aten.baddbmm") else 0
        a, b = _shape(node.args[offset], pieces), _shape(node.args[offset + 1], pieces)
        if a is None or b is None:
            return Work(0.0, moved, dtype, True, "matmul")
        flops = 2 * math.prod(a) * b[-1]  # [.., m, k] x [.., k, n]
        dtype = _pieces_of(node.args[offset], pieces)[0][1]
        return Work(float(flops), moved, dtype, True, "matmul")
    if name in _GROUPED:
        x, other = _shape(node.args[0], pieces), _shape(node.args[1], pieces)
        if x is None or other is None:
            return Work(0.0, moved, dtype, True, "grouped_mm")
        # grouped_mm / dgrad: every row times its expert's [k, n] matrix, whichever the layout;
        # wgrad: x [rows, k] and dout [rows, n] make every expert's [k, n].
        per_row = math.prod(other[1:]) if name != "shardgraph.grouped_mm_wgrad" else x[-1] * other[-1]
        return Work(2.0 * x[0] * per_row, moved, dtype, True, "grouped_mm")
    if name in _FUSED_GROUPED:
        rows_at, weight_at = _FUSED_GROUPED[name]
        rows = _shape(node.args[rows_at], pieces)
        if weight_at is None:  # wgrad: token rows [.., k] and gradient rows [.., n] make every [n, k]
            x, dout = _shape(node.args[0], pieces), _shape(node.args[2], pieces)
            other = None if x is None or dout is None else (0, x[-1], dout[-1])
        else:  # the gate/up product (both halves) or the down dgrad: every row times its expert's matrix
            other = _shape(node.args[weight_at], pieces)
        if rows is None or other is None:
            return Work(0.0, moved, dtype, True, "grouped_mm")
        return Work(2.0 * rows[0] * other[1] * other[2], moved, dtype, True, "grouped_mm")
    if name in _ATTENTION_FORWARD or name in _ATTENTION_BACKWARD or name == "shardgraph.attention_backward":
        query = _shape(_argument(node, ("query",), 1 if "backward" in name else 0), pieces)
        key = _shape(_argument(node, ("key",), 2 if "backward" in name else 1), pieces)
        value = _shape(_argument(node, ("value",), 3 if "backward" in name else 2), pieces)
        causal = bool(_argument(node, ("is_causal",), 4 if name == "shardgraph.attention_backward" else 3))
        # The backward kernel: scores again, then four products (dV, dP, dQ, dK), 2.5x the
        # forward's FLOPs; shardgraph's backward first runs the forward again for its log-sum-exp.
        passes = 1.0 if name in _ATTENTION_FORWARD else 3.5 if name == "shardgraph.attention_backward" else 2.5
        return Work(_attention_flops(query, key, value, causal, passes), moved, dtype, True, "attention")
    if name == "shardgraph.linear_cross_entropy":
        hidden, weight = _shape(node.args[0], pieces), _shape(node.args[1], pieces)
        if hidden is None or weight is None:
            return Work(0.0, moved, dtype, True, "loss")
        rows, vocab = math.prod(hidden[:-1]), weight[0]
        # logits, the gradient of the hidden states and of the weight: three products; the
        # float32 logits of each chunk are written, read for the softmax, written as their
        # gradient and read by two products.
        return Work(6.0 * rows * hidden[-1] * vocab, moved + 4 * rows * vocab * 4, dtype, True, "loss")
    numel = max((math.prod(p[0]) for p in _pieces_of(node, pieces)), default=0)
    return Work(float(numel), moved, dtype, False, "memory")


@dataclass
class Prediction:
    """One rank's predicted step (seconds), with and without overlap, and where the time goes."""

    hardware: str
    step_seconds: float
    step_seconds_without_overlap: float
    compute_seconds: float
    communication_seconds: float
    exposed_communication_seconds: float
    communication_hidden_fraction: float
    compute_seconds_by_kind: dict = field(default_factory=dict)
    communication_seconds_by_axis: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)  # axis -> the link it runs on
    collectives: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def simulate(nodes: list[Node], compute: dict[Node, float], communication: dict[Node, float],
             overlap: bool = True) -> float:
    """Finish time of ``nodes`` (program order) on one compute and one communication stream.

    ``compute``: seconds of each compute node; ``communication``: seconds of each c10d op.
    Without ``overlap`` each c10d op is waited for as soon as it is issued."""
    compute_free = comm_free = 0.0
    finished: dict[Node, float] = {}
    for node in nodes:
        if node in communication:
            start = max(compute_free, comm_free)
            comm_free = finished[node] = start + communication[node]
            if not overlap:
                compute_free = comm_free
        elif c10d.is_wait(node):
            issue = node.args[0]
            compute_free = max(compute_free, finished.get(issue, 0.0))
        else:
            compute_free += compute.get(node, 0.0)
    return max(compute_free, comm_free)


def _fused_bytes(nodes: list[Node], works: dict[Node, Work], pieces: dict) -> dict[Node, float]:
    """Bytes each elementwise or reduction aten op moves when a compiler fuses them (inductor):
    a value made by such an op and read only by such ops (through views) stays in registers; it
    is written only where something else (a matrix product, a collective, a custom op, the
    program's output) reads it, and read only from memory."""
    def fusible(node: Node) -> bool:
        work = works.get(node)
        return work is not None and work.kind == "memory" and isinstance(node.target, torch._ops.OpOverload)

    def readers(node: Node):
        for user in node.users:
            if user.op == "call_function" and user not in works and not c10d.is_issue(user) and not c10d.is_wait(user):
                yield from readers(user)  # a view or an item: whoever reads it
            else:
                yield user

    base: dict[Node, Node] = {}
    for node in nodes:
        is_free = node.op == "call_function" and node not in works and not c10d.is_issue(node) and not c10d.is_wait(node)
        base[node] = base.get(node.all_input_nodes[0], node) if is_free and node.all_input_nodes else node
    written = {node for node in nodes if fusible(node) and not all(fusible(r) for r in readers(node))}
    fused = {}
    for node in nodes:
        if not fusible(node):
            continue
        read = sum(_piece_bytes(p) for n in node.all_input_nodes for p in _pieces_of(n, pieces)
                   if not fusible(base[n]) or base[n] in written)
        fused[node] = read + (sum(_piece_bytes(p) for p in _pieces_of(node, pieces)) if node in written else 0)
    return fused


def predict_step(gm: GraphModule, mesh: MeshSpec, hardware: Hardware | str = "h100", *, link: LinkModel | None = None,
                 gpus_per_node: int | None = None, pieces: dict | None = None, fused: bool = False) -> Prediction:
    """The predicted step of the lowered program ``gm`` (see the module docstring).

    ``hardware``: a ``passes.cost.HARDWARE`` name or a ``Hardware``; ``link`` replaces its links
    (a calibrated ``LinkModel``); ``gpus_per_node`` its ranks per node. ``fused``: elementwise
    ops cost what they would fused by a compiler (``_fused_bytes``), not one kernel each."""
    if isinstance(hardware, str):
        if hardware not in HARDWARE:
            raise ValueError(f"unknown hardware {hardware!r}; known: {', '.join(HARDWARE)}")
        hardware = HARDWARE[hardware]
    link = link or link_model(mesh, hardware, gpus_per_node)
    if pieces is None:
        from .report import local_pieces

        pieces = local_pieces(gm, mesh)
    nodes = list(gm.graph.nodes)
    compute: dict[Node, float] = {}
    by_kind: dict[str, float] = defaultdict(float)
    works = {node: work for node in nodes if (work := node_work(node, pieces)) is not None}
    if fused:
        moved = _fused_bytes(nodes, works, pieces)
        works = {node: replace(work, nbytes=moved.get(node, work.nbytes)) for node, work in works.items()}
    for node, work in works.items():
        seconds = hardware.compute.seconds(work.flops, work.nbytes, work.dtype, work.matmul)
        compute[node] = seconds
        by_kind[work.kind] += seconds
    communication: dict[Node, float] = {}
    by_axis: dict[str, float] = defaultdict(float)
    links = {}
    for node in nodes:
        record = meta.collective(node) if c10d.is_issue(node) else None
        if record is None:
            continue
        label = axis_label(record.axis)
        seconds = link.seconds(label, float(record.bytes), record.kind, record.group_size)
        communication[node] = seconds
        by_axis[label] += seconds
        links[label] = link.axis_link.get(label, "custom")
    with_overlap = simulate(nodes, compute, communication, overlap=True)
    without = simulate(nodes, compute, communication, overlap=False)
    compute_total, comm_total = sum(compute.values()), sum(communication.values())
    exposed = max(with_overlap - compute_total, 0.0)
    hidden = 1.0 - min(exposed / comm_total, 1.0) if comm_total else 0.0
    return Prediction(hardware.name, with_overlap, without, compute_total, comm_total, exposed, hidden,
                      dict(by_kind), dict(by_axis), links, len(communication))
