"""The fused MoE expert path: its Triton kernels under the CPU interpreter against float64 (ops,
one MoE layer's forward and backward, compiled programs on meshes with and without dispatch), the
lowering's choice of path, and the ops' unfused fallback against ``shardgraph.ops.moe``."""

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels
import shardgraph as sg
from examples.moe_model import shardgraph_entry
from kernels import fused_moe
from shardgraph.ops.moe import GatedActivation
from tests.kernels import interpreted_rows

OPS = torch.ops.shardgraph


@pytest.fixture(scope="module")
def results():
    rows = interpreted_rows("fused_moe_interpreted.py")
    return {group: [r for r in rows if r["group"] == group] for group in ("op", "block", "program")}


def test_every_interpreted_case_ran(results):
    assert [len(results[g]) for g in ("op", "block", "program")] == [4 + 6 + 1, 2, 2]


def test_fused_ops_match_float64_over_dtypes_layouts_and_activations(results):
    seen = set()
    for row in results["op"]:
        tolerance = 1e-5 if row["dtype"] == "torch.float32" else 1e-2
        for kind in ("forward_h", "forward_gate_up", "dgrad", "wgrad"):
            assert row[kind] < tolerance, (kind, row)
        assert row["finite"] and row["trailing_rows_zero"] and row["empty_groups_zero"], row
        # each op ran its Triton kernel, once
        assert row["launches"] == {"gather_glu_product": 1, "glu_dgrad": 1, "gather_wgrad": 1}, row
        seen.add((row["dtype"], row["layout"], row["activation"], row["interleaved"]))
    assert {(a, i) for _, _, a, i in seen} == {(a, i) for a in fused_moe.FUSED_ACTIVATIONS for i in (False, True)}
    assert {(d, layout) for d, layout, _, _ in seen} >= {(d, layout) for d in ("torch.float32", "torch.bfloat16")
                                                         for layout in ("enk", "ekn")}
    assert any(row["empty_groups"] for row in results["op"])


def test_fused_layer_forward_and_backward_match_the_float64_definition(results):
    for row in results["block"]:
        assert set(row["errors"]) == {"output", "grad hidden", "grad topk_weights", "grad w_gate_up", "grad w_down"}
        assert max(row["errors"].values()) < 1e-5, row
    assert 0 in results["block"][0]["counts"]  # an expert no token chose
    assert len(set(results["block"][0]["counts"])) > 2  # uneven counts


def test_programs_with_the_fused_path_match_the_unsharded_model(results):
    assert [row["mesh"] for row in results["program"]] == ["world=1", "world=8,tp=2,ep=2,etp=2"]
    for row in results["program"]:
        assert row["loss"] < 1e-5 and row["gradients"] < 1e-5 and row["weights"] < 1e-5, row
        assert row["fused_nodes"] == [1, 1, 1], row
        assert row["unfused_nodes"] == 1, row  # the down projection's wgrad; the gate/up one is fused
        # the cost model counts the same grouped-product FLOPs as for the unfused program, and the
        # report sizes the fused product's outputs: h [rows, I] and gate_up [rows, 2I]
        assert row["grouped_flops"][0] == row["grouped_flops"][1] > 0, row
        (h, gate_up), = row["glu_pieces"]
        assert h[0] == gate_up[0] > 0 and gate_up[1] == 2 * h[1], row
        ranks = 1 if row["mesh"] == "world=1" else 8
        for name in ("gather_glu_product", "glu_dgrad", "gather_wgrad"):
            assert row["launches"][name] == ranks, row


