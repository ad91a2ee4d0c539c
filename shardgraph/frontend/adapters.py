"""Module adapters: trace the routed-expert blocks of real models as one ``moe_experts`` op.

An adapter computes a module's forward with ``torch.ops.shardgraph.moe_experts``. While
``trace`` runs, each recognised module gets the adapter as an instance-level ``forward``
(removed again afterwards, also when tracing fails); the model's classes and source are never
edited. Adapters read the weights from the module itself at call time, so the graph's parameter
placeholders keep the model's own names and a plan written against those names applies.

Recognised without registration, in this order:

* a class registered with ``register_experts(module_class, adapter_fn)`` (also subclasses);
  ``adapter_fn(module, *args, **kwargs)`` receives the module's forward arguments;
* a torchtitan-style MoE block: a module with a ``router`` and ``experts`` holding 3-d ``w1``
  ``[E, I, H]`` (gate), ``w3 [E, I, H]`` (up) and ``w2 [E, H, I]`` (down) whose forward takes
  ``(x, num_tokens_per_expert)``. torchtitan's
  ``GroupedExperts.forward(x, num_tokens_per_expert)`` receives tokens already permuted by
  expert, with data-dependent group sizes, so the block is the level at which routing is still
  visible: the adapter calls the block's own router (``router(tokens, expert_bias)`` returning
  ``(top_scores, expert_ids, ...)``), then ``moe_experts`` on ``cat([w1, w3], dim=1)`` (an
  ordinary aten ``cat`` in the graph, so the parameters stay ``w1`` and ``w3``) and ``w2``, then
  adds ``shared_experts``. The load-balancing counter ``tokens_per_expert`` is a no-grad
  statistic and is not accumulated by the traced step;
* HF transformers 5.x fused experts (``MixtralExperts``, ``Qwen2MoeExperts``, ``Qwen3MoeExperts``
  and every class built the same way): 3-d ``gate_up_proj [E, 2I, H]`` and ``down_proj
  [E, H, I]`` and ``forward(hidden_states, top_k_index, top_k_weights)``. Their eager forward is
  ``gate, up = F.linear(x, gate_up_proj[e]).chunk(2, dim=-1)``, ``act_fn(gate) * up``,
  ``F.linear(., down_proj[e])``, times ``top_k_weights[token, slot]``, summed with
  ``index_add_``: exactly ``moe_experts``. Layouts that differ (``is_transposed``,
  ``has_bias``, interleaved gate/up, a custom ``_apply_gate``, a post-expert norm) are refused;
* a ``GroupedExperts``-like module (3-d ``w1``/``w2``/``w3``) whose forward takes
  ``(x, topk_ids, topk_weights)``.

The activation of HF experts is identified by evaluating ``act_fn`` on a float64 probe and
comparing it with each activation ``moe_experts`` knows, so ``nn.SiLU``, ``SiLUActivation``,
``GELUActivation``, ``NewGELUActivation``, ``GELUTanh`` and plain functions all map, and anything
else (``QuickGELUActivation``, a clipped GELU) is refused rather than approximated.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..ops.moe import ACTIVATIONS, activation_function
from .errors import AdapterError

__all__ = [
    "AdapterError",
    "ExpertAdapter",
    "register_experts",
    "unregister_experts",
    "identify_activation",
    "adapter_for",
    "adapters_installed",
]

ExpertAdapter = Callable[..., torch.Tensor]

_REGISTERED: dict[type, ExpertAdapter] = {}


def register_experts(module_class: type, adapter_fn: ExpertAdapter) -> None:
    """Trace every instance of ``module_class`` (and of its subclasses) through ``adapter_fn``.

    ``adapter_fn(module, *args, **kwargs)`` is called with the module and the arguments of its
    forward and must return what the forward returns, computed with
    ``torch.ops.shardgraph.moe_experts`` for the routed experts (router and shared experts may
    stay ordinary torch code). Registering a class again replaces its adapter.
    """
    if not isinstance(module_class, type) or not issubclass(module_class, nn.Module):
        raise TypeError(f"register_experts: module_class must be an nn.Module subclass, got {module_class!r}")
    if not callable(adapter_fn):
        raise TypeError(f"register_experts: adapter_fn must be callable, got {adapter_fn!r}")
    _REGISTERED[module_class] = adapter_fn


def unregister_experts(module_class: type) -> None:
    """Forget the adapter registered for ``module_class``."""
    if module_class not in _REGISTERED:
        raise KeyError(f"unregister_experts: no adapter is registered for {module_class!r}")
    del _REGISTERED[module_class]


def _describe(function) -> str:
    if isinstance(function, nn.Module):
        return type(function).__name__
    return getattr(function, "__qualname__", None) or repr(function)


def identify_activation(act_fn, path: str) -> str:
    """Which ``moe_experts`` activation ``act_fn`` computes, found by evaluating it."""
    probe = torch.linspace(-8.0, 8.0, 321, dtype=torch.float64, device="cpu")
    try:
        with torch.no_grad():
            values = act_fn(probe.clone())
    except Exception as error:  # noqa: BLE001 - any failure means the activation cannot be identified
        raise AdapterError(
            f"{path}: cannot evaluate its activation {_describe(act_fn)} on a float64 CPU probe "
            f"({type(error).__name__}: {error}); register the class with register_experts"
        ) from None
    if not isinstance(values, torch.Tensor) or values.shape != probe.shape:
        raise AdapterError(f"{path}: activation {_describe(act_fn)} is not elementwise")
    for name in ACTIVATIONS:
        if torch.allclose(values, activation_function(name)(probe), rtol=1e-8, atol=1e-9):
            return name
    raise AdapterError(
        f"{path}: activation {_describe(act_fn)} is none of the moe_experts activations ({', '.join(ACTIVATIONS)}); "
        f"register the class with register_experts"
    )


@dataclass(frozen=True)
class _Recognised:
    kind: str
    forward: Callable
    covers_children: bool = False


def _parameter(module: nn.Module, name: str, ndim: int) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, nn.Parameter) and value.dim() == ndim else None


def _has_grouped_weights(module: nn.Module) -> bool:
    return all(_parameter(module, name, 3) is not None for name in ("w1", "w2", "w3"))


def _check_grouped_shapes(path: str, module: nn.Module) -> None:
    w1, w2, w3 = module.w1, module.w2, module.w3
    experts, intermediate, hidden = w1.shape
    if tuple(w3.shape) != tuple(w1.shape) or tuple(w2.shape) != (experts, hidden, intermediate):
        raise AdapterError(
            f"{path}: w1 {tuple(w1.shape)}, w3 {tuple(w3.shape)}, w2 {tuple(w2.shape)} are not "
            f"[E, I, H], [E, I, H], [E, H, I]"
        )


def _grouped_activation(path: str, module: nn.Module) -> str:
    activation = getattr(module, "activation", "silu")
    if activation not in ACTIVATIONS:
        raise AdapterError(f"{path}: activation {activation!r} is none of {', '.join(ACTIVATIONS)}")
    return activation


def _fused_gate_up(experts: nn.Module) -> torch.Tensor:
    # Gate rows then up rows of every expert: moe_experts' layout. Built in the graph, so the
    # parameters stay w1 and w3 (two Shard(1) operands become one InterleavedShard(1, 2)).
    return torch.cat([experts.w1, experts.w3], dim=1)


def _titan_block(path: str, block: nn.Module) -> _Recognised:
    experts = block.experts
    _check_grouped_shapes(f"{path}.experts", experts)
    activation = _grouped_activation(f"{path}.experts", experts)
    if getattr(block, "score_before_experts", False):
        raise AdapterError(
            f"{path}: score_before_experts=True scales each expert's input by its routing score; moe_experts scales "
            f"the expert outputs (the two differ for a gated MLP), so build the block with score_before_experts=False"
        )
    if not callable(getattr(block, "router", None)):
        raise AdapterError(f"{path}: a torchtitan-style MoE block needs a callable router")

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise AdapterError(f"{path}: expects hidden states [batch, seq, dim], got shape {tuple(x.shape)}")
        batch, seq, dim = x.shape
        tokens = x.reshape(batch * seq, dim)
        routed = block.router(tokens, getattr(block, "expert_bias", None))
        if not isinstance(routed, (tuple, list)) or len(routed) < 2:
            raise AdapterError(f"{path}.router must return (top_scores, expert_ids, ...), got {type(routed).__name__}")
        top_scores, expert_ids = routed[0], routed[1]
        out = torch.ops.shardgraph.moe_experts(tokens, expert_ids, top_scores.to(tokens.dtype),
                                               _fused_gate_up(experts), experts.w2, activation)
        shared = getattr(block, "shared_experts", None)
        if shared is not None:
            out = shared(tokens) + out
        return out.reshape(batch, seq, dim)

    return _Recognised("torchtitan_moe_block", forward, covers_children=True)


def _positional_arity(function) -> int | None:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return None
    return sum(1 for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _grouped_experts(path: str, module: nn.Module) -> _Recognised:
    _check_grouped_shapes(path, module)
    activation = _grouped_activation(path, module)
    arity = _positional_arity(module.forward)
    if arity is not None and arity != 3:
        raise AdapterError(
            f"{path}: {type(module).__name__}.forward takes {arity} arguments; shardgraph adapts w1/w2/w3 experts "
            f"that take (x, topk_ids, topk_weights), or a torchtitan-style MoE block (router + experts) around "
            f"experts that take tokens already grouped by expert; otherwise register the block with register_experts"
        )

    def forward(x, topk_ids, topk_weights):
        return torch.ops.shardgraph.moe_experts(x, topk_ids, topk_weights.to(x.dtype), _fused_gate_up(module),
                                                module.w2, activation)

    return _Recognised("grouped_experts", forward)


# HF's ``use_experts_implementation`` decorator records the layout on the instance; these are
# the values of the [gate; up]-concatenated, untransposed, bias-free layout moe_experts has.
_HF_LAYOUT = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
              "has_post_expert_norm": False, "_is_expert_parallel": False}


def _hf_fused_experts(path: str, module: nn.Module) -> _Recognised:
    gate_up, down = module.gate_up_proj, module.down_proj
    arity = _positional_arity(module.forward)
    if arity is not None and arity != 3:
        # Llama 4's experts take every token once per expert, already scaled by its routing
        # score: the score multiplies the expert's input, where moe_experts scales its output.
        raise AdapterError(
            f"{path}: {type(module).__name__}.forward takes {arity} argument(s), not (hidden_states, top_k_index, "
            f"top_k_weights): its tokens arrive already routed (and, in Llama 4, scaled by their routing score "
            f"before the experts, where moe_experts scales the expert outputs); register the enclosing MoE block "
            f"with register_experts")
    for attribute, expected in _HF_LAYOUT.items():
        if getattr(module, attribute, expected) != expected:
            raise AdapterError(
                f"{path}: {type(module).__name__}.{attribute} is {getattr(module, attribute)!r}; moe_experts takes "
                f"the layout with {attribute}={expected!r}; register the class with register_experts"
            )
    biases = [name for name, _ in module.named_parameters(recurse=False) if name.endswith("_bias")]
    if biases:
        raise AdapterError(f"{path}: expert biases {biases} have no place in moe_experts; register the class")
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None and getattr(apply_gate, "__name__", "") != "_default_apply_gate":
        raise AdapterError(
            f"{path}: {type(module).__name__} overrides _apply_gate ({_describe(apply_gate)}); moe_experts computes "
            f"act(gate) * up with (gate, up) = chunk(2); register the class with register_experts"
        )
    experts, two_intermediate, hidden = gate_up.shape
    if two_intermediate % 2 or tuple(down.shape) != (experts, hidden, two_intermediate // 2):
        raise AdapterError(
            f"{path}: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not [E, 2I, H] and "
            f"[E, H, I]"
        )
    if not hasattr(module, "act_fn"):
        raise AdapterError(f"{path}: fused experts without an act_fn; register the class with register_experts")
    activation = identify_activation(module.act_fn, f"{path}.act_fn")

    def forward(hidden_states, top_k_index, top_k_weights):
        return torch.ops.shardgraph.moe_experts(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype),
                                                module.gate_up_proj, module.down_proj, activation)

    return _Recognised("hf_fused_experts", forward)


def _recognise(path: str, module: nn.Module) -> _Recognised | None:
    for cls in type(module).__mro__:
        if cls in _REGISTERED:
            user_adapter = _REGISTERED[cls]
            return _Recognised(f"registered:{cls.__qualname__}",
                               lambda *args, **kwargs: user_adapter(module, *args, **kwargs), covers_children=True)
    experts = getattr(module, "experts", None)
    if (isinstance(experts, nn.Module) and hasattr(module, "router") and _has_grouped_weights(experts)
            and _positional_arity(experts.forward) == 2):
        # Experts that take (tokens grouped by expert, counts): the block is where routing is visible.
        return _titan_block(path, module)
    if _parameter(module, "gate_up_proj", 3) is not None and _parameter(module, "down_proj", 3) is not None:
        return _hf_fused_experts(path, module)
    if _has_grouped_weights(module):
        return _grouped_experts(path, module)
    return None


def adapter_for(path: str, module: nn.Module) -> tuple[str, Callable] | None:
    """``(kind, forward)`` that ``trace`` would install on ``module``, or None."""
    recognised = _recognise(path, module)
    return None if recognised is None else (recognised.kind, recognised.forward)


@contextlib.contextmanager
def adapters_installed(model: nn.Module) -> Iterator[dict[str, str]]:
    """Give every recognised expert module its adapter as forward; yield ``{path: kind}``.

    Everything is checked before any module is touched, so a refused module leaves the model
    as it was; on exit each instance's own ``forward`` attribute is restored (or removed).
    """
    plan: list[tuple[str, nn.Module, _Recognised]] = []
    covered: list[str] = []
    for path, module in model.named_modules():
        if any(prefix == "" or path.startswith(prefix + ".") for prefix in covered):
            continue  # inside a block whose adapter replaces the whole forward
        recognised = _recognise(path or "<root>", module)
        if recognised is None:
            continue
        plan.append((path, module, recognised))
        if recognised.covers_children:
            covered.append(path)
    patched = []
    try:
        for path, module, recognised in plan:
            patched.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
            module.forward = recognised.forward
        yield {path or "<root>": recognised.kind for path, _, recognised in plan}
    finally:
        for module, had_own_forward, previous in reversed(patched):
            if had_own_forward:
                module.forward = previous
            else:
                del module.forward
