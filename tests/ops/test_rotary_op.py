"""shardgraph.rotary: its autograd equals autograd of the rotate-half formula bit for bit, it refuses
operands it cannot rotate by name, and under torch.compile the program runs its aten form, traced by dynamo without a graph break."""

import pytest
import torch

import shardgraph.ops  # noqa: F401 - registers the ops
from kernels.rotary import layout_of, reference_forward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_op_and_its_backward_equal_autograd_of_the_formula(dtype):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 4, 16, generator=generator).to(dtype).transpose(1, 2)
    angles = torch.rand(2, 1, 5, 16, generator=generator) * 6.3
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    grad = torch.randn(2, 4, 5, 16, generator=generator).to(dtype)
    mine, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = torch.ops.shardgraph.rotary(mine, cos, sin, layout_of(x))
    want = reference_forward(theirs, cos, sin)
    # Stored as the input is (a transposed view of [batch, seq, heads, dim]), as the aten form.
    assert torch.equal(out, want) and out.stride() == x.stride()
    assert torch.equal(torch.autograd.grad(out, mine, grad)[0], torch.autograd.grad(want, theirs, grad)[0])


@pytest.mark.parametrize("shapes, dtypes, words", [
    (((2, 7), (2, 7), (2, 7)), (torch.float32,) * 3, "must be even"),
    (((2, 8), (2, 8), (2, 8)), (torch.float32, torch.float64, torch.float32), "one floating dtype"),
    (((2, 8), (3, 8), (2, 8)), (torch.float32,) * 3, "must broadcast to the input's shape"),
], ids=["odd_last_dim", "table_dtype", "table_shape"])
def test_operands_it_cannot_rotate_are_refused_naming_the_rule(shapes, dtypes, words):
    x, cos, sin = (torch.ones(shape, dtype=dtype) for shape, dtype in zip(shapes, dtypes))
    with pytest.raises(ValueError, match=f"shardgraph.rotary: .*{words}"):
        torch.ops.shardgraph.rotary(x, cos, sin, list(range(x.dim())))


def test_under_torch_compile_the_program_runs_the_aten_form():
    from shardgraph.ops import as_aten_ops
    from shardgraph.frontend import trace
    from benchmarks.model_coverage import build, lm_loss

    model = build("qwen3_moe")
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    traced = trace(model, (ids,), lm_loss)
    ops = {torch.ops.shardgraph.rotary.default, torch.ops.shardgraph.rotary_backward.default}
    copied = as_aten_ops(traced.graph_module)
    assert any(n.target in ops for n in traced.graph_module.graph.nodes)
    assert not any(n.target in ops for n in copied.graph.nodes)
    arguments = [a.detach() for a in traced.arguments(model, ids)]
    for got, want in zip(copied(*arguments), traced.graph_module(*arguments)):
        assert torch.equal(got, want)
    # Dynamo traces the copy whole: no graph break at a lazily written module's first call.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(as_aten_ops(traced.graph_module), backend="eager", dynamic=False)
    for got, want in zip(compiled(*arguments), traced.graph_module(*arguments)):
        assert torch.equal(got, want)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
