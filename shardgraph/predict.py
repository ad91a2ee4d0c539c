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

import logging
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

__all__ = ["Work", "node_work", "Prediction", "predict_step", "simulate", "calibrate_kernels", "measured_efficiency"]

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
# Host-side bookkeeping of the MoE exchange: a few integers; allocations that write nothing.
_FREE = {*c10d.HOST_LIST_STEPS, "row_count", "contiguous", "empty", "empty_like", "new_empty", "empty_strided"}
# Ops that move rows by index (gathers, scatters, sorts, top-k): their reads or writes land in
# an order the memory system serves below its streaming rate (``ComputeRates.indexing_efficiency``).
_INDEXING = {"aten.index_select", "aten.index", "aten.index_add", "aten.index_add_", "aten.index_copy",
             "aten.index_copy_", "aten.index_put", "aten.index_put_", "aten.scatter", "aten.scatter_",
             "aten.scatter_add", "aten.scatter_add_", "aten.scatter_reduce", "aten.gather", "aten.sort",
             "aten.argsort", "aten.topk", "aten.embedding", "aten.embedding_dense_backward", "aten.searchsorted",
             "aten.repeat_interleave", "aten.bincount", "aten.histc"}


@dataclass(frozen=True)
class Work:
    """What one node computes on one rank: FLOPs, bytes it reads and writes, the dtype of a
    matrix product, and a kind for the breakdown (matmul, grouped_mm, attention, loss, memory)."""

    flops: float
    nbytes: float
    dtype: torch.dtype | None = None
    matmul: bool = False
    kind: str = "memory"
    kernels: int = 1  # kernels launched (a Python function of the runtime runs several)


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


# Ops that read no operand's values: they take only its shape, dtype and device.
_READS_NOTHING = {"aten.new_full", "aten.new_zeros", "aten.new_ones", "aten.new_empty", "aten.zeros_like",
                  "aten.ones_like", "aten.full_like", "aten.empty_like", "aten.rand_like", "aten.randn_like"}


def read_operands(node: Node) -> list[Node]:
    """The operands whose values ``node`` reads: not the shape-only operand of a factory
    (``new_full``, ``zeros_like``), not the destination ``copy_`` overwrites (the state a
    donated step writes its new value into)."""
    name = _name(node)
    if name in _READS_NOTHING:
        return []
    if name == "aten.copy_" and node.args and isinstance(node.args[0], Node):
        destination = node.args[0]
        return [n for n in node.all_input_nodes if n is not destination]
    return list(node.all_input_nodes)


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
    inputs = read_operands(node)
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
    if name == "shardgraph.grouped_mm_wgrad_sgd_":
        x, dout = _shape(node.args[1], pieces), _shape(node.args[2], pieces)
        # The weight is read and written back in place: its bytes count twice.
        moved += sum(_piece_bytes(p) for p in _pieces_of(node.args[0], pieces))
        if x is None or dout is None:
            return Work(0.0, moved, dtype, True, "grouped_mm")
        return Work(2.0 * x[0] * x[-1] * dout[-1], moved, dtype, True, "grouped_mm")
    if name == "shardgraph.embedding_sgd_":
        # Only the looked-up rows: the output gradient and the indices are read, a float32 sum
        # per index written and read, and at most one weight row per index read and written.
        grad_output, indices = _shape(node.args[1], pieces), _shape(node.args[2], pieces)
        weight = _pieces_of(node.args[0], pieces)
        if grad_output is None or indices is None or not weight:
            return Work(0.0, moved, dtype, False, "indexing")
        rows, width, size = math.prod(indices), weight[0][0][-1], weight[0][1].itemsize
        nbytes = sum(_piece_bytes(p) for n in node.args[1:3] for p in _pieces_of(n, pieces))
        nbytes += rows * width * (2 * 4 + 2 * size)
        # About twenty launches: the sort, the segment sums, the gathers and the row copy.
        return Work(float(rows * width), nbytes, dtype, False, "indexing", kernels=20)
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
        causal = bool(_argument(node, ("is_causal",), 6 if name == "shardgraph.attention_backward" else 3))
        # The backward kernel: scores again, then four products (dV, dP, dQ, dK), 2.5x the
        # forward's FLOPs; shardgraph's backward reads the forward's log-sum-exp, so runs no
        # forward of its own.
        passes = 1.0 if name in _ATTENTION_FORWARD else 2.5
        return Work(_attention_flops(query, key, value, causal, passes), moved, dtype, True, "attention")
    if name in ("shardgraph.linear_cross_entropy", "shardgraph.linear_cross_entropy_sgd_"):
        if name == "shardgraph.linear_cross_entropy_sgd_":
            # The weight's step: written back in place once every chunk has read it.
            moved += sum(_piece_bytes(p) for p in _pieces_of(node.args[1], pieces))
        hidden, weight = _shape(node.args[0], pieces), _shape(node.args[1], pieces)
        if hidden is None or weight is None:
            return Work(0.0, moved, dtype, True, "loss")
        rows, vocab = math.prod(hidden[:-1]), weight[0]
        # logits, the gradient of the hidden states and of the weight: three products; the
        # float32 logits of each chunk are written, read for the softmax, written as their
        # gradient and read by two products.
        return Work(6.0 * rows * hidden[-1] * vocab, moved + 4 * rows * vocab * 4, dtype, True, "loss")
    if not isinstance(node.target, torch._ops.OpOverload) and callable(node.target):
        composite = _composite_work(node, pieces)
        if composite is not None:
            return composite
    numel = max((math.prod(p[0]) for p in _pieces_of(node, pieces)), default=0)
    return Work(float(numel), moved, dtype, False, "indexing" if name in _INDEXING else "memory")


