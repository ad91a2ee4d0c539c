"""moe_experts and moe_experts_backward against autograd of a per-token float64 definition."""

import pytest
import torch
import torch.nn.functional as F

from shardgraph.ops import ACTIVATIONS, GatedActivation, moe_experts_reference

moe_experts = torch.ops.shardgraph.moe_experts
moe_experts_backward = torch.ops.shardgraph.moe_experts_backward


def case(seed=0, tokens=9, hidden=6, intermediate=4, experts=5, top_k=2, dtype=torch.float64, rows_per_unit=2):
    """Random operands; the last expert is never chosen, so one group is empty. ``rows_per_unit``:
    rows of w_gate_up per intermediate unit (1 for ungated experts)."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, dtype=dtype, generator=generator)
    ids = torch.stack([torch.randperm(experts - 1, generator=generator)[:top_k] for _ in range(tokens)]
                      or [torch.empty(0, top_k, dtype=torch.long)]).reshape(tokens, top_k)
    weights = torch.rand(tokens, top_k, dtype=dtype, generator=generator)
    gate_up = torch.randn(experts, rows_per_unit * intermediate, hidden, dtype=dtype, generator=generator)
    down = torch.randn(experts, hidden, intermediate, dtype=dtype, generator=generator)
    return h, ids, weights, gate_up, down


def leaves(tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


# Beyond the plain elementwise ones: clamped (DeepSeek-V4, HunYuan-V4), soft-capped (Inkling 2), and
# ungated (Nemotron-H) experts. The operands' products reach |x| ~ 5, so every clamp and cap cuts in.
MORE_SPECS = ("silu(limit=0.9)", "gelu_tanh(limit=1.5,layout=interleaved)",
              "softcapped_swiglu(gate_softcap=1.5,up_softcap=2.0)", "relu2(layout=ungated)", "silu(layout=ungated)")


def rows_per_unit(activation):
    return GatedActivation.parse(activation).rows_per_unit


@pytest.mark.parametrize("activation", ACTIVATIONS + MORE_SPECS)
def test_forward_and_gradients_match_the_per_token_definition(activation):
    h, ids, weights, gate_up, down = case(rows_per_unit=rows_per_unit(activation))
    ours, theirs = leaves((h, weights, gate_up, down)), leaves((h, weights, gate_up, down))
    out = moe_experts(ours[0], ids, ours[1], ours[2], ours[3], activation)
    reference = moe_experts_reference(theirs[0], ids, theirs[1], theirs[2], theirs[3], activation)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad(out, ours, grad), torch.autograd.grad(reference, theirs, grad)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_backward_op_called_directly_gives_the_definitions_gradients():
    h, ids, weights, gate_up, down = case(seed=3, top_k=3)
    theirs = leaves((h, weights, gate_up, down))
    reference = moe_experts_reference(theirs[0], ids, theirs[1], theirs[2], theirs[3], "silu")
    grad = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, theirs, grad)
    got = moe_experts_backward(grad, h, ids, weights, gate_up, down, "silu")
    for name, value, want in zip(("hidden", "topk_weights", "w_gate_up", "w_down"), got, expected):
        torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-10, msg=name)
    assert got[2][-1].abs().sum() == 0 and got[3][-1].abs().sum() == 0  # the unused expert gets no gradient


def test_gate_rows_come_before_up_rows():
    h, ids, weights, gate_up, down = case(seed=4)
    intermediate = gate_up.shape[1] // 2
    swapped = torch.cat([gate_up[:, intermediate:], gate_up[:, :intermediate]], dim=1)
    expected = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate = gate_up[e, :intermediate] @ h[t]
            up = gate_up[e, intermediate:] @ h[t]
            expected[t] += weights[t, j] * (down[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(moe_experts(h, ids, weights, gate_up, down, "silu"), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(moe_experts(h, ids, weights, swapped, down, "silu"), expected)


@pytest.mark.parametrize("activation", ACTIVATIONS + MORE_SPECS[2:4])
def test_opcheck_passes_for_forward_and_backward(activation):
    h, ids, weights, gate_up, down = case(dtype=torch.float32, rows_per_unit=rows_per_unit(activation))
    torch.library.opcheck(moe_experts.default, (h, ids, weights, gate_up, down, activation))
    torch.library.opcheck(moe_experts_backward.default,
                          (torch.randn_like(h), h, ids, weights, gate_up, down, activation))


def test_no_tokens_gives_an_empty_output_and_zero_weight_gradients():
    h, ids, weights, gate_up, down = case(tokens=0)
    ours = leaves((h, weights, gate_up, down))
    out = moe_experts(ours[0], ids, ours[1], ours[2], ours[3])
    assert out.shape == (0, 6)
    grads = torch.autograd.grad(out.sum(), ours, allow_unused=True)
    assert grads[2].abs().sum() == 0 and grads[3].abs().sum() == 0


def test_meta_tensors_get_shapes_without_running_the_kernel():
    h, ids, weights, gate_up, down = (t.to("meta") for t in case())
    out = moe_experts(h, ids, weights, gate_up, down, "gelu")
    assert out.device.type == "meta" and out.shape == h.shape
    grads = moe_experts_backward(out, h, ids, weights, gate_up, down, "gelu")
    assert [g.shape for g in grads] == [h.shape, weights.shape, gate_up.shape, down.shape]


@pytest.mark.parametrize("bad_id, shown", [(7, r"0\.\.7"), (-1, r"-1\.\.3")])
def test_out_of_range_expert_ids_fail_with_a_clear_error(bad_id, shown):
    h, ids, weights, gate_up, down = case()
    ids[3, 1] = bad_id
    with pytest.raises(ValueError, match=rf"moe_experts: topk_ids hold expert ids {shown}, outside 0\.\.4"):
        moe_experts(h, ids, weights, gate_up, down, "silu")
    with pytest.raises(ValueError, match=r"moe_experts_backward: topk_ids hold expert ids"):
        moe_experts_backward(torch.zeros_like(h), h, ids, weights, gate_up, down, "silu")
    with pytest.raises(ValueError, match=rf"topk_ids\[3, 1\] = {bad_id} is outside 0\.\.4"):
        moe_experts_reference(h, ids, weights, gate_up, down)


def test_operands_with_wrong_shapes_or_dtypes_are_named():
    h, ids, weights, gate_up, down = case()
    cases = [
        ((h, ids, weights, gate_up, down[:, :, :3], "silu"), ValueError,
         r"w_down must be \[experts=5, hidden=6, intermediate=4\]"),
        ((h, ids, weights, gate_up[:, :7], down, "silu"), ValueError, "w_gate_up must be"),
        ((h, ids, weights[:, :1], gate_up, down, "silu"), ValueError, "topk_weights"),
        ((h[None], ids, weights, gate_up, down, "silu"), ValueError, r"hidden must be \[tokens, hidden\]"),
        ((h, ids.int(), weights, gate_up, down, "silu"), TypeError, "topk_ids must be int64"),
        ((h, ids, weights, gate_up.float(), down, "silu"), TypeError,
         "w_gate_up is torch.float32 but hidden is torch.float64"),
        ((h, ids, weights, gate_up, down, "relu3"), ValueError, "unknown activation 'relu3'"),
    ]
    for arguments, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            moe_experts(*arguments)


# ----------------------------------------------------------------------------- biases, gated activations
import kernels  # noqa: E402
from shardgraph.runtime import moe as moe_steps  # noqa: E402

GPT_OSS = "clamped_swiglu(alpha=1.702,limit=0.8,layout=interleaved)"


def gpt_oss_definition(h, ids, weights, gate_up, down, gate_up_bias, down_bias, alpha=1.702, limit=0.8):
    """GPT-OSS's expert formula written out token by token, independent of GatedActivation."""
    rows = []
    for t in range(h.shape[0]):
        total = torch.zeros_like(h[t])
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            product = gate_up[e] @ h[t] + gate_up_bias[e]
            gate, up = product[::2].clamp(max=limit), product[1::2].clamp(-limit, limit)
            total = total + weights[t, j] * (down[e] @ ((up + 1) * gate * torch.sigmoid(gate * alpha)) + down_bias[e])
        rows.append(total)
    return torch.stack(rows)


