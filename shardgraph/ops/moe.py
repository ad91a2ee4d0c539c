"""``shardgraph::moe_experts``: the routed-expert block as one op, forward and backward.

    out[t] = sum_j topk_weights[t, j] * (glu(x W_gate_up[e]^T + b_gate_up[e]) W_down[e]^T + b_down[e])
             with x = hidden[t], e = topk_ids[t, j]

Operands:

* ``hidden [T, H]``, floating point;
* ``topk_ids [T, k]`` int64, every id in ``0 .. E-1``;
* ``topk_weights [T, k]``, floating point, already normalised by the router (the op only
  weights and sums); the weighting is done in ``hidden``'s dtype;
* ``w_gate_up [E, 2I, H]``: the gate and up projections of each expert, rows arranged as the
  activation spec's ``layout`` says: ``concatenated`` (the default) has rows ``0 .. I-1`` gate and
  ``I .. 2I-1`` up, the layout of HF transformers 5.x fused experts, whose eager forward computes
  ``F.linear(x, gate_up_proj[e]).chunk(2, dim=-1)`` as ``(gate, up)``; ``interleaved`` has gate
  in the even rows and up in the odd ones (GPT-OSS: ``gate_up[..., ::2]``, ``gate_up[..., 1::2]``);
  ``ungated`` experts have no gate (Nemotron-H: ``act(x up_proj[e]^T) down_proj[e]^T``) and
  ``w_gate_up [E, I, H]`` holds the up projection alone;
* ``w_down [E, H, I]``;
* ``activation``: a spec string (``GatedActivation``) naming what turns the ``2I`` gate/up
  columns into ``I``: ``"silu"`` (SwiGLU), ``"gelu"`` (exact, erf), ``"gelu_tanh"`` (tanh
  approximation) or ``"relu2"`` (squared ReLU), applied to the gate half and multiplied by up
  (``limit=L`` clamps both first: ``act(gate.clamp(max=L)) * up.clamp(-L, L)``), or
  ``"clamped_swiglu(alpha=A,limit=L)"`` (GPT-OSS): ``gate = gate.clamp(max=L)``,
  ``up = up.clamp(-L, L)``, ``(up + 1) * gate * sigmoid(A * gate)``, or
  ``"softcapped_swiglu(gate_softcap=G,up_softcap=U)"`` (Inkling 2):
  ``G tanh(gate / G) * sigmoid(gate) * U tanh(up / U)``. ``layout=interleaved`` in the
  parameters selects the interleaved rows: ``"clamped_swiglu(alpha=1.702,limit=7.0,layout=interleaved)"``;
  ``layout=ungated`` the experts without a gate: ``"relu2(layout=ungated)"`` is ``relu(up)^2``;
* ``gate_up_bias [E, 2I]`` (``[E, I]`` ungated; optional): added to each copy's gate/up product before the
  activation, its columns in the rows' layout;
* ``down_bias [E, H]`` (optional): added to each copy's down product before the routing weight.

The backward is a second op, ``moe_experts_backward``, wired in with ``register_autograd``, so a
traced joint graph holds exactly one forward and one backward node per MoE layer and the MoE
lowering can replace both. It returns ``[grad_hidden, grad_topk_weights, grad_w_gate_up,
grad_w_down]`` followed by the gradient of each bias that was given (``gate_up_bias`` first).
Both ops have fake kernels (shape checks only), so tracing on fake or meta tensors never runs the
reference kernels; those run eagerly, where out-of-range expert ids are refused before any indexing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kernels import op_bodies

__all__ = [
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "GatedActivation",
    "activation_function",
    "activation_derivative",
    "bias_gradient_positions",
    "moe_experts",
    "moe_experts_backward",
    "moe_experts_reference",
]

# Elementwise activations: of the gate half (``act(gate) * up``), or of the whole product where
# the experts have no gate (``layout=ungated``).
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu2")
# Gated activations that read gate and up together (with their parameters).
GATED_ACTIVATIONS = ("clamped_swiglu", "softcapped_swiglu")
# How the rows of ``w_gate_up`` hold the gate and the up projection of each intermediate unit.
LAYOUTS = ("concatenated", "interleaved")
# Experts without a gate: ``w_gate_up`` holds the up projection only, I rows.
UNGATED = "ungated"
# The numeric settings each activation needs (and, for ACTIVATIONS, may take).
_REQUIRED = {"clamped_swiglu": ("alpha", "limit"), "softcapped_swiglu": ("gate_softcap", "up_softcap")}
_OPTIONAL = {name: ("limit",) for name in ACTIVATIONS}
_SETTINGS = ("alpha", "limit", "gate_softcap", "up_softcap")


def activation_function(name: str):
    """The elementwise activation ``moe_experts`` applies to the gate half, by name."""
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu2":  # squared ReLU (Primer; Nemotron-H's experts)
        return lambda x: torch.square(F.relu(x))
    raise ValueError(f"moe_experts: unknown activation {name!r}; known: {', '.join(ACTIVATIONS + GATED_ACTIVATIONS)}")


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
    if name == "relu2":
        return 2 * F.relu(x)
    raise ValueError(f"moe_experts: unknown activation {name!r}; known: {', '.join(ACTIVATIONS + GATED_ACTIVATIONS)}")


def _softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


_PARSED: dict[str, "GatedActivation"] = {}


@dataclass(frozen=True)
class GatedActivation:
    """What ``moe_experts`` computes between its two products, parsed from the op's spec string.

    ``name(key=value, ...)``:

    * ``name`` one of ``ACTIVATIONS``: ``act(gate) * up``; with ``limit=L``,
      ``act(gate.clamp(max=L)) * up.clamp(-L, L)`` (DeepSeek-V4, HunYuan-V4);
    * ``clamped_swiglu(alpha=A,limit=L)`` (GPT-OSS): ``gate = gate.clamp(max=L)``,
      ``up = up.clamp(-L, L)``, ``(up + 1) * gate * sigmoid(A * gate)``;
    * ``softcapped_swiglu(gate_softcap=G,up_softcap=U)`` (Inkling 2):
      ``G tanh(gate / G) * sigmoid(gate) * U tanh(up / U)`` (the sigmoid sees the raw gate).

    ``layout`` says how the rows of ``w_gate_up`` (and the columns of its product) hold each
    intermediate unit: ``concatenated`` (gate columns, then up columns; the default),
    ``interleaved`` (gate even, up odd), or ``ungated`` (experts without a gate: ``I`` up rows,
    ``act(up)``; an elementwise activation without a limit only). ``str()`` gives the canonical
    spec, so equal activations have equal strings in a graph.
    """

    name: str
    alpha: float | None = None
    limit: float | None = None
    layout: str = "concatenated"
    gate_softcap: float | None = None
    up_softcap: float | None = None

    @staticmethod
    def parse(spec: str) -> "GatedActivation":
        # A graph's specs are parsed when it is built (the op's rule, its fake kernel), so a run
        # under torch.compile finds its record here, an existing object, instead of tracing the
        # parser and the frozen record's construction (which dynamo of torch 2.11 cannot).
        found = _PARSED.get(spec) if isinstance(spec, str) else None
        if found is None:
            found = _PARSED[spec] = GatedActivation._parse(spec)
        return found

    @staticmethod
    def _parse(spec: str) -> "GatedActivation":
        if not isinstance(spec, str):
            raise ValueError(f"moe_experts: the activation must be a spec string, got {spec!r}")
        name, _, rest = spec.strip().partition("(")
        name, settings = name.strip(), {}
        if rest:
            if not rest.endswith(")"):
                raise ValueError(f"moe_experts: activation spec {spec!r} has no closing parenthesis")
            for item in filter(None, (part.strip() for part in rest[:-1].split(","))):
                key, equals, value = (part.strip() for part in item.partition("="))
                if not equals or key not in _SETTINGS + ("layout",) or key in settings:
                    raise ValueError(f"moe_experts: activation spec {spec!r}: {item!r} is not one of "
                                     f"{', '.join(k + '=' for k in _SETTINGS + ('layout',))} (each at most once)")
                settings[key] = value
        if name not in ACTIVATIONS + GATED_ACTIVATIONS:
            raise ValueError(f"moe_experts: unknown activation {name!r}; known: "
                             f"{', '.join(ACTIVATIONS + GATED_ACTIVATIONS)}")
        layout = settings.pop("layout", "concatenated")
        if layout not in LAYOUTS + (UNGATED,):
            raise ValueError(f"moe_experts: activation spec {spec!r}: layout must be one of "
                             f"{', '.join(LAYOUTS + (UNGATED,))}")
        numbers = {}
        for key, value in settings.items():
            try:
                numbers[key] = float(value)
            except ValueError:
                raise ValueError(f"moe_experts: activation spec {spec!r}: {key}={value!r} is not a number") from None
        required = _REQUIRED.get(name, ())
        if not set(required) <= set(numbers):
            raise ValueError(f"moe_experts: activation {name!r} needs {' and '.join(k + '=' for k in required)}, "
                             f"got spec {spec!r}")
        extra = set(numbers) - set(required) - set(_OPTIONAL.get(name, ()))
        if extra:
            raise ValueError(f"moe_experts: activation {name!r} takes no {', '.join(sorted(extra))}")
        for key in ("limit", "gate_softcap", "up_softcap"):
            if key in numbers and numbers[key] <= 0:
                raise ValueError(f"moe_experts: activation spec {spec!r}: {key} must be positive")
        if layout == UNGATED and (name not in ACTIVATIONS or numbers):
            raise ValueError(f"moe_experts: activation spec {spec!r}: layout=ungated takes an elementwise activation "
                             f"({', '.join(ACTIVATIONS)}) without settings: there is no gate or up half to clamp")
        return GatedActivation(name, numbers.get("alpha"), numbers.get("limit"), layout, numbers.get("gate_softcap"),
                               numbers.get("up_softcap"))

    def __str__(self) -> str:
        settings = [f"{key}={getattr(self, key)!r}" for key in _SETTINGS if getattr(self, key) is not None]
        settings += [f"layout={self.layout}"] if self.layout != "concatenated" else []
        return self.name + (f"({','.join(settings)})" if settings else "")

    @property
    def interleaved(self) -> bool:
        return self.layout == "interleaved"

    @property
    def gated(self) -> bool:
        return self.layout != UNGATED

    @property
    def rows_per_unit(self) -> int:
        """Rows of ``w_gate_up`` (columns of its product) per intermediate unit: gate and up, or up alone."""
        return 2 if self.gated else 1

    def split(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) columns of a gate/up product (or of a bias, or of its gradient)."""
        if not self.gated:
            raise ValueError(f"moe_experts: {self} has no gate: its product is the up projection alone")
        if self.interleaved:
            return gate_up[..., ::2], gate_up[..., 1::2]
        return gate_up.chunk(2, dim=-1)

    def join(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The inverse of ``split``: gate and up columns back in the layout."""
        if self.interleaved:
            return torch.stack([gate, up], dim=-1).flatten(-2)
        return torch.cat([gate, up], dim=-1)

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``[..., 2I] -> [..., I]`` (``[..., I] -> [..., I]`` ungated)."""
        if not self.gated:
            return activation_function(self.name)(gate_up)
        gate, up = self.split(gate_up)
        if self.name == "clamped_swiglu":
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        if self.name == "softcapped_swiglu":
            return _softcap(gate, self.gate_softcap) * torch.sigmoid(gate) * _softcap(up, self.up_softcap)
        if self.limit is not None:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
        return activation_function(self.name)(gate) * up

    def backward(self, grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
        """The gradient of ``self(gate_up)`` with respect to ``gate_up``, in its layout."""
        if not self.gated:
            return grad * activation_derivative(self.name, gate_up)
        gate, up = self.split(gate_up)
        if self.name == "softcapped_swiglu":
            tanh_gate, tanh_up = torch.tanh(gate / self.gate_softcap), torch.tanh(up / self.up_softcap)
            capped_gate, capped_up = tanh_gate * self.gate_softcap, tanh_up * self.up_softcap
            sigmoid = torch.sigmoid(gate)
            # d/dgate of capped_gate * sigmoid: (1 - tanh^2) * sigmoid + capped_gate * sigmoid (1 - sigmoid)
            d_gate = (1 - tanh_gate * tanh_gate) * sigmoid + capped_gate * sigmoid * (1 - sigmoid)
            grad_gate = grad * capped_up * d_gate
            grad_up = grad * capped_gate * sigmoid * (1 - tanh_up * tanh_up)
            return self.join(grad_gate, grad_up)
        if self.limit is None:
            grad_gate = grad * up * activation_derivative(self.name, gate)
            return self.join(grad_gate, grad * activation_function(self.name)(gate))
        # clamp passes the gradient where its input is within the bounds, ends included (as
        # torch.clamp's backward does).
        clamped_gate = gate.clamp(max=self.limit)
        clamped_up = up.clamp(min=-self.limit, max=self.limit)
        gate_passes, up_passes = gate <= self.limit, (up >= -self.limit) & (up <= self.limit)
        if self.name == "clamped_swiglu":
            sigmoid = torch.sigmoid(clamped_gate * self.alpha)
            glu = clamped_gate * sigmoid
            d_glu = sigmoid * (1 + self.alpha * clamped_gate * (1 - sigmoid))
            grad_gate = grad * (clamped_up + 1) * d_glu * gate_passes
            grad_up = grad * glu * up_passes
            return self.join(grad_gate, grad_up)
        grad_gate = grad * clamped_up * activation_derivative(self.name, clamped_gate) * gate_passes
        grad_up = grad * activation_function(self.name)(clamped_gate) * up_passes
        return self.join(grad_gate, grad_up)


def bias_gradient_positions(has_gate_up_bias: bool, has_down_bias: bool) -> tuple[int | None, int | None]:
    """Where ``moe_experts_backward``'s outputs hold the gradients of the two biases (None: absent)."""
    gate_up = 4 if has_gate_up_bias else None
    down = (5 if has_gate_up_bias else 4) if has_down_bias else None
    return gate_up, down


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _check(op: str, hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, gate_up_bias=None,
           down_bias=None) -> GatedActivation:
    """Shapes, dtypes and devices of the operands; runs in the fake kernels too, so at trace time."""
    parsed = GatedActivation.parse(activation)
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
    rows_per_unit = parsed.rows_per_unit
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != hidden.shape[1] or w_gate_up.shape[1] % rows_per_unit:
        rows = "2 * intermediate" if parsed.gated else "intermediate (ungated)"
        raise ValueError(
            f"{op}: w_gate_up must be [experts, {rows}, hidden={hidden.shape[1]}], "
            f"got shape {_shape(w_gate_up)}"
        )
    experts, two_intermediate, hidden_size = w_gate_up.shape
    if _shape(w_down) != (experts, hidden_size, two_intermediate // rows_per_unit):
        raise ValueError(
            f"{op}: w_down must be [experts={experts}, hidden={hidden_size}, "
            f"intermediate={two_intermediate // rows_per_unit}], got shape {_shape(w_down)}"
        )
    operands = [("w_gate_up", w_gate_up), ("w_down", w_down)]
    for name, bias, shape in (("gate_up_bias", gate_up_bias, (experts, two_intermediate)),
                              ("down_bias", down_bias, (experts, hidden_size))):
        if bias is not None:
            if _shape(bias) != shape:
                raise ValueError(f"{op}: {name} must be {list(shape)} (one row per expert), got shape {_shape(bias)}")
            operands.append((name, bias))
    for name, weight in operands:
        if weight.dtype != hidden.dtype:
            raise TypeError(f"{op}: {name} is {weight.dtype} but hidden is {hidden.dtype}; they must match")
    devices = {t.device for t in (hidden, topk_ids, topk_weights, *(t for _, t in operands))}
    if len(devices) > 1:
        raise ValueError(f"{op}: operands are on several devices {sorted(str(d) for d in devices)}")
    return parsed


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


@op_bodies.custom_op("shardgraph::moe_experts", mutates_args=())
def moe_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor, activation: str = "silu", gate_up_bias: Optional[torch.Tensor] = None,
                down_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    act = _check("moe_experts", hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, gate_up_bias,
                 down_bias)
    _check_ids("moe_experts", topk_ids, w_gate_up.shape[0])
    order, token_of_copy, counts = _group_by_expert(topk_ids, w_gate_up.shape[0])
    copies = hidden.index_select(0, token_of_copy)
    expert_outputs = torch.empty_like(copies)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            gate_up = copies[rows] @ w_gate_up[expert].T
            if gate_up_bias is not None:
                gate_up = gate_up + gate_up_bias[expert]
            expert_out = act(gate_up) @ w_down[expert].T
            expert_outputs[rows] = expert_out if down_bias is None else expert_out + down_bias[expert]
        start += count
    weights = topk_weights.reshape(-1).index_select(0, order).to(hidden.dtype).unsqueeze(-1)
    return torch.zeros_like(hidden).index_add_(0, token_of_copy, expert_outputs * weights)


@moe_experts.register_fake
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation="silu", gate_up_bias=None, down_bias=None):
    _check("moe_experts", hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, gate_up_bias, down_bias)
    return torch.empty_like(hidden)


@op_bodies.custom_op("shardgraph::moe_experts_backward", mutates_args=())
def moe_experts_backward(grad_out: torch.Tensor, hidden: torch.Tensor, topk_ids: torch.Tensor,
                         topk_weights: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                         activation: str = "silu", gate_up_bias: Optional[torch.Tensor] = None,
                         down_bias: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """``[grad_hidden, grad_topk_weights, grad_w_gate_up, grad_w_down]`` of ``moe_experts``, then
    ``grad_gate_up_bias`` and ``grad_down_bias`` where those biases were given."""
    act = _check("moe_experts_backward", hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, gate_up_bias,
                 down_bias)
    _check_grad_out(grad_out, hidden)
    _check_ids("moe_experts_backward", topk_ids, w_gate_up.shape[0])
    order, token_of_copy, counts = _group_by_expert(topk_ids, w_gate_up.shape[0])
    copies = hidden.index_select(0, token_of_copy)
    weights = topk_weights.reshape(-1).index_select(0, order).to(hidden.dtype)
    grad_copies_out = grad_out.index_select(0, token_of_copy)
    grad_copies_in = torch.empty_like(copies)
    grad_weights_sorted = torch.empty_like(weights)
    grad_w_gate_up = torch.zeros_like(w_gate_up)
    grad_w_down = torch.zeros_like(w_down)
    grad_gate_up_bias = None if gate_up_bias is None else torch.zeros_like(gate_up_bias)
    grad_down_bias = None if down_bias is None else torch.zeros_like(down_bias)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            x = copies[rows]
            gate_up = x @ w_gate_up[expert].T
            if gate_up_bias is not None:
                gate_up = gate_up + gate_up_bias[expert]
            activated = act(gate_up)
            expert_out = activated @ w_down[expert].T
            if down_bias is not None:
                expert_out = expert_out + down_bias[expert]
            grad_weights_sorted[rows] = (grad_copies_out[rows] * expert_out).sum(dim=-1)
            grad_expert_out = grad_copies_out[rows] * weights[rows].unsqueeze(-1)
            grad_w_down[expert] = grad_expert_out.T @ activated
            if grad_down_bias is not None:
                grad_down_bias[expert] = grad_expert_out.sum(dim=0)
            grad_activated = grad_expert_out @ w_down[expert]
            grad_gate_up = act.backward(grad_activated, gate_up)
            grad_w_gate_up[expert] = grad_gate_up.T @ x
            if grad_gate_up_bias is not None:
                grad_gate_up_bias[expert] = grad_gate_up.sum(dim=0)
            grad_copies_in[rows] = grad_gate_up @ w_gate_up[expert]
        start += count
    grad_hidden = torch.zeros_like(hidden).index_add_(0, token_of_copy, grad_copies_in)
    grad_topk_weights = torch.empty(topk_weights.numel(), dtype=topk_weights.dtype, device=topk_weights.device)
    grad_topk_weights[order] = grad_weights_sorted.to(topk_weights.dtype)
    grads = [grad_hidden, grad_topk_weights.reshape(topk_weights.shape), grad_w_gate_up, grad_w_down]
    return grads + [g for g in (grad_gate_up_bias, grad_down_bias) if g is not None]


def _check_grad_out(grad_out: torch.Tensor, hidden: torch.Tensor) -> None:
    if _shape(grad_out) != _shape(hidden) or grad_out.dtype != hidden.dtype:
        raise ValueError(
            f"moe_experts_backward: grad_out {_shape(grad_out)} {grad_out.dtype} must match hidden "
            f"{_shape(hidden)} {hidden.dtype}"
        )


@moe_experts_backward.register_fake
def _(grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, activation="silu", gate_up_bias=None,
      down_bias=None):
    _check("moe_experts_backward", hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, gate_up_bias,
           down_bias)
    _check_grad_out(grad_out, hidden)
    grads = [torch.empty_like(hidden), torch.empty_like(topk_weights), torch.empty_like(w_gate_up),
             torch.empty_like(w_down)]
    return grads + [torch.empty_like(b) for b in (gate_up_bias, down_bias) if b is not None]


def _setup_context(ctx, inputs, output):
    hidden, topk_ids, topk_weights, w_gate_up, w_down, activation, gate_up_bias, down_bias = inputs
    ctx.save_for_backward(hidden, topk_ids, topk_weights, w_gate_up, w_down, gate_up_bias, down_bias)
    ctx.activation = activation


def _backward(ctx, grad_out):
    hidden, topk_ids, topk_weights, w_gate_up, w_down, gate_up_bias, down_bias = ctx.saved_tensors
    grads = torch.ops.shardgraph.moe_experts_backward(
        grad_out, hidden, topk_ids, topk_weights, w_gate_up, w_down, ctx.activation, gate_up_bias, down_bias)
    at_gate_up, at_down = bias_gradient_positions(gate_up_bias is not None, down_bias is not None)
    return (grads[0], None, grads[1], grads[2], grads[3], None,
            None if at_gate_up is None else grads[at_gate_up], None if at_down is None else grads[at_down])


moe_experts.register_autograd(_backward, setup_context=_setup_context)


def moe_experts_reference(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation="silu", gate_up_bias=None,
                          down_bias=None):
    """The definition, token by token, differentiable with plain autograd (for tests; slow)."""
    act = GatedActivation.parse(activation)
    experts = w_gate_up.shape[0]
    rows = []
    for t in range(hidden.shape[0]):
        total = torch.zeros_like(hidden[t])
        for j in range(topk_ids.shape[1]):
            expert = int(topk_ids[t, j])
            if not 0 <= expert < experts:
                raise ValueError(f"moe_experts_reference: topk_ids[{t}, {j}] = {expert} is outside 0..{experts - 1}")
            gate_up = hidden[t] @ w_gate_up[expert].T
            if gate_up_bias is not None:
                gate_up = gate_up + gate_up_bias[expert]
            expert_out = act(gate_up) @ w_down[expert].T
            if down_bias is not None:
                expert_out = expert_out + down_bias[expert]
            total = total + topk_weights[t, j].to(hidden.dtype) * expert_out
        rows.append(total)
    return torch.stack(rows) if rows else hidden.new_zeros(hidden.shape)
