"""``shardgraph.rms_norm``: both roundings against autograd of the formulas they name, and the copy
of a program that a compiler gets (its norms as aten ops) against the program."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import shardgraph as sg
from shardgraph.ops import as_aten_ops, rms_norm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.moe_model import shardgraph_entry  # noqa: E402


def _native(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _upcast(x, weight, eps):
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("upcast", [True, False], ids=["upcast", "native"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_forward_and_backward_are_autograd_of_the_formula(upcast, dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 24, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = (torch.randn(24, generator=generator, dtype=torch.float64) + 1).to(dtype).requires_grad_(True)
    grad = torch.randn(3, 4, 24, generator=generator, dtype=torch.float64).to(dtype)
    formula = _upcast if upcast else _native
    expected = formula(x, weight, 1e-5)
    expected_grads = torch.autograd.grad(expected, (x, weight), grad)
    out, rstd = rms_norm(x, weight, 1e-5, upcast)
    grads = torch.autograd.grad(out, (x, weight), grad)
    assert torch.equal(out, expected)
    assert rstd.shape == (3, 4) and rstd.dtype == (torch.float32 if upcast or dtype == torch.float32 else dtype)
    torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-12 if dtype == torch.float64 else 0, atol=0)
    # The weight's gradient sums 12 rows, in another order than autograd's reduction may take.
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2 ** -7}[dtype]
    torch.testing.assert_close(grads[1], expected_grads[1], rtol=tolerance, atol=0)


def test_a_float64_input_with_upcast_is_normalised_in_float32_as_hf_does():
    x = torch.randn(2, 16, dtype=torch.float64)
    weight = torch.ones(16, dtype=torch.float64)
    out, rstd = rms_norm(x, weight, 1e-6, True)
    assert rstd.dtype == torch.float32
    assert torch.equal(out, _upcast(x, weight, 1e-6))
    assert not torch.equal(out, _native(x, weight, 1e-6))


def test_a_weight_of_another_width_is_refused_naming_both_shapes():
    with pytest.raises(ValueError, match=r"weight \[8\] must be 1-D with the input's last dim \(input \[2, 16\]\)"):
        rms_norm(torch.randn(2, 16), torch.ones(8), 1e-6, True)


def test_the_compiler_copy_runs_the_aten_form_and_computes_what_the_program_computes():
    model, inputs, loss_fn = shardgraph_entry("tiny")
    program = sg.compile(model, sg.MeshSpec(world=1), inputs, loss_fn)
    graph_module = program.graph_module
    norm_ops = {torch.ops.shardgraph.rms_norm.default, torch.ops.shardgraph.rms_norm_backward.default}
    assert any(node.target in norm_ops for node in graph_module.graph.nodes)
    copied = as_aten_ops(graph_module)
    assert not any(node.target in norm_ops for node in copied.graph.nodes)
    assert any(node.target in norm_ops for node in graph_module.graph.nodes)  # the program keeps its ops
    step, compiled_step = program.single_device_step(), None
    parameters = dict(model.named_parameters())
    loss, grads = step(parameters, inputs)
    program.graph_module = copied
    try:
        compiled_step = program.single_device_step()
        copied_loss, copied_grads = compiled_step(parameters, inputs)
    finally:
        program.graph_module = graph_module
    assert torch.equal(loss, copied_loss)
    for name in grads:
        torch.testing.assert_close(copied_grads[name], grads[name], rtol=1e-6, atol=1e-7)
