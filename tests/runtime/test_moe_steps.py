"""The expert-parallel dispatch steps reproduce a dense MoE layer, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from shardgraph.mesh import MeshSpec
from shardgraph.placement import InterleavedShard, Partial, Shard, Sharding, shard, unshard
from shardgraph.runtime import collectives
from shardgraph.runtime import moe as steps
from shardgraph.runtime.simulate import Simulator

DTYPE = torch.float64


def loop_grouped_mm(x, w, offsets):
    """x @ w[g].T per group: the weight layout [E, N, K] of HF's fused experts."""
    out = x.new_zeros(x.shape[0], w.shape[1])
    start = 0
    for g, end in enumerate(offsets.tolist()):
        out[start:end] = x[start:end] @ w[g].T
        start = end
    return out


def loop_dgrad(dout, w, offsets):
    out = dout.new_zeros(dout.shape[0], w.shape[2])
    start = 0
    for g, end in enumerate(offsets.tolist()):
        out[start:end] = dout[start:end] @ w[g]
        start = end
    return out


def loop_wgrad(x, dout, offsets, groups):
    out = x.new_zeros(groups, dout.shape[1], x.shape[1])
    start = 0
    for g, end in enumerate(offsets.tolist()):
        out[g] = dout[start:end].T @ x[start:end]
        start = end
    return out


def reference_moe(hidden, ids, weights, w_gate_up, w_down):
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            gate, up = (hidden[t] @ w_gate_up[e].T).chunk(2)
            out[t] = out[t] + weights[t, j] * ((F.silu(gate) * up) @ w_down[e].T)
    return out


def rank_step(comm, hidden, ids, weights, w_gate_up, w_down, grad_out, num_experts):
    mesh = comm.mesh
    top_k = ids.shape[1]
    order, tokens_per_expert = steps.sort_by_expert(ids, num_experts)
    received_counts = steps.exchange_counts(comm, tokens_per_expert, "ep")
    send, receive = steps.split_sizes(tokens_per_expert, received_counts)
    received = collectives.all_to_all(comm, steps.gather_copies(hidden, order, top_k), "ep", send)
    counts = received_counts
    sizes = None
    if mesh.etp > 1:
        sizes = steps.etp_sizes(comm, received.shape[0], "etp")
        received = steps.etp_gather(comm, received, "etp", sizes)
        counts = steps.etp_gather(comm, received_counts, "etp")
    grouped, permutation, offsets = steps.group_by_local_expert(received, counts)
    gate_up = loop_grouped_mm(grouped, w_gate_up, offsets)
    activated = steps.glu(gate_up, "silu")
    expert_out = steps.ungroup(loop_grouped_mm(activated, w_down, offsets), permutation)
    if mesh.etp > 1:
        expert_out = steps.etp_reduce_own(comm, expert_out, "etp", sizes)
    returned = collectives.all_to_all(comm, expert_out, "ep", receive)
    out = steps.combine(returned, order, weights)

    grad_copies, grad_weights = steps.combine_backward(grad_out, returned, order, weights)
    grad_received = collectives.all_to_all(comm, grad_copies, "ep", send)
    if mesh.etp > 1:
        grad_received = steps.etp_gather(comm, grad_received, "etp", sizes)
    grad_grouped = grad_received.index_select(0, permutation)
    grad_activated = loop_dgrad(grad_grouped, w_down, offsets)
    grad_w_down = loop_wgrad(activated, grad_grouped, offsets, w_down.shape[0])
    grad_gate_up = steps.glu_backward(grad_activated, gate_up, "silu")
    grad_w_gate_up = loop_wgrad(grouped, grad_gate_up, offsets, w_gate_up.shape[0])
    grad_tokens = steps.ungroup(loop_dgrad(grad_gate_up, w_gate_up, offsets), permutation)
    if mesh.etp > 1:
        grad_tokens = steps.etp_reduce_own(comm, grad_tokens, "etp", sizes)
    grad_back = collectives.all_to_all(comm, grad_tokens, "ep", receive)
    grad_hidden = steps.scatter_copies(grad_back, order, top_k, hidden.shape[0])
    return out, grad_hidden, grad_weights, grad_w_gate_up, grad_w_down


@pytest.mark.parametrize("text", ["world=2,ep=2", "world=4,tp=2,ep=4", "world=4,tp=2,ep=2", "world=8,tp=2,ep=2,etp=2",
                                  "world=4,ep=2,etp=2", "world=4,tp=4,ep=4"])
