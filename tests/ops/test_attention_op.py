"""``shardgraph::attention``: the fused attention op and its backward against F.sdpa autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import shardgraph.ops  # noqa: F401 - registers the ops


def operands(heads=4, kv_heads=4, seq=6, dim=8, seed=0, kv_seq=None, value_dim=None):
    generator = torch.Generator().manual_seed(seed)
    kv_seq = seq if kv_seq is None else kv_seq
    query = torch.randn(2, heads, seq, dim, generator=generator, dtype=torch.float64)
    key = torch.randn(2, kv_heads, kv_seq, dim, generator=generator, dtype=torch.float64)
    value = torch.randn(2, kv_heads, kv_seq, value_dim or dim, generator=generator, dtype=torch.float64)
    return query, key, value


def sdpa_and_op_gradients(query, key, value, is_causal, scale, gqa):
    """(reference output, reference gradients, op output, op gradients) for one random grad_out."""
    query, key, value = (t.detach().requires_grad_() for t in (query, key, value))
    reference = F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    grad_out = torch.randn(reference.shape, dtype=reference.dtype, generator=torch.Generator().manual_seed(1))
    expected = torch.autograd.grad(reference, (query, key, value), grad_out)
    out = torch.ops.shardgraph.attention(query, key, value, is_causal, scale, gqa)
    got = torch.autograd.grad(out, (query, key, value), grad_out)
    return reference, expected, out, got


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
    sequence_major = tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (query, key, value))
    for inputs in ((query, key, value), sequence_major):
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
@pytest.mark.parametrize("shape", [dict(seq=3, kv_seq=6), dict(value_dim=5), dict(heads=6, kv_heads=2, value_dim=4)])
def test_query_and_key_lengths_or_head_dims_that_differ_still_match_sdpa_autograd(is_causal, shape):
    # Causal attention with fewer queries than keys is aligned top-left, as in F.sdpa; a value
    # head_dim unlike the query's takes the textbook backward (no CPU fused kernel takes it).
    query, key, value = operands(**shape)
    gqa = query.shape[1] != key.shape[1]
    reference, expected, out, got = sdpa_and_op_gradients(query, key, value, is_causal, 0.3, gqa)
    assert out.shape == reference.shape and torch.allclose(out, reference, rtol=1e-12, atol=1e-12)
    for name, value_got, value_expected in zip(("query", "key", "value"), got, expected):
        assert value_got.shape == value_expected.shape, name
        assert torch.allclose(value_got, value_expected, rtol=1e-10, atol=1e-12), name


def test_fake_kernels_give_the_output_and_gradient_shapes_with_grouped_heads():
    query, key, value = operands(heads=6, kv_heads=2, seq=5, kv_seq=7, value_dim=3)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (query, key, value)]
        out = torch.ops.shardgraph.attention(*fake, False, 0.5, True)
        assert tuple(out.shape) == (2, 6, 5, 3)
        grads = torch.ops.shardgraph.attention_backward(torch.empty_like(out), *fake, False, 0.5, True)
        assert [tuple(g.shape) for g in grads] == [(2, 6, 5, 8), (2, 2, 7, 8), (2, 2, 7, 3)]


def test_mismatched_operands_are_refused_naming_the_tensor():
    query, key, value = operands()
    with pytest.raises(ValueError, match=r"query \(2, 4, 6, 8\), key \(1, 4, 6, 8\) .* batch size"):
        torch.ops.shardgraph.attention(query, key[:1], value, False, 0.5, False)
    with pytest.raises(ValueError, match=r"key .* and value .* must share heads"):
        torch.ops.shardgraph.attention(query, key, value[:, :2], False, 0.5, True)
    with pytest.raises(ValueError, match=r"query head_dim 8 differs from key head_dim 4"):
        torch.ops.shardgraph.attention(query, key[..., :4], value, False, 0.5, False)
    with pytest.raises(ValueError, match=r"query has 4 heads and key/value 2; .* enable_gqa"):
        torch.ops.shardgraph.attention(query, key[:, :2], value[:, :2], False, 0.5, False)
    with pytest.raises(TypeError, match=r"value torch.float32 must share a dtype"):
        torch.ops.shardgraph.attention(query, key, value.float(), False, 0.5, False)
    with pytest.raises(ValueError, match=r"attention_backward: grad_out \(2, 4, 6, 7\)"):
        torch.ops.shardgraph.attention_backward(query[..., :7], query, key, value, False, 0.5, False)


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
