"""passes/foreach_parameter_updates.py: the plain step's per-parameter SGD updates and gradient
norms become foreach ops that give the same weights bit for bit (and the same norm up to the
order of its sum), in buckets where told, and a step with another update keeps its ops."""

import collections
from dataclasses import replace

import pytest
import torch

import shardgraph as sg
from examples.moe_model import CONFIGS, MoETransformer, lm_loss, make_batch
from passes import foreach_parameter_updates as module
from shardgraph.fx_graph import copy_graph_module
from shardgraph.ops.direct_calls import use_direct_calls

FOREACH = (torch.ops.aten._foreach_norm.Scalar, torch.ops.aten._foreach_mul.Tensor, torch.ops.aten._foreach_sub_.List)


def _program(dtype, optimizer):
    config = replace(CONFIGS["tiny"], num_layers=2)
    torch.manual_seed(0)
    model = MoETransformer(config).to(dtype)
    inputs = make_batch(config, 4, 8, 0, "cpu")
    return model, inputs, sg.compile(model, sg.MeshSpec(world=1), inputs, lm_loss, optimizer=optimizer)


def _targets(graph_module):
    return collections.Counter(n.target for n in graph_module.graph.nodes if n.op == "call_function")


def _steps(program, model, inputs, direct, steps=2):
    with use_direct_calls(direct):
        state = program.init_state(model, 0)
        for _ in range(steps):
            loss, state, metrics = program.train_step(state, inputs)
    return loss, state, metrics["grad_norm"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sgd_updates_and_norms_become_foreach_ops_with_the_same_weights(dtype):
    model, inputs, program = _program(dtype, sg.optim.SGD(lr=0.1))
    before = _targets(program.graph_module)
    after = _targets(module.foreach_parameter_updates(copy_graph_module(program.graph_module)))
    assert all(after[op] >= 1 for op in FOREACH), after
    # Every dense parameter's update (4 ops) and norm (3-5 ops) gone but for the foreach ops.
    assert sum(after.values()) < sum(before.values()) - 40
    assert after[torch.ops.aten.copy_.default] < before[torch.ops.aten.copy_.default]
    loss, state, norm = _steps(program, model, inputs, direct=True)
    want_loss, want_state, want_norm = _steps(program, model, inputs, direct=False)
    assert torch.equal(loss, want_loss)
    for name, value in want_state.parameters.items():
        assert torch.equal(state.parameters[name], value), name
    # Each parameter's norm summed in another order: equal in bf16 here, within float32 rounding.
    assert abs(norm.item() - want_norm.item()) <= 1e-6 * want_norm.item()


def test_buckets_bound_the_products_and_give_the_same_weights(monkeypatch):
    model, inputs, program = _program(torch.float32, sg.optim.SGD(lr=0.1))
    monkeypatch.setattr(module, "BUCKET_BYTES", 4096)
    grouped = module.foreach_parameter_updates(copy_graph_module(program.graph_module))
    assert _targets(grouped)[torch.ops.aten._foreach_mul.Tensor] > 2
    _, state, _ = _steps(program, model, inputs, direct=True)
    _, want_state, _ = _steps(program, model, inputs, direct=False)
    for name, value in want_state.parameters.items():
        assert torch.equal(state.parameters[name], value), name


def test_an_update_with_momentum_keeps_its_ops():
    _, _, program = _program(torch.float32, sg.optim.SGD(lr=0.1, momentum=0.9))
    grouped = module.foreach_parameter_updates(copy_graph_module(program.graph_module))
    targets = _targets(grouped)
    assert targets[torch.ops.aten._foreach_mul.Tensor] == targets[torch.ops.aten._foreach_sub_.List] == 0
    assert targets[torch.ops.aten._foreach_norm.Scalar] >= 1  # the norms still are
