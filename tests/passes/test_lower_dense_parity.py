"""Lowered dense graphs reproduce the unsharded loss and gradients on every mesh (simulator)."""


import pytest
import torch

from passes.decompose_loss import decompose_loss
from passes.lower_localize import lower_localize
from passes.lower_redistribute import lower_redistribute
from passes.propagate import propagate
from shardgraph.mesh import MeshSpec
from shardgraph.placement import shard, unshard
from shardgraph.runtime.simulate import Simulator

from .graphs import attention_case, attention_loss, joint_graph
from shardgraph import meta
from shardgraph.fx_graph import copy_graph_module
from passes.add_communicator import add_communicator

MEGATRON = {"q_proj.weight": "colwise", "k_proj.weight": "colwise", "v_proj.weight": "colwise", "o_proj.weight": "rowwise"}


def lower_and_run(gm, mesh, plan, params, inputs):
    placed = propagate(decompose_loss(gm), mesh, plan)
    lowered = add_communicator(copy_graph_module(placed.graph_module))
    lowered = lower_localize(lower_redistribute(lowered, mesh), mesh)
    placeholders = [n for n in lowered.graph.nodes if n.op == "placeholder"][1:]
    full = {**params, **inputs}
    per_rank = [[shard(full[meta.display_name(n)], meta.sharding(n), mesh, r) for n in placeholders]
                for r in mesh.ranks]
    simulator = Simulator(mesh)
    outputs = simulator.run(lambda comm, *args: lowered(comm, *args), per_rank)
    loss = outputs[0][0]
    assert all(torch.equal(o[0], loss) for o in outputs)
    grads = {
        name: unshard([o[1 + i] for o in outputs], placed.parameters[name].sharding, mesh, check_replicas=True)
        for i, name in enumerate(params)
    }
    return loss, grads, simulator


def reference(loss_of, params, inputs):
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = loss_of(leaves, inputs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(params, grads))


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("mesh", ["world=1", "world=2,tp=2", "world=2", "world=4,tp=2", "world=4,tp=4", "world=8,tp=2"])
def test_megatron_attention_matches_unsharded_loss_and_gradients(mesh):
    mesh = MeshSpec.parse(mesh)
    params, inputs = attention_case(hidden=16, batch=8, seq=4)
    gm = joint_graph(attention_loss, params, inputs)
    loss, grads, _ = lower_and_run(gm, mesh, MEGATRON, params, inputs)
    ref_loss, ref_grads = reference(attention_loss, params, inputs)
    assert relative_error(loss, ref_loss) < 1e-5
    for name in params:
        assert relative_error(grads[name], ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("mesh", ["world=2", "world=4,tp=2"])
def test_cross_entropy_with_ignored_rows_is_exact_under_data_parallel(mesh):
    mesh = MeshSpec.parse(mesh)
    generator = torch.Generator().manual_seed(5)
    params = {"embed.weight": torch.randn(13, 8, generator=generator), "head.weight": torch.randn(13, 8, generator=generator)}
    ids = torch.randint(0, 13, (4, 6), generator=generator)
    ids[0, 2:] = -100 + 0 * ids[0, 2:]  # rank 0's rows are mostly ignored: local means would be wrong

    def loss_of(p, batch):
        x = torch.nn.functional.embedding(batch["ids"].clamp_min(0), p["embed.weight"])
        logits = x @ p["head.weight"].t()
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 13), batch["ids"][:, 1:].reshape(-1))

    inputs = {"ids": ids}
    gm = joint_graph(loss_of, params, inputs)
    loss, grads, _ = lower_and_run(gm, mesh, {}, params, inputs)
    ref_loss, ref_grads = reference(loss_of, params, inputs)
    assert relative_error(loss, ref_loss) < 1e-5
    for name in params:
        assert relative_error(grads[name], ref_grads[name]) < 1e-5, name


def test_tensor_parallel_attention_communicates_over_tp_and_syncs_gradients_over_dp():
    mesh = MeshSpec(4, tp=2)
    params, inputs = attention_case(hidden=16, batch=8, seq=4)
    _, _, simulator = lower_and_run(joint_graph(attention_loss, params, inputs), mesh, MEGATRON, params, inputs)
    axes = {record.axis for record in simulator.records}
    assert "tp" in axes and "dp" in axes
