"""The compiled program under real torch.distributed (gloo processes) matches the unsharded model."""

import pytest
import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry

pytestmark = pytest.mark.distributed


def gloo_step(rank, mesh_text, num_layers=2, compile=None):
    from shardgraph.runtime.distributed import DistributedCommunicator

    torch.manual_seed(0)
    model, inputs, loss_fn = shardgraph_entry("tiny_shared", batch_size=8, seq_len=8, num_layers=num_layers)
    mesh = sg.MeshSpec.parse(mesh_text)
    program = sg.compile(model, mesh, inputs, loss_fn)
    parameters = {name: p.detach() for name, p in model.named_parameters()}
    local_parameters = program.local_parameters(rank, parameters)
    local_batch = program.local_batch(rank, inputs)
    if compile is not None:
        # Four ranks share the machine's cores: no pool of compile workers per rank.
        torch._inductor.config.compile_threads = 1
    loss, gradients = program.run(local_parameters, local_batch, communicator=DistributedCommunicator(mesh),
                                  compile=compile)
    return loss, gradients


@pytest.mark.parametrize("mesh_text, num_layers, compile", [
    ("world=4,tp=2,ep=4", 2, None),
    ("world=4,tp=2,ep=2", 2, None),
    # The c10d program under torch.compile (inductor on CPU), ep across tp lanes (the mesh with
    # both kinds of all-to-all peer); one layer keeps inductor's compile short. ep=2 within the
    # lanes runs compiled below, with etp=2 (test_a_compiled_multi_rank_step_..., against its
    # eager steps), and uncompiled above.
    pytest.param("world=4,tp=2,ep=4", 1, "inductor", marks=pytest.mark.slow),
])
def test_gloo_processes_match_the_unsharded_model(mesh_text, num_layers, compile):
    from shardgraph.runtime.distributed import spawn_gloo

    mesh = sg.MeshSpec.parse(mesh_text)
    results = spawn_gloo(gloo_step, mesh.world, mesh_text, num_layers, compile)
    torch.manual_seed(0)
    model, inputs, loss_fn = shardgraph_entry("tiny_shared", batch_size=8, seq_len=8, num_layers=num_layers)
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


def _zero3_program():
    from tests.test_training import NO_DECAY

    torch.manual_seed(0)
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    model = model.to(torch.float64)
    optimizer = sg.optim.AdamW(lr=1e-2, weight_decay=0.1, no_decay=NO_DECAY)
    program = sg.compile(model, sg.MeshSpec.parse("world=4,tp=2,ep=2"), inputs, loss_fn, optimizer=optimizer,
                         clip_grad_norm=1.0, zero=3)
    return model, inputs, loss_fn, program


def gloo_zero3_steps(rank, steps):
    from shardgraph.runtime.distributed import DistributedCommunicator

    model, inputs, _, program = _zero3_program()
    state, losses = program.init_state(model, rank), []
    communicator = DistributedCommunicator(program.mesh)
    for _ in range(steps):
        loss, state, _ = program.train_step(state, program.local_batch(rank, inputs), communicator=communicator)
        losses.append(loss)
    return losses, state.state_dict()


def test_gloo_processes_take_zero3_adamw_steps_equal_to_torch_optim():
    from shardgraph.runtime.distributed import spawn_gloo
    from shardgraph.training import TrainState
    from tests.test_training import _torch_adamw, _torch_step, _worst_state_error

    model, inputs, loss_fn, program = _zero3_program()
    results = spawn_gloo(gloo_zero3_steps, program.mesh.world, 2)
    reference = model
    torch_optimizer = _torch_adamw(reference, 1e-2)
    for step in range(2):
        expected, _ = _torch_step(reference, torch_optimizer, inputs, loss_fn, 1.0)
        for losses, _ in results:
            assert abs(losses[step].item() - expected.item()) / abs(expected.item()) < 1e-9
    states = [TrainState.from_state_dict(state) for _, state in results]
    weights, moments = _worst_state_error(program, states, reference, torch_optimizer)
    assert weights < 1e-9 and moments < 1e-9, (weights, moments)


def gloo_compiled_steps(rank, mesh_text, steps, zero=0):
    """``steps`` AdamW steps under torch.compile and eagerly, each on a new batch (new routing,
    so new all-to-all split sizes): the losses of both, and the graphs dynamo compiled per step."""
    from torch._dynamo.utils import counters

    from shardgraph.runtime.distributed import DistributedCommunicator

    torch._inductor.config.compile_threads = 1
    torch.manual_seed(0)
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8, num_layers=1)
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn, optimizer=sg.optim.AdamW(lr=1e-3),
                         zero=zero)
    communicator = DistributedCommunicator(program.mesh)
    compiled_state, eager_state = program.init_state(model, rank), program.init_state(model, rank)
    compiled_losses, eager_losses, graphs = [], [], []
    for step in range(steps):
        batch = [torch.randint(0, 64, inputs[0].shape, generator=torch.Generator().manual_seed(step))]
        local = program.local_batch(rank, batch)
        before = counters["stats"]["unique_graphs"]
        loss, compiled_state, _ = program.train_step(compiled_state, local, communicator=communicator,
                                                     compile="inductor")
        graphs.append(counters["stats"]["unique_graphs"] - before)
        compiled_losses.append(loss.item())
        loss, eager_state, _ = program.train_step(eager_state, local, communicator=communicator)
        eager_losses.append(loss.item())
    return compiled_losses, eager_losses, graphs


@pytest.mark.slow
def test_a_compiled_multi_rank_step_is_compiled_once_whatever_the_routing_sends():
    # The all-to-all split sizes and the etp row counts are read on the host each step; traced as
    # unbacked sizes, a new routing reuses the compiled graph instead of recompiling it. etp=2
    # adds the gather of uneven pieces to the dispatch.
    from shardgraph.runtime.distributed import spawn_gloo

    for compiled, eager, graphs in spawn_gloo(gloo_compiled_steps, 4, "world=4,tp=2,ep=2,etp=2", 3):
        assert graphs == [1, 0, 0], graphs  # one graph, no break in it, compiled once
        for ours, reference in zip(compiled, eager):
            assert abs(ours - reference) / abs(reference) < 1e-5, (compiled, eager)
