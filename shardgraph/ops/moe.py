"""``shardgraph::moe_experts``: the routed-expert block as one op, forward and backward.

    out[t] = sum_j topk_weights[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t)),   e = topk_ids[t, j]

with ``w_gate_up [E, 2I, H]`` (rows ``0..I-1`` of each expert are the gate projection, rows
``I..2I-1`` the up projection: the layout of HF transformers' fused ``gate_up_proj``, which
splits ``x @ W.T`` with ``chunk(2, dim=-1)``) and ``w_down [E, H, I]``. Activations: ``silu``
(SwiGLU), ``gelu``, ``gelu_tanh``.

The backward is a second op, ``moe_experts_backward``, wired in with ``register_autograd``, so a
traced joint graph holds exactly one forward and one backward node per MoE layer; the MoE
lowering replaces both. Both ops have fake kernels, so meta-device tracing never runs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["moe_experts", "moe_experts_backward", "moe_experts_reference", "activation_derivative", "ACTIVATIONS"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _activation(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"moe_experts: unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")


def activation_derivative(name: str, x: torch.Tensor) -> torch.Tensor:
    """d act(x) / dx, written out: autograd is not available inside a custom op's kernel."""
    if name == "silu":
        sigmoid = torch.sigmoid(x)
        return sigmoid * (1 + x * (1 - sigmoid))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(x * 0.7071067811865476))
        pdf = torch.exp(-0.5 * x * x) * 0.3989422804014327
        return cdf + x * pdf
    if name == "gelu_tanh":
        k = 0.7978845608028654  # sqrt(2 / pi)
        inner = k * (x + 0.044715 * x.pow(3))
        tanh = torch.tanh(inner)
        return 0.5 * (1 + tanh) + 0.5 * x * (1 - tanh * tanh) * k * (1 + 3 * 0.044715 * x * x)
    raise ValueError(f"moe_experts: unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")


def _check(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation) -> None:
    _activation(activation)
    if hidden.dim() != 2:
        raise ValueError(f"moe_experts: hidden must be [tokens, hidden], got shape {tuple(hidden.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"moe_experts: topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be "
            f"[tokens={hidden.shape[0]}, top_k]"
        )
    experts, two_intermediate, hidden_size = w_gate_up.shape
    if hidden_size != hidden.shape[1] or two_intermediate % 2:
        raise ValueError(
            f"moe_experts: w_gate_up {tuple(w_gate_up.shape)} must be [experts, 2 * intermediate, hidden={hidden.shape[1]}]"
        )
    if tuple(w_down.shape) != (experts, hidden_size, two_intermediate // 2):
        raise ValueError(
            f"moe_experts: w_down {tuple(w_down.shape)} must be [experts={experts}, hidden={hidden_size}, "
            f"intermediate={two_intermediate // 2}]"
        )


def _check_ids(topk_ids: torch.Tensor, experts: int) -> None:
    if topk_ids.numel() and topk_ids.device.type != "meta":
        low, high = int(topk_ids.min()), int(topk_ids.max())
        if low < 0 or high >= experts:
            raise ValueError(f"moe_experts: topk_ids hold expert ids {low}..{high}, outside 0..{experts - 1}")


def _expert_groups(topk_ids: torch.Tensor, experts: int):
    """Copies (token, slot) sorted by expert; the token of each copy; the copies per expert."""
    flat = topk_ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=experts).tolist()
    return order, order // topk_ids.shape[1], counts


@torch.library.custom_op("shardgraph::moe_experts", mutates_args=())
def moe_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    _check(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation)
    _check_ids(topk_ids, w_gate_up.shape[0])
    act = _activation(activation)
    order, token_of_copy, counts = _expert_groups(topk_ids, w_gate_up.shape[0])
    copies = hidden.index_select(0, token_of_copy)
    outputs = torch.empty_like(copies)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            gate, up = (copies[rows] @ w_gate_up[expert].T).chunk(2, dim=-1)
            outputs[rows] = (act(gate) * up) @ w_down[expert].T
        start += count
    weights = topk_weights.reshape(-1).index_select(0, order).to(outputs.dtype).unsqueeze(-1)
    out = torch.zeros_like(hidden)
    return out.index_add_(0, token_of_copy, outputs * weights)


