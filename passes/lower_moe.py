"""Expand ``moe_experts`` and its backward into expert-parallel dispatch and grouped GEMMs.

Reads
    a graph after ``lower_redistribute``: each ``shardgraph.moe_experts`` node's token inputs
    are this rank's own tokens (split over dp and tp), its weights this rank's experts
    (``Shard(0)`` over ep; gate/up interleaved and down split over etp).
Writes
    the call sequence of ``shardgraph.runtime.moe`` (sort by expert, count exchange, token
    all-to-all over ep, etp gather, grouping by local expert, ``kernels.grouped_mm`` gate/up,
    activation, ``kernels.grouped_mm`` down, etp reduction, all-to-all back, weighted combine).
    Where ``kernels.fused_moe.fused_moe_refusal`` allows (a mode that is off by default; under
    ``"auto"``: tokens on a CUDA device, the Triton grouped GEMM backend, a plain ``act(gate) * up``
    activation, no expert biases) the gather
    into expert order, the gate/up product and the activation are one kernel,
    ``gather_glu_grouped_mm``, reading the token rows through an index vector (with ep = etp = 1
    the token of each copy in expert order; else the local-expert order of the received rows),
    and the backward takes ``glu_grouped_mm_dgrad`` (down dgrad and activation backward) and
    ``gather_grouped_mm_wgrad`` (gate/up wgrad through the same index): the grouped copy of the
    tokens is never made. The forward node's record (``meta.fused_moe_choice``) says which path it took and why.
    ``moe_experts_backward`` becomes the mirror sequence and reuses the forward's routing,
    splits, grouped tokens and activations (the joint graph holds both directions, so nothing is
    recomputed or sent twice), with ``kernels.grouped_mm_dgrad`` / ``grouped_mm_wgrad``.
    With ep = etp = 1 (every expert on the rank) the exchange steps are left out: the copies stay
    in expert order and the offsets never leave the device, so the MoE layer has no host sync.
    Inserted nodes carry a ``meta.MoeStep`` naming the MoE node they serve; collectives carry a
    ``meta.Collective`` with a byte estimate for uniform routing (``data_dependent``); the
    simulator records the real bytes.
Assumes
    the forward node precedes its backward node (true of any joint graph); the graph has its
    communicator input (``add_communicator``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

import kernels  # noqa: F401 - registers torch.ops.shardgraph.grouped_mm*
from kernels.fused_moe import fused_moe_refusal
from shardgraph import meta
from shardgraph.mesh import MeshSpec
from shardgraph.ops.moe import GatedActivation
from shardgraph.meta import Collective, CollectiveKind, MoeStep, PlacedValue, Purpose, View
from shardgraph.runtime import collectives
from shardgraph.runtime import moe as moe_steps

from .gather_parameters import _CASTS
from .routing_path import routing_path
from .rules.moe import token_copies

__all__ = ["lower_moe", "is_moe_forward", "is_moe_backward", "Routing"]


def is_moe_forward(node: Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith("shardgraph.moe_experts.")


def is_moe_backward(node: Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith("shardgraph.moe_experts_backward.")


@dataclass(frozen=True)
class Routing:
    """What the backward of one MoE layer reuses from its forward: nothing is routed or sent twice.

    ``send`` / ``receive`` / ``permutation`` / ``etp_sizes`` are None when every expert is on the
    rank (ep = etp = 1): nothing was dispatched.
    """

    order: Node  # the token copies sorted by expert
    offsets: Node  # group ends of the grouped tokens
    grouped: Node | None  # the tokens the gate/up product read (None on the fused path: never copied)
    gate_up: Node  # its output, before the activation
    activated: Node  # the down product's input
    returned: Node  # expert outputs back on their token's rank, before the combine
    send: Node | None
    receive: Node | None
    permutation: Node | None
    etp_sizes: Node | None
    activation: str
    top_k: int
    local_experts: int
    estimate: float  # bytes one dispatch sends per rank under uniform routing
    # The fused path: the grouped tokens are rows gather_index[r] of gather_source, read in place.
    gather_source: Node | None = None
    gather_index: Node | None = None

    @property
    def dispatched(self) -> bool:
        return self.permutation is not None

    @property
    def fused(self) -> bool:
        return self.gather_source is not None


class _Emitter:
    """Inserts the steps of one MoE node before it, each marked with the layer it serves."""

    def __init__(self, graph, comm: Node, before: Node, mesh: MeshSpec):
        self.graph, self.comm, self.before, self.mesh = graph, comm, before, mesh

    def call(self, target, *args, **kwargs) -> Node:
        with self.graph.inserting_before(self.before):
            node = self.graph.call_function(target, args, kwargs)
        meta.copy_source_location(self.before, node)
        meta.set_moe_step(node, MoeStep(self.before.name))
        meta.set_placed(node, PlacedValue(None, View.EXPERT, (), f"expert step of {self.before.name}"))
        return node

    def communicate(self, target, *args, kind: CollectiveKind, axis: str, estimate: float, purpose: Purpose,
                    detail: str, **kwargs) -> Node:
        node = self.call(target, self.comm, *args, **kwargs)
        meta.set_collective(node, Collective(kind, axis, self.mesh.size(axis), estimate, purpose,
                                             of=self.before.name, detail=detail, data_dependent=True))
        return node

    def item(self, node: Node, index: int) -> Node:
        return self.call(operator.getitem, node, index)


def _token_bytes(hidden: Node, top_k: int, mesh: MeshSpec) -> float:
    found = meta.tensor_value(hidden)
    if found is None:
        return 0.0
    local_tokens = found.shape[0] // (mesh.dp * mesh.tp)
    return local_tokens * top_k * found.shape[-1] * found.element_size()


def moe_operand(node: Node, position: int, name: str, default=None):
    """An argument of a ``moe_experts`` node (positions of the forward op), passed by position or name."""
    if position < len(node.args):
        return node.args[position]
    return node.kwargs.get(name, default)


# Forward op argument positions; the backward op's are one further (grad_out comes first).
_OPERANDS = {"activation": 5, "gate_up_bias": 6, "down_bias": 7}


def _operands(node: Node, backward: bool) -> dict:
    shift = 1 if backward else 0
    found = {name: moe_operand(node, position + shift, name) for name, position in _OPERANDS.items()}
    found["activation"] = found["activation"] or "silu"
    return found


_TRANSPOSE = torch.ops.aten.transpose.int


def _weight_in_place(weight: Node) -> tuple[Node, str]:
    """The tensor a grouped product reads an ``[E, N, K]`` operand from, and its layout: a
    transpose of the last two dims of a stored ``[E, K, N]`` weight (GPT-OSS's ``gate_up_proj
    [E, H, 2I]``, which the adapter hands the op as ``transpose(1, 2)``) is read in place as
    ``"ekn"``, so the kernels get the stored, contiguous tensor and no transposed copy is made."""
    if (weight.op == "call_function" and weight.target is _TRANSPOSE
            and sorted(d % 3 for d in weight.args[1:3]) == [1, 2]):
        found = meta.tensor_value(weight)
        if found is not None and found.dim() == 3:
            return weight.args[0], "ekn"
    return weight, "enk"


def _weight_origin(node):
    """The value an expert weight operand was made from: with zero=3 the forward and the backward
    read their own all-gathers (of their own casts) of one held parameter, which pair them, and
    of one held padded, the slices that drop the padding (``pad_parameters``)."""
    while isinstance(node, Node) and node.op == "call_function" and node.all_input_nodes and (
            meta.collective(node) is not None or node.target in _CASTS or node.target is _TRANSPOSE
            or meta.padding(node) is not None):
        node = node.all_input_nodes[-1]
    return node



def lower_moe(gm: GraphModule, mesh: MeshSpec) -> GraphModule:
    graph = gm.graph
    comm = meta.communicator_node(graph)
    routings: dict[tuple, Routing] = {}
    on_routing_path = routing_path(gm)
    for node in list(graph.nodes):
        if is_moe_forward(node):
            key = tuple(node.args[:3]) + tuple(_weight_origin(w) for w in node.args[3:5])
            routings[key] = _lower_forward(graph, _Emitter(graph, comm, node, mesh), node, mesh,
                                           _exact_down_dtype(node, mesh, on_routing_path))
        elif is_moe_backward(node):
            routing = routings.get(tuple(node.args[1:4]) + tuple(_weight_origin(w) for w in node.args[4:6]))
            if routing is None:
                raise ValueError(
                    f"{node.name}: no matching moe_experts forward (same hidden, routing and weights) precedes it"
                )
            _lower_backward(graph, _Emitter(graph, comm, node, mesh), node, routing, mesh)
    gm.recompile()
    return gm


def _dispatch(emit: _Emitter, copies: Node, tokens_per_expert: Node, num_experts: int, estimate: float, mesh: MeshSpec,
              fused: bool = False):
    """Exchange counts, send each copy to its expert's rank, gather over etp, group by local expert.
    ``fused``: the grouping is left to the fused product, which reads ``received[permutation]``
    in place; the first value returned is then ``received``."""
    ep, etp = mesh.ep, mesh.etp
    received_counts = emit.communicate(moe_steps.exchange_counts, tokens_per_expert, "ep",
                                       kind=CollectiveKind.ALL_TO_ALL, axis="ep",
                                       estimate=8.0 * num_experts * (ep - 1) / ep, purpose=Purpose.MOE_COUNTS,
                                       detail="tokens per expert")
    sizes = emit.call(moe_steps.split_sizes, tokens_per_expert, received_counts)
    send, receive = emit.item(sizes, 0), emit.item(sizes, 1)
    received = emit.communicate(collectives.all_to_all, copies, "ep", send, output_splits=receive,
                                kind=CollectiveKind.ALL_TO_ALL, axis="ep", estimate=estimate,
                                purpose=Purpose.MOE_DISPATCH, detail="dispatch")
    counts, etp_sizes = received_counts, None
    if etp > 1:
        etp_sizes = emit.call(moe_steps.etp_sizes, emit.comm, received, "etp")
        received = emit.communicate(moe_steps.etp_gather, received, "etp", sizes=etp_sizes,
                                    kind=CollectiveKind.ALL_GATHER, axis="etp",
                                    estimate=estimate / max(ep - 1, 1) * (etp - 1), purpose=Purpose.MOE_ETP,
                                    detail="expert tokens to every etp rank")
        counts = emit.call(moe_steps.etp_gather, emit.comm, received_counts, "etp")
    if fused:
        ordered = emit.call(moe_steps.local_expert_order, received, counts)
        permutation, offsets = emit.item(ordered, 0), emit.item(ordered, 1)
        return received, permutation, offsets, send, receive, etp_sizes, received_counts
    grouped_ = emit.call(moe_steps.group_by_local_expert, received, counts)
    grouped, permutation, offsets = (emit.item(grouped_, i) for i in range(3))
    return grouped, permutation, offsets, send, receive, etp_sizes, received_counts


_LOW_PRECISION = (torch.bfloat16, torch.float16)
_CAST = torch.ops.prims.convert_element_type.default


def _exact_down_dtype(node: Node, mesh: MeshSpec, on_routing_path: set) -> torch.dtype | None:
    """The low-precision dtype of an MoE layer whose output a later router reads and whose down
    projection is split over etp, else None. Its partial sums are formed in float32 and rounded
    once after the etp reduction, as the unsharded grouped product rounds once
    (``exact_partial_reductions`` says why)."""
    found = meta.tensor_value(node)
    if mesh.etp == 1 or node not in on_routing_path or found is None or found.dtype not in _LOW_PRECISION:
        return None
    return found.dtype


def _lower_forward(graph, emit: _Emitter, node: Node, mesh: MeshSpec, exact_dtype: torch.dtype | None = None) -> Routing:
    hidden, topk_ids, topk_weights, w_gate_up, w_down = node.args[:5]
    operands = _operands(node, backward=False)
    activation, gate_up_bias, down_bias = operands["activation"], operands["gate_up_bias"], operands["down_bias"]
    num_experts = meta.value(w_gate_up).shape[0]
    top_k = meta.value(topk_ids).shape[-1]
    # Uniform routing sends (ep - 1) / ep of each rank's copies away: an estimate for the report;
    # the simulator counts what the routing really sent.
    estimate = _token_bytes(hidden, top_k, mesh) * (mesh.ep - 1) / mesh.ep
    fused = _fused(node, hidden, activation, gate_up_bias is not None or down_bias is not None)
    sorted_ = emit.call(moe_steps.sort_by_expert, topk_ids, num_experts)
    order, tokens_per_expert = emit.item(sorted_, 0), emit.item(sorted_, 1)
    send = receive = permutation = etp_sizes = received_counts = None
    gather_source = gather_index = grouped = None
    if mesh.ep == 1 and mesh.etp == 1:
        # Every expert is on this rank: the copies are already grouped by expert, so the offsets
        # stay on the device and nothing waits for the host.
        offsets = emit.call(moe_steps.expert_offsets, tokens_per_expert)
        if fused:  # copy r of the expert order is row order[r] // top_k of hidden, read in place
            gather_source, gather_index = hidden, emit.call(moe_steps.token_of_copies, order, top_k)
        else:
            grouped = emit.call(moe_steps.gather_copies, hidden, order, top_k)
    else:
        copies = emit.call(moe_steps.gather_copies, hidden, order, top_k)
        grouped, permutation, offsets, send, receive, etp_sizes, received_counts = _dispatch(
            emit, copies, tokens_per_expert, num_experts, estimate, mesh, fused)
        if fused:  # row r of the local-expert order is row permutation[r] of the received rows
            gather_source, gather_index, grouped = grouped, permutation, None
    gate_up_weight, gate_up_layout = _weight_in_place(w_gate_up)
    down_weight, down_layout = _weight_in_place(w_down)
    if fused:
        parsed = GatedActivation.parse(activation)
        glu_ = emit.call(torch.ops.shardgraph.gather_glu_grouped_mm.default, gather_source, gather_index,
                         gate_up_weight, offsets, parsed.name, parsed.interleaved, gate_up_layout)
        activated, gate_up = emit.item(glu_, 0), emit.item(glu_, 1)
    else:
        gate_up = emit.call(torch.ops.shardgraph.grouped_mm.default, grouped, gate_up_weight, offsets,
                            gate_up_layout)
        if gate_up_bias is not None:
            # This rank's gate/up columns of each row's expert: the bias is split over etp as the rows are.
            gate_up = emit.call(moe_steps.add_expert_bias, gate_up, gate_up_bias, offsets)
        activated = emit.call(moe_steps.glu, gate_up, activation)
    if exact_dtype is None:
        down = emit.call(torch.ops.shardgraph.grouped_mm.default, activated, down_weight, offsets, down_layout)
    else:
        down = emit.call(torch.ops.shardgraph.grouped_mm.default, emit.call(_CAST, activated, torch.float32),
                         emit.call(_CAST, down_weight, torch.float32), offsets, down_layout)
    if down_bias is not None and mesh.etp == 1:
        # Whole rows: the bias goes on in the grouped layout, where the offsets give each row's expert.
        down = emit.call(moe_steps.add_expert_bias, down, down_bias, offsets)
    returned = down
    if permutation is not None:
        expert_out = emit.call(moe_steps.ungroup, down, permutation)
        if mesh.etp > 1:
            widening = 1 if exact_dtype is None else torch.float32.itemsize / exact_dtype.itemsize
            expert_out = emit.communicate(moe_steps.etp_reduce_own, expert_out, "etp", etp_sizes,
                                          kind=CollectiveKind.ALL_REDUCE, axis="etp",
                                          estimate=2 * estimate * widening * (mesh.etp - 1) / mesh.etp,
                                          purpose=Purpose.MOE_ETP, detail="down-projection partial sums" + (
                                              "" if exact_dtype is None else ", in float32 (exact routing)"))
            if exact_dtype is not None:
                expert_out = emit.call(_CAST, expert_out, exact_dtype)
            if down_bias is not None:
                # Added once, to the reduced rows this rank keeps (added to every etp rank's partial
                # sum it would count etp times). They arrived source-major, by local expert within.
                ends = emit.call(moe_steps.group_ends, received_counts)
                expert_out = emit.call(moe_steps.add_expert_bias, expert_out, down_bias, ends)
        returned = emit.communicate(collectives.all_to_all, expert_out, "ep", receive, output_splits=send,
                                    kind=CollectiveKind.ALL_TO_ALL, axis="ep", estimate=estimate,
                                    purpose=Purpose.MOE_RETURN, detail="return")
    out = emit.call(moe_steps.combine, returned, order, topk_weights)
    meta.copy_source_info(node, out)
    meta.set_placed(out, meta.placed(node))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return Routing(order=order, offsets=offsets, grouped=grouped, gate_up=gate_up, activated=activated,
                   returned=returned, send=send, receive=receive, permutation=permutation, etp_sizes=etp_sizes,
                   activation=activation, top_k=top_k, local_experts=num_experts // mesh.ep, estimate=estimate,
                   gather_source=gather_source, gather_index=gather_index)


def _fused(node: Node, hidden: Node, activation: str, has_bias: bool) -> bool:
    """Whether this MoE layer takes the fused expert kernels (``kernels.fused_moe`` says when);
    the answer, either way, is kept in the forward node's records (``meta.fused_moe_choice``)."""
    found = meta.tensor_value(hidden)
    parsed = GatedActivation.parse(activation)
    # The kernels compute the plain act(gate) * up with gate and up concatenated or interleaved;
    # anything more (a limit, soft caps, GPT-OSS's alpha, ungated rows) keeps the unfused path,
    # refused under its full spec.
    plain = (parsed.layout in ("concatenated", "interleaved")
             and parsed == GatedActivation(parsed.name, layout=parsed.layout))
    name = parsed.name if plain else str(parsed)
    refusal = ("no recorded value of the tokens" if found is None
               else fused_moe_refusal(found, name, parsed.interleaved, has_bias))
    meta.set_fused_moe_choice(node, refusal or "fused")
    return refusal is None