def biased_case(seed=5, **sizes):
    h, ids, weights, gate_up, down = case(seed=seed, **sizes)
    generator = torch.Generator().manual_seed(seed + 100)
    gate_up_bias = torch.randn(gate_up.shape[:2], dtype=h.dtype, generator=generator)
    down_bias = torch.randn(down.shape[:2], dtype=h.dtype, generator=generator)
    return h, ids, weights, gate_up, down, gate_up_bias, down_bias


def test_biases_and_clamped_interleaved_swiglu_match_gpt_oss_formula_forward_and_backward():
    h, ids, weights, gate_up, down, gate_up_bias, down_bias = biased_case()
    ours = leaves((h, weights, gate_up, down, gate_up_bias, down_bias))
    theirs = leaves((h, weights, gate_up, down, gate_up_bias, down_bias))
    out = moe_experts(ours[0], ids, ours[1], ours[2], ours[3], GPT_OSS, ours[4], ours[5])
    expected = gpt_oss_definition(theirs[0], ids, *theirs[1:])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # Both clamps cut in on these operands, so their gradient masks are exercised.
    products = torch.einsum("th,eih->tei", h, gate_up) + gate_up_bias
    assert (products[..., ::2] > 0.8).any() and (products[..., 1::2].abs() > 0.8).any()
    grad = torch.randn_like(out)
    names = ("hidden", "topk_weights", "w_gate_up", "w_down", "gate_up_bias", "down_bias")
    for name, got, want in zip(names, torch.autograd.grad(out, ours, grad), torch.autograd.grad(expected, theirs, grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
    assert moe_experts_reference(h, ids, weights, gate_up, down, GPT_OSS, gate_up_bias, down_bias).allclose(expected)


@pytest.mark.parametrize("which", ["gate_up_bias", "down_bias"])
def test_each_bias_is_optional_and_its_gradient_follows_the_four_weight_gradients(which):
    h, ids, weights, gate_up, down, gate_up_bias, down_bias = biased_case(seed=6)
    biases = (gate_up_bias, None) if which == "gate_up_bias" else (None, down_bias)
    theirs = leaves((h, weights, gate_up, down, biases[0] if biases[0] is not None else biases[1]))
    given = (theirs[4], None) if which == "gate_up_bias" else (None, theirs[4])
    reference = moe_experts_reference(theirs[0], ids, theirs[1], theirs[2], theirs[3], "gelu", *given)
    grad = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, theirs, grad)
    got = moe_experts_backward(grad, h, ids, weights, gate_up, down, "gelu", *biases)
    assert len(got) == 5
    for value, want in zip(got, expected):
        torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-10)
    torch.library.opcheck(moe_experts.default, (h.float(), ids, weights.float(), gate_up.float(), down.float(),
                                                "silu", *(b if b is None else b.float() for b in biases)))


