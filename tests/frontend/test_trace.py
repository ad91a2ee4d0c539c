"""Tracing: the joint graph reproduces each model's loss and gradients, keeps MoE whole, reports errors."""

import pytest
import torch
from torch import nn

from examples.moe_model import lm_loss, shardgraph_entry
from examples.titan_model import TitanConfig, TitanMoE
from shardgraph.frontend import TraceError, register_experts, trace

from ..test_parity import hf_models


def relative_error(value, reference):
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def moe_nodes(traced):
    nodes = [n for n in traced.graph_module.graph.nodes if n.op == "call_function"]
    forward = [n for n in nodes if str(n.target) == "shardgraph.moe_experts.default"]
    backward = [n for n in nodes if str(n.target) == "shardgraph.moe_experts_backward.default"]
    return forward, backward


def check_traced(model, inputs, layers):
    traced = trace(model, inputs, lm_loss)
    loss, gradients = traced.run(model, *inputs)
    reference = lm_loss(model(*inputs), *inputs)
    reference_gradients = torch.autograd.grad(reference, list(model.parameters()))
    assert relative_error(loss, reference.detach()) < 1e-6
    for name, expected in zip(traced.parameter_names, reference_gradients):
        assert relative_error(gradients[name], expected) < 1e-6, name
    forward, backward = moe_nodes(traced)
    assert len(forward) == layers and len(backward) == layers
    forward_only = trace(model, inputs)
    logits = forward_only.graph_module(*[p.detach() for p in model.parameters()],
                                       *[b for b in model.buffers()], *inputs)[0]
    expected_logits = getattr(model(*inputs), "logits", None)
    expected_logits = model(*inputs) if expected_logits is None else expected_logits
    assert relative_error(logits, expected_logits.detach()) < 1e-6
    return traced


def test_example_model_traces_to_its_own_loss_gradients_and_logits():
    model, inputs, _ = shardgraph_entry("tiny_shared")
    traced = check_traced(model, inputs, layers=2)
    placeholders = [n for n in traced.graph_module.graph.nodes if n.op == "placeholder"]
    assert placeholders[0].meta["shardgraph_name"] == "embed_tokens.weight"
    assert placeholders[0].meta["shardgraph_kind"] == "parameter"
    assert placeholders[-1].meta["shardgraph_kind"] == "input"
    assert not [n for n in traced.graph_module.graph.nodes if n.op == "call_function" and str(n.target).endswith("_.Tensor")]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_hf_models_trace_to_their_own_loss_gradients_and_logits(family):
    model = hf_models()[family]
    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(1))
    traced = check_traced(model, (ids,), layers=2)
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in traced.parameter_names)


def test_torchtitan_style_grouped_experts_trace_with_w1_w3_fused_in_the_graph():
    torch.manual_seed(0)
    model = TitanMoE(TitanConfig())
    ids = torch.randint(0, 64, (4, 6))
    traced = check_traced(model, (ids,), layers=2)
    cats = [n for n in traced.graph_module.graph.nodes if n.op == "call_function" and "cat" in str(n.target)]
    assert cats and "layers.0.moe.experts.w1" in traced.parameter_names


def test_meta_device_model_traces_without_memory():
    model, inputs, loss_fn = shardgraph_entry("small", device="meta", batch_size=2, seq_len=16)
    assert all(p.device.type == "meta" for p in model.parameters())
    traced = trace(model, inputs, loss_fn)
    forward, backward = moe_nodes(traced)
    assert len(forward) == len(backward) == model.config.num_layers


def test_data_dependent_control_flow_names_the_module_and_line():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            y = self.proj(x)
            if y.sum() > 0:  # depends on values
                return y * 2
            return y

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Branchy()

        def forward(self, x):
            return self.block(x)

    with pytest.raises(TraceError) as info:
        trace(Outer(), (torch.randn(2, 4),), lambda out, x: out.sum())
    message = str(info.value)
    assert "module 'block'" in message and "test_trace.py" in message and "if y.sum() > 0" in message
    assert "tensor values" in message


def test_user_expert_modules_register_an_adapter():
    class MyExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_and_gate = nn.Parameter(torch.randn(4, 8, 6) * 0.3)
            self.out = nn.Parameter(torch.randn(4, 6, 4) * 0.3)

        def forward(self, x, ids, weights):  # eager: a loop the frontend never sees
            return torch.ops.shardgraph.moe_experts(x, ids, weights, self.up_and_gate, self.out, "silu")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(6, 4, bias=False)
            self.experts = MyExperts()

        def forward(self, x):
            weights, ids = self.router(x).softmax(-1).topk(2, dim=-1)
            return self.experts(x, ids, weights)

    calls = []

    def adapter(module, x, ids, weights):
        calls.append(module)
        return torch.ops.shardgraph.moe_experts(x, ids, weights, module.up_and_gate, module.out, "silu")

    register_experts(MyExperts, adapter)
    model = Model()
    traced = trace(model, (torch.randn(5, 6),), lambda out, x: out.pow(2).sum())
    assert calls and len(moe_nodes(traced)[0]) == 1
    assert "experts.up_and_gate" in traced.parameter_names
