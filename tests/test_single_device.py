"""A world=1 program as a plain step function, eager and under torch.compile, equals the model."""

import pytest
import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry


def reference(model, inputs, loss_fn):
    loss = loss_fn(model(*inputs), *inputs)
    return loss.detach(), dict(zip([n for n, _ in model.named_parameters()],
                                   torch.autograd.grad(loss, list(model.parameters()))))


@pytest.mark.parametrize("compile", [None, "inductor"])
def test_single_device_step_gives_the_model_loss_and_gradients(compile):
    model, inputs, loss_fn = shardgraph_entry("tiny_shared", batch_size=2, seq_len=8)
    program = sg.compile(model, sg.MeshSpec(world=1), inputs, loss_fn)
    step = program.single_device_step(compile=compile)
    parameters = {n: p.detach() for n, p in model.named_parameters()}
    loss, gradients = step(parameters, inputs)
    expected_loss, expected = reference(model, inputs, loss_fn)
    assert torch.allclose(loss, expected_loss, rtol=1e-5)
    for name, gradient in expected.items():
        assert ((gradients[name] - gradient).norm() / gradient.norm()).item() < 1e-5, name


def test_single_device_step_refuses_sharded_programs_and_missing_parameters():
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=4, seq_len=8)
    with pytest.raises(ValueError, match=r"needs a world=1 program"):
        sg.compile(model, sg.MeshSpec(world=2, tp=2), inputs, loss_fn).single_device_step()
    step = sg.compile(model, sg.MeshSpec(world=1), inputs, loss_fn).single_device_step()
    with pytest.raises(KeyError, match=r"lacks \['embed_tokens.weight'\]"):
        step({n: p for n, p in model.named_parameters() if n != "embed_tokens.weight"}, inputs)
