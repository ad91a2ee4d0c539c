"""Routed linear projections: each token's ``k`` routed copies multiplied by their own expert's matrix.

    routed_linear(inputs, ids, weight)[t, j] = inputs[t (, j)] @ weight[ids[t, j]]^T

with ``weight [E, out, in]`` (one ``[out, in]`` Linear weight per expert, the layout of JetMoE's
``ParallelExperts``) and ``ids [T, k]`` a top-k choice (the ``k`` ids of a token are distinct).
It is the single projection that a routed gated MLP (``moe_experts``) does twice around its
activation, used where something other than an activation sits between the two projections:
JetMoE's mixture of attention heads projects each routed copy's query with its expert's
``input_linear`` before attention and each copy's attention output with its ``output_linear``
after it (``adapters._mixture_of_attention_heads``).

Eager code computes only the routed copies: it sorts them by expert and reads the group sizes
(``expert_size.tolist()``), which one static graph cannot follow. Here every token is projected
by every expert and the routed products are picked out, with ops that placement already handles
(``mm``/``bmm``, ``gather``, ``scatter``, and their backward ``scatter_add`` / ``gather``):

* ``inputs [T, in]``, one input shared by the ``k`` copies (the query projection):
  ``inputs @ weight.view(E * out, in)^T`` is ``[T, E, out]``, every expert's product of every
  token; ``gather`` on the expert dim picks ``[T, k, out]``.
* ``inputs [T, k, in]``, one input per copy (the output projection): the copies are written into
  ``[T, E, in]`` at their expert's slot (``scatter``; zeros elsewhere), one ``bmm`` over the
  expert dim projects slot ``e`` with ``weight[e]``, and ``gather`` picks each copy's slot.

Both are exact: each picked product is the very dot products of eager ``F.linear(x, weight[e])``
(only the kernel's summation order may differ), and nothing is summed with the products that
are not picked. They compute ``2 * T * E * in * out`` FLOPs (and hold a ``[T, E, out]``
intermediate) where the routed copies need ``2 * T * k * in * out``: ``E / k`` times the work.
Sharding these projections over ep is not done; their weights stay whole on every rank.
"""

from __future__ import annotations

import torch

__all__ = ["routed_linear", "routed_linear_sum"]


def _check(inputs: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 3:
        raise ValueError(f"routed_linear: weight must be [experts, out, in], got shape {tuple(weight.shape)}")
    if ids.dim() != 2 or ids.shape[0] != inputs.shape[0]:
        raise ValueError(f"routed_linear: ids must be [tokens={inputs.shape[0]}, k], got shape {tuple(ids.shape)}")
    if inputs.dim() not in (2, 3) or inputs.shape[-1] != weight.shape[2] or (
            inputs.dim() == 3 and inputs.shape[1] != ids.shape[1]):
        raise ValueError(f"routed_linear: inputs must be [tokens, in={weight.shape[2]}] or [tokens, k={ids.shape[1]}, "
                         f"in={weight.shape[2]}], got shape {tuple(inputs.shape)}")


def routed_linear(inputs: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[T, k, out]``: copy ``j`` of token ``t`` projected by expert ``ids[t, j]``'s ``[out, in]``
    matrix. ``inputs`` is ``[T, in]`` (every copy of a token the same) or ``[T, k, in]``; ``ids``
    ``[T, k]`` int64 with a token's ``k`` ids distinct (a top-k)."""
    _check(inputs, ids, weight)
    experts, out_features, in_features = weight.shape
    tokens, k = ids.shape
    if inputs.dim() == 2:
        every = torch.mm(inputs, weight.reshape(experts * out_features, in_features).t())
        every = every.view(tokens, experts, out_features)
    else:
        # Copy j of token t at slot ids[t, j]; distinct ids never write one slot twice.
        slots = inputs.new_zeros(tokens, experts, in_features).scatter(
            1, ids.unsqueeze(-1).expand(tokens, k, in_features), inputs)
        every = torch.bmm(slots.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)  # [T, E, out]
    return every.gather(1, ids.unsqueeze(-1).expand(tokens, k, out_features))


def routed_linear_sum(inputs: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
    """``[T, out]``: ``sum_j weights[t, j] * routed_linear(inputs, ids, weight)[t, j]``, the
    routing-weighted sum of the ``k`` projected copies (in ``inputs``' dtype)."""
    projected = routed_linear(inputs, ids, weight)
    return (projected * weights.to(projected.dtype).unsqueeze(-1)).sum(dim=1)
