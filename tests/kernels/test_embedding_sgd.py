"""kernels/embedding_sgd.py: the sparse SGD step on an embedding table equals the dense step
(``embedding_dense_backward``, then ``W - grad * lr``) and its norm term, leaves rows no index
names bit for bit, and names what is wrong with bad operands."""

import pytest
import torch

import kernels  # noqa: F401 - registers torch.ops.shardgraph.embedding_sgd_
from kernels.embedding_sgd import EmbeddingSgdError

STEP = torch.ops.shardgraph.embedding_sgd_


def dense_step(weight, grad_output, indices, lr, padding_idx):
    grad = torch.ops.aten.embedding_dense_backward(grad_output, indices, weight.shape[0], padding_idx, False)
    return weight - grad * lr, torch.sum(torch.pow(grad.double(), 2))


@pytest.mark.parametrize("padding_idx", [-1, 3])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("index_shape", [(37,), (4, 9), (2, 3, 5)])
def test_the_sparse_step_equals_the_dense_step_in_float64(padding_idx, index_dtype, index_shape):
    generator = torch.Generator().manual_seed(len(index_shape) + padding_idx)
    weight = torch.randn(40, 6, dtype=torch.float64, generator=generator)
    # Few distinct rows: most indices repeat, and the padding row is among them.
    indices = torch.randint(0, 8, index_shape, generator=generator).to(index_dtype)
    grad_output = torch.randn(*index_shape, 6, dtype=torch.float64, generator=generator)
    lr = torch.tensor(0.25, dtype=torch.float64)
    expected, expected_term = dense_step(weight, grad_output, indices.long(), lr, padding_idx)
    updated = weight.clone()
    term = STEP(updated, grad_output, indices, lr, padding_idx, [])
    assert term.dtype == torch.float32
    assert torch.allclose(updated, expected, rtol=0, atol=1e-14)
    assert abs(term.double() - expected_term) <= 1e-6 * expected_term
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[indices.long().flatten()] = False
    if padding_idx >= 0:
        untouched[padding_idx] = True
    assert torch.equal(updated[untouched], weight[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sixteen_and_thirty_two_bit_tables_round_as_the_float32_accumulating_dense_backward(dtype):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(30, 16, generator=generator).to(dtype)
    indices = torch.randint(0, 12, (64,), generator=generator)
    grad_output = torch.randn(64, 16, generator=generator).to(dtype)
    lr = torch.tensor(0.1, dtype=dtype)
    # The dense backward's float32 sums, rounded once to the table's dtype.
    grad = torch.zeros(30, 16).index_add_(0, indices, grad_output.float()).to(dtype)
    expected = weight - grad * lr
    updated = weight.clone()
    term = STEP(updated, grad_output, indices, lr, -1, [])
    tolerance = 0 if dtype == torch.bfloat16 else 1e-6
    assert torch.allclose(updated.float(), expected.float(), rtol=0, atol=tolerance)
    assert torch.allclose(term, grad.float().pow(2).sum(), rtol=1e-6)


def test_no_indices_leave_the_table_and_give_a_zero_norm_term():
    weight = torch.randn(5, 4)
    updated = weight.clone()
    term = STEP(updated, torch.empty(0, 4), torch.empty(0, dtype=torch.long), torch.tensor(0.5), -1, [])
    assert torch.equal(updated, weight) and term.item() == 0.0


@pytest.mark.parametrize("case, message", [
    ("grad width", r"grad_output \(6, 5\) must be indices' shape \(6,\) plus the weight's width 4"),
    ("grad dtype", "grad_output is torch.float64, the weight torch.float32"),
    ("indices dtype", "indices must be int32 or int64"),
    ("lr shape", "lr must be a 0-dim tensor in the weight's dtype torch.float32"),
    ("table", r"weight must be a \[rows, width\] table"),
])
def test_bad_operands_are_named(case, message):
    weight, grad_output, indices, lr = torch.zeros(8, 4), torch.zeros(6, 4), torch.zeros(6, dtype=torch.long), \
        torch.tensor(0.1)
    if case == "grad width":
        grad_output = torch.zeros(6, 5)
    elif case == "grad dtype":
        grad_output = grad_output.double()
    elif case == "indices dtype":
        indices = indices.float()
    elif case == "lr shape":
        lr = torch.tensor([0.1])
    else:
        weight = torch.zeros(8, 4, 1)
    with pytest.raises(EmbeddingSgdError, match=message):
        STEP(weight, grad_output, indices, lr, -1, [])


def test_the_fake_kernel_checks_and_gives_a_float32_scalar():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        weight, grad_output = torch.empty(100, 8, dtype=torch.bfloat16), torch.empty(2, 5, 8, dtype=torch.bfloat16)
        term = STEP(weight, grad_output, torch.empty(2, 5, dtype=torch.long), torch.empty((), dtype=torch.bfloat16),
                    -1, [])
        assert term.shape == () and term.dtype == torch.float32
        with pytest.raises(EmbeddingSgdError, match="lr must be"):
            STEP(weight, grad_output, torch.empty(2, 5, dtype=torch.long), torch.empty(()), -1, [])


def test_the_triton_kernel_under_the_interpreter_steps_as_the_aten_form():
    from . import interpreted_rows

    rows = interpreted_rows("embedding_sgd_interpreted.py")
    assert len(rows) == 6
    for row in rows:
        assert row["untouched_equal"], row
        if row["dtype"] == "torch.float32":
            # The same float32 sums in the same (token) order and the same two rounded ops.
            assert row["equal_to_aten"] and row["squares"] < 1e-6 and row["step_error"] < 1e-6, row
        else:
            # The interpreter's float32 -> bfloat16 casts do not round as a GPU's do (the GPU run
            # checks equality): as exact as the aten form to within that rounding.
            assert row["step_error"] < 2.5 * row["aten_step_error"] and row["squares"] < 2e-2, row
