"""The compiled program under real torch.distributed (gloo processes) matches the unsharded model."""

import pytest
import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry

pytestmark = pytest.mark.distributed


def gloo_step(rank, mesh_text):
    from shardgraph.runtime.distributed import DistributedCommunicator

    torch.manual_seed(0)
    model, inputs, loss_fn = shardgraph_entry("tiny_shared", batch_size=8, seq_len=8)
    mesh = sg.MeshSpec.parse(mesh_text)
    program = sg.compile(model, mesh, inputs, loss_fn)
    parameters = {name: p.detach() for name, p in model.named_parameters()}
    local_parameters = program.local_parameters(rank, parameters)
    local_batch = program.local_batch(rank, inputs)
    loss, gradients = program.run(local_parameters, local_batch, communicator=DistributedCommunicator(mesh))
    return loss, gradients


@pytest.mark.parametrize("mesh_text", ["world=4,tp=2,ep=4", "world=4,tp=2,ep=2"])
def test_gloo_processes_match_the_unsharded_model(mesh_text):
    from shardgraph.runtime.distributed import spawn_gloo

    mesh = sg.MeshSpec.parse(mesh_text)
    results = spawn_gloo(gloo_step, mesh.world, mesh_text)
    torch.manual_seed(0)
    model, inputs, loss_fn = shardgraph_entry("tiny_shared", batch_size=8, seq_len=8)
    reference_loss = loss_fn(model(*inputs), *inputs)
    names = [n for n, _ in model.named_parameters()]
    reference_gradients = dict(zip(names, torch.autograd.grad(reference_loss, list(model.parameters()))))
    program = sg.compile(model, mesh, inputs, loss_fn)
    for rank in mesh.ranks:
        assert abs(results[rank][0].item() - reference_loss.item()) / abs(reference_loss.item()) < 1e-5
    for name in names:
        gradient = sg.unshard([results[r][1][name] for r in mesh.ranks], program.parameter_sharding(name), mesh,
                              check_replicas=False)
        reference = reference_gradients[name]
        assert ((gradient - reference).norm() / reference.norm()).item() < 1e-5, name
