"""Gated activations of HF experts found by what their ``_apply_gate`` computes: a gate computed in
float32 whatever its input (Beam's), a clamped SwiGLU whose constants are named swiglu_alpha and
swiglu_limit (MiniMax-M3's); experts without a gate (Nemotron-H's) refused."""

import pytest
import torch
import torch.nn.functional as F

from shardgraph.frontend import AdapterError
from shardgraph.frontend.adapters import adapter_for, identify_gated_activation

pytest.importorskip("transformers")


def float32_swiglu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def float32_reluglu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return (torch.relu(gate.float()) * up.float()).to(gate.dtype)


def test_a_gate_computed_in_float32_is_identified_by_its_activation():
    assert identify_gated_activation(float32_swiglu, 16, "experts._apply_gate") == "silu"


def test_a_gate_computed_in_float32_that_the_op_does_not_compute_is_still_refused():
    with pytest.raises(AdapterError, match=r"experts\._apply_gate: its gate .* computes none"):
        identify_gated_activation(float32_reluglu, 16, "experts._apply_gate")


def test_minimax_m3_experts_are_one_op_equal_to_their_eager_forward_with_clamps_cutting_in():
    from benchmarks.model_coverage import tiny_config
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLExperts

    torch.manual_seed(0)
    config = tiny_config("minimax_m3_vl_text")
    experts = MiniMaxM3VLExperts(config).double()
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_()
    kind, forward = adapter_for("experts", experts)
    hidden = torch.randn(11, config.hidden_size, dtype=torch.float64)
    weights, ids = torch.randn(11, config.num_local_experts).softmax(-1).topk(2, dim=-1)
    weights = weights.double()
    assert kind == "hf_fused_experts"
    torch.testing.assert_close(forward(hidden, ids, weights), experts(hidden, ids, weights), rtol=1e-12, atol=1e-12)
    gate, up = (hidden @ experts.gate_up_proj[0].T).chunk(2, dim=-1)
    assert (gate > config.swiglu_limit).any() and (up.abs() > config.swiglu_limit).any()  # both clamps cut in


def test_ungated_experts_are_refused_naming_the_module_and_has_gate():
    from benchmarks.model_coverage import tiny_config
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    experts = NemotronHExperts(tiny_config("nemotron_h"))
    with pytest.raises(AdapterError, match=r"layers\.1\.mixer\.experts: NemotronHExperts holds ungated experts "
                                           r"\(has_gate=False"):
        adapter_for("layers.1.mixer.experts", experts)