_COMPOSITE_CACHE: dict = {}


def _composite_work(node: Node, pieces: dict) -> Work | None:
    """A Python function of the runtime (``combine``, ``glu``, ...) priced as the aten ops it
    runs: traced on fake tensors of its operands' pieces, each op's work summed (bytes, FLOPs,
    one kernel each). ``indexing`` if any of them moves rows by index. None where it cannot be
    traced without values (a shape read from the data, a host read): the caller prices its
    operands and results once."""
    from torch.fx.experimental.proxy_tensor import make_fx

    arguments, signature = [], [node.target]
    for argument in node.args:
        if isinstance(argument, Node):
            found = _pieces_of(argument, pieces)
            if len(found) != 1:
                return None
            shape, dtype = found[0]
            arguments.append(("tensor", shape, dtype))
            signature.append((tuple(shape), dtype))
        elif isinstance(argument, (int, float, str, bool, type(None))):
            arguments.append(("constant", argument))
            signature.append(argument)
        else:
            return None
    if node.kwargs:
        return None
    key = tuple(signature)
    if key in _COMPOSITE_CACHE:
        return _COMPOSITE_CACHE[key]

    def materialise(spec):
        if spec[0] == "constant":
            return spec[1]
        _, shape, dtype = spec
        if dtype.is_floating_point:
            return torch.empty(shape, dtype=dtype)
        # Integer operands are indices or counts: zeros index in range of any non-empty dim.
        return torch.zeros(shape, dtype=dtype)

    work = None
    # A function that cannot run on these operands makes the fake tensor log an error before it
    # raises: the fallback below is the answer, not a fault to show.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        traced = make_fx(node.target, tracing_mode="fake")(*[materialise(a) for a in arguments])
    except Exception:  # data-dependent shapes or host reads: not traceable on fake tensors
        traced = None
    finally:
        fake_log.setLevel(level)
    if traced is not None:
        inner: dict = {}
        for inner_node in traced.graph.nodes:
            value = meta.tensor_value(inner_node)
            inner[inner_node] = ([(tuple(value.shape), value.dtype)] if isinstance(value, torch.Tensor)
                                 else [None])
        # A size that depends on values (a repeat by counts) has no number to price.
        sized = all(all(isinstance(d, int) for d in p[0]) for found in inner.values() for p in found if p is not None)
        works = [w for n in traced.graph.nodes if n.op == "call_function" and (w := node_work(n, inner)) is not None] \
            if sized else []
        if works:
            kind = "indexing" if any(w.kind == "indexing" for w in works) else "memory"
            work = Work(sum(w.flops for w in works), sum(w.nbytes for w in works), works[0].dtype, False, kind,
                        sum(w.kernels for w in works))
    _COMPOSITE_CACHE[key] = work
    return work


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
    kernels: int = 0  # compute kernels launched
    launch_seconds: float = 0.0  # the host's time to issue them
    measured_nodes: int = 0  # nodes priced by their measured time (calibrate_kernels)

    def as_dict(self) -> dict:
        return asdict(self)


