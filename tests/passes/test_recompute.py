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
