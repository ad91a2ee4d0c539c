"""``shardgraph::attention``: the fused attention op and its backward against float64 math attention."""

import importlib
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import shardgraph.ops  # noqa: F401 - registers the ops

# The module (``shardgraph.ops.attention`` as an attribute is the op it defines).
attention_module = importlib.import_module("shardgraph.ops.attention")

F64 = torch.float64


def operands(heads=4, kv_heads=4, seq=6, dim=8, seed=0, kv_seq=None, value_dim=None, dtype=F64):
    generator = torch.Generator().manual_seed(seed)
    kv_seq = seq if kv_seq is None else kv_seq
    query = torch.randn(2, heads, seq, dim, generator=generator, dtype=F64)
    key = torch.randn(2, kv_heads, kv_seq, dim, generator=generator, dtype=F64)
    value = torch.randn(2, kv_heads, kv_seq, value_dim or dim, generator=generator, dtype=F64)
    return tuple(t.to(dtype) for t in (query, key, value))


def math_attention(query, key, value, is_causal, scale):
    """float64 attention written out (top-left causal mask; grouped heads repeated):
    ``(out, logsumexp)``, differentiable through autograd."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ value, scores.logsumexp(dim=-1)


def reference_and_op(query, key, value, is_causal, scale):
    """(reference out, logsumexp, gradients in float64; op out, logsumexp, gradients) for one
    random grad_out, the op run in the operands' dtype."""
    gqa = query.shape[1] != key.shape[1]
    inputs64 = [t.detach().to(F64).requires_grad_() for t in (query, key, value)]
    expected_out, expected_logsumexp = math_attention(*inputs64, is_causal, scale)
    grad_out = torch.randn(expected_out.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    expected = torch.autograd.grad(expected_out, inputs64, grad_out)
    inputs = [t.detach().requires_grad_() for t in (query, key, value)]
    out, logsumexp = torch.ops.shardgraph.attention(*inputs, is_causal, scale, gqa)
    got = torch.autograd.grad(out, inputs, grad_out.to(query.dtype))
    return (expected_out, expected_logsumexp, expected), (out, logsumexp, got)


def assert_close(got, expected, name, rtol, atol):
    assert got.shape == expected.shape, name
    assert torch.allclose(got.to(F64), expected, rtol=rtol, atol=atol), \
        f"{name}: max abs error {(got.to(F64) - expected).abs().max().item():.3g}"


SHAPES = [dict(), dict(kv_heads=2), dict(seq=7, kv_seq=7, kv_heads=1), dict(seq=3, kv_seq=6),
          dict(seq=5, kv_seq=3), dict(value_dim=5), dict(heads=6, kv_heads=2, value_dim=4, seq=9)]


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "equal")
def test_output_logsumexp_and_gradients_match_float64_math_attention(is_causal, shape):
    # Grouped heads, odd and unequal lengths (causal aligned top-left, as in F.sdpa; more
    # queries than keys too), a value head_dim unlike the query's (the textbook path): the CPU
    # kernels agree with the written-out float64 formulas to float64 rounding.
    query, key, value = operands(**shape)
    (expected_out, expected_logsumexp, expected), (out, logsumexp, got) = reference_and_op(
        query, key, value, is_causal, 0.3)
    assert logsumexp.dtype == F64 and not logsumexp.requires_grad
    assert_close(out, expected_out.detach(), "out", 1e-12, 1e-12)
    assert_close(logsumexp, expected_logsumexp.detach(), "logsumexp", 1e-12, 1e-12)
    for name, value_got, value_expected in zip(("query", "key", "value"), got, expected):
        assert_close(value_got, value_expected, name, 1e-10, 1e-12)


@pytest.mark.parametrize("is_causal", [True, False])
def test_float32_output_and_gradients_are_within_float32_rounding_of_float64(is_causal):
    query, key, value = operands(heads=4, kv_heads=2, seq=33, dim=16, dtype=torch.float32)
    (expected_out, expected_logsumexp, expected), (out, logsumexp, got) = reference_and_op(
        query, key, value, is_causal, 0.25)
    assert out.dtype == torch.float32 and logsumexp.dtype == torch.float32
    assert_close(out, expected_out.detach(), "out", 1e-5, 1e-5)
    assert_close(logsumexp, expected_logsumexp.detach(), "logsumexp", 1e-5, 1e-5)
    for name, value_got, value_expected in zip(("query", "key", "value"), got, expected):
        assert_close(value_got, value_expected, name, 1e-4, 1e-5)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_every_cpu_kernel_returns_the_same_logsumexp_so_the_backward_may_use_another(dtype):
    # The saved log-sum-exp means the formula, not a kernel's private state: the CPU flash and
    # the textbook forward give the same one, and either backward takes either forward's.
    query, key, value = operands(seq=7, dtype=dtype)
    tolerance = 1e-12 if dtype == F64 else 2e-5
    saved = {kernel: forward(query, key, value, True, 0.3) for kernel, forward in
             (("cpu_flash", attention_module._cpu_flash_forward), ("math", attention_module._math_forward))}
    (flash_out, flash_logsumexp), (math_out, math_logsumexp) = saved["cpu_flash"], saved["math"]
    assert flash_logsumexp.dtype == math_logsumexp.dtype == (F64 if dtype == F64 else torch.float32)
    assert_close(flash_out, math_out.to(F64), "out", tolerance, tolerance)
    assert_close(flash_logsumexp, math_logsumexp.to(F64), "logsumexp", tolerance, tolerance)
    grad_out = torch.randn_like(saved["math"][0])
    backwards = {"cpu_flash": attention_module._cpu_flash_backward, "math": attention_module._math_backward}
    results = [[g.to(F64) for g in backward(grad_out, query, key, value, *saved[made_by], True, 0.3)]
               for backward in backwards.values() for made_by in saved]
    for other in results[1:]:
        for name, got, expected in zip(("query", "key", "value"), other, results[0]):
            assert_close(got, expected, name, 10 * tolerance, 10 * tolerance)


