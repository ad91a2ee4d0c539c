"""Reference grouped products against a float64 dense computation, both weight layouts."""

import pytest
import torch

import kernels


def groups(sizes):
    return torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("layout", ["ekn", "enk"])
def test_forward_dgrad_wgrad_match_dense_products_with_empty_groups(layout):
    generator = torch.Generator().manual_seed(0)
    sizes = [3, 0, 5, 1]
    offsets = groups(sizes)
    m, k, n = sum(sizes), 7, 5
    x = torch.randn(m, k, dtype=torch.float64, generator=generator)
    w = torch.randn(4, k, n, dtype=torch.float64, generator=generator)
    stored = w if layout == "ekn" else w.transpose(1, 2).contiguous()
    dout = torch.randn(m, n, dtype=torch.float64, generator=generator)
    out = kernels.grouped_mm(x, stored, offsets, w_layout=layout)
    dx = kernels.grouped_mm_dgrad(dout, stored, offsets, w_layout=layout)
    dw = kernels.grouped_mm_wgrad(x, dout, offsets, 4, w_layout=layout)
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        torch.testing.assert_close(out[rows], x[rows] @ w[g])
        torch.testing.assert_close(dx[rows], dout[rows] @ w[g].T)
        expected = x[rows].T @ dout[rows]
        torch.testing.assert_close(dw[g], expected if layout == "ekn" else expected.T)
        start += size


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="w_layout must be"):
        kernels.grouped_mm(torch.randn(2, 3), torch.randn(1, 3, 4), groups([2]), w_layout="kn")
