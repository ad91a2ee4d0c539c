"""The MoE row kernels (dispatch gather, weighted combine, its backward, SwiGLU and its backward):
under the CPU interpreter against float64 and against the runtime's aten form, inside compiled
programs against the unsharded model, and their checks and fallbacks without the interpreter."""


import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kernels import moe_rows
from shardgraph.ops.moe import GatedActivation
from shardgraph.runtime import moe as moe_steps
from tests.kernels import interpreted_rows

OPS = torch.ops.shardgraph
# A 16-bit product rounded once per element: a few units of the last place of the result.
TOLERANCE = {"torch.float32": 1e-6, "torch.bfloat16": 2e-2, "torch.float16": 2e-3}


@pytest.fixture(scope="module")
def results():
    rows = interpreted_rows("moe_rows_interpreted.py")
    return {group: [r for r in rows if r["group"] == group] for group in ("op", "runtime", "glu", "glu_runtime",
                                                                          "program")}


def test_every_interpreted_case_ran(results):
    assert [len(results[g]) for g in ("op", "runtime", "glu", "glu_runtime", "program")] == [6, 2, 16, 7, 2]


def test_each_kernel_matches_the_float64_definition_over_dtypes_widths_and_top_k(results):
    for row in results["op"]:
        assert row["shapes_ok"], row
        for name, error in row["errors"].items():
            assert error <= TOLERANCE[row["dtype"]], (name, row)
        # The router weights' gradient keeps the weights' dtype (float32 here), the rows theirs.
        assert row["dtypes"][:5] == [row["dtype"]] * 5 and row["dtypes"][5] == "torch.float32", row


def test_the_runtime_steps_with_the_kernels_equal_their_aten_form(results):
    for row in results["runtime"]:
        for name, error in row["errors"].items():
            assert error <= 1e-6, (name, row)


def test_the_swiglu_kernels_round_as_the_aten_form_they_replace(results):
    # 16-bit: every elementwise step rounded where aten rounds it, so at most one unit in the last
    # place from the aten form (the interpreter's exp is numpy's, not torch's: a last float32 bit
    # may move a rounding); float32 equal up to the exps' last bits. Against float64 both forms
    # carry the same rounding error.
    for row in results["glu"]:
        assert row["shapes_ok"] and row["dtypes"] == [row["dtype"]] * 2, row
        for name in ("out", "grad"):
            if row["dtype"] == "torch.float32":
                assert row["aten"][name] <= 1e-6, (name, row)
            else:
                assert row["ulps"][name] <= 1, (name, row)
            assert row["errors"][name] <= TOLERANCE[row["dtype"]], (name, row)
            assert row["errors"][name] <= 1.05 * row["aten_errors"][name] + 1e-7, (name, row)
    layouts = {(row["dtype"], row["layout"]) for row in results["glu"]}
    assert len(layouts) == 6, layouts


def test_the_runtime_glu_launches_the_kernels_for_plain_swiglu_only(results):
    for row in results["glu_runtime"]:
        plain = row["spec"] in ("silu", "silu(layout=interleaved)")
        assert row["launches"] == {"swiglu": int(plain), "swiglu_backward": int(plain)}, row
        # The other activations run the very aten ops they are compared with.
        assert max(row["ulps"].values()) <= (1 if plain else 0), row


def test_programs_run_the_kernels_and_match_the_unsharded_model(results):
    for row in results["program"]:
        assert row["loss"] < 1e-5 and row["gradients"] < 1e-5 and row["weights"] < 1e-5, row
        # Every step a layer has: the dispatch gather (and with ep > 1 the ungroup), the combine,
        # the copies' gradient sum, the combine's backward, the SwiGLU both ways.
        assert row["launches"]["rows"] >= 1 and row["launches"]["sum"] >= 2 and row["launches"]["backward"] >= 1, row
        assert row["launches"]["swiglu"] >= 1 and row["launches"]["swiglu_backward"] >= 1, row