def test_activation_specs_parse_to_one_canonical_string_and_bad_ones_are_refused():
    parsed = GatedActivation.parse(" clamped_swiglu( limit=7, alpha=1.702 , layout=interleaved )")
    assert str(parsed) == "clamped_swiglu(alpha=1.702,limit=7.0,layout=interleaved)" and parsed.interleaved
    assert str(GatedActivation.parse("silu")) == "silu" and str(GatedActivation.parse("gelu(layout=interleaved)")) \
        == "gelu(layout=interleaved)"
    assert str(GatedActivation.parse("silu( limit=10 )")) == "silu(limit=10.0)"
    parsed = GatedActivation.parse("softcapped_swiglu(up_softcap=25,gate_softcap=4)")
    assert str(parsed) == "softcapped_swiglu(gate_softcap=4.0,up_softcap=25.0)" and parsed.rows_per_unit == 2
    parsed = GatedActivation.parse("relu2(layout=ungated)")
    assert str(parsed) == "relu2(layout=ungated)" and not parsed.gated and parsed.rows_per_unit == 1
    for spec, pattern in [("clamped_swiglu(alpha=1.702)", "needs alpha= and limit="),
                          ("silu(alpha=1)", "takes no alpha"), ("silu(layout=striped)", "layout must be one of"),
                          ("clamped_swiglu(alpha=x,limit=1)", "is not a number"), ("silu(beta=1)", "is not one of"),
                          ("softcapped_swiglu(gate_softcap=4)", "needs gate_softcap= and up_softcap="),
                          ("silu(limit=-1)", "limit must be positive"),
                          ("silu(limit=1,layout=ungated)", "layout=ungated takes an elementwise activation"),
                          ("clamped_swiglu(alpha=1,limit=1,layout=ungated)", "layout=ungated takes")]:
        with pytest.raises(ValueError, match=pattern):
            GatedActivation.parse(spec)