def test_cpu_operands_run_the_cpu_flash_kernel_unless_value_head_dim_differs():
    query, key, value = operands(kv_heads=2)
    assert attention_module.attention_kernel(query, key, value, True, True) == "cpu_flash"
    assert attention_module.attention_kernel(*operands(value_dim=5), True) == "math"


def test_a_fused_kernel_returning_an_unexpected_logsumexp_is_not_used(monkeypatch):
    # A kernel whose outputs are not what the op expects (here a log-sum-exp padded like the
    # memory-efficient kernel's) is reported and the next kernel runs: never silently used.
    real = attention_module._FUSED_FORWARD["cpu_flash"]

    def padded(query, key, value, is_causal, scale):
        out, logsumexp = real(query, key, value, is_causal, scale)
        return out, torch.nn.functional.pad(logsumexp, (0, 2))

    monkeypatch.setitem(attention_module._FUSED_FORWARD, "cpu_flash", padded)
    query, key, value = operands(seq=5)
    with pytest.warns(RuntimeWarning, match=r"cpu_flash kernel not used \(cpu_flash attention returned logsumexp "
                                            r"\(2, 4, 7\)"):
        out, logsumexp = torch.ops.shardgraph.attention(query, key, value, True, 0.3, False)
    expected_out, expected_logsumexp = math_attention(query, key, value, True, 0.3)
    assert_close(out, expected_out, "out", 1e-12, 1e-12)
    assert_close(logsumexp, expected_logsumexp, "logsumexp", 1e-12, 1e-12)


def test_a_fused_backward_that_raises_falls_back_to_the_textbook_backward(monkeypatch):
    def broken(*args):
        raise RuntimeError("no execution plan")

    monkeypatch.setitem(attention_module._FUSED_BACKWARD, "cpu_flash", broken)
    query, key, value = operands(kv_heads=2, seq=5)
    with pytest.warns(RuntimeWarning, match="cpu_flash kernel not used \\(no execution plan\\)"):
        (_, _, expected), (_, _, got) = reference_and_op(query, key, value, True, 0.3)
    for name, value_got, value_expected in zip(("query", "key", "value"), got, expected):
        assert_close(value_got, value_expected, name, 1e-10, 1e-12)


def test_outputs_are_stored_sequence_major_and_logsumexp_contiguous_whatever_the_input_layout():
    # The traced graph relies on the fake kernel's strides, so the real kernel must return the
    # same layout for contiguous and transposed inputs alike.
    query, key, value = operands()
    sequence_major = tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (query, key, value))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no kernel falls back
        for inputs in ((query, key, value), sequence_major):
            out, logsumexp = torch.ops.shardgraph.attention(*inputs, True, 0.5, False)
            assert out.transpose(1, 2).is_contiguous() and logsumexp.is_contiguous()
            # The backward takes a log-sum-exp of any strides (a lowering may hand it a slice).
            strided = logsumexp.transpose(1, 2).contiguous().transpose(1, 2)
            grads = torch.ops.shardgraph.attention_backward(torch.randn_like(out), *inputs, out, strided, True, 0.5,
                                                            False)
            assert all(g.transpose(1, 2).is_contiguous() for g in grads)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (query, key, value)]
        out, logsumexp = torch.ops.shardgraph.attention(*fake, True, 0.5, False)
        assert out.shape == query.shape and out.transpose(1, 2).is_contiguous()
        assert logsumexp.shape == query.shape[:3] and logsumexp.is_contiguous() and logsumexp.dtype == F64


def test_fake_kernels_give_the_output_logsumexp_and_gradient_shapes_with_grouped_heads():
    query, key, value = operands(heads=6, kv_heads=2, seq=5, kv_seq=7, value_dim=3, dtype=torch.bfloat16)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (query, key, value)]
        out, logsumexp = torch.ops.shardgraph.attention(*fake, False, 0.5, True)
        assert tuple(out.shape) == (2, 6, 5, 3) and out.dtype == torch.bfloat16
        assert tuple(logsumexp.shape) == (2, 6, 5) and logsumexp.dtype == torch.float32
        grads = torch.ops.shardgraph.attention_backward(torch.empty_like(out), *fake, out, logsumexp, False, 0.5, True)
        assert [tuple(g.shape) for g in grads] == [(2, 6, 5, 8), (2, 2, 7, 8), (2, 2, 7, 3)]


