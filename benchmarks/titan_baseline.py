"""The hand-written baseline for benchmarks/multigpu.py: the example model parallelised the way
torchtitan-style training code does it, without shardgraph.

* Tensor parallelism with DTensor's ``parallelize_module``: q/k/v and the shared expert's gate/up
  ``ColwiseParallel``, o_proj and the shared expert's down ``RowwiseParallel``; each attention
  module's head counts divided by tp. Embedding, norms, router and lm_head stay replicated.
* Expert parallelism with an all-to-all over each ep group in which every TP lane dispatches all
  of its tokens. The tokens are replicated across the TP lanes, so each token is sent, and its
  experts computed, tp times: the cost shardgraph's token split over tp removes.
* Gradient sync by hand after the backward: dense gradients summed over dp and divided by dp (the
  loss is each dp rank's own mean); expert gradients summed over edp and divided by tp * dp (the
  tp duplicates of every token each added a full contribution).

``parallelize(model, mesh, device)`` rewrites the model in place and returns
``sync_gradients()``; ``full_gradients(model, mesh)`` rebuilds unsharded gradients for the parity
check.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives
from torch import nn

import kernels
from shardgraph.mesh import MeshSpec
from shardgraph.runtime import moe as moe_steps


def _groups(mesh: MeshSpec, axis: str):
    """This rank's process group on ``axis`` (every rank creates every group, in the same order)."""
    mine = None
    rank = dist.get_rank()
    for ranks in mesh.groups(axis):
        group = dist.new_group(list(ranks))
        if rank in ranks:
            mine = group
    return mine


class DuplicatedDispatchExperts(nn.Module):
    """This rank's experts; every TP lane dispatches all its tokens over the ep group."""

    def __init__(self, experts: nn.Module, mesh: MeshSpec, ep_group):
        super().__init__()
        rank = dist.get_rank()
        self.ep, self.ep_index, self.ep_group = mesh.ep, mesh.index("ep", rank), ep_group
        self.num_experts = experts.gate_up_proj.shape[0]
        local = self.num_experts // self.ep
        keep = slice(self.ep_index * local, (self.ep_index + 1) * local)
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[keep].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[keep].clone())

    def _exchange(self, tensor, send, receive):
        if self.ep == 1:
            return tensor
        return functional_collectives.all_to_all_single_autograd(tensor.contiguous(), receive, send, self.ep_group)

    def forward(self, hidden, top_k_index, top_k_weights):
        top_k = top_k_index.shape[-1]
        order, tokens_per_expert = moe_steps.sort_by_expert(top_k_index, self.num_experts)
        counts = tokens_per_expert.reshape(self.ep, -1)
        if self.ep > 1:
            received_counts = torch.empty_like(counts)
            dist.all_to_all_single(received_counts, counts.contiguous(), group=self.ep_group)
        else:
            received_counts = counts
        send, receive = counts.sum(dim=1).tolist(), received_counts.sum(dim=1).tolist()
        received = self._exchange(moe_steps.gather_copies(hidden, order, top_k), send, receive)
        grouped, permutation, offsets = moe_steps.group_by_local_expert(received, received_counts)
        gate_up = kernels.grouped_mm(grouped, self.gate_up_proj, offsets, w_layout="enk")
        down = kernels.grouped_mm(moe_steps.glu(gate_up, "silu"), self.down_proj, offsets, w_layout="enk")
        returned = self._exchange(moe_steps.ungroup(down, permutation), receive, send)
        return moe_steps.combine(returned, order, top_k_weights)


def parallelize(model: nn.Module, mesh: MeshSpec, device: torch.device):
    """Apply TP and duplicated-dispatch EP to the example model in place; returns the gradient sync."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dense = init_device_mesh(device.type, (mesh.dp, mesh.tp), mesh_dim_names=("dp", "tp"))
    tp_mesh = dense["tp"]
    ep_group, edp_group, dp_group = _groups(mesh, "ep"), _groups(mesh, "edp"), _groups(mesh, "dp")
    expert_parameters = []
    for layer in model.layers:
        attention = layer.self_attn
        if mesh.tp > 1:
            parallelize_module(attention, tp_mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                                    "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
            attention.heads //= mesh.tp
            attention.kv_heads //= mesh.tp
            if layer.mlp.shared_expert is not None:
                parallelize_module(layer.mlp.shared_expert, tp_mesh, {
                    "gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()})
        layer.mlp.experts = DuplicatedDispatchExperts(layer.mlp.experts, mesh, ep_group).to(device)
        expert_parameters += list(layer.mlp.experts.parameters())
    expert_ids = {id(p) for p in expert_parameters}

    def sync_gradients():
        for parameter in model.parameters():
            if parameter.grad is None:
                continue
            grad = parameter.grad
            local = grad._local_tensor if hasattr(grad, "_local_tensor") else grad
            if id(parameter) in expert_ids:
                # every token arrived tp times and each dp rank's loss is its own mean
                if mesh.edp > 1:
                    dist.all_reduce(local, group=edp_group)
                local.div_(mesh.tp * mesh.dp)
            else:
                if mesh.dp > 1:
                    dist.all_reduce(local, group=dp_group)
                local.div_(mesh.dp)

    return sync_gradients


def full_gradients(model: nn.Module, mesh: MeshSpec) -> dict[str, torch.Tensor]:
    """Unsharded gradients by the unsharded model's parameter names (on every rank)."""
    from torch.distributed.tensor import DTensor

    ep_group = None
    for ranks in mesh.groups("ep"):  # the ep groups again, for the expert all-gather
        group = dist.new_group(list(ranks))
        if dist.get_rank() in ranks:
            ep_group = group
    gradients = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        if isinstance(grad, DTensor):
            grad = grad.full_tensor()
        elif ".mlp.experts." in name and mesh.ep > 1:
            pieces = [torch.empty_like(grad) for _ in range(mesh.ep)]
            dist.all_gather(pieces, grad.contiguous(), group=ep_group)
            grad = torch.cat(pieces)
        gradients[name] = grad.detach()
    return gradients