def simulate(nodes: list[Node], compute: dict[Node, float], communication: dict[Node, float],
             overlap: bool = True, launch: dict[Node, float] | None = None) -> float:
    """Finish time of ``nodes`` (program order) on one compute and one communication stream.

    ``compute``: seconds of each compute node; ``communication``: seconds of each c10d op;
    ``launch``: the host's seconds to issue each node's kernels. The host issues in program order
    and never waits for the device (nothing reads a value back), so a node starts no earlier than
    the host has issued it: a run of kernels shorter than their launches is the host's time, not
    the device's. Without ``overlap`` each c10d op is waited for as soon as it is issued."""
    launch = launch or {}
    host = compute_free = comm_free = 0.0
    finished: dict[Node, float] = {}
    for node in nodes:
        host += launch.get(node, 0.0)
        if node in communication:
            start = max(compute_free, comm_free, host)
            comm_free = finished[node] = start + communication[node]
            if not overlap:
                compute_free = comm_free
        elif c10d.is_wait(node):
            issue = node.args[0]
            compute_free = max(compute_free, finished.get(issue, 0.0))
        elif node in compute:
            compute_free = max(compute_free, host) + compute[node]
    return max(compute_free, comm_free)


def _fused_bytes(nodes: list[Node], works: dict[Node, Work], pieces: dict) -> tuple[dict[Node, float], set[Node]]:
    """Bytes each elementwise or reduction aten op moves when a compiler fuses them (inductor):
    a value made by such an op and read only by such ops (through views) stays in registers; it
    is written only where something else (a matrix product, a collective, a custom op, the
    program's output) reads it, and read only from memory. Also returns the fusible ops whose
    value is written: each ends one fused kernel."""
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
        read = sum(_piece_bytes(p) for n in read_operands(node) for p in _pieces_of(n, pieces)
                   if not fusible(base[n]) or base[n] in written)
        fused[node] = read + (sum(_piece_bytes(p) for p in _pieces_of(node, pieces)) if node in written else 0)
    return fused, written


def predict_step(gm: GraphModule, mesh: MeshSpec, hardware: Hardware | str = "h100", *, link: LinkModel | None = None,
                 gpus_per_node: int | None = None, pieces: dict | None = None, fused: bool = False,
                 measured: dict[Node, float] | None = None) -> Prediction:
    """The predicted step of the lowered program ``gm`` (see the module docstring).

    ``hardware``: a ``passes.cost.HARDWARE`` name or a ``Hardware``; ``link`` replaces its links
    (a calibrated ``LinkModel``); ``gpus_per_node`` its ranks per node. ``fused``: elementwise
    ops cost what they would fused by a compiler (``_fused_bytes``), not one kernel each, and
    launch one kernel per fused group. ``measured``: seconds of nodes timed on the device
    (``calibrate_kernels``), used in place of their modelled time."""
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
        moved, written = _fused_bytes(nodes, works, pieces)
        # A fused group is one kernel, launched for the value it writes.
        works = {node: replace(work, nbytes=moved.get(node, work.nbytes),
                               kernels=work.kernels if node not in moved else int(node in written))
                 for node, work in works.items()}
    measured = measured or {}
    launch: dict[Node, float] = {}
    for node, work in works.items():
        seconds = measured.get(node)
        if seconds is None:
            seconds = hardware.compute.seconds(work.flops, work.nbytes, work.dtype, work.matmul, work.kind)
        compute[node] = seconds
        launch[node] = work.kernels * hardware.compute.launch_seconds
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
    for node in communication:
        launch[node] = hardware.compute.launch_seconds
    with_overlap = simulate(nodes, compute, communication, overlap=True, launch=launch)
    without = simulate(nodes, compute, communication, overlap=False, launch=launch)
    compute_total, comm_total = sum(compute.values()), sum(communication.values())
    exposed = max(with_overlap - compute_total, 0.0)
    hidden = 1.0 - min(exposed / comm_total, 1.0) if comm_total else 0.0
    return Prediction(hardware.name, with_overlap, without, compute_total, comm_total, exposed, hidden,
                      dict(by_kind), dict(by_axis), links, len(communication),
                      sum(work.kernels for work in works.values()), sum(launch.values()),
                      sum(1 for node in works if node in measured))


# The kinds whose time depends on the shape far more than bytes and a peak rate say: timed on
# the device at the program's own shapes by ``calibrate_kernels``.
_TIMED_KINDS = ("matmul", "grouped_mm", "attention", "loss")


