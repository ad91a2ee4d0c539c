"""Adapters recognise expert blocks without editing them, and users can register their own."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples import hf_models
from examples.hf_models import lm_loss
from shardgraph.frontend import AdapterError, identify_activation, register_experts, trace, unregister_experts

from .models import MOE_FORWARD, calls, reference_loss_and_gradients, relative_error, worst_gradient_error


@pytest.mark.parametrize("name, expected", [
    ("silu", "silu"), ("swish", "silu"), ("gelu", "gelu"), ("gelu_new", "gelu_tanh"),
    ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_fast", "gelu_tanh"),
])
def test_hf_activations_are_identified_by_what_they_compute(name, expected):
    from transformers.activations import ACT2FN

    assert identify_activation(ACT2FN[name], "experts.act_fn") == expected


def test_plain_functions_and_torch_modules_are_identified_and_others_refused():
    assert identify_activation(F.silu, "a") == "silu"
    assert identify_activation(nn.GELU(approximate="tanh"), "a") == "gelu_tanh"
    assert identify_activation(lambda x: x * torch.sigmoid(x), "a") == "silu"
    with pytest.raises(AdapterError, match="a: activation ReLU is none of the moe_experts activations"):
        identify_activation(nn.ReLU(), "a")
    with pytest.raises(AdapterError, match="a: activation .* is not elementwise"):
        identify_activation(lambda x: x.sum(), "a")


@pytest.mark.parametrize("hidden_act, activation", [("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh")])
def test_hf_experts_with_gelu_trace_to_the_matching_activation(hidden_act, activation):
    model = hf_models.build("mixtral", hidden_act=hidden_act)
    inputs = (torch.randint(0, hf_models.VOCAB_SIZE, (3, 5), generator=torch.Generator().manual_seed(2)),)
    traced = trace(model, inputs, lm_loss)
    assert {node.args[5] for node in calls(traced, MOE_FORWARD)} == {activation}
    loss, gradients = traced.run(model, *inputs)
    reference_loss, reference_gradients = reference_loss_and_gradients(model, inputs, lm_loss)
    assert relative_error(loss, reference_loss) < 1e-6
    assert worst_gradient_error(gradients, reference_gradients)[0] < 1e-6


class PairExperts(nn.Module):
    """A user's expert module with its own weight names and an eager loop."""

    def __init__(self, experts=4, hidden=6, intermediate=3):
        super().__init__()
        self.gate_and_up = nn.Parameter(torch.randn(experts, 2 * intermediate, hidden) * 0.3)
        self.out = nn.Parameter(torch.randn(experts, hidden, intermediate) * 0.3)

    def forward(self, x, ids, weights):
        result = torch.zeros_like(x)
        for token in range(x.shape[0]):
            for slot in range(ids.shape[1]):
                expert = int(ids[token, slot])
                gate, up = (self.gate_and_up[expert] @ x[token]).chunk(2)
                result[token] += weights[token, slot] * (self.out[expert] @ (F.silu(gate) * up))
        return result


class RoutedModel(nn.Module):
    def __init__(self, experts: nn.Module):
        super().__init__()
        self.router = nn.Linear(6, 4, bias=False)
        self.experts = experts

    def forward(self, x):
        weights, ids = self.router(x).softmax(-1).topk(2, dim=-1)
        return self.experts(x, ids, weights / weights.sum(-1, keepdim=True))


def pair_adapter(module, x, ids, weights):
    return torch.ops.shardgraph.moe_experts(x, ids, weights, module.gate_and_up, module.out, "silu")


@pytest.fixture
def registered_pair_experts():
    register_experts(PairExperts, pair_adapter)
    yield
    unregister_experts(PairExperts)


def test_registered_expert_module_traces_as_one_op_and_matches_its_eager_loop(registered_pair_experts):
    class MyPairExperts(PairExperts):  # subclasses use the registered adapter too
        pass

    torch.manual_seed(0)
    model, x = RoutedModel(MyPairExperts()), torch.randn(5, 6)
    traced = trace(model, (x,), lambda out, x: out.pow(2).sum())
    assert traced.expert_modules == {"experts": "registered:PairExperts"}
    assert len(calls(traced, MOE_FORWARD)) == 1
    assert "experts.gate_and_up" in traced.gradient_names
    loss, gradients = traced.run(model, x)
    reference_loss, reference_gradients = reference_loss_and_gradients(model, (x,), lambda out, x: out.pow(2).sum())
    assert relative_error(loss, reference_loss) < 1e-6
    assert worst_gradient_error(gradients, reference_gradients)[0] < 1e-6


def test_unregistered_module_is_no_longer_adapted():
    register_experts(PairExperts, pair_adapter)
    unregister_experts(PairExperts)
    with pytest.raises(KeyError, match="no adapter is registered"):
        unregister_experts(PairExperts)
    with pytest.raises(Exception, match="cannot trace module 'experts'"):
        trace(RoutedModel(PairExperts()), (torch.randn(5, 6),), lambda out, x: out.sum())


def test_register_experts_checks_its_arguments():
    with pytest.raises(TypeError, match="module_class must be an nn.Module subclass"):
        register_experts(object, pair_adapter)
    with pytest.raises(TypeError, match="adapter_fn must be callable"):
        register_experts(PairExperts, "pair")


def test_grouped_experts_taking_routing_directly_are_adapted_with_w1_w3_concatenated():
    class ThreeWeightExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(4, 3, 6) * 0.3)
            self.w2 = nn.Parameter(torch.randn(4, 6, 3) * 0.3)
            self.w3 = nn.Parameter(torch.randn(4, 3, 6) * 0.3)

        def forward(self, x, topk_ids, topk_weights):
            result = torch.zeros_like(x)
            for token in range(x.shape[0]):
                for slot in range(topk_ids.shape[1]):
                    e = int(topk_ids[token, slot])
                    hidden = F.silu(self.w1[e] @ x[token]) * (self.w3[e] @ x[token])
                    result[token] += topk_weights[token, slot] * (self.w2[e] @ hidden)
            return result

    torch.manual_seed(1)
    model, x = RoutedModel(ThreeWeightExperts()), torch.randn(5, 6)
    traced = trace(model, (x,), lambda out, x: out.pow(2).sum())
    assert traced.expert_modules == {"experts": "grouped_experts"}
    assert len(calls(traced, "aten.cat.default")) == 1
    loss, gradients = traced.run(model, x)
    reference_loss, reference_gradients = reference_loss_and_gradients(model, (x,), lambda out, x: out.pow(2).sum())
    assert relative_error(loss, reference_loss) < 1e-6
    assert worst_gradient_error(gradients, reference_gradients)[0] < 1e-6


def test_forward_is_restored_when_tracing_fails_inside_an_adapted_module():
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(6, 4, bias=False)
            self.experts = PairExperts()

        def forward(self, x):
            weights, ids = self.router(x).softmax(-1).topk(2, dim=-1)
            return self.experts(x, ids.to(torch.int32), weights)  # the op takes int64 ids

    register_experts(PairExperts, pair_adapter)
    try:
        model = Failing()
        with pytest.raises(Exception, match="topk_ids must be int64 expert ids, got torch.int32"):
            trace(model, (torch.randn(5, 6),), lambda out, x: out.sum())
        assert "forward" not in model.experts.__dict__
    finally:
        unregister_experts(PairExperts)
