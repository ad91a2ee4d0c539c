"""Gated activations of HF experts found by what their ``_apply_gate`` computes: a gate computed in
float32 whatever its input (Beam's), a clamped SwiGLU whose constants are named swiglu_alpha and
swiglu_limit (MiniMax-M3's), a clamped SiLU (DeepSeek-V4's, HunYuan-V4's), a soft-capped SwiGLU
(Inkling 2's); experts without a gate (Nemotron-H's) as the op's ungated layout."""

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


def random_experts(experts_class, config, seed=0):
    torch.manual_seed(seed)
    experts = experts_class(config).double()
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_()
    return experts


def routed_probe(config, tokens=11, experts=4):
    hidden = torch.randn(tokens, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights, ids = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(2)).softmax(-1).topk(2, dim=-1)
    return hidden, ids, weights.double()


@pytest.mark.parametrize("model_type, module, experts_class", [
    ("deepseek_v4", "deepseek_v4.modeling_deepseek_v4", "DeepseekV4Experts"),
    ("hy_v4", "hy_v4.modeling_hy_v4", "HYV4Experts"),
])
def test_clamped_silu_experts_are_one_op_equal_to_their_eager_forward_with_clamps_cutting_in(model_type, module,
                                                                                               experts_class):
    """DeepSeek-V4 and HunYuan-V4: silu(gate.clamp(max=limit)) * up.clamp(-limit, limit), the limit
    named limit and swiglu_limit: recognised by what the gate computes, whatever the name."""
    import importlib

    from benchmarks.model_coverage import tiny_config

    config = tiny_config(model_type)
    experts = random_experts(getattr(importlib.import_module(f"transformers.models.{module}"), experts_class), config)
    kind, forward = adapter_for("experts", experts)
    hidden, ids, weights = routed_probe(config)
    limit = config.swiglu_limit
    assert kind == "hf_fused_experts"
    torch.testing.assert_close(forward(hidden, ids, weights), experts(hidden, ids, weights), rtol=1e-12, atol=1e-12)
    [spec] = {str(a) for a in _moe_activations(forward, hidden, ids, weights)}
    assert spec == f"silu(limit={float(limit)!r})"
    gate, up = (hidden @ experts.gate_up_proj[0].T).chunk(2, dim=-1)
    assert (gate > limit).any() and (up.abs() > limit).any()  # both clamps cut in


def _moe_activations(forward, *args):
    """The activation specs moe_experts is called with while ``forward`` runs."""
    from unittest import mock

    from shardgraph.ops import GatedActivation

    seen = []
    real = torch.ops.shardgraph.moe_experts

    def spy(*call_args):
        seen.append(GatedActivation.parse(call_args[5]))
        return real(*call_args)

    with mock.patch.object(torch.ops.shardgraph, "moe_experts", spy):
        forward(*args)
    return seen


@pytest.mark.parametrize("model_type, module, experts_class", [
    ("inkling2_text", "inkling2.modeling_inkling2", "Inkling2Experts"),
    ("inkling2_loop_text", "inkling2_loop.modeling_inkling2_loop", "Inkling2LoopExperts"),
])
def test_inkling2_softcapped_swiglu_experts_are_one_op_equal_to_their_eager_forward(model_type, module, experts_class):
    """Inkling 2: softcap(gate) * sigmoid(gate) * softcap(up), its caps held by submodules of its
    act_fn; its gate computes in float32 whatever its input, so the comparison is at float32's precision."""
    import importlib

    from benchmarks.model_coverage import tiny_config

    config = tiny_config(model_type)
    experts = random_experts(getattr(importlib.import_module(f"transformers.models.{module}"), experts_class), config)
    kind, forward = adapter_for("experts", experts)
    hidden, ids, weights = routed_probe(config)
    hidden = hidden * 0.05  # products of |x| ~ 1: through both caps' bend (0.1 and 0.2) and the sigmoid's
    assert kind == "hf_fused_experts"
    [spec] = {str(a) for a in _moe_activations(forward, hidden, ids, weights)}
    assert spec == f"softcapped_swiglu(gate_softcap={config.mlp_gate_softcap!r},up_softcap={config.mlp_up_softcap!r})"
    torch.testing.assert_close(forward(hidden, ids, weights), experts(hidden, ids, weights), rtol=1e-5, atol=1e-7)


def test_a_clamp_at_a_constant_the_module_does_not_hold_is_refused():
    def clamped_at_three(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate.clamp(max=3.0)) * up.clamp(-3.0, 3.0)

    assert identify_gated_activation(clamped_at_three, 16, "experts._apply_gate", constants=[3]) == "silu(limit=3.0)"
    with pytest.raises(AdapterError, match=r"computes none of the moe_experts gated activations .*constants tried: 4"):
        identify_gated_activation(clamped_at_three, 16, "experts._apply_gate", constants=[4])


def test_nemotron_h_ungated_experts_are_one_op_equal_to_their_eager_forward():
    from benchmarks.model_coverage import tiny_config
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    config = tiny_config("nemotron_h")
    experts = random_experts(NemotronHExperts, config)
    kind, forward = adapter_for("layers.1.mixer.experts", experts)
    hidden, ids, weights = routed_probe(config)
    assert kind == "hf_ungated_experts"
    [spec] = {str(a) for a in _moe_activations(forward, hidden, ids, weights)}
    assert spec == "relu2(layout=ungated)"
    torch.testing.assert_close(forward(hidden, ids, weights), experts(hidden, ids, weights), rtol=1e-12, atol=1e-12)


def test_ungated_experts_whose_forward_computes_something_else_are_refused_naming_the_module():
    from benchmarks.model_coverage import tiny_config
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    class ScaledExperts(NemotronHExperts):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

    with pytest.raises(AdapterError, match=r"layers\.1\.mixer\.experts: ScaledExperts does not compute "
                                           r"act\(x up_proj\[e\]\^T\) down_proj\[e\]\^T"):
        adapter_for("layers.1.mixer.experts", ScaledExperts(tiny_config("nemotron_h")))


def test_nemotron_h_matches_eager_on_world8_tp2_ep2_etp2_with_its_up_rows_split_in_blocks():
    """Ungated experts hold one up row per intermediate unit: over etp their [E, I, H] up_proj is a
    block split of the rows (Shard(1)), not the two stripes of concatenated gate/up rows."""
    import shardgraph as sg
    from benchmarks.model_coverage import build, lm_loss
    from shardgraph.check import parity_errors

    model = build("nemotron_h")
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(3))
    program = sg.compile(model, sg.MeshSpec.parse("world=8,tp=2,ep=2,etp=2"), (ids,), lm_loss)
    experts = "model.layers.1.mixer.experts."
    assert program.parameter_sharding(experts + "up_proj") == sg.Sharding.of(ep=sg.Shard(0), etp=sg.Shard(1))
    assert program.parameter_sharding(experts + "down_proj") == sg.Sharding.of(ep=sg.Shard(0), etp=sg.Shard(2))
    errors, _ = parity_errors(program, model, (ids,), lm_loss)
    assert errors.within(1e-5), errors