def lowered_targets(mode):
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=4, seq_len=4, num_layers=1)
    with fused_moe.use_fused_moe(mode):
        program = sg.compile(model, sg.MeshSpec.parse("world=1"), inputs, loss_fn)
    return [n.target for n in program.graph_module.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_a_cpu_program_without_the_interpreter_keeps_the_unfused_path(mode):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs the fused kernels on the CPU")
    targets = lowered_targets(mode)
    assert OPS.gather_glu_grouped_mm.default not in targets
    assert targets.count(OPS.grouped_mm.default) == 2 and targets.count(OPS.grouped_mm_wgrad.default) == 2


def fake(device, dtype=torch.bfloat16):
    with FakeTensorMode():
        return torch.empty(8, 16, device=device, dtype=dtype)


def test_refusals_name_what_keeps_a_layer_unfused():
    cuda = fake("cuda")
    with fused_moe.use_fused_moe("auto"):
        assert fused_moe.fused_moe_refusal(cuda, "silu", False, False) is None
        assert fused_moe.fused_moe_refusal(cuda, "gelu_tanh", True, False) is None
        assert "clamped_swiglu" in fused_moe.fused_moe_refusal(cuda, "clamped_swiglu(alpha=1.702,limit=7.0)", True,
                                                               False)
        assert fused_moe.fused_moe_refusal(cuda, "silu", False, True) == "expert biases"
        assert "meta" in fused_moe.fused_moe_refusal(fake("meta"), "silu", False, False)
        with kernels.use_backend("loop"):
            assert "'loop'" in fused_moe.fused_moe_refusal(cuda, "silu", False, False)
    with fused_moe.use_fused_moe("off"):
        assert "off" in fused_moe.fused_moe_refusal(cuda, "silu", False, False)
    with pytest.raises(kernels.GroupedGemmError, match="unknown fused MoE mode"):
        fused_moe.set_fused_moe("always")


@pytest.mark.parametrize("activation", fused_moe.FUSED_ACTIVATIONS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_fallback_equals_the_ops_activation_and_its_backward(activation, interleaved):
    # Where the Triton kernels do not run, the ops compute gather + grouped product + activation:
    # the kernels package writes the activations out itself, so they are checked against the
    # compiler's definitions (shardgraph.ops.moe.GatedActivation).
    generator = torch.Generator().manual_seed(7)
    sizes = [3, 0, 4]
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    x = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    index = torch.tensor([4, 0, 0, 2, 1, 3, 4])
    w1 = torch.randn(3, 8, 6, generator=generator, dtype=torch.float64)
    w2 = torch.randn(3, 6, 4, generator=generator, dtype=torch.float64)
    dout = torch.randn(7, 6, generator=generator, dtype=torch.float64)
    spec = GatedActivation.parse(f"{activation}(layout=interleaved)" if interleaved else activation)
    with kernels.use_backend("loop"):
        h, gate_up = OPS.gather_glu_grouped_mm(x, index, w1, offsets, activation, interleaved, "enk")
        d_gate_up = OPS.glu_grouped_mm_dgrad(dout, w2, offsets, gate_up, activation, interleaved, "enk")
        dw = OPS.gather_grouped_mm_wgrad(x, index, d_gate_up, offsets, 3, "enk")
        want_gate_up = kernels.grouped_mm(x[index], w1, offsets, w_layout="enk")
        want_dh = kernels.grouped_mm_dgrad(dout, w2, offsets, w_layout="enk")
        want_dw = kernels.grouped_mm_wgrad(x[index], d_gate_up, offsets, 3, w_layout="enk")
    torch.testing.assert_close(gate_up, want_gate_up)
    torch.testing.assert_close(h, spec(want_gate_up))
    torch.testing.assert_close(d_gate_up, spec.backward(want_dh, gate_up))
    torch.testing.assert_close(dw, want_dw)


def test_opcheck_passes_for_the_three_fused_ops():
    generator = torch.Generator().manual_seed(8)
    offsets = torch.tensor([2, 2, 6], dtype=torch.int32)
    x, index = torch.randn(4, 6, generator=generator), torch.tensor([3, 1, 0, 0, 2, 3])
    w1, w2 = torch.randn(3, 8, 6, generator=generator), torch.randn(3, 6, 4, generator=generator)
    gate_up, dout = torch.randn(6, 8, generator=generator), torch.randn(6, 6, generator=generator)
    with kernels.use_backend("loop"):
        torch.library.opcheck(OPS.gather_glu_grouped_mm.default, (x, index, w1, offsets, "silu", False, "enk"))
        torch.library.opcheck(OPS.glu_grouped_mm_dgrad.default, (dout, w2, offsets, gate_up, "silu", False, "enk"))
        torch.library.opcheck(OPS.gather_grouped_mm_wgrad.default, (x, index, gate_up, offsets, 3, "enk"))


@pytest.mark.parametrize("spec", ["silu(limit=7.0)", "relu2(layout=ungated)",
                                  "softcapped_swiglu(gate_softcap=30.0,up_softcap=30.0)",
                                  "clamped_swiglu(alpha=1.702,limit=7.0,layout=interleaved)"])
def test_an_activation_with_more_than_act_gate_times_up_keeps_the_unfused_path(spec):
    # The kernels know only act(gate) * up: a clamp, soft caps or ungated rows fused would be
    # silently dropped, so the lowering refuses them under their full spec, in every mode.
    from torch.fx import Graph

    from passes.lower_moe import _fused
    from shardgraph import meta

    graph = Graph()
    hidden = graph.placeholder("hidden")
    node = graph.call_function(torch.add, (hidden, hidden))
    meta.set_value(hidden, fake("cuda"))
    with fused_moe.use_fused_moe("on"):
        assert not _fused(node, hidden, spec, has_bias=False)
    assert spec.split("(")[0] in meta.fused_moe_choice(node)
    with fused_moe.use_fused_moe("on"):
        _fused(node, hidden, "silu", has_bias=False)
    assert "activation" not in meta.fused_moe_choice(node)  # the plain SwiGLU is not refused for its activation


def test_bad_operands_are_refused_naming_the_op_and_the_rule():
    offsets = torch.tensor([2, 4], dtype=torch.int32)
    x, index, w1 = torch.randn(4, 6), torch.tensor([0, 1, 2, 3]), torch.randn(2, 8, 6)
    with pytest.raises(kernels.GroupedGemmError, match="gather_glu_grouped_mm: activation 'relu'"):
        fused_moe.gather_glu_grouped_mm(x, index, w1, offsets, "relu")
    with pytest.raises(kernels.GroupedGemmError, match="gather_glu_grouped_mm: index must be"):
        fused_moe.gather_glu_grouped_mm(x, index.float(), w1, offsets)
    with pytest.raises(kernels.GroupedGemmError, match="glu_grouped_mm_dgrad: .* want dout"):
        fused_moe.glu_grouped_mm_dgrad(torch.randn(4, 6), torch.randn(2, 6, 4), offsets, torch.randn(4, 6))
    with pytest.raises(kernels.GroupedGemmError, match="gather_grouped_mm_wgrad: offsets must be int32"):
        fused_moe.gather_grouped_mm_wgrad(x, index, torch.randn(4, 8), offsets.long(), 2)
