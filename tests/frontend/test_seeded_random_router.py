"""Random numbers a model draws (PhiMoE's train-mode sparsemixer: Gumbel sampling and a random
mask) come from a seed the program takes as input: every rank draws the numbers the unsharded
model draws eagerly after ``torch.manual_seed(seed)``, the same seed gives the same step, another
seed another; draws read split on a model-parallel dim, and random ops shardgraph does not seed,
are refused by name."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardgraph as sg
from shardgraph.check import parity_errors
from shardgraph.frontend import TraceError, trace
from shardgraph.placement import ShardingError

MESH = "world=4,tp=2,ep=2"


def _loss(out, ids):
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.fixture(scope="module")
def phimoe():
    from transformers import PhimoeConfig, PhimoeForCausalLM

    torch.manual_seed(0)
    config = PhimoeConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=64, attn_implementation="eager", use_cache=False)
    model = PhimoeForCausalLM(config).float().train()  # sparsemixer samples experts in training
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(3))
    return model, ids, sg.compile(model, sg.MeshSpec.parse(MESH), (ids,), _loss)


def test_phimoe_train_mode_router_matches_eager_run_under_the_same_seed(phimoe):
    model, ids, program = phimoe
    assert program.takes_seed
    draws = [n for n in program.traced.graph_module.graph.nodes if str(n.target) == "shardgraph.random_draw.default"]
    assert [n.args[1] for n in draws] == ["exponential", "uniform", "exponential", "uniform", "uniform"] * 2
    errors, _ = parity_errors(program, model, (ids,), _loss, seed=11)
    assert errors.within(1e-5), errors


def test_the_same_seed_gives_the_same_step_and_another_seed_another(phimoe):
    model, ids, program = phimoe
    full = {name: p.detach() for name, p in model.named_parameters()}
    first, again, other = (program.run_simulated(full, (ids,), seed=seed) for seed in (5, 5, 6))
    assert torch.equal(first.loss, again.loss)
    assert all(torch.equal(first.gradients[n], again.gradients[n]) for n in first.gradients)
    assert not torch.equal(first.loss, other.loss)
    assert any(not torch.equal(first.gradients[n], other.gradients[n]) for n in first.gradients)


def test_a_program_that_draws_random_numbers_asks_for_its_seed(phimoe):
    model, ids, program = phimoe
    with pytest.raises(TypeError, match=r"draws random numbers .*pass seed=<int>"):
        program.run_simulated({n: p.detach() for n, p in model.named_parameters()}, (ids,))


class NoisyProjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(32, 32, bias=False)  # colwise over tp in the default plan
        self.self_attn.o_proj = nn.Linear(32, 32, bias=False)
        self.head = nn.Linear(32, 64, bias=False)

    def forward(self, ids):
        q = self.self_attn.q_proj(self.embed(ids))
        q = q * torch.rand_like(q)  # noise on an activation split over tp by its hidden units
        return self.head(self.self_attn.o_proj(q))


def test_a_draw_read_split_over_tp_on_hidden_units_is_refused_naming_it():
    model = NoisyProjection()
    ids = torch.randint(0, 64, (4, 8))
    with pytest.raises(ShardingError, match=r"random draw .*uniform, shape \[4, 8, 32\].*split over tp on dim 2.*"
                                            r"not on model-parallel activations"):
        sg.compile(model, sg.MeshSpec.parse("world=2,tp=2"), (ids,), _loss)


class SampledTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64)

    def forward(self, ids):
        probabilities = self.head(self.embed(ids)).softmax(-1).flatten(0, 1)
        sampled = torch.multinomial(probabilities, 1).reshape(ids.shape)
        return self.head(self.embed(sampled))


def test_a_random_op_shardgraph_does_not_seed_is_refused_naming_it():
    with pytest.raises(TraceError, match=r"module '<root>' at .*draws random numbers \(aten\.multinomial.*does not seed"):
        trace(SampledTokens(), (torch.randint(0, 64, (2, 8)),), _loss)


def test_dropout_of_an_activation_replicated_over_tp_draws_what_eager_draws():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), nn.Dropout(0.25), nn.Linear(32, 64)).train()
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1))
    program = sg.compile(model, sg.MeshSpec.parse("world=4,tp=2"), (ids,), _loss)
    errors, _ = parity_errors(program, model, (ids,), _loss, seed=3)
    assert errors.within(1e-5), errors
