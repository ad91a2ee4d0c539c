"""moe_experts computes what the installed HF transformers fused experts compute, weight for weight."""

import pytest
import torch


def hf_experts(family: str, hidden_act: str):
    from transformers import MixtralConfig, Qwen2MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    if family == "mixtral":
        config = MixtralConfig(hidden_size=12, intermediate_size=5, num_local_experts=6, hidden_act=hidden_act)
        return MixtralExperts(config)
    config = Qwen2MoeConfig(hidden_size=12, moe_intermediate_size=5, num_experts=6, hidden_act=hidden_act)
    return Qwen2MoeExperts(config)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("hidden_act, activation", [("silu", "silu"), ("gelu", "gelu")])
def test_op_equals_the_hf_experts_eager_forward(family, hidden_act, activation):
    torch.manual_seed(0)
    experts = hf_experts(family, hidden_act).double()
    with torch.no_grad():
        experts.gate_up_proj.normal_()
        experts.down_proj.normal_()
    assert tuple(experts.gate_up_proj.shape) == (6, 10, 12) and tuple(experts.down_proj.shape) == (6, 12, 5)
    hidden = torch.randn(11, 12, dtype=torch.float64)
    weights, ids = torch.randn(11, 6).softmax(-1).topk(3, dim=-1)
    weights = weights.double()
    expected = experts(hidden, ids, weights)
    got = torch.ops.shardgraph.moe_experts(hidden, ids, weights, experts.gate_up_proj, experts.down_proj, activation)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