@moe_experts.register_fake
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation="silu"):
    _check(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation)
    return torch.empty_like(hidden)


@torch.library.custom_op("shardgraph::moe_experts_backward", mutates_args=())
def moe_experts_backward(grad_out: torch.Tensor, hidden: torch.Tensor, topk_ids: torch.Tensor,
                         topk_weights: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                         activation: str = "silu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    act = _activation(activation)
    order, token_of_copy, counts = _expert_groups(topk_ids, w_gate_up.shape[0])
    copies = hidden.index_select(0, token_of_copy)
    weights = topk_weights.reshape(-1).index_select(0, order).to(hidden.dtype)
    grad_copies_out = grad_out.index_select(0, token_of_copy)
    grad_copies_in = torch.empty_like(copies)
    grad_weights_sorted = torch.empty_like(weights)
    grad_w_gate_up = torch.zeros_like(w_gate_up)
    grad_w_down = torch.zeros_like(w_down)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            x = copies[rows]
            gate_up = x @ w_gate_up[expert].T
            gate, up = gate_up.chunk(2, dim=-1)
            activated_gate = act(gate)
            activated = activated_gate * up
            expert_out = activated @ w_down[expert].T
            grad_weights_sorted[rows] = (grad_copies_out[rows] * expert_out).sum(dim=-1)
            grad_expert_out = grad_copies_out[rows] * weights[rows].unsqueeze(-1)
            grad_w_down[expert] = grad_expert_out.T @ activated
            grad_activated = grad_expert_out @ w_down[expert]
            grad_gate = grad_activated * up * activation_derivative(activation, gate)
            grad_gate_up = torch.cat([grad_gate, grad_activated * activated_gate], dim=-1)
            grad_w_gate_up[expert] = grad_gate_up.T @ x
            grad_copies_in[rows] = grad_gate_up @ w_gate_up[expert]
        start += count
    grad_hidden = torch.zeros_like(hidden).index_add_(0, token_of_copy, grad_copies_in)
    grad_topk_weights = torch.empty(topk_weights.numel(), dtype=topk_weights.dtype, device=topk_weights.device)
    grad_topk_weights[order] = grad_weights_sorted.to(topk_weights.dtype)
    return grad_hidden, grad_topk_weights.reshape(topk_weights.shape), grad_w_gate_up, grad_w_down


@moe_experts_backward.register_fake
def _(grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, activation="silu"):
    return (torch.empty_like(hidden), torch.empty_like(topk_weights), torch.empty_like(w_gate_up),
            torch.empty_like(w_down))


def _setup_context(ctx, inputs, output):
    hidden, topk_ids, topk_weights, w_gate_up, w_down, activation = inputs
    ctx.save_for_backward(hidden, topk_ids, topk_weights, w_gate_up, w_down)
    ctx.activation = activation


def _backward(ctx, grad_out):
    hidden, topk_ids, topk_weights, w_gate_up, w_down = ctx.saved_tensors
    grads = torch.ops.shardgraph.moe_experts_backward(grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down,
                                                      ctx.activation)
    grad_hidden, grad_weights, grad_gate_up, grad_down = grads
    return grad_hidden, None, grad_weights, grad_gate_up, grad_down, None


moe_experts.register_autograd(_backward, setup_context=_setup_context)


def moe_experts_reference(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation="silu"):
    """Per-token loop, differentiable with plain autograd: the definition the op is tested against."""
    act = _activation(activation)
    rows = []
    for t in range(hidden.shape[0]):
        total = torch.zeros_like(hidden[t])
        for j in range(topk_ids.shape[1]):
            expert = int(topk_ids[t, j])
            gate, up = (hidden[t] @ w_gate_up[expert].T).chunk(2)
            total = total + topk_weights[t, j] * ((act(gate) * up) @ w_down[expert].T)
        rows.append(total)
    return torch.stack(rows)