@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
def test_etp_pieces_with_the_down_bias_added_once_after_the_reduction_give_the_whole_experts(layout):
    """What the lowering does on 2 etp ranks, step by step: each rank holds the gate and up columns
    of half the intermediate units (with the matching gate/up bias columns) and half of down;
    the partial down products sum to the whole, plus the down bias once. Gradients of the pieces
    put back together are the whole's."""
    etp, activation = 2, f"clamped_swiglu(alpha=1.702,limit=0.8,layout={layout})"
    h, ids, weights, gate_up, down, gate_up_bias, down_bias = biased_case(seed=7, intermediate=6)
    act = GatedActivation.parse(activation)
    intermediate = down.shape[2]
    tokens_per_expert = torch.bincount(ids.reshape(-1), minlength=gate_up.shape[0])
    order, _ = moe_steps.sort_by_expert(ids, gate_up.shape[0])
    rows = moe_steps.gather_copies(h, order, ids.shape[1])
    offsets = moe_steps.expert_offsets(tokens_per_expert)

    def columns(rank):  # this rank's gate/up columns of the product, in the layout's order
        units = torch.arange(rank * intermediate // etp, (rank + 1) * intermediate // etp)
        gate, up = act.split(torch.arange(2 * intermediate))
        return act.join(gate[units], up[units]), units

    partials, bias_grad_pieces = [], []
    grad_out = torch.randn(rows.shape[0], h.shape[1], dtype=h.dtype, generator=torch.Generator().manual_seed(8))
    for rank in range(etp):
        kept, units = columns(rank)
        if layout == "interleaved":  # a contiguous run of (gate, up) pairs: Shard(1)
            assert torch.equal(kept, torch.arange(rank * 2 * intermediate // etp, (rank + 1) * 2 * intermediate // etp))
        product = moe_steps.add_expert_bias(kernels.grouped_mm(rows, gate_up[:, kept], offsets, w_layout="enk"),
                                            gate_up_bias[:, kept], offsets)
        activated = moe_steps.glu(product, activation)
        partials.append(kernels.grouped_mm(activated, down[:, :, units], offsets, w_layout="enk"))
        grad_activated = kernels.grouped_mm_dgrad(grad_out, down[:, :, units], offsets, w_layout="enk")
        grad_product = moe_steps.glu_backward(grad_activated, product, activation)
        bias_grad_pieces.append((kept, moe_steps.expert_bias_gradient(grad_product, offsets, gate_up.shape[0])))
    whole = moe_steps.add_expert_bias(sum(partials), down_bias, offsets)
    expected = torch.stack([down[e] @ act(gate_up[e] @ rows[i] + gate_up_bias[e]) + down_bias[e]
                            for i, e in enumerate(ids.reshape(-1)[order].tolist())])
    torch.testing.assert_close(whole, expected, rtol=1e-12, atol=1e-12)
    # Added on every rank's partial sum, the bias would be counted etp times.
    assert not torch.allclose(sum(moe_steps.add_expert_bias(p, down_bias, offsets) for p in partials), expected)
    # Gradients: the gate/up bias's pieces are the whole's columns, the down bias's is whole on each rank.
    leaves_ = [gate_up_bias.clone().requires_grad_(True), down_bias.clone().requires_grad_(True)]
    reference = torch.stack([down[e] @ act(gate_up[e] @ rows[i] + leaves_[0][e]) + leaves_[1][e]
                             for i, e in enumerate(ids.reshape(-1)[order].tolist())])
    grad_gate_up_bias, grad_down_bias = torch.autograd.grad(reference, leaves_, grad_out)
    for kept, piece in bias_grad_pieces:
        torch.testing.assert_close(piece, grad_gate_up_bias[:, kept], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(moe_steps.expert_bias_gradient(grad_out, offsets, gate_up.shape[0]), grad_down_bias,
                               rtol=1e-10, atol=1e-10)


# The activations written out as the models' code computes them (independent of GatedActivation),
# on (gate, up) halves or, ungated, on the whole product.
WRITTEN_OUT = {
    # DeepSeek-V4's and HunYuan-V4's _apply_gate: act_fn(gate.clamp(max=limit)) * up.clamp(-limit, limit)
    "silu(limit=0.9)": lambda g, u: F.silu(g.clamp(max=0.9)) * u.clamp(min=-0.9, max=0.9),
    "gelu(limit=1.5)": lambda g, u: F.gelu(g.clamp(max=1.5)) * u.clamp(min=-1.5, max=1.5),
    # Inkling 2's Inkling2SoftcappedSwiGLU: softcap(gate) * sigmoid(gate) * softcap(up), softcap(x) = tanh(x/c) c
    "softcapped_swiglu(gate_softcap=1.5,up_softcap=2.0)":
        lambda g, u: torch.tanh(g / 1.5) * 1.5 * torch.sigmoid(g) * (torch.tanh(u / 2.0) * 2.0),
    "relu2": lambda g, u: torch.square(torch.relu(g)) * u,
    # Nemotron-H's experts: ReLUSquaredActivation of the up product, no gate
    "relu2(layout=ungated)": lambda p: torch.square(torch.relu(p)),
    "gelu_tanh(layout=ungated)": lambda p: F.gelu(p, approximate="tanh"),
}


@pytest.mark.parametrize("spec", sorted(WRITTEN_OUT))
def test_each_activation_and_its_derivative_match_the_model_formula_and_autograd_in_float64(spec):
    act, formula = GatedActivation.parse(spec), WRITTEN_OUT[spec]
    generator = torch.Generator().manual_seed(11)
    product = (torch.randn(40, 2 * 6, dtype=torch.float64, generator=generator) * 2.5).requires_grad_(True)
    expected = formula(product) if not act.gated else formula(*product.chunk(2, dim=-1))
    torch.testing.assert_close(act(product), expected, rtol=1e-13, atol=1e-13)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    (autograd,) = torch.autograd.grad(expected, product, grad)
    torch.testing.assert_close(act.backward(grad, product.detach()), autograd, rtol=1e-12, atol=1e-12)
    if act.limit is not None:  # both clamps cut in, so the gradient masks are exercised
        gate, up = product.detach().chunk(2, dim=-1)
        assert (gate > act.limit).any() and (up.abs() > act.limit).any()
    if act.gate_softcap is not None:  # far into tanh's bend
        assert (product.detach().abs() > 2 * act.up_softcap).any()


def test_ungated_experts_take_intermediate_rows_and_refuse_a_gated_shape():
    h, ids, weights, up, down = case(seed=9, rows_per_unit=1)
    expected = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            expected[t] += weights[t, j] * (down[e] @ torch.square(torch.relu(up[e] @ h[t])))
    torch.testing.assert_close(moe_experts(h, ids, weights, up, down, "relu2(layout=ungated)"), expected,
                               rtol=1e-12, atol=1e-12)
    gated = torch.cat([up, up], dim=1)
    with pytest.raises(ValueError, match=r"w_down must be \[experts=5, hidden=6, intermediate=8\]"):
        moe_experts(h, ids, weights, gated, down, "relu2(layout=ungated)")
