"""RMSNorm modules are traced as ``shardgraph.rms_norm`` exactly where their own forward computes it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from shardgraph.frontend import op_histogram, trace
from shardgraph.frontend.norms import norm_rounding, norms_traced_as_ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.moe_model import RMSNorm as ExampleRMSNorm  # noqa: E402
from examples.moe_model import shardgraph_entry  # noqa: E402


class UpcastRMSNorm(nn.Module):
    """HF transformers' RMSNorm (Llama, Qwen, Mixtral, OLMoE ...), written out here."""

    def __init__(self, size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class OnePlusWeightRMSNorm(UpcastRMSNorm):
    """Gemma's: the weight is an offset from one."""

    def forward(self, hidden_states):
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (x * (1.0 + self.weight.float())).type_as(hidden_states)


class EpsilonOutsideRMSNorm(UpcastRMSNorm):
    """The epsilon added after the square root: another function, refused."""

    def forward(self, hidden_states):
        x = hidden_states.float()
        x = x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.variance_epsilon)
        return self.weight * x.to(hidden_states.dtype)


def test_hf_rms_norm_is_recognised_with_float32_statistics():
    assert norm_rounding(UpcastRMSNorm(16, 1e-5)) == ("weight", 1e-5, True)


def test_a_norm_written_in_the_input_dtype_is_recognised_without_upcast():
    assert norm_rounding(ExampleRMSNorm(16, 1e-6)) == ("weight", 1e-6, False)


def test_the_transformers_classes_are_recognised_by_what_they_compute():
    modeling = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    assert norm_rounding(modeling.Qwen3MoeRMSNorm(32, 1e-6)) == ("weight", 1e-6, True)
    with torch.device("meta"):  # a model built without memory is recognised too
        assert norm_rounding(modeling.Qwen3MoeRMSNorm(32, 1e-6)) == ("weight", 1e-6, True)


@pytest.mark.parametrize("module", [OnePlusWeightRMSNorm(16), EpsilonOutsideRMSNorm(16), nn.RMSNorm(16, eps=1e-6),
                                    nn.LayerNorm(16), nn.LayerNorm(16, bias=False), nn.Linear(16, 16, bias=False)],
                         ids=["one_plus_weight", "epsilon_outside", "torch_rms_norm", "layer_norm",
                              "layer_norm_no_bias", "linear"])
def test_modules_computing_anything_else_keep_their_own_forward(module):
    assert norm_rounding(module) is None


def _run(traced, model, inputs):
    values = [*dict(model.named_parameters()).values(), *dict(model.named_buffers()).values(), *inputs]
    return traced.graph_module(*values)


def test_the_example_model_traces_its_norms_as_the_op_and_computes_what_the_aten_trace_computes():
    model, inputs, loss_fn = shardgraph_entry("tiny")
    model = model.double()
    as_op = trace(model, inputs, loss_fn)
    with norms_traced_as_ops(False):
        as_aten = trace(model, inputs, loss_fn)
    histogram, aten_histogram = op_histogram(as_op), op_histogram(as_aten)
    norms = sum(isinstance(m, ExampleRMSNorm) for m in model.modules())
    assert histogram["shardgraph.rms_norm.default"] == norms
    assert histogram["shardgraph.rms_norm_backward.default"] == norms
    assert "shardgraph.rms_norm.default" not in aten_histogram
    assert histogram.get("aten.rsqrt.default", 0) < aten_histogram["aten.rsqrt.default"]
    got, expected = _run(as_op, model, inputs), _run(as_aten, model, inputs)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # The forward hooks are gone once tracing ends: the model runs its own forward again.
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_the_traced_op_gives_the_modules_own_bfloat16_output_and_gradients():
    torch.manual_seed(0)
    norm = UpcastRMSNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = torch.randn(4, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(4, 7, 64, dtype=torch.bfloat16)
    out = norm(x)
    expected = torch.autograd.grad(out, (x, norm.weight), grad)
    from shardgraph.ops.norm import rms_norm

    got_out = rms_norm(x, norm.weight, 1e-6, True)[0]
    assert torch.equal(got_out, out)
    got = torch.autograd.grad(got_out, (x, norm.weight), grad)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    # The weight's gradient sums 28 rows: the order of a bfloat16 sum may differ in its last bit.
    torch.testing.assert_close(got[1], expected[1], rtol=2 ** -7, atol=0)
