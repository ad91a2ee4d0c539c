"""``shardgraph::moe_experts``: the routed-expert block as one op, forward and backward.

    out[t] = sum_j topk_weights[t, j] * (act(x W_gate[e]^T) * (x W_up[e]^T)) W_down[e]^T
             with x = hidden[t], e = topk_ids[t, j]

Operands:

* ``hidden [T, H]``, floating point;
* ``topk_ids [T, k]`` int64, every id in ``0 .. E-1``;
* ``topk_weights [T, k]``, floating point, already normalised by the router (the op only
  weights and sums); the weighting is done in ``hidden``'s dtype;
* ``w_gate_up [E, 2I, H]``: rows ``0 .. I-1`` of each expert are the gate projection, rows
  ``I .. 2I-1`` the up projection. This is the layout of HF transformers 5.x fused experts,
  whose eager forward computes ``F.linear(x, gate_up_proj[e]).chunk(2, dim=-1)`` as
  ``(gate, up)``;
* ``w_down [E, H, I]``;
* ``activation``: ``"silu"`` (SwiGLU), ``"gelu"`` (exact, erf) or ``"gelu_tanh"`` (tanh
  approximation), applied to the gate half only.

The backward is a second op, ``moe_experts_backward``, wired in with ``register_autograd``, so a
traced joint graph holds exactly one forward and one backward node per MoE layer and the MoE
lowering can replace both. Both ops have fake kernels (shape checks only), so tracing on fake or
meta tensors never runs the reference kernels; those run eagerly, where out-of-range expert ids
are refused before any indexing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "activation_function",
    "activation_derivative",
    "moe_experts",
    "moe_experts_backward",
    "moe_experts_reference",
]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def activation_function(name: str):
    """The elementwise activation ``moe_experts`` applies to the gate half, by name."""
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"moe_experts: unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")


def activation_derivative(name: str, x: torch.Tensor) -> torch.Tensor:
    """``d act(x) / dx`` written out: a custom op's kernel runs below autograd."""
    if name == "silu":
        sigmoid = torch.sigmoid(x)
        return sigmoid * (1 + x * (1 - sigmoid))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(x * 0.7071067811865476))  # 1 / sqrt(2)
        pdf = torch.exp(-0.5 * x * x) * 0.3989422804014327  # 1 / sqrt(2 pi)
        return cdf + x * pdf
    if name == "gelu_tanh":
        k = 0.7978845608028654  # sqrt(2 / pi)
        tanh = torch.tanh(k * (x + 0.044715 * x.pow(3)))
        return 0.5 * (1 + tanh) + 0.5 * x * (1 - tanh * tanh) * k * (1 + 3 * 0.044715 * x * x)
    raise ValueError(f"moe_experts: unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _check(op: str, hidden, topk_ids, topk_weights, w_gate_up, w_down, activation) -> None:
    """Shapes, dtypes and devices of the operands; runs in the fake kernels too, so at trace time."""
    activation_function(activation)
    if hidden.dim() != 2:
        raise ValueError(f"{op}: hidden must be [tokens, hidden], got shape {_shape(hidden)}")
    if not hidden.dtype.is_floating_point:
        raise TypeError(f"{op}: hidden must be floating point, got {hidden.dtype}")
    tokens = hidden.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens:
        raise ValueError(f"{op}: topk_ids must be [tokens={tokens}, top_k], got shape {_shape(topk_ids)}")
    if topk_ids.dtype != torch.int64:
        raise TypeError(f"{op}: topk_ids must be int64 expert ids, got {topk_ids.dtype}")
    if _shape(topk_weights) != _shape(topk_ids):
        raise ValueError(
            f"{op}: topk_weights {_shape(topk_weights)} must have the shape of topk_ids {_shape(topk_ids)}")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"{op}: topk_weights must be floating point, got {topk_weights.dtype}")
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != hidden.shape[1] or w_gate_up.shape[1] % 2:
        raise ValueError(
            f"{op}: w_gate_up must be [experts, 2 * intermediate, hidden={hidden.shape[1]}], "
            f"got shape {_shape(w_gate_up)}"
        )
    experts, two_intermediate, hidden_size = w_gate_up.shape
    if _shape(w_down) != (experts, hidden_size, two_intermediate // 2):
        raise ValueError(
            f"{op}: w_down must be [experts={experts}, hidden={hidden_size}, intermediate={two_intermediate // 2}], "
            f"got shape {_shape(w_down)}"
        )
    for name, weight in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if weight.dtype != hidden.dtype:
            raise TypeError(f"{op}: {name} is {weight.dtype} but hidden is {hidden.dtype}; they must match")
    devices = {t.device for t in (hidden, topk_ids, topk_weights, w_gate_up, w_down)}
    if len(devices) > 1:
        raise ValueError(f"{op}: operands are on several devices {sorted(str(d) for d in devices)}")


def _check_ids(op: str, topk_ids: torch.Tensor, experts: int) -> None:
    if topk_ids.numel():
        low, high = int(topk_ids.min()), int(topk_ids.max())
        if low < 0 or high >= experts:
            raise ValueError(f"{op}: topk_ids hold expert ids {low}..{high}, outside 0..{experts - 1}")


def _group_by_expert(topk_ids: torch.Tensor, experts: int):
    """Token copies (one per (token, slot)) sorted by expert: their flat slot index, their token,
    and how many copies each expert receives (a Python list: the kernels run eagerly)."""
    flat = topk_ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=experts).tolist()
    return order, order // topk_ids.shape[1], counts