def _lower_backward(graph, emit: _Emitter, node: Node, routing: Routing, mesh: MeshSpec) -> None:
    grad_out, hidden, _topk_ids, topk_weights, w_gate_up, w_down = node.args[:6]
    operands = _operands(node, backward=True)
    gate_up_weight, gate_up_layout = _weight_in_place(w_gate_up)
    down_weight, down_layout = _weight_in_place(w_down)
    combined = emit.call(moe_steps.combine_backward, grad_out, routing.returned, routing.order, topk_weights)
    grad_copies, grad_topk_weights = emit.item(combined, 0), emit.item(combined, 1)
    grad_grouped = grad_copies  # already in expert order when nothing was dispatched
    if routing.dispatched:
        grad_received = emit.communicate(collectives.all_to_all, grad_copies, "ep", routing.send,
                                         output_splits=routing.receive, kind=CollectiveKind.ALL_TO_ALL, axis="ep",
                                         estimate=routing.estimate, purpose=Purpose.MOE_DISPATCH,
                                         detail="dispatch of output gradients")
        if mesh.etp > 1:
            grad_received = emit.communicate(moe_steps.etp_gather, grad_received, "etp", sizes=routing.etp_sizes,
                                             kind=CollectiveKind.ALL_GATHER, axis="etp",
                                             estimate=routing.estimate / max(mesh.ep - 1, 1) * (mesh.etp - 1),
                                             purpose=Purpose.MOE_ETP, detail="output gradients to every etp rank")
        grad_grouped = emit.call(torch.index_select, grad_received, 0, routing.permutation)
    grouped_mm = torch.ops.shardgraph
    grad_w_down = _operand_layout(emit, emit.call(grouped_mm.grouped_mm_wgrad.default, routing.activated,
                                                  grad_grouped, routing.offsets, routing.local_experts, down_layout),
                                  down_layout)
    if routing.fused:
        # The down dgrad with the activation's backward in its epilogue: dh never reaches memory.
        parsed = GatedActivation.parse(routing.activation)
        grad_gate_up = emit.call(grouped_mm.glu_grouped_mm_dgrad.default, grad_grouped, down_weight,
                                 routing.offsets, routing.gate_up, parsed.name, parsed.interleaved, down_layout)
        grad_w_gate_up = emit.call(grouped_mm.gather_grouped_mm_wgrad.default, routing.gather_source,
                                   routing.gather_index, grad_gate_up, routing.offsets, routing.local_experts,
                                   gate_up_layout)
    else:
        grad_activated = emit.call(grouped_mm.grouped_mm_dgrad.default, grad_grouped, down_weight, routing.offsets,
                                   down_layout)
        grad_gate_up = emit.call(moe_steps.glu_backward, grad_activated, routing.gate_up, routing.activation)
        grad_w_gate_up = emit.call(grouped_mm.grouped_mm_wgrad.default, routing.grouped, grad_gate_up,
                                   routing.offsets, routing.local_experts, gate_up_layout)
    grad_w_gate_up = _operand_layout(emit, grad_w_gate_up, gate_up_layout)
    grad_tokens = emit.call(grouped_mm.grouped_mm_dgrad.default, grad_gate_up, gate_up_weight, routing.offsets,
                            gate_up_layout)
    # Bias gradients: each local expert's rows summed. The rows are every row of the etp group
    # (the output gradients were gathered over etp), so the down bias's gradient is whole on each
    # etp rank, as the bias is; the gate/up bias's covers this rank's columns, as its piece does.
    bias_grads = []
    if operands["gate_up_bias"] is not None:
        bias_grads.append(emit.call(moe_steps.expert_bias_gradient, grad_gate_up, routing.offsets,
                                    routing.local_experts))
    if operands["down_bias"] is not None:
        bias_grads.append(emit.call(moe_steps.expert_bias_gradient, grad_grouped, routing.offsets,
                                    routing.local_experts))
    record = meta.placed(node)
    copies = token_copies(record.input_shardings[1], mesh)
    if copies > 1:
        # Each token was dispatched from `copies` ranks (the token count did not divide over
        # dp x tp), so every expert summed its gradient `copies` times.
        grad_w_down = emit.call(torch.mul, grad_w_down, 1.0 / copies)
        grad_w_gate_up = emit.call(torch.mul, grad_w_gate_up, 1.0 / copies)
        bias_grads = [emit.call(torch.mul, grad, 1.0 / copies) for grad in bias_grads]
    if routing.dispatched:
        grad_tokens = emit.call(moe_steps.ungroup, grad_tokens, routing.permutation)
        if mesh.etp > 1:
            grad_tokens = emit.communicate(moe_steps.etp_reduce_own, grad_tokens, "etp", routing.etp_sizes,
                                           kind=CollectiveKind.ALL_REDUCE, axis="etp",
                                           estimate=2 * routing.estimate * (mesh.etp - 1) / mesh.etp,
                                           purpose=Purpose.MOE_ETP, detail="token-gradient partial sums")
        grad_tokens = emit.communicate(collectives.all_to_all, grad_tokens, "ep", routing.receive,
                                       output_splits=routing.send, kind=CollectiveKind.ALL_TO_ALL, axis="ep",
                                       estimate=routing.estimate, purpose=Purpose.MOE_RETURN,
                                       detail="return of token gradients")
    grad_hidden = emit.call(_scatter_to_tokens, grad_tokens, routing.order, routing.top_k, hidden)
    results = [grad_hidden, grad_topk_weights, grad_w_gate_up, grad_w_down, *bias_grads]
    shardings = (record.sharding if record is not None and isinstance(record.sharding, tuple)
                 else (None,) * len(results))
    values = meta.value(node)
    for result, item_sharding, found in zip(results, shardings, values):
        meta.set_value(result, found)
        meta.set_placed(result, PlacedValue(item_sharding, View.of_sharding(item_sharding) or View.DENSE, (),
                                            f"output of {node.name}"))
    for user in list(node.users):
        if user.target is operator.getitem:
            user.replace_all_uses_with(results[user.args[1]])
            graph.erase_node(user)
    graph.erase_node(node)


def _operand_layout(emit: _Emitter, grad_weight: Node, layout: str) -> Node:
    """A weight gradient computed in the stored layout, as the op's ``[E, N, K]`` operand (a view:
    the transpose the adapter put in the graph turns it back)."""
    return grad_weight if layout == "enk" else emit.call(torch.transpose, grad_weight, 1, 2)


def _scatter_to_tokens(grad_copies: torch.Tensor, order: torch.Tensor, top_k: int, hidden: torch.Tensor):
    return moe_steps.scatter_copies(grad_copies, order, top_k, hidden.shape[0])
