"""Llama 4's MoE block (router, experts stored [E, H, 2I] / [E, I, H], shared expert, sigmoid
scores applied to the expert *inputs*) traces as one moe_experts op per layer over one row per
(token, slot), computes exactly what the block computes, and shards its transposed expert
weights over ep and etp in their stored dims."""

import torch
import torch.nn.functional as F

import shardgraph as sg
from shardgraph.check import parity_errors
from shardgraph.frontend import trace
from shardgraph.ops.moe import moe_experts_reference

from .models import MOE_BACKWARD, MOE_FORWARD, assert_moe_operands_read_as_computed_over_ep_etp, calls, \
    reference_loss_and_gradients, relative_error, worst_gradient_error


def _loss(out, ids):
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _model(top_k: int):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    config = Llama4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=16, intermediate_size_mlp=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_local_experts=4, num_experts_per_tok=top_k, interleave_moe_layer_step=1,
                              attention_chunk_size=64, attn_implementation="eager", use_cache=False)
    model = Llama4ForCausalLM(config).float().eval()
    with torch.no_grad():  # Llama 4 initialises gate_up_proj to zeros: give the experts something to compute
        for name, parameter in model.named_parameters():
            if "experts" in name:
                parameter.normal_(0, 0.3)
    return model, torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(3))


def test_llama4_block_traces_as_one_moe_op_per_layer_and_matches_eager_with_top_2():
    model, ids = _model(top_k=2)
    traced = trace(model, (ids,), _loss)
    assert traced.expert_modules == {"model.layers.0.feed_forward": "llama4_moe_block",
                                     "model.layers.1.feed_forward": "llama4_moe_block"}
    assert len(calls(traced, MOE_FORWARD)) == 2 and len(calls(traced, MOE_BACKWARD)) == 2
    loss, gradients = traced.run(model, ids)
    reference_loss, reference_gradients = reference_loss_and_gradients(model, (ids,), _loss)
    assert relative_error(loss, reference_loss) < 1e-6
    assert worst_gradient_error(gradients, reference_gradients)[0] < 1e-5


def test_llama4_scores_scale_the_expert_inputs_which_scaling_the_outputs_would_not_reproduce():
    model, _ = _model(top_k=2)
    block = model.model.layers[0].feed_forward
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = type(block).forward(block, x)[0] - block.shared_expert(x)
        scores, logits = block.router(x)
        ids = torch.topk(logits, 2, dim=1).indices
        weights = scores.gather(1, ids)
        gate_up, down = block.experts.gate_up_proj.transpose(1, 2), block.experts.down_proj.transpose(1, 2)
        scaled_outputs = moe_experts_reference(x, ids, weights, gate_up, down)
        scaled_inputs = sum(moe_experts_reference(x * weights[:, j:j + 1], ids[:, j:j + 1],
                                                  torch.ones(6, 1), gate_up, down) for j in range(2))
    assert relative_error(scaled_inputs, expected) < 1e-6
    assert relative_error(scaled_outputs, expected) > 1e-2


def test_llama4_matches_eager_with_transposed_expert_weights_split_in_their_stored_dims():
    model, ids = _model(top_k=1)
    program = sg.compile(model, sg.MeshSpec.parse("world=8,tp=2,ep=2,etp=2"), (ids,), _loss)
    gate_up = program.parameter_sharding("model.layers.0.feed_forward.experts.gate_up_proj")  # [E, H, 2I]
    down = program.parameter_sharding("model.layers.1.feed_forward.experts.down_proj")  # [E, I, H]
    assert gate_up.placement("ep") == sg.Shard(0) and gate_up.placement("etp") == sg.InterleavedShard(2, stripes=2)
    assert down.placement("ep") == sg.Shard(0) and down.placement("etp") == sg.Shard(1)
    # The op reads its transposed operands split as it computes with them: no redistribution.
    assert_moe_operands_read_as_computed_over_ep_etp(program.placed)
    errors, _ = parity_errors(program, model, (ids,), _loss)
    assert errors.within(1e-5), errors