@torch.library.custom_op("shardgraph::moe_experts", mutates_args=())
def moe_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    _check("moe_experts", hidden, topk_ids, topk_weights, w_gate_up, w_down, activation)
    _check_ids("moe_experts", topk_ids, w_gate_up.shape[0])
    act = activation_function(activation)
    order, token_of_copy, counts = _group_by_expert(topk_ids, w_gate_up.shape[0])
    copies = hidden.index_select(0, token_of_copy)
    expert_outputs = torch.empty_like(copies)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            gate, up = (copies[rows] @ w_gate_up[expert].T).chunk(2, dim=-1)
            expert_outputs[rows] = (act(gate) * up) @ w_down[expert].T
        start += count
    weights = topk_weights.reshape(-1).index_select(0, order).to(hidden.dtype).unsqueeze(-1)
    return torch.zeros_like(hidden).index_add_(0, token_of_copy, expert_outputs * weights)


@moe_experts.register_fake
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation="silu"):
    _check("moe_experts", hidden, topk_ids, topk_weights, w_gate_up, w_down, activation)
    return torch.empty_like(hidden)


@torch.library.custom_op("shardgraph::moe_experts_backward", mutates_args=())
def moe_experts_backward(grad_out: torch.Tensor, hidden: torch.Tensor, topk_ids: torch.Tensor,
                         topk_weights: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                         activation: str = "silu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_hidden, grad_topk_weights, grad_w_gate_up, grad_w_down)`` of ``moe_experts``."""
    _check("moe_experts_backward", hidden, topk_ids, topk_weights, w_gate_up, w_down, activation)
    _check_grad_out(grad_out, hidden)
    _check_ids("moe_experts_backward", topk_ids, w_gate_up.shape[0])
    act = activation_function(activation)
    order, token_of_copy, counts = _group_by_expert(topk_ids, w_gate_up.shape[0])
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
            gate, up = (x @ w_gate_up[expert].T).chunk(2, dim=-1)
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


def _check_grad_out(grad_out: torch.Tensor, hidden: torch.Tensor) -> None:
    if _shape(grad_out) != _shape(hidden) or grad_out.dtype != hidden.dtype:
        raise ValueError(
            f"moe_experts_backward: grad_out {_shape(grad_out)} {grad_out.dtype} must match hidden "
            f"{_shape(hidden)} {hidden.dtype}"
        )


@moe_experts_backward.register_fake
def _(grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, activation="silu"):
    _check("moe_experts_backward", hidden, topk_ids, topk_weights, w_gate_up, w_down, activation)
    _check_grad_out(grad_out, hidden)
    return (torch.empty_like(hidden), torch.empty_like(topk_weights), torch.empty_like(w_gate_up),
            torch.empty_like(w_down))


def _setup_context(ctx, inputs, output):
    hidden, topk_ids, topk_weights, w_gate_up, w_down, activation = inputs
    ctx.save_for_backward(hidden, topk_ids, topk_weights, w_gate_up, w_down)
    ctx.activation = activation


def _backward(ctx, grad_out):
    hidden, topk_ids, topk_weights, w_gate_up, w_down = ctx.saved_tensors
    grad_hidden, grad_weights, grad_gate_up, grad_down = torch.ops.shardgraph.moe_experts_backward(
        grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, ctx.activation)
    return grad_hidden, None, grad_weights, grad_gate_up, grad_down, None


moe_experts.register_autograd(_backward, setup_context=_setup_context)


def moe_experts_reference(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation="silu"):
    """The definition, token by token, differentiable with plain autograd (for tests; slow)."""
    act = activation_function(activation)
    experts = w_gate_up.shape[0]
    rows = []
    for t in range(hidden.shape[0]):
        total = torch.zeros_like(hidden[t])
        for j in range(topk_ids.shape[1]):
            expert = int(topk_ids[t, j])
            if not 0 <= expert < experts:
                raise ValueError(f"moe_experts_reference: topk_ids[{t}, {j}] = {expert} is outside 0..{experts - 1}")
            gate, up = (hidden[t] @ w_gate_up[expert].T).chunk(2)
            total = total + topk_weights[t, j].to(hidden.dtype) * ((act(gate) * up) @ w_down[expert].T)
        rows.append(total)
    return torch.stack(rows) if rows else hidden.new_zeros(hidden.shape)
