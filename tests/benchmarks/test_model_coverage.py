"""benchmarks/model_coverage.py: MoE causal LMs discovered from transformers' configs, tiny configs."""

import pytest

from benchmarks.model_coverage import EXPERTS, build, discover, tiny_config


@pytest.fixture(scope="module")
def discovered():
    return {entry.model_type: entry for entry in discover()}


def test_moe_causal_lms_are_discovered_by_their_expert_count_and_dense_ones_are_not(discovered):
    for model_type in ("mixtral", "qwen3_moe", "deepseek_v3", "jamba"):
        assert discovered[model_type].runs_as is None, model_type
    # DBRX counts its experts in a sub-config.
    assert "ffn_config.moe_num_experts" in discovered["dbrx"].expert_fields
    for dense in ("llama", "qwen2", "mistral", "gpt2"):
        assert dense not in discovered


def test_a_multimodal_config_runs_as_its_text_model(discovered):
    assert discovered["llama4"].runs_as == "llama4_text"
    assert discovered["llama4_text"].runs_as is None


def test_the_tiny_config_has_four_experts_and_two_layers_and_keeps_both_layer_kinds():
    config = tiny_config("kolibri1")
    assert config.num_experts == EXPERTS and config.num_hidden_layers == 2
    # The default's first two layers are both sliding-window ones; the full one is kept instead.
    assert config.layer_types == ["sliding_attention", "full_attention"]
    assert config.sliding_window == 4
    model = build("mixtral")
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == EXPERTS


def test_the_float64_referee_passes_the_program_and_catches_a_gradient_off_by_more_than_rounding():
    import dataclasses

    import torch

    import shardgraph as sg
    from benchmarks.model_coverage import VOCAB, float64_referee, lm_loss
    from shardgraph.check import parity_errors

    model = build("mixtral")
    ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(3))
    program = sg.compile(model, sg.MeshSpec.parse("world=4,tp=2,ep=2"), (ids,), lm_loss)
    _, result = parity_errors(program, model, (ids,), lm_loss)
    referee = float64_referee(program, model, ids, result)
    assert referee["no_further_than_eager"] and referee["program_error"] < 1e-5
    name = program.gradient_names[0]
    skewed = dict(result.gradients, **{name: result.gradients[name] * (1 + 1e-4)})
    referee = float64_referee(program, model, ids, dataclasses.replace(result, gradients=skewed))
    assert not referee["no_further_than_eager"] and referee["worst_parameter"] == name
