"""The example models: HF-like names and shapes, eager expert paths equal to moe_experts, entry points."""

import pytest
import torch
import torch.nn.functional as F

from examples import hf_models
from examples.moe_model import (
    CONFIGS,
    MoEConfig,
    MoETransformer,
    UnknownConfigError,
    count_parameters,
    lm_loss,
    make_batch,
    shardgraph_entry,
)
from examples.titan_model import TitanConfig, TitanMoE
from shardgraph.frontend import trace


def test_parameter_names_follow_hf():
    model, _, _ = shardgraph_entry("tiny_shared")
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "embed_tokens.weight" and names[-2:] == ["norm.weight", "lm_head.weight"]
    assert [n.removeprefix("layers.0.") for n in names if n.startswith("layers.0.")] == [
        "input_layernorm.weight",
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj",
        "mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight", "mlp.shared_expert.down_proj.weight",
    ]


def test_qwen3_30b_a3b_config_has_the_published_shapes_and_size():
    model, inputs, _ = shardgraph_entry("qwen3_30b_a3b", device="meta", batch_size=2, seq_len=16)
    layer = model.layers[47]
    assert len(model.layers) == 48 and tuple(model.embed_tokens.weight.shape) == (151936, 2048)
    assert tuple(layer.self_attn.q_proj.weight.shape) == (32 * 128, 2048)
    assert tuple(layer.self_attn.k_proj.weight.shape) == (4 * 128, 2048)
    assert tuple(layer.mlp.experts.gate_up_proj.shape) == (128, 2 * 768, 2048)
    assert tuple(layer.mlp.experts.down_proj.shape) == (128, 2048, 768)
    assert layer.self_attn.q_norm is not None and layer.mlp.top_k == 8
    counts = count_parameters(CONFIGS["qwen3_30b_a3b"])
    assert 30.4e9 < counts["total"] < 30.6e9 and 3.2e9 < counts["active"] < 3.4e9
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert inputs[0].device.type == "meta" and inputs[0].dtype == torch.long


def test_qwen3_shaped_layers_trace_on_the_meta_device():
    model, inputs, loss_fn = shardgraph_entry("qwen3_30b_a3b", device="meta", batch_size=1, seq_len=32, num_layers=2)
    traced = trace(model, inputs, loss_fn)
    assert traced.parameter_shapes["layers.1.mlp.experts.gate_up_proj"] == (128, 1536, 2048)
    assert traced.gradient_names == traced.parameter_names


def test_expert_loop_equals_the_moe_experts_op():
    torch.manual_seed(0)
    model = MoETransformer(CONFIGS["tiny"])
    experts = model.layers[0].mlp.experts
    hidden = torch.randn(10, 32)
    weights, ids = torch.randn(10, 8).softmax(-1).topk(2, dim=-1)
    expected = experts(hidden, ids, weights)
    got = torch.ops.shardgraph.moe_experts(hidden, ids, weights, experts.gate_up_proj, experts.down_proj, "silu")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_router_weights_are_renormalised_over_the_top_k():
    torch.manual_seed(0)
    block = MoETransformer(CONFIGS["tiny"]).layers[0].mlp
    captured = {}
    block.experts.register_forward_hook(lambda m, args, out: captured.update(weights=args[2], ids=args[1]))
    block(torch.randn(2, 3, 32))
    torch.testing.assert_close(captured["weights"].sum(-1), torch.ones(6))
    assert captured["ids"].shape == (6, 2) and captured["ids"].dtype == torch.int64


def test_lm_loss_predicts_the_next_token():
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    expected = torch.stack([-F.log_softmax(logits[b, t], -1)[ids[b, t + 1]] for b in range(2) for t in range(4)]).mean()
    torch.testing.assert_close(lm_loss(logits, ids), expected)


def test_batches_are_deterministic_and_checked():
    config = CONFIGS["tiny"]
    (first,), (again,), (other,) = (make_batch(config, 3, 5, seed=s) for s in (1, 1, 2))
    assert first.shape == (3, 5) and torch.equal(first, again) and not torch.equal(first, other)
    assert int(first.max()) < config.vocab_size
    with pytest.raises(ValueError, match="seq_len 1 at least 2"):
        make_batch(config, 3, 1)


def test_entry_point_builds_model_inputs_and_loss():
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=3, seq_len=4, num_layers=3)
    assert len(model.layers) == 3 and inputs[0].shape == (3, 4) and loss_fn is lm_loss
    assert loss_fn(model(*inputs), *inputs).dim() == 0
    with pytest.raises(UnknownConfigError, match="unknown config 'huge'; known: tiny, tiny_shared"):
        shardgraph_entry("huge")
    assert issubclass(UnknownConfigError, ValueError) and issubclass(UnknownConfigError, KeyError)


def test_config_values_are_checked():
    with pytest.raises(ValueError, match="num_heads 6 must be a positive multiple of num_kv_heads 4"):
        MoEConfig(num_heads=6)
    with pytest.raises(ValueError, match="top_k 9 must be in 1..num_experts=8"):
        MoEConfig(top_k=9)
    with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_heads 4"):
        MoEConfig(hidden_size=30)
    assert MoEConfig(hidden_size=30, head_dim=8).attention_head_dim == 8


def test_torchtitan_style_model_counts_tokens_and_its_experts_equal_the_op():
    torch.manual_seed(0)
    config = TitanConfig(load_balance_coeff=1e-3)
    model = TitanMoE(config)
    ids = torch.randint(0, config.vocab_size, (2, 5))
    assert model(ids).shape == (2, 5, config.vocab_size)
    counted = model.layers[0].moe.tokens_per_expert
    assert counted.sum() == 2 * 5 * config.top_k  # every token copy counted once
    moe = model.layers[0].moe
    tokens = torch.randn(7, config.dim)
    scores, expert_ids, _ = moe.router(tokens, moe.expert_bias)
    w_gate_up = torch.cat([moe.experts.w1, moe.experts.w3], dim=1)
    got = torch.ops.shardgraph.moe_experts(tokens, expert_ids, scores, w_gate_up, moe.experts.w2, "silu")
    expected = moe(tokens[None])[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_expert_bias_changes_the_chosen_experts_but_not_their_scores():
    torch.manual_seed(0)
    moe = TitanMoE(TitanConfig(load_balance_coeff=1e-3)).layers[0].moe
    tokens = torch.randn(6, 32)
    _, unbiased_ids, _ = moe.router(tokens, None)
    bias = torch.tensor([10.0, 0.0, 0.0, 0.0])
    scores, ids, _ = moe.router(tokens, bias)
    assert (ids == 0).any(dim=-1).all() and not torch.equal(ids, unbiased_ids)
    raw = torch.sigmoid(moe.router.gate(tokens)).gather(-1, ids)
    torch.testing.assert_close(scores, raw / raw.sum(-1, keepdim=True))


def test_hf_entry_builds_both_families_and_refuses_others():
    for family in hf_models.FAMILIES:
        model, (ids,), loss_fn = hf_models.shardgraph_entry(family, batch_size=2, seq_len=5)
        assert loss_fn(model(ids), ids).dim() == 0
        assert model.config.hidden_act == "silu"
    model, (ids,), _ = hf_models.shardgraph_entry("qwen2_moe", device="meta")
    assert ids.device.type == "meta" and model.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"
    with pytest.raises(ValueError, match="unknown config 'gpt_oss'"):
        hf_models.shardgraph_entry("gpt_oss")
