"""kernels/rms_norm.py: the aten form against autograd of HF's ``RMSNorm`` formula, the Triton kernels
under the CPU interpreter against the aten form and against float64, and when the kernels run."""

import pytest
import torch

from kernels import rms_norm
from tests.kernels import interpreted_rows

EPS = 1e-6
FLOAT32_UNIT = 2.0 ** -23


def hf_rms_norm(x, weight, eps):
    """HF transformers' ``RMSNorm.forward``."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


def operands(shape, dtype, weight_dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=generator)).to(weight_dtype)
    grad_out = torch.randn(shape, generator=generator).to(torch.promote_types(dtype, weight_dtype))
    return x, weight, grad_out


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(3, 5, 24), (7, 128), (40,)])
def test_the_reference_is_autograd_of_the_hf_formula(dtype, weight_dtype, shape):
    x, weight, grad_out = operands(shape, dtype, weight_dtype, len(shape))
    x.requires_grad_(True)
    weight.requires_grad_(True)
    want_out = hf_rms_norm(x, weight, EPS)
    want_grad_x, want_grad_weight = torch.autograd.grad(want_out, (x, weight), grad_out)
    out, rstd = rms_norm.reference_forward(x.detach(), weight.detach(), EPS)
    grad_x, grad_weight = rms_norm.reference_backward(grad_out, x.detach(), weight.detach(), rstd)
    # Float32 statistics whatever the input's dtype, float64 too: HF's cast.
    assert rstd.dtype == torch.float32 and rstd.shape == x.shape[:-1]
    assert out.dtype == want_out.dtype and grad_x.dtype == dtype and grad_weight.dtype == weight_dtype
    assert torch.equal(out, want_out)
    # The same operations in the same order: bit for bit, but for the weight's sum over rows, which
    # autograd takes over the leading dims and the reference over their flattening (one float32
    # rounding apart at most, one unit of a 16-bit weight).
    assert torch.equal(grad_x, want_grad_x)
    unit = torch.finfo(weight_dtype).eps
    assert torch.allclose(grad_weight, want_grad_weight, rtol=unit, atol=0), (grad_weight, want_grad_weight)


def test_the_reference_rounds_the_normalised_value_to_the_input_dtype():
    # A bfloat16 input with a float32 weight: float32 output, but the weight multiplies bfloat16 values.
    x, weight, _ = operands((4, 16), torch.bfloat16, torch.float32, 9)
    out, rstd = rms_norm.reference_forward(x, weight, EPS)
    normed = (x.float() * rstd[:, None]).to(torch.bfloat16)
    assert out.dtype == torch.float32 and torch.equal(out, weight * normed.float())


@pytest.fixture(scope="module")
def interpreted():
    return interpreted_rows("rms_norm_interpreted.py")


def test_every_interpreted_case_ran(interpreted):
    assert len(interpreted) == 13
    assert all(row["shapes_ok"] for row in interpreted)


def test_float32_kernels_agree_with_the_aten_form_and_float64(interpreted):
    rows = [row for row in interpreted if row["dtype"] == "torch.float32"]
    assert rows
    for row in rows:
        for name, error in row["error"].items():
            # Both sum in float32, in different orders: as close to float64 as the aten form is.
            assert error < 1e-6 and error < 2 * row["aten_error"][name] + 4 * FLOAT32_UNIT, (name, row)
        assert row["ulps"]["rstd"] <= 2, row


def test_sixteen_bit_kernels_round_as_the_aten_form(interpreted):
    rows = [row for row in interpreted if row["dtype"] != "torch.float32"]
    assert len(rows) == 9
    for row in rows:
        # Every 16-bit rounding of the aten form, at the same place: at most one unit of the last
        # place apart (a float32 statistic one bit off), mostly equal.
        for name in ("out", "grad_x"):
            assert row["ulps"][name] <= 1 and row["differing"][name] <= 0.01, (name, row)
        if row["weight_dtype"] != "torch.float32":
            assert row["ulps"]["grad_weight"] <= 1, row
        assert row["ulps"]["rstd"] <= 2, row
        for name, error in row["error"].items():
            assert error <= 1.05 * row["aten_error"][name] + 4 * FLOAT32_UNIT, (name, row)


def test_the_kernels_run_only_where_they_apply(monkeypatch):
    x, weight = torch.randn(4, 8), torch.randn(8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not rms_norm.runs(x, weight)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert rms_norm.runs(x, weight)
    assert rms_norm.runs(x.bfloat16(), weight) and rms_norm.runs(x.half(), weight.bfloat16())
    assert rms_norm.runs(torch.randn(8, 4).t(), torch.randn(8))
    assert not rms_norm.runs(x.double(), weight) and not rms_norm.runs(x, weight.double())
    assert not rms_norm.runs(x, torch.randn(7)) and not rms_norm.runs(x, torch.randn(1, 8))
    assert not rms_norm.runs(torch.randn(0, 8), weight) and not rms_norm.runs(torch.randn(4, 0), torch.randn(0))
    assert not rms_norm.runs(torch.randn(2, rms_norm.MAX_WIDTH + 1), torch.randn(rms_norm.MAX_WIDTH + 1))
    assert not rms_norm.runs(torch.tensor(1.0), weight)
    with rms_norm.use_triton(False):
        assert not rms_norm.runs(x, weight)
    assert rms_norm.runs(x, weight)