def test_dispatch_steps_match_a_dense_moe_layer(text):
    mesh = MeshSpec.parse(text)
    generator = torch.Generator().manual_seed(7)
    tokens, hidden_size, intermediate, experts, top_k = 4 * mesh.world, 6, 8, 8, 2
    hidden = torch.randn(tokens, hidden_size, generator=generator, dtype=DTYPE)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    ids[: tokens // 2, 0] = 3  # one hot expert, so splits are far from even
    weights = torch.rand(tokens, top_k, generator=generator, dtype=DTYPE)
    w_gate_up = torch.randn(experts, 2 * intermediate, hidden_size, generator=generator, dtype=DTYPE) * 0.3
    w_down = torch.randn(experts, hidden_size, intermediate, generator=generator, dtype=DTYPE) * 0.3
    grad_out = torch.randn(tokens, hidden_size, generator=generator, dtype=DTYPE)

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weights, w_gate_up, w_down)]
    reference = reference_moe(leaves[0], ids, leaves[1], leaves[2], leaves[3])
    reference_grads = torch.autograd.grad(reference, leaves, grad_out)

    tokens_sharding = Sharding.of(dp=Shard(0), tp=Shard(0))
    gate_up_sharding = Sharding.of(ep=Shard(0), etp=InterleavedShard(1, 2))
    down_sharding = Sharding.of(ep=Shard(0), etp=Shard(2))
    per_rank = [
        (shard(hidden, tokens_sharding, mesh, r), shard(ids, tokens_sharding, mesh, r), shard(weights, tokens_sharding, mesh, r),
         shard(w_gate_up, gate_up_sharding, mesh, r), shard(w_down, down_sharding, mesh, r), shard(grad_out, tokens_sharding, mesh, r), experts)
        for r in mesh.ranks
    ]
    results = Simulator(mesh).run(rank_step, per_rank)
    out = unshard([r[0] for r in results], tokens_sharding, mesh)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(unshard([r[1] for r in results], tokens_sharding, mesh), reference_grads[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(unshard([r[2] for r in results], tokens_sharding, mesh), reference_grads[1], rtol=1e-10, atol=1e-10)
    # Every token reached its expert on exactly one EDP replica: partial sums over edp, no factor of tp.
    gate_up_grad = unshard([r[3] for r in results], Sharding.of(edp=Partial("sum"), ep=Shard(0), etp=InterleavedShard(1, 2)), mesh)
    down_grad = unshard([r[4] for r in results], Sharding.of(edp=Partial("sum"), ep=Shard(0), etp=Shard(2)), mesh)
    torch.testing.assert_close(gate_up_grad, reference_grads[2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(down_grad, reference_grads[3], rtol=1e-10, atol=1e-10)


def dispatch_volume(mesh, hidden, ids, split_over_tp):
    """Bytes handed to the dispatch all-to-all, summed over ranks, with or without the tp split."""
    experts = 8
    tokens_sharding = Sharding.of(dp=Shard(0), tp=Shard(0)) if split_over_tp else Sharding.of(dp=Shard(0))

    def dispatch(comm, hidden, ids):
        order, tokens_per_expert = steps.sort_by_expert(ids, experts)
        received_counts = steps.exchange_counts(comm, tokens_per_expert, "ep")
        send, _ = steps.split_sizes(tokens_per_expert, received_counts)
        return collectives.all_to_all(comm, steps.gather_copies(hidden, order, ids.shape[1]), "ep", send)

    simulator = Simulator(mesh)
    simulator.run(dispatch, [(shard(hidden, tokens_sharding, mesh, r), shard(ids, tokens_sharding, mesh, r)) for r in mesh.ranks])
    token_records = [r for r in simulator.records if r.kind == "all_to_all" and r.dtype == hidden.dtype]
    return sum(sum(r.input_bytes) for r in token_records)


@pytest.mark.parametrize("text", ["world=4,tp=2,ep=4", "world=8,tp=2,ep=4", "world=4,tp=4,ep=4"])
def test_tp_split_dispatch_moves_exactly_one_tp_th_of_duplicated_dispatch(text):
    mesh = MeshSpec.parse(text)
    generator = torch.Generator().manual_seed(11)
    tokens = 8 * mesh.world
    hidden = torch.randn(tokens, 16, generator=generator)
    ids = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(tokens)])
    split = dispatch_volume(mesh, hidden, ids, split_over_tp=True)
    duplicated = dispatch_volume(mesh, hidden, ids, split_over_tp=False)
    assert split * mesh.tp == duplicated
