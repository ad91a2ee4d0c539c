"""routed_linear: each token's k routed copies projected by their own expert's [out, in] matrix,
computed as every expert's product with the routed ones gathered; it equals the per-copy
F.linear of eager code, values and gradients, for a shared input and for one input per copy."""

import pytest
import torch
import torch.nn.functional as F

from shardgraph.frontend.routed_linear import routed_linear, routed_linear_sum


def _case(per_copy: bool):
    generator = torch.Generator().manual_seed(0)
    tokens, k, experts, out_features, in_features = 7, 3, 5, 4, 6
    ids = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(tokens)])
    shape = (tokens, k, in_features) if per_copy else (tokens, in_features)
    inputs = torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(experts, out_features, in_features, dtype=torch.float64, generator=generator,
                         requires_grad=True)
    gates = torch.rand(tokens, k, dtype=torch.float64, generator=generator, requires_grad=True)
    return inputs, ids, weight, gates


def _per_copy(inputs, ids, weight):
    tokens, k = ids.shape
    rows = [[F.linear(inputs[t, j] if inputs.dim() == 3 else inputs[t], weight[ids[t, j]]) for j in range(k)]
            for t in range(tokens)]
    return torch.stack([torch.stack(row) for row in rows])


@pytest.mark.parametrize("per_copy", [False, True], ids=["shared_input", "input_per_copy"])
def test_routed_linear_and_its_gradients_equal_the_per_copy_projection(per_copy):
    inputs, ids, weight, gates = _case(per_copy)
    result = routed_linear_sum(inputs, ids, gates, weight)
    expected = (_per_copy(inputs, ids, weight) * gates.unsqueeze(-1)).sum(dim=1)
    assert result.shape == expected.shape == (ids.shape[0], weight.shape[1])
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(result)
    got = torch.autograd.grad(result, (inputs, weight, gates), upstream)
    want = torch.autograd.grad(expected, (inputs, weight, gates), upstream)
    for name, a, b in zip(("inputs", "weight", "gates"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")
    torch.testing.assert_close(routed_linear(inputs, ids, weight), _per_copy(inputs, ids, weight),
                               rtol=1e-12, atol=1e-12)


def test_routed_linear_refuses_operands_of_mismatched_shapes():
    inputs, ids, weight, _ = _case(per_copy=False)
    with pytest.raises(ValueError, match=r"weight must be \[experts, out, in\]"):
        routed_linear(inputs, ids, weight[0])
    with pytest.raises(ValueError, match=r"inputs must be \[tokens, in=6\]"):
        routed_linear(inputs[:, :5], ids, weight)
    with pytest.raises(ValueError, match=r"ids must be \[tokens=7, k\]"):
        routed_linear(inputs, ids[:3], weight)