def test_head_counts_that_do_not_divide_are_refused_naming_the_rule():
    query, key, value = operands(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match=r"query has 4 heads and key/value 3"):
        torch.ops.shardgraph.attention(query, key, value, True, 0.5, True)
    with pytest.raises(ValueError, match=r"query must be 4-D"):
        torch.ops.shardgraph.attention(query[0], key, value, True, 0.5, False)


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
    out, logsumexp = torch.ops.shardgraph.attention(query, key, value, False, 0.5, False)
    backward = torch.ops.shardgraph.attention_backward
    with pytest.raises(ValueError, match=r"attention_backward: grad_out \(2, 4, 6, 7\)"):
        backward(query[..., :7], query, key, value, out, logsumexp, False, 0.5, False)
    with pytest.raises(ValueError, match=r"attention_backward: out \(2, 4, 6, 8\) torch.float32"):
        backward(out, query, key, value, out.float(), logsumexp, False, 0.5, False)
    with pytest.raises(ValueError, match=r"logsumexp \(2, 4, 5\) torch.float64 must be the forward's "
                                         r"\[batch, heads, seq\] = \(2, 4, 6\) torch.float64"):
        backward(out, query, key, value, out, logsumexp[..., :5], False, 0.5, False)


def _grouped_cpu_flash(monkeypatch, broken_backward=False):
    """The CPU flash kernel as a kernel that takes grouped key/value heads as they are (as the
    CUDA kernels may): it widens inside and sums the gradients back, so its results are right;
    the op must call it with the grouped tensors and not widen them itself."""
    forward, backward = attention_module._FUSED_FORWARD["cpu_flash"], attention_module._FUSED_BACKWARD["cpu_flash"]
    calls = {"grouped": 0, "widened_by_op": 0}

    def grouped_forward(query, key, value, is_causal, scale):
        groups = query.shape[1] // key.shape[1]
        calls["grouped"] += groups > 1
        return forward(query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), is_causal, scale)

    def grouped_backward(grad_out, query, key, value, out, logsumexp, is_causal, scale):
        groups = query.shape[1] // key.shape[1]
        if broken_backward and groups > 1:
            raise RuntimeError("grouped heads not supported here")
        calls["grouped"] += groups > 1
        grads = backward(grad_out, query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), out,
                         logsumexp, is_causal, scale)
        return grads[0], attention_module._sum_groups(grads[1], groups), attention_module._sum_groups(grads[2], groups)

    widen = attention_module._widen

    def counted_widen(tensor, groups):
        calls["widened_by_op"] += groups > 1
        return widen(tensor, groups)

    monkeypatch.setattr(attention_module, "_GROUPED_DEVICES", ("cpu",))
    monkeypatch.setitem(attention_module._FUSED_FORWARD, "cpu_flash", grouped_forward)
    monkeypatch.setitem(attention_module._FUSED_BACKWARD, "cpu_flash", grouped_backward)
    monkeypatch.setattr(attention_module, "_widen", counted_widen)
    return calls


def test_a_kernel_that_takes_grouped_heads_gets_them_unwidened_and_gives_the_reference_gradients(monkeypatch):
    calls = _grouped_cpu_flash(monkeypatch)
    query, key, value = operands(kv_heads=2, seq=5)
    assert attention_module.attention_kernel(query, key, value, True, True) == "cpu_flash (grouped)"
    (expected_out, _, expected), (got_out, _, got) = reference_and_op(query, key, value, True, 0.3)
    assert_close(got_out, expected_out, "out", 1e-10, 1e-12)
    for name, value_got, value_expected in zip(("query", "key", "value"), got, expected):
        assert_close(value_got, value_expected, name, 1e-10, 1e-12)
    assert calls == {"grouped": 2, "widened_by_op": 0}


def test_a_grouped_kernel_that_raises_falls_back_to_the_same_kernel_on_widened_heads(monkeypatch):
    calls = _grouped_cpu_flash(monkeypatch, broken_backward=True)
    query, key, value = operands(kv_heads=2, seq=5)
    with pytest.warns(RuntimeWarning, match=r"cpu_flash \(grouped\) kernel not used \(grouped heads not supported"):
        (_, _, expected), (_, _, got) = reference_and_op(query, key, value, True, 0.3)
    for name, value_got, value_expected in zip(("query", "key", "value"), got, expected):
        assert_close(value_got, value_expected, name, 1e-10, 1e-12)
    # The forward ran grouped; the backward widened key and value once each, then ran the kernel.
    assert calls == {"grouped": 1, "widened_by_op": 2}
