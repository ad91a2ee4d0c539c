"""HF MoE models whose non-expert layers need the convolution, padding, flip, triangular-solve,
LayerNorm (prims) and complex-rotary rules compile and match the unsharded model.

Jamba (Mamba: causal conv1d, selective scan), PhiMoE (nn.LayerNorm, decomposed to prims; a
sparsemixer router that clamps by a tensor bound), DeepSeek-V2 (rotary embeddings in complex
form) and Qwen3-Next (gated delta rule: short convolution, padding, flips, triangular solves):
loss, every gradient and the SGD step within float32 rounding on a tp=2, ep=2 mesh (dp=2).
"""

import pytest
import torch
import torch.nn.functional as F

import shardgraph as sg
from shardgraph.check import parity_errors

TOLERANCE = 1e-5
MESH = "world=4,tp=2,ep=2"
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_experts_per_tok=2,
              attn_implementation="eager", use_cache=False, tie_word_embeddings=False)


def jamba():
    from transformers import JambaConfig, JambaForCausalLM

    return JambaForCausalLM(JambaConfig(**COMMON, num_key_value_heads=2, intermediate_size=32, num_experts=4,
                                        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
                                        expert_layer_offset=0, mamba_d_state=4, mamba_dt_rank=4))


def phimoe():
    from transformers import PhimoeConfig, PhimoeForCausalLM

    return PhimoeForCausalLM(PhimoeConfig(**COMMON, num_key_value_heads=2, intermediate_size=32,
                                          num_local_experts=4))


def deepseek_v2():
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    return DeepseekV2ForCausalLM(DeepseekV2Config(
        **COMMON, num_key_value_heads=4, intermediate_size=32, moe_intermediate_size=16, n_routed_experts=4,
        n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, head_dim=8))


def qwen3_next():
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    return Qwen3NextForCausalLM(Qwen3NextConfig(
        **COMMON, num_key_value_heads=2, head_dim=8, intermediate_size=32, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_experts=4, layer_types=["linear_attention", "full_attention"],
        mlp_only_layers=[], linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4))


def lm_loss(output, ids):
    logits = output.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("build, ops", [
    (jamba, {"aten.convolution.default", "aten.convolution_backward.default"}),
    (phimoe, {"prims.var.default", "prims.broadcast_in_dim.default", "aten.clamp.Tensor"}),
    (deepseek_v2, {"aten.view_as_complex.default", "aten.view_as_real.default", "aten.polar.default"}),
    (qwen3_next, {"aten.constant_pad_nd.default", "aten.flip.default", "aten.linalg_solve_triangular.default",
                  "aten.convolution.default"}),
], ids=lambda value: value.__name__ if callable(value) else "")
def test_model_with_these_ops_matches_the_unsharded_model(build, ops):
    torch.manual_seed(0)
    model = build().float().eval()  # PhiMoE's router draws jitter noise in training mode
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(3))
    program = sg.compile(model, sg.MeshSpec.parse(MESH), (ids,), lm_loss)
    traced_ops = {str(node.target) for node in program.traced.graph_module.graph.nodes if node.op == "call_function"}
    assert ops <= traced_ops, ops - traced_ops  # the model still exercises the rules this test is about
    errors, _ = parity_errors(program, model, (ids,), lm_loss)
    assert errors.within(TOLERANCE), errors