def _replay_operands(node: Node, pieces: dict, device: torch.device):
    """Operands for running ``node``'s op alone on ``device``: random floats of its operands'
    pieces; integer operands made valid for the op by their schema name: a grouped GEMM's
    ``offsets`` split its rows evenly over the groups, an ``index`` picks random rows of the
    operand before it, a loss's ``target`` lies in the vocabulary. None where an operand is not
    one tensor piece."""
    schema = getattr(node.target, "_schema", None)
    names = [argument.name for argument in schema.arguments] if schema is not None else []
    values = []
    for position, argument in enumerate(node.args):
        if not isinstance(argument, Node):
            if isinstance(argument, (list, tuple)) and any(isinstance(a, Node) for a in argument):
                return None
            values.append(argument)
            continue
        found = _pieces_of(argument, pieces)
        if len(found) != 1:
            return None
        shape, dtype = found[0]
        role = names[position] if position < len(names) else ""
        if dtype.is_floating_point:
            values.append(torch.randn(shape, device=device, dtype=torch.float32).mul_(0.02).to(dtype))
        elif role == "offsets":
            index = next((v for n, v in zip(names, values) if n == "index"), None)
            rows, groups = (index if index is not None else values[0]).shape[0], shape[0]
            ends = [(g + 1) * rows // groups for g in range(groups)]
            values.append(torch.tensor(ends, dtype=torch.int32, device=device))  # the ops take int32 ends
        elif role == "index":
            values.append(torch.randint(0, values[0].shape[0], shape, device=device, dtype=dtype))
        elif role == "target":
            values.append(torch.randint(0, values[1].shape[0], shape, device=device, dtype=dtype))
        else:
            values.append(torch.zeros(shape, device=device, dtype=dtype))
    return values


def _time_once(run, device: torch.device) -> float:
    """Seconds of one ``run()``: on a GPU between two events on its stream (the device's time,
    not the host's wait for it), elsewhere on the host's clock."""
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def calibrate_kernels(gm: GraphModule, mesh: MeshSpec, device="cuda", *, pieces: dict | None = None,
                      repeats: int = 5, warmup: int = 2) -> dict[Node, float]:
    """Seconds of each matrix product, grouped GEMM, attention and fused loss of ``gm`` measured
    on ``device``: each distinct op and operand shape (a layer's repeat shares its first's time)
    run alone on random operands of one rank's pieces, the median of ``repeats`` after
    ``warmup``. Routing-dependent ops run with the rows spread evenly over the experts, as the
    rest of the prediction assumes. Give the result to ``predict_step(measured=...)``."""
    device = torch.device(device)
    if pieces is None:
        from .report import local_pieces

        pieces = local_pieces(gm, mesh)
    by_signature: dict = {}
    measured: dict[Node, float] = {}
    for node in gm.graph.nodes:
        work = node_work(node, pieces) if node.op == "call_function" else None
        if work is None or work.kind not in _TIMED_KINDS or node.kwargs:
            continue
        signature = (node.target, tuple(tuple(_pieces_of(a, pieces)) if isinstance(a, Node) else repr(a)
                                        for a in node.args))
        if signature not in by_signature:
            operands = _replay_operands(node, pieces, device)
            if operands is None:
                by_signature[signature] = None
                continue
            samples = []
            with torch.no_grad():
                for _ in range(warmup + repeats):
                    samples.append(_time_once(lambda: node.target(*operands), device))
            samples = samples[warmup:]
            by_signature[signature] = sorted(samples)[len(samples) // 2]
            del operands
        if by_signature[signature] is not None:
            measured[node] = by_signature[signature]
    return measured


def measured_efficiency(gm: GraphModule, measured: dict[Node, float], peak: dict, pieces: dict) -> dict[str, float]:
    """The fraction of the peak (``peak``: FLOP/s by dtype, ``ComputeRates.matmul_flops``) that
    each timed kind reached in ``measured`` (``calibrate_kernels``): its nodes' FLOPs over their
    measured seconds. What ``ComputeRates.kind_efficiency`` holds for a card."""
    flops: dict[str, float] = defaultdict(float)
    seconds: dict[str, float] = defaultdict(float)
    for node, taken in measured.items():
        work = node_work(node, pieces)
        rate = peak.get(work.dtype) or peak.get(torch.float32)
        flops[work.kind] += work.flops / rate
        seconds[work.kind] += taken
    return {kind: flops[kind] / seconds[kind] for kind in flops if seconds[kind] > 0}
