"""Parity: every supported mesh gives the unsharded model's loss, gradients and SGD weights.

float32 throughout; the reference is the plain model run eagerly on one device on the same
global batch. SGD (not Adam) so that a gradient off by a constant factor shows.
"""

import pytest
import torch

import shardgraph as sg
from shardgraph.check import parity_errors
from examples.moe_model import lm_loss, shardgraph_entry
from shardgraph import meta

LEARNING_RATE = 0.1
TOLERANCE = 1e-5

MESHES = [
    "world=1",
    "world=2,tp=2",
    "world=2,ep=2",
    "world=4,tp=2,ep=2",
    "world=4,tp=2,ep=4",
    "world=4,tp=4,ep=4",
    "world=8,tp=2,ep=4",
    "world=8,tp=4,ep=4",
    "world=8,tp=2,ep=2,etp=2",
    "world=8,ep=8",
    "world=8,tp=8",
    "world=4,ep=4",
]


def relative_error(value, reference):
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def reference_step(model, inputs, loss_fn):
    parameters = dict(model.named_parameters())
    loss = loss_fn(model(*inputs), *inputs)
    return loss.detach(), dict(zip(parameters, torch.autograd.grad(loss, list(parameters.values()))))


def check_parity(model, inputs, loss_fn, mesh_text):
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn)
    errors, result = parity_errors(program, model, inputs, loss_fn, LEARNING_RATE)
    return {"loss": errors.loss, "gradients": errors.gradients, "weights": errors.weights}, program, result


@pytest.mark.parametrize("mesh_text", MESHES)
def test_example_model_matches_unsharded_loss_gradients_and_sgd_weights(mesh_text):
    model, inputs, loss_fn = shardgraph_entry("tiny_shared", batch_size=8, seq_len=8)
    errors, _, _ = check_parity(model, inputs, loss_fn, mesh_text)
    assert errors["loss"] < TOLERANCE and errors["gradients"] < TOLERANCE and errors["weights"] < TOLERANCE, errors


def hf_models():
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    mixtral = MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, attn_implementation="eager"))
    qwen = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, moe_intermediate_size=8, shared_expert_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        attn_implementation="eager"))
    return {"mixtral": mixtral, "qwen2_moe": qwen}


@pytest.fixture(scope="module")
def hf():
    return hf_models()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("mesh_text", ["world=4,tp=2,ep=2", "world=4,tp=2,ep=4", "world=8,tp=2,ep=2,etp=2"])
def test_hf_models_match_unsharded_loss_gradients_and_sgd_weights(hf, family, mesh_text):
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(3))
    errors, _, _ = check_parity(hf[family], (ids,), lm_loss, mesh_text)
    assert errors["loss"] < TOLERANCE and errors["gradients"] < TOLERANCE and errors["weights"] < TOLERANCE, errors


@pytest.mark.parametrize("mesh_text", ["world=4,tp=2,ep=2", "world=8,tp=2,ep=4", "world=4,ep=4"])
def test_fused_attention_split_over_tp_and_dp_matches_unsharded(mesh_text):
    from examples.hf_models import build

    model = build("mixtral", attn_implementation="sdpa")
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(5))
    errors, program, _ = check_parity(model, (ids,), lm_loss, mesh_text)
    assert errors["loss"] < TOLERANCE and errors["gradients"] < TOLERANCE and errors["weights"] < TOLERANCE, errors
    attention = [n for n in program.placed.graph_module.graph.nodes if str(n.target).startswith("shardgraph.attention")]
    assert len(attention) == 4  # two layers, forward and backward
    mesh = program.mesh
    for node in attention:
        sharding = meta.sharding(node)
        first = sharding[0] if isinstance(sharding, tuple) else sharding
        # never computed twice: split over tp (heads, or rows where that moves fewer bytes) and
        # over dp by rows
        assert first.placement("tp") in ((sg.Shard(0), sg.Shard(1)) if mesh.tp > 1 else (sg.Replicate(),)), (
            node.name, first)
        assert first.placement("dp") == (sg.Shard(0) if mesh.dp > 1 else sg.Replicate()), (node.name, first)
        if str(node.target) == "shardgraph.attention.default":
            # (out, logsumexp): the log-sum-exp the backward reads is split as the output is.
            assert isinstance(sharding, tuple) and sharding[1] == first, (node.name, sharding)


def test_expert_gradients_are_reduced_over_edp_by_sum_and_the_tp_split_needs_no_cancel():
    """Expert gradients come out partial over edp only; summing gives the exact gradient.

    Averaging instead (what a hand-written TP-cancel without the tp split would amount to) is off
    by the edp factor, which this checks by redoing the reduction both ways from the per-rank pieces.
    """
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    mesh = sg.MeshSpec(8, tp=2, ep=4)  # edp = 2
    errors, program, result = check_parity(model, inputs, loss_fn, "world=8,tp=2,ep=4")
    assert errors["gradients"] < TOLERANCE
    name = "layers.0.mlp.experts.down_proj"
    output = next(n for n in program.placed.graph_module.graph.nodes if n.op == "output")
    index = 1 + program.parameter_names.index(name)
    gradient_node = output.args[0][index]
    assert meta.sharding(gradient_node).placement("edp") == sg.Partial("sum")
    assert meta.sharding(gradient_node).placement("ep") == sg.Shard(0)
    reductions = [r for r in program.report(format="dict")["collectives"] if gradient_node.name in r["members"]]
    assert [(r["kind"], r["axis"]) for r in reductions] == [("all_reduce", "edp")]
    assert mesh.edp == 2


def test_router_gradient_is_summed_over_dp_and_averaging_would_be_wrong():
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    mesh_text = "world=4,tp=2,ep=2"  # dp = 2
    errors, program, result = check_parity(model, inputs, loss_fn, mesh_text)
    assert errors["gradients"] < TOLERANCE
    name = "layers.0.mlp.gate.weight"
    output = next(n for n in program.placed.graph_module.graph.nodes if n.op == "output")
    gradient_node = output.args[0][1 + program.parameter_names.index(name)]
    assert meta.sharding(gradient_node).placement("dp") == sg.Partial("sum")
    reductions = [r for r in program.report(format="dict")["collectives"] if gradient_node.name in r["members"]]
    assert ("all_reduce", "dp") in [(r["kind"], r["axis"]) for r in reductions]
    # The per-rank pieces averaged instead of summed would be off by exactly dp = 2.
    _, reference_gradients = reference_step(model, inputs, loss_fn)
    assert relative_error(result.gradients[name] / program.mesh.dp, reference_gradients[name]) == pytest.approx(0.5, abs=1e-5)


@pytest.mark.parametrize("mesh_text", ["world=8,tp=2,ep=2,etp=2", "world=4,tp=2,ep=4"])
def test_torchtitan_style_experts_match_with_w1_w3_fused_in_the_graph(mesh_text):
    from examples.titan_model import TitanConfig, TitanMoE

    torch.manual_seed(0)
    model = TitanMoE(TitanConfig())
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(4))
    errors, program, _ = check_parity(model, (ids,), lm_loss, mesh_text)
    assert errors["loss"] < TOLERANCE and errors["gradients"] < TOLERANCE and errors["weights"] < TOLERANCE, errors
    if program.mesh.etp > 1:
        # Separate w1 and w3 split on their rows become one interleaved gate/up operand.
        cat = next(n for n in program.placed.graph_module.graph.nodes if n.op == "call_function" and "cat" in str(n.target))
        assert meta.sharding(cat).placement("etp") == sg.InterleavedShard(1, 2)
