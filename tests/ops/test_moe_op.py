"""moe_experts and moe_experts_backward against autograd of a per-token float64 definition."""

import pytest
import torch

from shardgraph.ops import ACTIVATIONS, moe_experts_reference

moe_experts = torch.ops.shardgraph.moe_experts
moe_experts_backward = torch.ops.shardgraph.moe_experts_backward


def case(seed=0, tokens=9, hidden=6, intermediate=4, experts=5, top_k=2, dtype=torch.float64):
    """Random operands; the last expert is never chosen, so one group is empty."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, dtype=dtype, generator=generator)
    ids = torch.stack([torch.randperm(experts - 1, generator=generator)[:top_k] for _ in range(tokens)]
                      or [torch.empty(0, top_k, dtype=torch.long)]).reshape(tokens, top_k)
    weights = torch.rand(tokens, top_k, dtype=dtype, generator=generator)
    gate_up = torch.randn(experts, 2 * intermediate, hidden, dtype=dtype, generator=generator)
    down = torch.randn(experts, hidden, intermediate, dtype=dtype, generator=generator)
    return h, ids, weights, gate_up, down


def leaves(tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_and_gradients_match_the_per_token_definition(activation):
    h, ids, weights, gate_up, down = case()
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


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_passes_for_forward_and_backward(activation):
    h, ids, weights, gate_up, down = case(dtype=torch.float32)
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
        ((h, ids, weights, gate_up, down, "relu2"), ValueError, "unknown activation 'relu2'"),
    ]
    for arguments, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            moe_experts(*arguments)
