"""JetMoE: the MoE MLP (router.layer, input_linear [E, 2I, H], output_linear [E, H, I], an output
bias) traces as one moe_experts op and matches eager split over ep; the mixture of attention
heads (JetMoeMoA, routed query and output projections around attention, called through
map/reduce) traces as routed linears, checked against its own map/reduce, so the whole model
compiles and matches eager with its MoA weights whole on every rank."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardgraph as sg
from shardgraph.check import parity_errors
from shardgraph.frontend import AdapterError, trace


def _config():
    from transformers import JetMoeConfig

    return JetMoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, kv_channels=8, num_local_experts=4,
                        num_experts_per_tok=2, attn_implementation="eager", use_cache=False)


def _loss(out, ids):
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


class JetMoeMlpStack(nn.Module):
    """Embedding, two JetMoE MoE MLP blocks with residuals, output projection."""

    def __init__(self, config):
        from transformers.models.jetmoe.modeling_jetmoe import JetMoeMoE

        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(JetMoeMoE(config) for _ in range(2))
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _jetmoe(seed: int = 0):
    from transformers import JetMoeForCausalLM

    torch.manual_seed(seed)
    model = JetMoeForCausalLM(_config()).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "linear" in name or name.endswith("bias"):
                # Biases start at zero; expert weights at HF's 0.02 leave attention nearly uniform,
                # where the query gradients cancel and eager float32 itself is 1e-5 from float64.
                parameter.normal_(0, 0.3)
    return model


def test_jetmoe_with_mixture_of_attention_heads_matches_eager_at_world4_tp2_ep2():
    model = _jetmoe()
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(3))
    program = sg.compile(model, sg.MeshSpec.parse("world=4,tp=2,ep=2"), (ids,), _loss)
    for layer in (0, 1):
        assert program.traced.expert_modules[f"model.layers.{layer}.self_attention.experts"] == \
            "mixture_of_attention_heads"
        assert program.traced.expert_modules[f"model.layers.{layer}.mlp"] == "parallel_experts_block"
    # The MoE MLP's experts are split over ep; the attention experts stay whole on every rank.
    assert program.parameter_sharding("model.layers.0.mlp.input_linear.weight").placement("ep") == sg.Shard(0)
    for name in ("input_linear.weight", "output_linear.weight"):
        sharding = program.parameter_sharding(f"model.layers.0.self_attention.experts.{name}")
        assert all(sharding.placement(axis) == sg.Replicate() for axis in ("tp", "ep", "etp"))
    errors, _ = parity_errors(program, model, (ids,), _loss)
    assert errors.within(1e-5), errors
    # map/reduce were the instance's own only while tracing.
    assert not {"map", "reduce", "forward"} & set(vars(model.model.layers[0].self_attention.experts))


def test_mixture_of_attention_heads_whose_reduce_differs_from_the_routed_sum_is_refused():
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeMoA

    class UnweightedMoA(JetMoeMoA):
        """Sums the projected copies without their routing weights."""

        def reduce(self, layer_input, topo_info):
            index_sorted, batch_index, batch_gates, expert_size = topo_info
            return super().reduce(layer_input, (index_sorted, batch_index, torch.ones_like(batch_gates), expert_size))

    model = _jetmoe()
    model.model.layers[1].self_attention.experts = UnweightedMoA(_config())
    with pytest.raises(AdapterError, match=r"model\.layers\.1\.self_attention\.experts: UnweightedMoA looks like a "
                                           r"mixture of attention heads .* its own reduce differs"):
        trace(model, (torch.randint(0, 64, (2, 8)),), _loss)
    assert "reduce" not in vars(model.model.layers[0].self_attention.experts)  # nothing was left installed


def test_jetmoe_moe_mlp_matches_eager_with_experts_split_over_ep():
    torch.manual_seed(0)
    model = JetMoeMlpStack(_config())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "linear" in name or name.endswith("bias"):
                parameter.normal_(0, 0.3)  # JetMoE leaves expert weights and biases uninitialised
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(3))
    program = sg.compile(model, sg.MeshSpec.parse("world=4,tp=2,ep=2"), (ids,), _loss)
    assert program.traced.expert_modules == {"blocks.0": "parallel_experts_block", "blocks.1": "parallel_experts_block"}
    for name in ("input_linear.weight", "output_linear.weight"):
        assert program.parameter_sharding(f"blocks.0.{name}").placement("ep") == sg.Shard(0)
    errors, _ = parity_errors(program, model, (ids,), _loss)
    assert errors.within(1e-5), errors
