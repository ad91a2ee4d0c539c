"""The moe_experts op and its backward against a per-token float64 definition."""

import pytest
import torch

from shardgraph.ops import moe_experts_reference


def case(activation_seed=0, tokens=9, hidden=6, intermediate=4, experts=5, top_k=2):
    generator = torch.Generator().manual_seed(activation_seed)
    h = torch.randn(tokens, hidden, dtype=torch.float64, generator=generator)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    ids[:, 0] = ids[:, 0].clamp_max(experts - 2)  # expert experts-1 rarely chosen, sometimes empty
    weights = torch.rand(tokens, top_k, dtype=torch.float64, generator=generator)
    gate_up = torch.randn(experts, 2 * intermediate, hidden, dtype=torch.float64, generator=generator)
    down = torch.randn(experts, hidden, intermediate, dtype=torch.float64, generator=generator)
    return h, ids, weights, gate_up, down


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_forward_and_backward_match_the_per_token_definition(activation):
    h, ids, weights, gate_up, down = case()
    leaves = [t.clone().requires_grad_(True) for t in (h, weights, gate_up, down)]
    reference_leaves = [t.clone().requires_grad_(True) for t in (h, weights, gate_up, down)]
    out = torch.ops.shardgraph.moe_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], activation)
    reference = moe_experts_reference(reference_leaves[0], ids, reference_leaves[1], reference_leaves[2], reference_leaves[3], activation)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(reference, reference_leaves, grad)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_opcheck_passes_for_forward_and_backward():
    h, ids, weights, gate_up, down = case()
    torch.library.opcheck(torch.ops.shardgraph.moe_experts.default, (h, ids, weights, gate_up, down, "silu"))
    grad = torch.randn_like(h)
    torch.library.opcheck(torch.ops.shardgraph.moe_experts_backward.default, (grad, h, ids, weights, gate_up, down, "silu"))


def test_out_of_range_expert_ids_fail_with_a_clear_error():
    h, ids, weights, gate_up, down = case()
    ids[3, 1] = 7
    with pytest.raises(ValueError, match=r"expert ids 0\.\.7, outside 0\.\.4"):
        torch.ops.shardgraph.moe_experts(h, ids, weights, gate_up, down, "silu")


def test_shape_mismatches_name_the_operand():
    h, ids, weights, gate_up, down = case()
    with pytest.raises(ValueError, match="w_down"):
        torch.ops.shardgraph.moe_experts(h, ids, weights, gate_up, down[:, :, :3], "silu")
    with pytest.raises(ValueError, match="unknown activation 'relu2'"):
        torch.ops.shardgraph.moe_experts(h, ids, weights, gate_up, down, "relu2")
