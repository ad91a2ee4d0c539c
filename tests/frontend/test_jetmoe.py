"""JetMoE: the MoE MLP (router.layer, input_linear [E, 2I, H], output_linear [E, H, I], an output
bias) traces as one moe_experts op and matches eager split over ep; the mixture of attention
heads (JetMoeMoA, routed query and output projections around attention) is refused up front,
naming the module."""

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


def test_jetmoe_mixture_of_attention_heads_is_refused_up_front_naming_the_module():
    from transformers import JetMoeForCausalLM

    model = JetMoeForCausalLM(_config()).eval()
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.self_attention\.experts: JetMoeMoA is a mixture of "
                                           r"attention heads.*does not support routed attention projections"):
        trace(model, (torch.randint(0, 64, (2, 8)),), _loss)


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
