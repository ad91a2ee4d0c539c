"""Blocks whose experts are an nn.ModuleList of MLP modules, routed by a Python loop over the
experts, trace as one moe_experts op on the stacked weights; the sharded step matches eager with
the per-expert weights split over ep; blocks that cannot be recognised are refused by name."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardgraph as sg
from shardgraph import meta
from shardgraph.check import parity_errors
from shardgraph.frontend import AdapterError, trace

from .expert_list_models import ExpertMLP, LoopedMoE, build
from .models import MOE_BACKWARD, MOE_FORWARD, calls, reference_loss_and_gradients, relative_error, \
    worst_gradient_error

TOLERANCE = 1e-5


@pytest.mark.parametrize("options", [
    {},
    {"names": ("w1", "w3", "w2"), "shared": True},
    {"top_k": 1, "renormalise": False},
], ids=["gate_up_down", "w1_w3_w2_shared", "top1_not_renormalised"])
def test_module_list_experts_trace_as_one_moe_op_with_gradients_per_expert_weight(options):
    model, inputs, loss_fn = build(**options)
    traced = trace(model, inputs, loss_fn)
    assert traced.expert_modules == {"layers.0.mlp": "module_list_experts", "layers.1.mlp": "module_list_experts"}
    assert len(calls(traced, MOE_FORWARD)) == 2 and len(calls(traced, MOE_BACKWARD)) == 2
    gate = options.get("names", ("gate_proj",))[0]
    assert f"layers.1.mlp.experts.3.{gate}.weight" in traced.gradient_names
    loss, gradients = traced.run(model, *inputs)
    reference_loss, reference_gradients = reference_loss_and_gradients(model, inputs, loss_fn)
    assert relative_error(loss, reference_loss) < 1e-6
    assert worst_gradient_error(gradients, reference_gradients)[0] < 1e-6


def test_module_list_experts_trace_on_the_meta_device():
    with torch.device("meta"):
        model = build()[0]
    traced = trace(model, (torch.zeros(8, 8, dtype=torch.long, device="meta"),), build()[2])
    assert len(calls(traced, MOE_FORWARD)) == 2


@pytest.mark.parametrize("mesh", ["world=4,tp=2,ep=2", "world=8,tp=2,ep=2,etp=2"])
def test_module_list_experts_match_eager_with_expert_weights_split_over_ep(mesh):
    model, inputs, loss_fn = build(shared=True)
    program = sg.compile(model, sg.MeshSpec.parse(mesh), inputs, loss_fn)
    etp = program.mesh.etp > 1
    for index in range(4):
        gate = program.parameter_sharding(f"layers.0.mlp.experts.{index}.gate_proj.weight")
        down = program.parameter_sharding(f"layers.1.mlp.experts.{index}.down_proj.weight")
        assert gate.placement("ep") == sg.Shard(1) and down.placement("ep") == sg.Shard(0)
        assert gate.placement("etp") == (sg.Shard(0) if etp else sg.Replicate())
        assert down.placement("etp") == (sg.Shard(1) if etp else sg.Replicate())
    # The shared expert is a dense MLP, not split over ep.
    assert program.parameter_sharding("layers.0.mlp.shared_experts.gate_proj.weight").placement("ep").is_replicate()
    # Each rank computes with its own experts: moe_experts reads its weights split by expert.
    for node in calls(program.placed, MOE_FORWARD):
        record = meta.placed(node)
        assert record.input_shardings[3].placement("ep") == sg.Shard(0)
        assert record.input_shardings[4].placement("ep") == sg.Shard(0)
    errors, _ = parity_errors(program, model, inputs, loss_fn)
    assert errors.within(TOLERANCE), errors


class TopKThenSoftmaxTimesTwo(LoopedMoE):
    """Routing weights no convention produces (scaled by 2): must be refused, not approximated."""

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights, ids = torch.topk(F.softmax(self.gate(x), dim=-1), self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            token, slot = (ids == i).nonzero(as_tuple=True)
            out.index_add_(0, token, expert(x[token]) * 2 * weights[token, slot, None])
        return out.reshape(hidden_states.shape)


class ReluExpert(ExpertMLP):
    def forward(self, x):
        return self.down_proj(torch.relu(self.gate_proj(x)) * self.up_proj(x))


class Wrapper(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


def _refusal(block) -> str:
    x = torch.randn(2, 3, 8)
    with pytest.raises(AdapterError) as caught:
        trace(Wrapper(block), (x,), lambda out, x: out.pow(2).mean())
    return str(caught.value)


def test_unrecognised_routing_is_refused_naming_the_block():
    torch.manual_seed(0)
    message = _refusal(TopKThenSoftmaxTimesTwo(8, 4))
    assert message.startswith("block: TopKThenSoftmaxTimesTwo holds per-expert MLP modules")
    assert "not recognised and would not be expert-sharded" in message


def test_expert_activation_outside_moe_experts_is_refused_naming_the_expert():
    torch.manual_seed(0)
    block = LoopedMoE(8, 4)
    block.experts = nn.ModuleList(ReluExpert(8, 4) for _ in range(4))
    message = _refusal(block)
    assert message.startswith("block.experts.0: expert 0 (ReluExpert) does not compute down(act(gate(x)) * up(x))")


def test_expert_lists_without_a_router_are_refused_naming_the_block():
    torch.manual_seed(0)
    block = LoopedMoE(8, 4)
    block.gate = nn.Linear(8, 3, bias=False)  # not one logit per expert
    assert "holds 4 per-expert MLP modules but no router" in _refusal(block)
