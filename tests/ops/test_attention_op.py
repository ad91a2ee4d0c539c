"""``shardgraph::attention``: the fused attention op and its backward against F.sdpa autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import shardgraph.ops  # noqa: F401 - registers the ops


def operands(heads=4, kv_heads=4, seq=6, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, heads, seq, dim, generator=generator, dtype=torch.float64)
    key = torch.randn(2, kv_heads, seq, dim, generator=generator, dtype=torch.float64)
    value = torch.randn(2, kv_heads, seq, dim, generator=generator, dtype=torch.float64)
    return query, key, value


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_forward_and_backward_match_sdpa_autograd_in_float64(is_causal, kv_heads):
    query, key, value = (t.requires_grad_() for t in operands(kv_heads=kv_heads))
    gqa = kv_heads != 4
    scale = 0.3
    reference = F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    grad_out = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, (query, key, value), grad_out)

    out = torch.ops.shardgraph.attention(query, key, value, is_causal, scale, gqa)
    got = torch.autograd.grad(out, (query, key, value), grad_out)
    assert torch.allclose(out, reference, rtol=1e-12, atol=1e-12)
    for name, value_got, value_expected in zip(("query", "key", "value"), got, expected):
        assert value_got.shape == value_expected.shape, name
        assert torch.allclose(value_got, value_expected, rtol=1e-10, atol=1e-12), name


def test_outputs_are_stored_sequence_major_whatever_the_input_layout():
    # The traced graph relies on the fake kernel's strides, so the real kernel must return the
    # same layout for contiguous and transposed inputs alike.
    query, key, value = operands()
    for inputs in ((query, key, value), tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (query, key, value))):
        out = torch.ops.shardgraph.attention(*inputs, True, 0.5, False)
        assert out.transpose(1, 2).is_contiguous()
        grads = torch.ops.shardgraph.attention_backward(torch.randn_like(out), *inputs, True, 0.5, False)
        assert all(g.transpose(1, 2).is_contiguous() for g in grads)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (query, key, value)]
        out = torch.ops.shardgraph.attention(*fake, True, 0.5, False)
        assert out.shape == query.shape and out.transpose(1, 2).is_contiguous()


def test_head_counts_that_do_not_divide_are_refused_naming_the_rule():
    query, key, value = operands(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match=r"query has 4 heads and key/value 3"):
        torch.ops.shardgraph.attention(query, key, value, True, 0.5, True)
    with pytest.raises(ValueError, match=r"query must be 4-D"):
        torch.ops.shardgraph.attention(query[0], key, value, True, 0.5, False)


@pytest.mark.parametrize("is_causal", [True, False])
def test_textbook_backward_used_where_no_fused_kernel_fits_matches_autograd(is_causal):
    from shardgraph.ops.attention import _math_backward

    query, key, value = (t.requires_grad_() for t in operands(seq=5))
    reference = F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=0.4)
    grad_out = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, (query, key, value), grad_out)
    got = _math_backward(grad_out, query.detach(), key.detach(), value.detach(), is_causal, 0.4)
    for value_got, value_expected in zip(got, expected):
        assert torch.allclose(value_got, value_expected, rtol=1e-10, atol=1e-12)
