"""The MoE row kernels (dispatch gather, weighted combine, its backward): under the CPU interpreter
against float64 and against the runtime's aten form, inside compiled programs against the
unsharded model, and their checks and fallbacks without the interpreter."""


import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kernels import moe_rows
from shardgraph.runtime import moe as moe_steps
from tests.kernels import interpreted_rows

OPS = torch.ops.shardgraph
# A 16-bit product rounded once per element: a few units of the last place of the result.
TOLERANCE = {"torch.float32": 1e-6, "torch.bfloat16": 2e-2, "torch.float16": 2e-3}


@pytest.fixture(scope="module")
def results():
    rows = interpreted_rows("moe_rows_interpreted.py")
    return {group: [r for r in rows if r["group"] == group] for group in ("op", "runtime", "program")}


def test_every_interpreted_case_ran(results):
    assert [len(results[g]) for g in ("op", "runtime", "program")] == [6, 2, 2]


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


def test_programs_run_the_kernels_and_match_the_unsharded_model(results):
    for row in results["program"]:
        assert row["loss"] < 1e-5 and row["gradients"] < 1e-5 and row["weights"] < 1e-5, row
        # Every step a layer has: the dispatch gather (and with ep > 1 the ungroup), the combine,
        # the copies' gradient sum, the combine's backward.
        assert row["launches"]["rows"] >= 1 and row["launches"]["sum"] >= 2 and row["launches"]["backward"] >= 1, row


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
