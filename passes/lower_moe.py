"""Expand ``moe_experts`` and its backward into expert-parallel dispatch and grouped GEMMs.

Reads
    a graph after ``lower_redistribute``: each ``shardgraph.moe_experts`` node's token inputs
    are this rank's own tokens (split over dp and tp), its weights this rank's experts
    (``Shard(0)`` over ep; gate/up interleaved and down split over etp).
Writes
    the call sequence of ``shardgraph.runtime.moe`` (sort by expert, count exchange, token
    all-to-all over ep, etp gather, grouping by local expert, ``kernels.grouped_mm`` gate/up,
    activation, ``kernels.grouped_mm`` down, etp reduction, all-to-all back, weighted combine).
    ``moe_experts_backward`` becomes the mirror sequence and reuses the forward's routing,
    splits, grouped tokens and activations (the joint graph holds both directions, so nothing is
    recomputed or sent twice), with ``kernels.grouped_mm_dgrad`` / ``grouped_mm_wgrad``.
    With ep = etp = 1 (every expert on the rank) the exchange steps are left out: the copies stay
    in expert order and the offsets never leave the device, so the MoE layer has no host sync.
    Inserted all-to-all nodes carry ``meta["collective"]`` with a byte estimate for uniform
    routing; the simulator records the real, data-dependent bytes.
Assumes
    the forward node precedes its backward node (true of any joint graph).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

import kernels  # noqa: F401 - registers torch.ops.shardgraph.grouped_mm*
from shardgraph.mesh import MeshSpec
from shardgraph.runtime import collectives
from shardgraph.runtime import moe as moe_steps

__all__ = ["lower_moe", "is_moe_forward", "is_moe_backward"]


def _name(target) -> str:
    return str(target)


def is_moe_forward(node: Node) -> bool:
    return node.op == "call_function" and _name(node.target).startswith("shardgraph.moe_experts.")


def is_moe_backward(node: Node) -> bool:
    return node.op == "call_function" and _name(node.target).startswith("shardgraph.moe_experts_backward.")


class _Emitter:
    def __init__(self, graph, before: Node, layer: str):
        self.graph, self.before, self.layer = graph, before, layer

    def call(self, target, *args, collective=None, **kwargs) -> Node:
        with self.graph.inserting_before(self.before):
            node = self.graph.call_function(target, args, kwargs)
        node.meta["moe_layer"] = self.layer
        node.meta["view"] = "expert"
        if collective is not None:
            node.meta["collective"] = collective
        return node

    def item(self, node: Node, index: int) -> Node:
        return self.call(operator.getitem, node, index)


def _token_bytes(hidden: Node, top_k: int, mesh: MeshSpec) -> float:
    value = hidden.meta.get("val")
    if value is None:
        return 0.0
    local_tokens = value.shape[0] // (mesh.dp * mesh.tp)
    return local_tokens * top_k * value.shape[-1] * value.element_size()


def lower_moe(gm: GraphModule, mesh: MeshSpec) -> GraphModule:
    graph = gm.graph
    comm = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "comm")
    saved: dict[tuple, dict] = {}
    ep, etp = mesh.ep, mesh.etp
    for node in list(graph.nodes):
        if is_moe_forward(node):
            hidden, topk_ids, topk_weights, w_gate_up, w_down = node.args[:5]
            activation = node.args[5] if len(node.args) > 5 else node.kwargs.get("activation", "silu")
            num_experts = w_gate_up.meta["val"].shape[0]
            top_k = topk_ids.meta["val"].shape[-1]
            local_experts = num_experts // ep
            emit = _Emitter(graph, node, node.name)
            # Uniform routing sends (ep - 1) / ep of each rank's copies away: an estimate for the
            # report; the simulator counts what the routing really sent.
            dispatch_estimate = _token_bytes(hidden, top_k, mesh) * (ep - 1) / ep
            sorted_ = emit.call(moe_steps.sort_by_expert, topk_ids, num_experts)
            order, tokens_per_expert = emit.item(sorted_, 0), emit.item(sorted_, 1)
            copies = emit.call(moe_steps.gather_copies, hidden, order, top_k)
            send_sizes = receive_sizes = permutation = etp_row_sizes = None
            if ep == 1 and etp == 1:
                # Every expert is on this rank: the copies are already grouped by expert, so the
                # offsets stay on the device and nothing waits for the host.
                grouped = copies
                offsets = emit.call(moe_steps.expert_offsets, tokens_per_expert)
            else:
                received_counts = emit.call(moe_steps.exchange_counts, comm, tokens_per_expert, "ep",
                                            collective={"kind": "all_to_all", "axis": "ep", "group_size": ep,
                                                        "bytes": 8.0 * num_experts * (ep - 1) / ep,
                                                        "of": node.name, "purpose": "tokens per expert"})
                sizes = emit.call(moe_steps.split_sizes, tokens_per_expert, received_counts)
                send_sizes, receive_sizes = emit.item(sizes, 0), emit.item(sizes, 1)
                received = emit.call(collectives.all_to_all, comm, copies, "ep", send_sizes,
                                     output_splits=receive_sizes,
                                     collective={"kind": "all_to_all", "axis": "ep", "group_size": ep,
                                                 "bytes": dispatch_estimate, "of": node.name, "purpose": "dispatch"})
                counts = received_counts
                if etp > 1:
                    etp_row_sizes = emit.call(moe_steps.etp_sizes, comm, received, "etp")
                    received = emit.call(moe_steps.etp_gather, comm, received, "etp", sizes=etp_row_sizes,
                                         collective={"kind": "all_gather", "axis": "etp", "group_size": etp,
                                                     "bytes": dispatch_estimate / max(ep - 1, 1) * (etp - 1),
                                                     "of": node.name, "purpose": "expert tokens to every etp rank"})
                    counts = emit.call(moe_steps.etp_gather, comm, received_counts, "etp")
                grouped_ = emit.call(moe_steps.group_by_local_expert, received, counts)
                grouped, permutation, offsets = (emit.item(grouped_, i) for i in range(3))
            gate_up = emit.call(torch.ops.shardgraph.grouped_mm.default, grouped, w_gate_up, offsets, "enk")
            activated = emit.call(moe_steps.glu, gate_up, activation)
            down = emit.call(torch.ops.shardgraph.grouped_mm.default, activated, w_down, offsets, "enk")
            returned = down
            if permutation is not None:
                expert_out = emit.call(moe_steps.ungroup, down, permutation)
                if etp > 1:
                    expert_out = emit.call(moe_steps.etp_reduce_own, comm, expert_out, "etp", etp_row_sizes,
                                           collective={"kind": "all_reduce", "axis": "etp", "group_size": etp,
                                                       "bytes": 2 * dispatch_estimate * (etp - 1) / etp,
                                                       "of": node.name, "purpose": "down-projection partial sums"})
                returned = emit.call(collectives.all_to_all, comm, expert_out, "ep", receive_sizes,
                                     output_splits=send_sizes,
                                     collective={"kind": "all_to_all", "axis": "ep", "group_size": ep,
                                                 "bytes": dispatch_estimate, "of": node.name, "purpose": "return"})
            out = emit.call(moe_steps.combine, returned, order, topk_weights)
            out.meta.update({k: node.meta[k] for k in ("val", "sharding", "view", "placement_reason") if k in node.meta})
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            saved[(hidden, topk_ids, topk_weights, w_gate_up, w_down)] = dict(
                order=order, send=send_sizes, receive=receive_sizes, grouped=grouped, permutation=permutation,
                offsets=offsets, gate_up=gate_up, activated=activated, returned=returned, etp_sizes=etp_row_sizes,
                activation=activation, top_k=top_k, local_experts=local_experts, estimate=dispatch_estimate,
            )
        elif is_moe_backward(node):
            grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down = node.args[:6]
            forward = saved.get((hidden, topk_ids, topk_weights, w_gate_up, w_down))
            if forward is None:
                raise ValueError(
                    f"{node.name}: no matching moe_experts forward (same hidden, routing and weights) precedes it"
                )
            emit = _Emitter(graph, node, node.name)
            combined = emit.call(moe_steps.combine_backward, grad_out, forward["returned"], forward["order"], topk_weights)
            grad_copies, grad_topk_weights = emit.item(combined, 0), emit.item(combined, 1)
            if forward["permutation"] is None:
                grad_grouped = grad_copies  # already in expert order: nothing was dispatched
            else:
                grad_received = emit.call(collectives.all_to_all, comm, grad_copies, "ep", forward["send"],
                                          output_splits=forward["receive"],
                                          collective={"kind": "all_to_all", "axis": "ep", "group_size": ep,
                                                      "bytes": forward["estimate"], "of": node.name,
                                                      "purpose": "dispatch of output gradients"})
                if etp > 1:
                    grad_received = emit.call(moe_steps.etp_gather, comm, grad_received, "etp",
                                              sizes=forward["etp_sizes"],
                                              collective={"kind": "all_gather", "axis": "etp", "group_size": etp,
                                                          "bytes": forward["estimate"] / max(ep - 1, 1) * (etp - 1),
                                                          "of": node.name,
                                                          "purpose": "output gradients to every etp rank"})
                grad_grouped = emit.call(torch.index_select, grad_received, 0, forward["permutation"])
            grad_activated = emit.call(torch.ops.shardgraph.grouped_mm_dgrad.default, grad_grouped, w_down,
                                       forward["offsets"], "enk")
            grad_w_down = emit.call(torch.ops.shardgraph.grouped_mm_wgrad.default, forward["activated"], grad_grouped,
                                    forward["offsets"], forward["local_experts"], "enk")
            grad_gate_up = emit.call(moe_steps.glu_backward, grad_activated, forward["gate_up"], forward["activation"])
            grad_tokens = emit.call(torch.ops.shardgraph.grouped_mm_dgrad.default, grad_gate_up, w_gate_up,
                                    forward["offsets"], "enk")
            grad_w_gate_up = emit.call(torch.ops.shardgraph.grouped_mm_wgrad.default, forward["grouped"], grad_gate_up,
                                       forward["offsets"], forward["local_experts"], "enk")
            if forward["permutation"] is not None:
                grad_tokens = emit.call(moe_steps.ungroup, grad_tokens, forward["permutation"])
                if etp > 1:
                    grad_tokens = emit.call(moe_steps.etp_reduce_own, comm, grad_tokens, "etp", forward["etp_sizes"],
                                            collective={"kind": "all_reduce", "axis": "etp", "group_size": etp,
                                                        "bytes": 2 * forward["estimate"] * (etp - 1) / etp,
                                                        "of": node.name, "purpose": "token-gradient partial sums"})
                grad_tokens = emit.call(collectives.all_to_all, comm, grad_tokens, "ep", forward["receive"],
                                        output_splits=forward["send"],
                                        collective={"kind": "all_to_all", "axis": "ep", "group_size": ep,
                                                    "bytes": forward["estimate"], "of": node.name,
                                                    "purpose": "return of token gradients"})
            grad_hidden = emit.call(_scatter_to_tokens, grad_tokens, forward["order"], forward["top_k"], hidden)
            results = [grad_hidden, grad_topk_weights, grad_w_gate_up, grad_w_down]
            shardings = node.meta.get("sharding") or (None,) * 4
            for result, sharding in zip(results, shardings):
                result.meta["sharding"] = sharding
            for user in list(node.users):
                if user.target is operator.getitem:
                    user.replace_all_uses_with(results[user.args[1]])
                    graph.erase_node(user)
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def _scatter_to_tokens(grad_copies: torch.Tensor, order: torch.Tensor, top_k: int, hidden: torch.Tensor):
    return moe_steps.scatter_copies(grad_copies, order, top_k, hidden.shape[0])
