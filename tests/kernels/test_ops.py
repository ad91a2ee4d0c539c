"""The registered ops ``torch.ops.shardgraph.grouped_mm`` / ``_dgrad`` / ``_wgrad``: schema, fake
kernels, autograd and AOT dispatch checked by ``torch.library.opcheck`` on every backend that
runs on the CPU, and the forward op's gradients against float64 autograd of per-group products."""

import pytest
import torch

import kernels


def operands(layout, requires_grad=False, dtype=torch.float32):
    generator = torch.Generator().manual_seed(4)
    sizes = [3, 0, 5, 2]
    m, k, n = sum(sizes) + 2, 12, 8  # two rows past the last group
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    shape = (len(sizes), k, n) if layout == "ekn" else (len(sizes), n, k)
    x = torch.randn(m, k, generator=generator, dtype=dtype).requires_grad_(requires_grad)
    w = torch.randn(shape, generator=generator, dtype=dtype).requires_grad_(requires_grad)
    dout = torch.randn(m, n, generator=generator, dtype=dtype)
    return x, w, dout, offsets


@pytest.mark.parametrize("backend", ["loop", "torch"])
@pytest.mark.parametrize("layout", ["ekn", "enk"])
def test_opcheck_passes_for_forward_dgrad_and_wgrad(backend, layout):
    x, w, dout, offsets = operands(layout, requires_grad=True)
    with kernels.use_backend(backend):
        torch.library.opcheck(torch.ops.shardgraph.grouped_mm.default, (x, w, offsets, layout))
        torch.library.opcheck(torch.ops.shardgraph.grouped_mm_dgrad.default, (dout, w.detach(), offsets, layout))
        torch.library.opcheck(torch.ops.shardgraph.grouped_mm_wgrad.default,
                              (x.detach(), dout, offsets, w.shape[0], layout))


@pytest.mark.parametrize("layout", ["ekn", "enk"])
def test_forward_op_gradients_match_float64_per_group_products(layout):
    x, w, dout, offsets = operands(layout, requires_grad=True)
    out = torch.ops.shardgraph.grouped_mm(x, w, offsets, layout)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), dout)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    pieces, start = [], 0
    for group, end in enumerate(offsets.tolist()):
        weight = w64[group] if layout == "ekn" else w64[group].T
        pieces.append(x64[start:end] @ weight)
        start = end
    pieces.append(x64.new_zeros(x64.shape[0] - start, weight.shape[1]))
    expected = torch.cat(pieces)
    expected_x, expected_w = torch.autograd.grad(expected, (x64, w64), dout.double())
    for value, reference in ((out, expected), (grad_x, expected_x), (grad_w, expected_w)):
        assert ((value.double() - reference).norm() / reference.norm()).item() < 1e-6
    assert (grad_w[1] == 0).all()  # the empty group's weight gets no gradient


def test_a_bad_argument_is_refused_by_the_op_with_its_name():
    x, w, _, offsets = operands("ekn")
    with pytest.raises(kernels.GroupedGemmError, match="offsets must be int32"):
        torch.ops.shardgraph.grouped_mm(x, w, offsets.long(), "ekn")
    with pytest.raises(kernels.GroupedGemmError, match="x has K=11 columns"):
        torch.ops.shardgraph.grouped_mm(x[:, :11], w, offsets, "ekn")
