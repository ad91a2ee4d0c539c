"""Activation recomputation: the backward reads recomputed copies of a layer's activations, the
program computes the same loss, gradients and training steps, and the activation peak drops."""

import pytest
import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from shardgraph import meta
from shardgraph.meta import Phase


def _relative(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("mesh_text", ["world=1", "world=8,tp=2,ep=2,etp=2"])
def test_recomputed_programs_give_the_loss_and_gradients_of_the_plain_program(mesh_text):
    model, inputs, loss_fn = shardgraph_entry("tiny_shared", batch_size=8, seq_len=16)
    parameters = {n: p.detach() for n, p in model.named_parameters()}
    results = {policy: sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn, recompute=policy)
               .run_simulated(parameters, inputs) for policy in ("none", "selective", "full")}
    for policy in ("selective", "full"):
        assert _relative(results[policy].loss, results["none"].loss) < 1e-6
        for name, gradient in results["none"].gradients.items():
            assert _relative(results[policy].gradients[name], gradient) < 1e-5, (policy, name)


def test_a_full_recompute_keeps_only_each_layers_boundary_for_the_backward():
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=16)
    program = sg.compile(model, sg.MeshSpec(world=1), inputs, loss_fn, recompute="full")
    placed = program.placed.graph_module.graph
    read_by_backward = [node for node in placed.nodes if meta.phase(node) is Phase.FORWARD
                        and meta.layer(node) is not None
                        and any(meta.phase(user) is Phase.BACKWARD for user in node.users)]
    for node in read_by_backward:
        # Kept: the layer's output (read by the next layer's forward) or an input of its MoE op.
        crosses = any(meta.phase(user) is Phase.FORWARD and meta.layer(user) != meta.layer(node)
                      for user in node.users)
        feeds_moe = any(str(user.target).startswith("shardgraph.moe_experts.") for user in node.users)
        assert crosses or feeds_moe or any(user.op == "output" for user in node.users), node.name


def test_the_activation_peak_falls_from_none_to_selective_to_full():
    model, inputs, loss_fn = shardgraph_entry("small", batch_size=8, seq_len=64)
    peaks = [sg.compile(model, sg.MeshSpec(world=1), inputs, loss_fn, recompute=policy)
             .report(format="dict")["totals"]["peak_activation_bytes_per_rank"] for policy in ("none", "selective", "full")]
    assert peaks[0] > peaks[1] > peaks[2], peaks


def test_a_recomputed_training_step_takes_the_same_steps():
    # float64: Adam divides each gradient element by its own magnitude, so float32 rounding of a
    # gradient that is zero up to rounding moves a weight by up to the learning rate either way.
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    model = model.to(torch.float64)
    programs = [sg.compile(model, sg.MeshSpec.parse("world=4,tp=2,ep=2"), inputs, loss_fn,
                           optimizer=sg.optim.AdamW(lr=1e-2), clip_grad_norm=1.0, recompute=policy)
                for policy in ("none", "full")]
    states = [program.init_states(model) for program in programs]
    for _ in range(3):
        losses = []
        for index, program in enumerate(programs):
            loss, states[index], _ = program.simulate_train_step(states[index], inputs)
            losses.append(loss)
        assert _relative(losses[1], losses[0]) < 1e-12
    full = [program.gather_state(s) for program, s in zip(programs, states)]
    assert max(_relative(full[1].parameters[n], p) for n, p in full[0].parameters.items()) < 1e-9


def test_an_unknown_policy_is_refused_by_name():
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    with pytest.raises(ValueError, match="recompute must be one of"):
        sg.compile(model, sg.MeshSpec(world=1), inputs, loss_fn, recompute="everything")


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_an_op_only_a_gradient_needs_inside_the_forward_keeps_recomputation_in_order(policy):
    # HF's DeepSeek-V3 MLA makes a clone in the forward that the loss does not depend on (it is
    # of the backward phase) but that sits before the layer's later forward ops: recomputed
    # copies must go after the whole forward, not before that clone.
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from examples.hf_models import lm_loss
    from shardgraph.check import parity_errors

    torch.manual_seed(0)
    config = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                              num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
                              num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
                              qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
                              num_experts_per_tok=2, n_group=4, topk_group=2, attn_implementation="sdpa")
    model = DeepseekV3ForCausalLM(config)
    ids = torch.randint(0, 64, (4, 8))
    program = sg.compile(model, sg.MeshSpec.parse("world=2,ep=2"), (ids,), lm_loss, recompute=policy)
    errors, _ = parity_errors(program, model, (ids,), lm_loss, 0.1)
    assert errors.loss < 1e-5 and errors.gradients < 1e-5 and errors.weights < 1e-5, errors
