"""shardgraph.linear_cross_entropy against whole logits + autograd, chunked every way."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels  # noqa: F401 - registers the ops
from kernels.linear_cross_entropy import chunk_rows_for_budget, linear_cross_entropy_reference

op = torch.ops.shardgraph.linear_cross_entropy


def relative(value, reference) -> float:
    value, reference = value.double(), reference.double()
    return ((value - reference).norm() / reference.norm().clamp_min(1e-300)).item()


def case(dtype, rows=37, width=16, vocab=50, ignore_index=-100):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=generator).to(dtype)
    weight = torch.randn(vocab, width, generator=generator).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=generator)
    target[::4] = ignore_index
    return hidden, weight, target, torch.tensor(0.37, dtype=dtype)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize("chunk_rows", [1, 8, 37, 64])  # one row, uneven last chunk, exact, more than the rows
def test_loss_and_gradients_match_whole_logits_for_every_chunking(dtype, tolerance, chunk_rows):
    hidden, weight, target, scale = case(dtype)
    loss, grad_hidden, grad_weight = op(hidden, weight, target, scale, -100, chunk_rows, dtype)
    expected = linear_cross_entropy_reference(hidden, weight, target, scale, -100)
    assert grad_hidden.dtype == grad_weight.dtype == loss.dtype == dtype
    for value, reference in zip((loss, grad_hidden, grad_weight), expected):
        assert relative(value, reference) < tolerance


def test_ignored_rows_add_no_loss_and_no_gradient():
    hidden, weight, target, scale = case(torch.float64, ignore_index=3)
    loss, grad_hidden, _ = op(hidden, weight, target, scale, 3, 5, torch.float64)
    kept = target != 3
    expected = linear_cross_entropy_reference(hidden[kept], weight, target[kept], scale, 3)
    assert relative(loss, expected[0]) < 1e-13
    assert grad_hidden[~kept].abs().max() == 0
    every_row_ignored = op(hidden, weight, torch.full_like(target, 3), scale, 3, 5, torch.float64)
    assert every_row_ignored[0] == 0 and every_row_ignored[1].abs().max() == 0 == every_row_ignored[2].abs().max()


def test_bfloat16_stays_within_bfloat16_rounding_of_float64():
    hidden, weight, target, scale = case(torch.bfloat16, rows=64, width=32, vocab=200)
    loss, grad_hidden, grad_weight = op(hidden, weight, target, scale, -100, 16, torch.float32)
    expected = linear_cross_entropy_reference(hidden.double(), weight.double(), target, scale.double(), -100)
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16 and loss.dtype == torch.float32
    for value, reference in zip((loss, grad_hidden, grad_weight), expected):
        assert relative(value, reference) < 2e-2


def test_fake_kernel_gives_shapes_and_dtypes_without_computing():
    with FakeTensorMode():
        hidden, weight = torch.empty(9, 4, dtype=torch.bfloat16), torch.empty(11, 4, dtype=torch.bfloat16)
        loss, grad_hidden, grad_weight = op(hidden, weight, torch.zeros(9, dtype=torch.long), torch.ones(()), -100,
                                            4, torch.float32)
    assert (loss.shape, loss.dtype) == ((), torch.float32)
    assert grad_hidden.shape == (9, 4) and grad_weight.shape == (11, 4) and grad_weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_rows_give_a_zero_loss_and_zero_gradients(dtype):
    # The weight gradient's accumulator is written by the first chunk, not zero-filled: with no
    # chunk at all it must still come out zero, not uninitialised memory.
    hidden, weight, target, scale = case(dtype)
    loss, grad_hidden, grad_weight = op(hidden[:0], weight, target[:0], scale, -100, 8, torch.float32)
    assert loss.item() == 0.0 and grad_hidden.shape == (0, hidden.shape[1])
    assert torch.equal(grad_weight, torch.zeros_like(weight))


def test_bad_operands_are_refused_by_name():
    hidden, weight, target, scale = case(torch.float32)
    with pytest.raises(ValueError, match="target"):
        op(hidden, weight, target[:-1], scale, -100, 8, torch.float32)
    with pytest.raises(ValueError, match="chunk_rows"):
        op(hidden, weight, target, scale, -100, 0, torch.float32)


@pytest.mark.parametrize("vocab,dtype,triton_path", [(151936, torch.bfloat16, True), (151936, torch.float32, False),
                                                     (50, torch.float32, False)])
def test_chunk_rows_keep_the_chunk_within_the_budget(vocab, dtype, triton_path):
    budget = 256 << 20
    rows = chunk_rows_for_budget(8192, vocab, dtype, budget, triton_path)
    per_element = dtype.itemsize if triton_path else 2 * dtype.itemsize + 8
    assert 1 <= rows <= 8192 and rows * vocab * per_element <= budget
    assert rows == 8192 or rows % 64 == 0
    assert chunk_rows_for_budget(10, vocab, dtype, budget, triton_path) <= 10


@pytest.mark.parametrize("rows,budget_mib", [(8192, 2048), (8192, 512), (8192, 64), (5000, 300), (129, 100)])
def test_chunk_rows_split_the_rows_into_as_few_near_equal_chunks_as_the_budget_allows(rows, budget_mib):
    vocab, dtype = 151936, torch.bfloat16
    budget = budget_mib << 20
    largest = budget // (vocab * dtype.itemsize)
    largest -= largest % 64
    chunk = chunk_rows_for_budget(rows, vocab, dtype, budget, True)
    chunks = -(-rows // chunk)
    assert chunk <= largest and chunks == -(-rows // min(largest, rows))
    # Every chunk but the last is full; the last is short by less than 64 rows per chunk.
    assert rows - (chunks - 1) * chunk > chunk - 64 * chunks
    if (rows, budget_mib) == (8192, 2048):
        assert chunk == 4096  # two equal chunks, not 7040 rows and 1152


def test_triton_softmax_gradient_and_sgd_kernels_match_torch_under_the_interpreter():
    script = os.path.join(os.path.dirname(__file__), "linear_cross_entropy_interpreted.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["loss"] < 1e-6 and found["grad"] < 1e-6 and found["ignored_rows_zero"], found
    assert found["wide_loss"] < 1e-6 and found["wide_grad"] < 1e-6, found
    assert set(found["sgd"]) == {"torch.bfloat16", "torch.float32"}
    single, half = found["sgd"]["torch.float32"], found["sgd"]["torch.bfloat16"]
    assert single["param_equal"] and single["squares"] < 1e-6, found
    assert half["param"] < 1e-2 and half["squares"] < 2e-2, found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sgd_variant_returns_the_loss_and_hidden_gradient_and_steps_the_weight_as_the_unfused_ops(dtype):
    from kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_sgd_

    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 16).to(dtype), torch.randn(70, 16).to(dtype)
    target = torch.randint(0, 70, (40,))
    target[3] = -100
    grad_scale, lr = torch.tensor(1 / 39), torch.tensor(0.5, dtype=dtype)
    loss, grad_hidden, grad_weight = linear_cross_entropy(hidden, weight, target, grad_scale, -100, 16, torch.float32)
    stepped = weight.clone()
    loss_b, grad_hidden_b, squares = linear_cross_entropy_sgd_(hidden, stepped, target, grad_scale, -100, 16,
                                                               torch.float32, lr, [])
    assert torch.equal(loss, loss_b) and torch.equal(grad_hidden, grad_hidden_b)
    assert torch.equal(stepped, weight - grad_weight * lr)
    assert torch.allclose(squares, torch.sum(torch.pow(grad_weight.float(), 2)), rtol=1e-6)
    with pytest.raises(ValueError, match="lr must be a 0-dim tensor in the weight's dtype"):
        linear_cross_entropy_sgd_(hidden, stepped, target, grad_scale, -100, 16, torch.float32, lr.double(), [])
