"""The default plan finds routed experts by the graph's structure, not by their parameter names.

GraniteMoE keeps its experts under ``block_sparse_moe``, Jamba and LFM2 under ``feed_forward``,
and a user's registered class names its weights as it likes: wherever a ``moe_experts`` op reads
its weights from, those parameters are split over ep, and the sharded step matches eager.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardgraph as sg
from passes.plan import default_plan, expert_parameters
from shardgraph.check import parity_errors
from shardgraph.frontend import register_experts, trace, unregister_experts

TOLERANCE = 1e-5


def granite():
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

    torch.manual_seed(0)
    return GraniteMoeForCausalLM(GraniteMoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, attn_implementation="eager"))


def lm_loss(output, ids):
    logits = output.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class NamedOddly(nn.Module):
    """Experts whose weights are called neither gate_up_proj nor w1/w2/w3."""

    def __init__(self, experts=4, hidden=8, intermediate=4):
        super().__init__()
        self.wi = nn.Parameter(torch.randn(experts, 2 * intermediate, hidden) * 0.3)
        self.wo = nn.Parameter(torch.randn(experts, hidden, intermediate) * 0.3)

    def forward(self, x, ids, weights):
        out = torch.zeros_like(x)
        for slot in range(ids.shape[1]):
            gate, up = torch.einsum("th,tih->ti", x, self.wi[ids[:, slot]]).chunk(2, dim=-1)
            out = out + weights[:, slot, None] * torch.einsum("ti,thi->th", F.silu(gate) * up, self.wo[ids[:, slot]])
        return out


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4, bias=False)
        self.ffn = NamedOddly()

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        weights, ids = self.router(tokens).softmax(-1).topk(2, dim=-1)
        return x + self.ffn(tokens, ids, weights).reshape(x.shape)


def test_hf_experts_under_any_block_name_are_expert_sharded_by_structure():
    model = granite()
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(1))
    traced = trace(model, (ids,), lm_loss)
    found = expert_parameters(traced.graph_module)
    assert {name: (found.style, found.fused) for name, found in found.items()} == {
        f"model.layers.{i}.block_sparse_moe.experts.{name}": style
                     for i in range(2) for name, style in (("gate_up_proj", ("expert_colwise", True)),
                                                          ("down_proj", ("expert_rowwise", False)))}
    plan = default_plan(traced.parameter_names, traced.graph_module)
    mesh = sg.MeshSpec.parse("world=8,tp=2,ep=2,etp=2")
    program = sg.compile(model, mesh, (ids,), lm_loss, plan=plan)
    gate_up = program.parameter_sharding("model.layers.0.block_sparse_moe.experts.gate_up_proj")
    assert gate_up.placement("ep") == sg.Shard(0) and gate_up.placement("etp") == sg.InterleavedShard(1, 2)
    assert program.parameter_sharding("model.layers.1.block_sparse_moe.experts.down_proj").placement("etp") == sg.Shard(2)
    errors, _ = parity_errors(program, model, (ids,), lm_loss)
    assert errors.within(TOLERANCE), errors


def test_the_name_only_default_plan_matches_experts_under_any_block_name():
    names = ["model.layers.0.feed_forward.experts.gate_up_proj", "model.layers.0.feed_forward.experts.down_proj",
             "model.layers.0.mlp.shared_experts.gate_up_proj", "model.layers.0.mlp.gate_up_proj"]
    plan = default_plan(names)
    from passes.plan import resolve_plan

    placed = resolve_plan({n: (4, 8, 8) if "experts" in n else (8, 8) for n in names}, plan, sg.MeshSpec(4, ep=4))
    assert placed[names[0]].style == "expert_colwise" and placed[names[1]].style == "expert_rowwise"
    # A shared expert or a dense fused MLP is not a routed expert.
    assert placed[names[2]].style == "replicate" and placed[names[3]].style == "replicate"


@pytest.fixture
def registered():
    register_experts(NamedOddly, lambda module, x, ids, weights: torch.ops.shardgraph.moe_experts(
        x, ids, weights, module.wi, module.wo, "silu"))
    yield
    unregister_experts(NamedOddly)


def test_registered_experts_with_their_own_names_are_expert_sharded_and_match_eager(registered):
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(4, 4, 8)
    loss_fn = lambda out, x: out.pow(2).mean()  # noqa: E731
    traced = trace(model, (x,), loss_fn)
    plan = default_plan(traced.parameter_names, traced.graph_module)
    assert plan == {"ffn.wi": "expert_colwise", "ffn.wo": "expert_rowwise"}
    program = sg.compile(model, sg.MeshSpec.parse("world=4,tp=2,ep=2"), (x,), loss_fn, plan=plan)
    assert program.parameter_sharding("ffn.wi").placement("ep") == sg.Shard(0)

    errors, _ = parity_errors(program, model, (x,), loss_fn)
    assert errors.within(TOLERANCE), errors
