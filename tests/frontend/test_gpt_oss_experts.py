"""GPT-OSS (transformers' GptOssForCausalLM): experts with biases, transposed [E, H, 2I] interleaved
gate/up and a clamped SwiGLU traced as one moe_experts op; attention sinks split with the heads."""

import pytest
import torch
import torch.nn.functional as F

import shardgraph as sg
from shardgraph.check import parity_errors
from shardgraph.frontend import AdapterError, trace
from shardgraph.frontend.adapters import adapter_for

TOLERANCE = 1e-5
pytest.importorskip("transformers")


def gpt_oss_config(**overrides):
    from transformers import GptOssConfig

    settings = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=4, swiglu_limit=0.5,
                    max_position_embeddings=64, tie_word_embeddings=False, use_cache=False,
                    attn_implementation="eager")
    settings.update(overrides)
    return GptOssConfig(**settings)


def with_random_biases(module, seed=1, scale=0.5):
    """HF initialises GPT-OSS's biases to zero, which would hide a bias added twice or split wrong."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


def lm_loss(output, ids):
    logits = output.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def test_gpt_oss_experts_are_one_op_equal_to_their_eager_forward_with_clamps_cutting_in():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    torch.manual_seed(0)
    experts = GptOssExperts(gpt_oss_config(swiglu_limit=1.5)).double()
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_()
    kind, forward = adapter_for("experts", experts)
    hidden = torch.randn(11, 32, dtype=torch.float64)
    weights, ids = torch.randn(11, 4).softmax(-1).topk(2, dim=-1)
    weights = weights.double()
    assert kind == "hf_fused_experts"
    torch.testing.assert_close(forward(hidden, ids, weights), experts(hidden, ids, weights), rtol=1e-12, atol=1e-12)
    product = hidden @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
    assert (product[:, ::2] > 1.5).any() and (product[:, 1::2].abs() > 1.5).any()  # both clamps cut in


def test_gpt_oss_experts_trace_with_their_layout_and_parameters_in_place():
    from transformers import GptOssForCausalLM

    torch.manual_seed(0)
    model = GptOssForCausalLM(gpt_oss_config(num_hidden_layers=1, layer_types=["full_attention"]))
    traced = trace(model, (torch.zeros(2, 4, dtype=torch.long),), lm_loss)
    [node] = [n for n in traced.graph_module.graph.nodes if str(n.target) == "shardgraph.moe_experts.default"]
    assert node.args[5] == "clamped_swiglu(alpha=1.702,limit=0.5,layout=interleaved)"
    assert [str(a.target) for a in node.args[3:5]] == ["aten.transpose.int"] * 2  # views of the stored [E, H, 2I]
    assert len(node.args) == 8 and all(a.op == "placeholder" for a in node.args[6:8])  # the two biases


def test_gpt_oss_matches_eager_on_world8_tp2_ep2_etp2_with_experts_and_sinks_split():
    from transformers import GptOssForCausalLM

    torch.manual_seed(0)
    model = with_random_biases(GptOssForCausalLM(gpt_oss_config()).float().eval())
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(3))
    program = sg.compile(model, sg.MeshSpec.parse("world=8,tp=2,ep=2,etp=2"), (ids,), lm_loss)
    experts = "model.layers.0.mlp.experts."
    # Stored [E, H, 2I] with (gate, up) pairs adjacent: a contiguous run of pairs on each etp rank.
    assert program.parameter_sharding(experts + "gate_up_proj") == sg.Sharding.of(ep=sg.Shard(0), etp=sg.Shard(2))
    assert program.parameter_sharding(experts + "down_proj") == sg.Sharding.of(ep=sg.Shard(0), etp=sg.Shard(1))
    assert program.parameter_sharding(experts + "gate_up_proj_bias") == sg.Sharding.of(ep=sg.Shard(0),
                                                                                        etp=sg.Shard(1))
    assert program.parameter_sharding(experts + "down_proj_bias") == sg.Sharding.of(ep=sg.Shard(0))
    assert program.parameter_sharding("model.layers.1.self_attn.sinks") == sg.Sharding.of(tp=sg.Shard(0))
    errors, _ = parity_errors(program, model, (ids,), lm_loss)
    assert errors.within(TOLERANCE), errors


def test_gpt_oss_experts_whose_layout_flag_contradicts_their_gate_are_refused():
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM(gpt_oss_config(num_hidden_layers=1, layer_types=["full_attention"]))
    model.model.layers[0].mlp.experts.is_concatenated = True
    with pytest.raises(AdapterError, match=r"GptOssExperts\.is_concatenated is True, but its gate reads the gate/up "
                                           r"columns interleaved"):
        trace(model, (torch.zeros(2, 4, dtype=torch.long),), lm_loss)


def test_experts_with_a_gate_none_of_the_op_computes_are_refused_naming_it():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    class ReluGateExperts(GptOssExperts):
        def _apply_gate(self, gate_up):
            return torch.relu(gate_up[..., ::2]) * gate_up[..., 1::2]

    with pytest.raises(AdapterError, match=r"experts\._apply_gate: its gate .* computes none of the moe_experts gated "
                                           r"activations \(silu, silu\(layout=interleaved\)"):
        adapter_for("experts", ReluGateExperts(gpt_oss_config()))
