"""Rotary embedding written as ``x * cos + rotate_half(x) * sin`` is traced as one ``shardgraph.rotary``
node each way, recognised by the ops the model runs, and the graph computes what the aten trace
computes bit for bit; other forms keep their aten ops."""

import pytest
import torch
from torch import nn

from benchmarks.model_coverage import build, lm_loss
from shardgraph.frontend import trace
from shardgraph.frontend.rotary import rotary_traced_as_op

ROTARY = torch.ops.shardgraph.rotary.default
ROTARY_BACKWARD = torch.ops.shardgraph.rotary_backward.default


def counts(traced):
    nodes = list(traced.graph_module.graph.nodes)
    return sum(n.target is ROTARY for n in nodes), sum(n.target is ROTARY_BACKWARD for n in nodes)


@pytest.mark.parametrize("family, partial", [("qwen3_moe", False), ("glm4_moe", True)])
def test_hf_rotary_embedding_is_one_op_each_way_and_computes_what_the_aten_trace_computes(family, partial):
    model = build(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    as_op = trace(model, (ids,), lm_loss)
    with rotary_traced_as_op(False):
        as_aten = trace(model, (ids,), lm_loss)
    layers = model.config.num_hidden_layers
    assert counts(as_op) == (2 * layers, 2 * layers)  # q and k of every layer (GLM: their rotated slice)
    assert counts(as_aten) == (0, 0)
    for got, want in zip(as_op.graph_module(*as_op.arguments(model, ids)),
                         as_aten.graph_module(*as_aten.arguments(model, ids))):
        assert torch.equal(got, want)


class Rotating(nn.Module):
    """A projection rotated by tables that are buffers, or learned (a parameter that takes a gradient)."""

    def __init__(self, learned_tables=False, interleaved=False):
        super().__init__()
        self.project = nn.Linear(8, 8, bias=False)
        angles = torch.rand(4, 8, generator=torch.Generator().manual_seed(1))
        if learned_tables:
            self.cos, self.sin = nn.Parameter(angles.cos()), nn.Parameter(angles.sin())
        else:
            self.register_buffer("cos", angles.cos())
            self.register_buffer("sin", angles.sin())
        self.interleaved = interleaved

    def forward(self, x):
        x = self.project(x)
        if self.interleaved:  # pairs (even, odd) rotate: stack, not cat of halves
            rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        else:
            rotated = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)
        return x * self.cos + rotated * self.sin


def _loss(out, x):
    return (out * out).sum()


@pytest.mark.parametrize("options, expected", [({}, (1, 1)), ({"learned_tables": True}, (0, 0)),
                                               ({"interleaved": True}, (0, 0))],
                         ids=["buffers", "learned_tables_keep_aten_ops", "interleaved_keeps_aten_ops"])
def test_only_the_rotate_half_form_with_tables_that_take_no_gradient_becomes_the_op(options, expected):
    torch.manual_seed(0)
    model = Rotating(**options)
    x = torch.randn(3, 4, 8)
    traced = trace(model, (x,), _loss)
    assert counts(traced) == expected
    got = traced.graph_module(*traced.arguments(model, x))
    out = model(x)
    loss = _loss(out, x)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    torch.testing.assert_close(got[0], loss, rtol=1e-6, atol=1e-6)
    for g, want in zip(got[1:], grads):
        torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-6)