def test_without_the_interpreter_a_cpu_tensor_keeps_the_aten_form(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = torch.randn(4, 8)
    assert not moe_rows.runs(rows)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert moe_rows.runs(rows)
    # Not 2-D, a strided last dim, an integer dtype: the aten form.
    assert not moe_rows.runs(torch.randn(2, 4, 8))
    assert not moe_rows.runs(torch.randn(8, 4).t())
    assert not moe_rows.runs(torch.zeros(4, 8, dtype=torch.int32))
    monkeypatch.setattr(moe_rows, "TRITON_ENABLED", False)
    assert not moe_rows.runs(rows)


def test_the_fake_kernels_give_the_shapes_and_dtypes():
    with FakeTensorMode():
        rows, order = torch.empty(6, 10, dtype=torch.bfloat16), torch.empty(12, dtype=torch.long)
        weights = torch.empty(6, 2)
        assert OPS.gather_rows(rows, order, 2).shape == (12, 10)
        assert OPS.gather_sum(torch.empty(12, 10, dtype=torch.bfloat16), order, 2, weights).shape == (6, 10)
        grad_copies, grad_weights = OPS.combine_backward(rows, torch.empty(12, 10, dtype=torch.bfloat16), order, weights)
        assert grad_copies.shape == (12, 10) and grad_copies.dtype == torch.bfloat16
        assert grad_weights.shape == (6, 2) and grad_weights.dtype == torch.float32
        gate_up = torch.empty(7, 12, dtype=torch.bfloat16)
        out = OPS.swiglu(gate_up)
        assert out.shape == (7, 6) and out.dtype == torch.bfloat16
        grad_gate_up = OPS.swiglu_backward(out, gate_up, True)
        assert grad_gate_up.shape == (7, 12) and grad_gate_up.dtype == torch.bfloat16


def test_bad_operands_are_refused_naming_the_op_and_the_rule():
    rows, order = torch.randn(6, 10), torch.arange(12)
    with pytest.raises(moe_rows.MoeRowsError, match="gather_rows: index must be a 1-D integer tensor"):
        moe_rows.gather_rows(rows, order.float())
    with pytest.raises(moe_rows.MoeRowsError, match="gather_sum: index has 12 entries, not a multiple of top_k=5"):
        moe_rows.gather_sum(rows, order, 5)
    with pytest.raises(moe_rows.MoeRowsError, match=r"gather_sum: weights must be \[tokens, top_k\] = \[6, 2\]"):
        moe_rows.gather_sum(rows, order, 2, torch.rand(3, 4))
    with pytest.raises(moe_rows.MoeRowsError, match="combine_backward: returned .* must have the same width"):
        moe_rows.combine_backward(torch.randn(6, 10), torch.randn(12, 9), order, torch.rand(6, 2))
    with pytest.raises(moe_rows.MoeRowsError, match="combine_backward: returned .* must count the same copies"):
        moe_rows.combine_backward(torch.randn(6, 10), torch.randn(11, 10), order, torch.rand(6, 2))
    with pytest.raises(moe_rows.MoeRowsError, match=r"swiglu: gate_up must hold gate and up columns in pairs"):
        moe_rows.swiglu(torch.randn(6, 9))
    with pytest.raises(moe_rows.MoeRowsError, match="swiglu: gate_up must be float16, bfloat16 or float32"):
        moe_rows.swiglu(torch.randn(6, 8, dtype=torch.float64))
    with pytest.raises(moe_rows.MoeRowsError, match=r"swiglu_backward: grad must be \[6, 4\] in gate_up's dtype"):
        moe_rows.swiglu_backward(torch.randn(6, 8), torch.randn(6, 8))
    with pytest.raises(moe_rows.MoeRowsError, match=r"swiglu_backward: grad must be .* got \(6, 4\) torch.bfloat16"):
        moe_rows.swiglu_backward(torch.randn(6, 4, dtype=torch.bfloat16), torch.randn(6, 8))


def test_the_runtime_form_without_kernels_is_the_definition():
    # The aten form the kernels replace, on the CPU: the combine's output and both of its gradients
    # against autograd of the weighted sum it defines.
    generator = torch.Generator().manual_seed(3)
    tokens, top_k, width = 5, 2, 7
    ids = torch.stack([torch.randperm(4, generator=generator)[:top_k] for _ in range(tokens)])
    order, _ = moe_steps.sort_by_expert(ids, 4)
    returned = torch.randn(tokens * top_k, width, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(tokens, top_k, generator=generator, dtype=torch.float64, requires_grad=True)
    out = moe_steps.combine(returned, order, weights)
    flat = torch.empty_like(returned).index_copy(0, order, returned).reshape(tokens, top_k, width)
    torch.testing.assert_close(out, (flat * weights[..., None]).sum(1))
    grad_out = torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    want_copies, want_weights = torch.autograd.grad(out, (returned, weights), grad_out)
    grad_copies, grad_weights = moe_steps.combine_backward(grad_out, returned.detach(), order, weights.detach())
    torch.testing.assert_close(grad_copies, want_copies)
    torch.testing.assert_close(grad_weights, want_weights)


def _stub_swiglu_launches(monkeypatch):
    """The SwiGLU launches replaced by the aten form, counted: which path ``glu`` takes, without
    running a kernel in this process."""
    launches = []

    def forward(gate_up, interleaved):
        launches.append(("swiglu", interleaved))
        return GatedActivation.parse("silu(layout=interleaved)" if interleaved else "silu")(gate_up)

    def backward(grad, gate_up, interleaved):
        launches.append(("swiglu_backward", interleaved))
        return GatedActivation.parse("silu(layout=interleaved)" if interleaved else "silu").backward(grad, gate_up)

    monkeypatch.setattr(moe_rows, "_launch_swiglu", forward)
    monkeypatch.setattr(moe_rows, "_launch_swiglu_backward", backward)
    return launches


@pytest.mark.parametrize("spec", ["gelu", "gelu_tanh", "silu(limit=7.0)", "clamped_swiglu(alpha=1.702,limit=7.0)",
                                  "softcapped_swiglu(gate_softcap=20.0,up_softcap=20.0)", "relu2(layout=ungated)"])
def test_glu_keeps_the_aten_form_for_other_activations(monkeypatch, spec):
    launches = _stub_swiglu_launches(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # where the row kernels would run
    act = GatedActivation.parse(spec)
    generator = torch.Generator().manual_seed(4)
    gate_up = torch.randn(5, 8 * act.rows_per_unit, generator=generator, dtype=torch.bfloat16)
    grad = torch.randn(5, 8, generator=generator, dtype=torch.bfloat16)
    assert moe_rows.runs(gate_up, grad)
    assert torch.equal(moe_steps.glu(gate_up, spec), act(gate_up))
    assert torch.equal(moe_steps.glu_backward(grad, gate_up, spec), act.backward(grad, gate_up))
    assert launches == []


@pytest.mark.parametrize("spec", ["silu", "silu(layout=interleaved)"])
def test_glu_takes_the_kernels_for_plain_swiglu_where_they_run(monkeypatch, spec):
    launches = _stub_swiglu_launches(monkeypatch)
    act = GatedActivation.parse(spec)
    generator = torch.Generator().manual_seed(5)
    gate_up = torch.randn(5, 16, generator=generator, dtype=torch.bfloat16)
    grad = torch.randn(5, 8, generator=generator, dtype=torch.bfloat16)
    want = act(gate_up), act.backward(grad, gate_up)
    # On the CPU without the interpreter, with the kernels off, with a float32 gradient of a
    # bfloat16 product (the aten form promotes it): the aten form.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert torch.equal(moe_steps.glu(gate_up, spec), want[0])
    assert torch.equal(moe_steps.glu_backward(grad, gate_up, spec), want[1])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with moe_rows.use_row_kernels(False):
        moe_steps.glu(gate_up, spec), moe_steps.glu_backward(grad, gate_up, spec)
    moe_steps.glu_backward(grad.float(), gate_up, spec)
    # Under torch.compile: the aten form, which inductor fuses with the products' neighbours.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(moe_steps.glu(gate_up, spec), want[0])
    assert torch.equal(moe_steps.glu_backward(grad, gate_up, spec), want[1])
    assert launches == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert torch.equal(moe_steps.glu(gate_up, spec), want[0])
    assert torch.equal(moe_steps.glu_backward(grad, gate_up, spec), want[1])
    assert launches == [("swiglu", act.interleaved), ("swiglu_backward", act.interleaved)]
