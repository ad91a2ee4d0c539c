"""kernels/rotary.py: the aten form against autograd of HF's rotate-half formula, the Triton kernels
under the CPU interpreter against the aten form bit for bit, and when the kernels run."""

import pytest
import torch

from kernels import rotary
from tests.kernels import interpreted_rows


def hf_rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_the_reference_is_autograd_of_the_hf_formula_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, 8, generator=generator).to(dtype).transpose(1, 2).requires_grad_(True)
    angles = torch.rand(2, 1, 6, 8, generator=generator) * 6.3
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    grad = torch.randn(2, 3, 6, 8, generator=generator).to(dtype)
    want = x * cos + hf_rotate_half(x) * sin
    (want_grad,) = torch.autograd.grad(want, x, grad)
    assert torch.equal(rotary.reference_forward(x.detach(), cos, sin), want)
    assert torch.equal(rotary.reference_backward(grad, cos, sin), want_grad)


def test_the_interpreted_kernels_equal_the_aten_form_bit_for_bit():
    rows = interpreted_rows("rotary_interpreted.py")
    assert len(rows) == 9
    for row in rows:
        assert row["forward_equal"] and row["backward_equal"] and row["layout_kept"], row


def test_the_kernels_do_not_run_on_the_cpu_without_the_interpreter_or_on_tables_of_another_dtype():
    x = torch.randn(2, 4, 8)
    assert not rotary.runs(x, torch.ones(2, 4, 8), torch.ones(2, 4, 8))  # a CPU, not interpreted
    assert not rotary.runs(x.half(), torch.ones(2, 4, 8), torch.ones(2, 4, 8))
    assert not rotary.runs(torch.randn(2, 4, 7), torch.ones(2, 4, 7), torch.ones(2, 4, 7))
