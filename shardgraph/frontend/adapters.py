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
* HF transformers 5.x fused experts (``MixtralExperts``, ``Qwen2MoeExperts``, ``Qwen3MoeExperts``,
  ``GptOssExperts`` and every class built the same way): 3-d ``gate_up_proj`` and ``down_proj``
  and ``forward(hidden_states, top_k_index, top_k_weights)``. Mixtral's eager forward is
  ``gate, up = F.linear(x, gate_up_proj[e]).chunk(2, dim=-1)``, ``act_fn(gate) * up``,
  ``F.linear(., down_proj[e])``, times ``top_k_weights[token, slot]``, summed with
  ``index_add_``: exactly ``moe_experts``. GPT-OSS stores the experts transposed (``[E, H, 2I]``,
  ``[E, I, H]``, handed to the op as ``transpose(1, 2)`` views), adds ``gate_up_proj_bias`` and
  ``down_proj_bias``, and its own ``_apply_gate`` reads gate and up interleaved and computes a
  clamped SwiGLU: the op's bias operands and activation spec. The layout is read from the
  parameters, the gate from what it computes (``identify_gated_activation``); a post-expert
  norm, other biases, a gate none of the op's activations reproduces, or a layout flag that
  contradicts what was found are refused;
* a ``GroupedExperts``-like module (3-d ``w1``/``w2``/``w3``) whose forward takes
  ``(x, topk_ids, topk_weights)``;
* JetMoE's MoE MLP (``router.layer`` and ``input_linear`` / ``output_linear`` holding 3-d
  ``weight``), and its mixture of attention heads: the same layout with one projection each side
  of attention, called through ``map`` / ``reduce`` instead of ``forward``; those two methods are
  installed, computing ``routed_linear`` (``routed_linear.py``) with the routing written out.
  Both are checked against the module's own forward (or map and reduce) on a float64 copy;
* a block of per-expert MLP modules (transformers 4.x and many remote-code models): an
  ``experts`` ``nn.ModuleList`` of identical modules with bias-free ``gate_proj``/``up_proj``/
  ``down_proj`` (or ``w1``/``w3``/``w2``) ``nn.Linear`` layers, inside a block with a linear router
  whose forward loops over the experts (``(topk_ids == i).nonzero()``, ``index_add_``), which a
  static graph cannot follow. See ``_module_list_block``.

The activation of HF experts is identified by evaluating ``act_fn`` on a float64 probe and
comparing it with each activation ``moe_experts`` knows, so ``nn.SiLU``, ``SiLUActivation``,
``GELUActivation``, ``NewGELUActivation``, ``GELUTanh`` and plain functions all map, and anything
else (``QuickGELUActivation``, a clipped GELU) is refused rather than approximated.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.moe import ACTIVATIONS, LAYOUTS, UNGATED, GatedActivation, activation_function
from .errors import AdapterError
from .routed_linear import routed_linear, routed_linear_sum

__all__ = [
    "AdapterError",
    "ExpertAdapter",
    "register_experts",
    "unregister_experts",
    "identify_activation",
    "identify_gated_activation",
    "adapter_for",
    "adapter_methods_for",
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


def _on_probe(function, probe: torch.Tensor, path: str, what: str):
    """``function(probe)``, or a refusal naming the module: anything failing on a float64 CPU
    probe cannot be identified."""
    try:
        with torch.no_grad():
            return function(probe.clone())
    except Exception as error:  # noqa: BLE001 - any failure means it cannot be identified
        raise AdapterError(
            f"{path}: cannot evaluate its {what} {_describe(function)} on a float64 CPU probe "
            f"({type(error).__name__}: {error}); register the class with register_experts"
        ) from None


def identify_activation(act_fn, path: str) -> str:
    """Which ``moe_experts`` activation ``act_fn`` computes, found by evaluating it."""
    probe = torch.linspace(-8.0, 8.0, 321, dtype=torch.float64, device="cpu")
    values = _on_probe(act_fn, probe, path, "activation")
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
    forward: Callable | None
    covers_children: bool = False
    # Other methods installed instead of (or with) ``forward``: a module its parent calls through
    # methods of its own (JetMoE's mixture of attention heads: ``map`` and ``reduce``).
    methods: dict[str, Callable] = dataclasses.field(default_factory=dict)

    def installed(self) -> dict[str, Callable]:
        """``{method name: function}`` that ``adapters_installed`` puts on the instance."""
        return {**({"forward": self.forward} if self.forward is not None else {}), **self.methods}


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


# HF's ``use_experts_implementation`` decorator records the layout on the instance. These must
# hold: moe_experts computes gated experts with no norm after them, over every expert id.
_HF_LAYOUT = {"has_gate": True, "has_post_expert_norm": False, "_is_expert_parallel": False}
# The per-expert biases moe_experts adds (to the gate/up product, to the down product).
_HF_BIASES = ("gate_up_proj_bias", "down_proj_bias")


def _numeric_settings(module: nn.Module) -> list[float]:
    """The positive numbers a module and its submodules hold as plain attributes (GPT-OSS's
    ``limit``, HunYuan-V4's ``swiglu_limit``, Inkling 2's ``act_fn.gate_softcap.softcap``): the
    candidates for the constants of a gate, so that a gate is recognised by what it computes,
    whatever its constants are called."""
    found = set()
    for submodule in module.modules():
        for value in vars(submodule).values():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"):
                found.add(float(value))
    return sorted(found)


def _gate_candidates(alpha, limit, constants: Sequence[float]) -> list[GatedActivation]:
    """Every gated activation a gate may compute, plain ones first: each elementwise activation
    as ``act(gate) * up``, then clamped at each constant, GPT-OSS's clamped SwiGLU where ``alpha``
    and ``limit`` are numbers, and the soft-capped SwiGLU with each ordered pair of constants."""
    candidates = [GatedActivation(name) for name in ACTIVATIONS]
    candidates += [GatedActivation(name, limit=c) for c in constants for name in ACTIVATIONS]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (alpha, limit)) and limit > 0:
        candidates.append(GatedActivation("clamped_swiglu", float(alpha), float(limit)))
    candidates += [GatedActivation("softcapped_swiglu", gate_softcap=g, up_softcap=u)
                   for g in constants for u in constants]
    return candidates


def identify_gated_activation(apply_gate, two_intermediate: int, path: str, alpha=None, limit=None,
                              constants: Sequence[float] = ()) -> str:
    """The ``moe_experts`` activation spec (``ops.moe.GatedActivation``) that ``apply_gate``
    computes from a ``[n, 2I]`` gate/up product, found by evaluating it on a float64 probe: each
    elementwise activation as ``act(gate) * up``; the same with both halves clamped at one of
    ``constants`` (``act(gate.clamp(max=L)) * up.clamp(-L, L)``: DeepSeek-V4, HunYuan-V4); where
    the module has a numeric ``alpha`` and ``limit``, ``clamped_swiglu``; and
    ``softcapped_swiglu`` with its two caps among ``constants`` (Inkling 2); each with gate/up
    columns concatenated and interleaved. The probe's rows come at several scales, the largest
    beyond twice every constant, so any clamp or cap among them bends some of its values.
    Anything else is refused rather than approximated.

    A gate that computes in float32 whatever its input (``act(gate.float()) * up.float()``, cast
    back: Beam's) rounds the probe's values to float32; its result is then compared at float32's
    precision (relative 2e-6), which still tells every candidate from every other."""
    constants = sorted({float(c) for c in constants} | ({float(limit)} if isinstance(limit, (int, float))
                                                         and not isinstance(limit, bool) and limit > 0 else set()))
    generator = torch.Generator().manual_seed(0)
    scales = sorted({6.0, *(2.0 * c for c in constants)})
    probe = torch.cat([torch.randn(16, two_intermediate, dtype=torch.float64, generator=generator) * scale
                       for scale in scales])
    values = _on_probe(apply_gate, probe, path, "gate")
    rtol, atol = 1e-8, 1e-9
    if (isinstance(values, torch.Tensor) and values.dtype == torch.float64
            and torch.equal(values, values.float().double())):
        rtol, atol = 2e-6, 1e-6  # the gate computed in float32
    tried = []
    for candidate in _gate_candidates(alpha, limit, constants):
        for layout in LAYOUTS:
            spec = dataclasses.replace(candidate, layout=layout)
            tried.append(str(spec))
            expected = spec(probe)
            if (isinstance(values, torch.Tensor) and values.shape == expected.shape
                    and torch.allclose(values, expected, rtol=rtol, atol=atol)):
                return str(spec)
    shown = ", ".join(tried[:2 * len(ACTIVATIONS)]) + (f", ... ({len(tried)} in all)" if len(tried) > 8 else "")
    raise AdapterError(
        f"{path}: its gate {_describe(apply_gate)} computes none of the moe_experts gated activations "
        f"({shown}; constants tried: {', '.join(f'{c:g}' for c in constants) or 'none'}); register the class with "
        f"register_experts")


def _hf_transposed(path: str, module: nn.Module, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether the experts are stored ``[E, H, 2I]`` / ``[E, I, H]`` (transposed) rather than
    ``[E, 2I, H]`` / ``[E, H, I]``: read from the shapes (they cannot fit both), and checked
    against the decorator's ``is_transposed`` where the instance has it."""
    experts, first, second = gate_up.shape
    plain = first % 2 == 0 and tuple(down.shape) == (experts, second, first // 2)
    transposed = second % 2 == 0 and tuple(down.shape) == (experts, second // 2, first)
    if not plain and not transposed:
        raise AdapterError(
            f"{path}: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are neither [E, 2I, H] "
            f"and [E, H, I] nor (transposed) [E, H, 2I] and [E, I, H]")
    recorded = getattr(module, "is_transposed", transposed)
    if recorded != transposed:
        raise AdapterError(
            f"{path}: {type(module).__name__}.is_transposed is {recorded!r}, but gate_up_proj {tuple(gate_up.shape)} "
            f"and down_proj {tuple(down.shape)} are stored {'transposed' if transposed else 'untransposed'}; "
            f"moe_experts takes the layout with is_transposed={transposed!r}; register the class with "
            f"register_experts")
    return transposed


def _hf_fused_experts(path: str, module: nn.Module) -> _Recognised:
    """HF fused experts: the layout is read from the parameters (transposed or not, biases), the
    gate from what ``_apply_gate`` (or ``act_fn``) computes; GPT-OSS's ``GptOssExperts`` (transposed
    ``[E, H, 2I]`` interleaved gate/up, per-expert biases, clamped SwiGLU) and Mixtral's alike."""
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
    transposed = _hf_transposed(path, module, gate_up, down)
    experts = gate_up.shape[0]
    two_intermediate, hidden = (gate_up.shape[2], gate_up.shape[1]) if transposed else gate_up.shape[1:]
    biases = {name: value for name, value in module.named_parameters(recurse=False) if name.endswith("_bias")}
    unknown = sorted(set(biases) - set(_HF_BIASES))
    if unknown:
        raise AdapterError(f"{path}: {type(module).__name__} has biases {unknown}; moe_experts adds only "
                           f"{' and '.join(_HF_BIASES)}; register the class with register_experts")
    for name, shape in zip(_HF_BIASES, ((experts, two_intermediate), (experts, hidden))):
        if name in biases and tuple(biases[name].shape) != shape:
            raise AdapterError(f"{path}: {name} {tuple(biases[name].shape)} is not [E, {'2I' if 'gate' in name else 'H'}]"
                               f" = {list(shape)}")
    if getattr(module, "has_bias", bool(biases)) != bool(biases):
        raise AdapterError(f"{path}: {type(module).__name__}.has_bias is {module.has_bias!r} but it holds "
                           f"{'biases ' + str(sorted(biases)) if biases else 'no bias parameters'}; register the class "
                           f"with register_experts")
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None and getattr(apply_gate, "__name__", "") != "_default_apply_gate":
        # The class's own gate (GPT-OSS: interleaved columns, clamped SwiGLU): found by what it computes.
        # GPT-OSS names the clamped SwiGLU's constants alpha and limit; MiniMax-M3 swiglu_alpha and
        # swiglu_limit.
        alpha = getattr(module, "alpha", getattr(module, "swiglu_alpha", None))
        limit = getattr(module, "limit", getattr(module, "swiglu_limit", None))
        activation = identify_gated_activation(module._apply_gate, two_intermediate, f"{path}._apply_gate", alpha, limit,
                                               _numeric_settings(module))
    else:
        if not hasattr(module, "act_fn"):
            raise AdapterError(f"{path}: fused experts without an act_fn; register the class with register_experts")
        activation = identify_activation(module.act_fn, f"{path}.act_fn")
    interleaved = GatedActivation.parse(activation).interleaved
    if getattr(module, "is_concatenated", not interleaved) == interleaved:
        raise AdapterError(
            f"{path}: {type(module).__name__}.is_concatenated is {module.is_concatenated!r}, but its gate reads the "
            f"gate/up columns {'interleaved' if interleaved else 'concatenated'} ({activation}); register the class "
            f"with register_experts")
    gate_up_bias, down_bias = (biases.get(name) is not None for name in _HF_BIASES)

    def forward(hidden_states, top_k_index, top_k_weights):
        # Transposed experts are handed to the op as views in its [E, 2I, H] / [E, H, I] layout: the
        # parameters keep their names and shapes, and the lowering reads them in place.
        w_gate_up = module.gate_up_proj.transpose(1, 2) if transposed else module.gate_up_proj
        w_down = module.down_proj.transpose(1, 2) if transposed else module.down_proj
        extra = ()
        if gate_up_bias or down_bias:
            extra = (module.gate_up_proj_bias if gate_up_bias else None, module.down_proj_bias if down_bias else None)
        return torch.ops.shardgraph.moe_experts(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype),
                                                w_gate_up, w_down, activation, *extra)

    return _Recognised("hf_fused_experts", forward)


def _hf_ungated_experts(path: str, module: nn.Module) -> _Recognised:
    """HF fused experts without a gate (``has_gate=False``, Nemotron-H's ``NemotronHExperts``):
    ``up_proj [E, I, H]`` and ``down_proj [E, H, I]``, expert ``e`` computing
    ``act(x up_proj[e]^T) down_proj[e]^T``, weighted by ``top_k_weights`` and summed: ``moe_experts``
    with the activation's ``layout=ungated`` and ``up_proj`` as ``w_gate_up`` (``I`` rows). Its
    own forward loops over the hit experts (``.item()``), which tracing cannot follow; it is run
    on a float64 copy and a probe routing that reaches every expert and must agree."""
    up, down = module.up_proj, module.down_proj
    count, intermediate, hidden = up.shape
    if tuple(down.shape) != (count, hidden, intermediate):
        raise AdapterError(f"{path}: up_proj {tuple(up.shape)} and down_proj {tuple(down.shape)} of ungated experts "
                           f"are not [E, I, H] and [E, H, I]; register the class with register_experts")
    for attribute, expected in (("is_transposed", False), ("has_bias", False), ("has_post_expert_norm", False),
                                ("_is_expert_parallel", False)):
        if getattr(module, attribute, expected) != expected:
            raise AdapterError(f"{path}: {type(module).__name__}.{attribute} is {getattr(module, attribute)!r}; "
                               f"moe_experts takes ungated experts with {attribute}={expected!r}; register the class "
                               f"with register_experts")
    biases = sorted(name for name, _ in module.named_parameters(recurse=False) if name.endswith("bias"))
    if biases:
        raise AdapterError(f"{path}: ungated experts with biases {biases}; register the class with register_experts")
    if _positional_arity(module.forward) not in (None, 3):
        raise AdapterError(f"{path}: {type(module).__name__}.forward does not take (hidden_states, top_k_index, "
                           f"top_k_weights); register the class with register_experts")
    if not hasattr(module, "act_fn"):
        raise AdapterError(f"{path}: ungated experts without an act_fn; register the class with register_experts")
    activation = str(GatedActivation(identify_activation(module.act_fn, f"{path}.act_fn"), layout=UNGATED))

    def make_forward(experts: nn.Module):
        def forward(hidden_states, top_k_index, top_k_weights):
            return torch.ops.shardgraph.moe_experts(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype),
                                                    experts.up_proj, experts.down_proj, activation)
        return forward

    _verify_routed_experts(path, module, make_forward, hidden, count,
                           f"act(x up_proj[e]^T) down_proj[e]^T with act {activation}")
    return _Recognised("hf_ungated_experts", make_forward(module))


# ----------------------------------------------------------------------------- blocks checked by their own forward
# The adapters below compute a block's forward in another order than the block does (routing
# written out, weights read through views). Each is accepted only once the block's own forward,
# run eagerly on a float64 copy and a probe, agrees with it; one verification per kind of block.
_VERIFIED: dict[tuple, bool] = {}


def _settings_key(*holders) -> tuple:
    """Scalar attributes of ``holders`` (and their configs): blocks that agree on them compute alike."""
    items = []
    for holder in holders:
        for owner in (holder, getattr(holder, "config", None)):
            if owner is not None:
                items += [(type(owner).__name__, name, value) for name, value in vars(owner).items()
                          if isinstance(value, (bool, int, float, str, type(None)))]
    return tuple(sorted(items, key=repr))


def _verify_own_forward(path: str, block: nn.Module, make_forward: Callable[[nn.Module], Callable], probe_shape,
                        what: str) -> None:
    """Refuse ``block`` unless ``make_forward(copy)(probe)`` equals the class's own forward on a
    float64 copy (outputs compared leaf by leaf)."""
    key = (type(block), tuple((n, tuple(p.shape)) for n, p in block.named_parameters()), _settings_key(block),
           tuple(probe_shape))
    if key in _VERIFIED:
        return
    twin = _verification_copy(block)
    probe = torch.randn(*probe_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        try:
            expected = type(twin).forward(twin, probe)
        except Exception as error:  # noqa: BLE001 - a forward that cannot run on a probe is not recognised
            raise AdapterError(f"{path}: {type(block).__name__} looks like {what} but its forward cannot run on a "
                               f"probe {list(probe_shape)} ({type(error).__name__}: {error}); register the class "
                               f"with register_experts") from None
        result = make_forward(twin)(probe)
    expected_leaves = expected if isinstance(expected, (tuple, list)) else (expected,)
    result_leaves = result if isinstance(result, (tuple, list)) else (result,)
    same = len(expected_leaves) == len(result_leaves) and all(
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
        and torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(expected_leaves, result_leaves))
    if not same:
        raise AdapterError(f"{path}: {type(block).__name__} looks like {what} but its own forward does not compute "
                           f"what shardgraph would trace for it (checked on a float64 probe); register the class "
                           f"with register_experts")
    _VERIFIED[key] = True


def _is_llama4_block(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    return (isinstance(experts, nn.Module) and callable(getattr(module, "router", None))
            and _parameter(experts, "gate_up_proj", 3) is not None and _parameter(experts, "down_proj", 3) is not None
            and _positional_arity(experts.forward) == 1)


def _llama4_block(path: str, block: nn.Module) -> _Recognised:
    """Llama 4's MoE block (``Llama4TextMoe``): experts ``gate_up_proj [E, H, 2I]`` and
    ``down_proj [E, I, H]`` (``x @ gate_up_proj[e]``, the transposes of moe_experts' operands), a
    router returning ``(scores [T, E], logits [T, E])`` with ``scores = sigmoid`` of the top-k
    logits and 0 elsewhere, and a shared expert. The block multiplies each expert's *input* by
    its score: ``sum_e expert_e(x * score_e)`` (an expert of a zero input is zero). Scaling a
    gated MLP's input is not scaling its output, so each (token, slot) becomes its own row
    ``x * score`` with weight 1: ``moe_experts`` then computes exactly the block's sum."""
    experts = block.experts
    gate_up, down = experts.gate_up_proj, experts.down_proj
    count, hidden, two_intermediate = gate_up.shape
    if two_intermediate % 2 or tuple(down.shape) != (count, two_intermediate // 2, hidden):
        raise AdapterError(f"{path}.experts: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} "
                           f"are not [E, H, 2I] and [E, I, H]")
    top_k = getattr(block, "top_k", None) or getattr(block.router, "top_k", None)
    if not isinstance(top_k, int) or not 0 < top_k <= count:
        raise AdapterError(f"{path}: {type(block).__name__} has no top_k between 1 and {count}")
    if not hasattr(experts, "act_fn"):
        raise AdapterError(f"{path}.experts: no act_fn; register the block with register_experts")
    activation = identify_activation(experts.act_fn, f"{path}.experts.act_fn")

    def make_forward(module: nn.Module):
        def forward(hidden_states, *args, **kwargs):
            tokens = hidden_states.reshape(-1, hidden)
            scores, logits = module.router(tokens)
            ids = torch.topk(logits, top_k, dim=1).indices  # the router's own choice
            chosen = scores.gather(1, ids).to(tokens.dtype)
            rows = (tokens.unsqueeze(1) * chosen.unsqueeze(-1)).reshape(-1, hidden)  # one per (token, slot)
            ones = torch.ones_like(chosen).reshape(-1, 1)
            # Contiguous operands: the lowered kernels return contiguous weight gradients, and
            # the graph's views of them were traced with the strides the operands had.
            out = torch.ops.shardgraph.moe_experts(rows, ids.reshape(-1, 1), ones,
                                                   module.experts.gate_up_proj.transpose(1, 2).contiguous(),
                                                   module.experts.down_proj.transpose(1, 2).contiguous(), activation)
            out = out.reshape(-1, top_k, hidden).sum(dim=1)
            shared = getattr(module, "shared_expert", None)
            if shared is not None:
                out = shared(tokens) + out
            return out, logits
        return forward

    _verify_own_forward(path, block, make_forward, (2, 6, hidden), "a Llama 4 MoE block (router, experts "
                        "[E, H, 2I] / [E, I, H], routing scores applied to the expert inputs)")
    return _Recognised("llama4_moe_block", make_forward(block), covers_children=True)


def _flat_expert_mlp(module: nn.Module) -> nn.Module | None:
    """DBRX's layout: ``mlp`` (or the module itself) holding 2-d ``w1``, ``v1``, ``w2`` of one shape
    ``[E * I, H]``, the experts' gate, up and (transposed) down stacked along dim 0."""
    for holder in (getattr(module, "mlp", None), module):
        if isinstance(holder, nn.Module):
            weights = [_parameter(holder, name, 2) for name in ("w1", "v1", "w2")]
            if all(w is not None for w in weights) and len({tuple(w.shape) for w in weights}) == 1:
                return holder
    return None


def _flat_experts(path: str, module: nn.Module) -> _Recognised:
    """DBRX's experts (``DbrxExperts``): ``forward(hidden_states, top_k_index, top_k_weights)``
    over ``w1``, ``v1``, ``w2`` stored ``[E * I, H]``; expert ``e`` computes
    ``act(x w1[e]^T) * (x v1[e]^T) @ w2[e]`` with ``w[e]`` the ``[I, H]`` rows ``e*I .. (e+1)*I-1``.
    moe_experts reads views: ``cat([w1.view(E, I, H), v1.view(E, I, H)], 1)`` and
    ``w2.view(E, I, H).transpose(1, 2)``; the plan holds the stored parameters split by whole
    experts over ep (``passes/plan.py``, stored layouts)."""
    mlp = _flat_expert_mlp(module)
    rows, hidden = mlp.w1.shape
    count = next((getattr(holder, name) for holder in (module, mlp) for name in ("num_experts", "moe_num_experts")
                  if isinstance(getattr(holder, name, None), int)), None)
    if count is None or count <= 0 or rows % count:
        raise AdapterError(f"{path}: w1/v1/w2 {tuple(mlp.w1.shape)} store experts flattened, but the module names no "
                           f"number of experts (num_experts) that divides {rows}")
    intermediate = rows // count
    act_fn = next((getattr(mlp, n) for n in ("activation_fn", *_ACTIVATION_NAMES) if callable(getattr(mlp, n, None))),
                  None)
    if act_fn is None:
        raise AdapterError(f"{path}: flattened experts without an activation; register the class with register_experts")
    activation = identify_activation(act_fn, f"{path}.activation")

    def make_forward(experts: nn.Module):
        weights = _flat_expert_mlp(experts)

        def forward(hidden_states, top_k_index, top_k_weights):
            tokens = hidden_states.reshape(-1, hidden)
            shape = (count, intermediate, hidden)
            gate_up = torch.cat([weights.w1.view(shape), weights.v1.view(shape)], dim=1)
            down = weights.w2.view(shape).transpose(1, 2).contiguous()  # as in the Llama 4 block
            out = torch.ops.shardgraph.moe_experts(tokens, top_k_index, top_k_weights.to(tokens.dtype), gate_up,
                                                   down, activation)
            return out.view(*hidden_states.shape[:-1], hidden) if hidden_states.dim() > 1 else out
        return forward

    _verify_routed_experts(path, module, make_forward, hidden, count, "act(x w1[e]^T) * (x v1[e]^T) @ w2[e] with "
                           "w1/v1/w2 stored flattened [E * I, H]", probe_shape=(1, 6))
    return _Recognised("flat_experts", make_forward(module), covers_children=True)


def _verify_routed_experts(path: str, module: nn.Module, make_forward, hidden: int, count: int, what: str,
                           probe_shape: tuple[int, ...] = (6,)) -> None:
    """Experts of ``forward(hidden_states, top_k_index, top_k_weights)``: the module's own forward
    against the adapter's, on a float64 copy with a fixed routing that reaches every expert (6 tokens,
    ``probe_shape`` their leading dims)."""
    key = (type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters()), _settings_key(module))
    if key in _VERIFIED:
        return
    twin = _verification_copy(module)
    ids = torch.arange(12).remainder(count).reshape(6, 2) if count > 1 else torch.zeros(6, 1, dtype=torch.long)
    weights = torch.rand(ids.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    probe = torch.randn(*probe_shape, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        try:
            expected = type(twin).forward(twin, probe, ids, weights)
        except Exception as error:  # noqa: BLE001 - a forward that cannot run on a probe is not recognised
            raise AdapterError(f"{path}: {type(module).__name__} looks like experts computing {what} but its forward "
                               f"cannot run on a probe ({type(error).__name__}: {error}); register the class with "
                               f"register_experts") from None
        result = make_forward(twin)(probe, ids, weights)
    if not (isinstance(expected, torch.Tensor) and expected.shape == result.shape
            and torch.allclose(expected, result, rtol=1e-9, atol=1e-12)):
        raise AdapterError(f"{path}: {type(module).__name__} does not compute {what} weighted by top_k_weights "
                           f"(checked on a float64 probe); register the class with register_experts")
    _VERIFIED[key] = True


def _parallel_weight(module: nn.Module, name: str) -> torch.Tensor | None:
    child = getattr(module, name, None)
    return _parameter(child, "weight", 3) if isinstance(child, nn.Module) else None


def _is_parallel_experts_block(module: nn.Module) -> bool:
    """JetMoE's layout: a ``router`` with a ``layer`` Linear, and ``input_linear`` /
    ``output_linear`` modules holding 3-d ``weight`` ``[E, out, in]``."""
    router = getattr(module, "router", None)
    return (isinstance(router, nn.Module) and isinstance(getattr(router, "layer", None), nn.Linear)
            and _parallel_weight(module, "input_linear") is not None
            and _parallel_weight(module, "output_linear") is not None)


def _is_map_reduce(module: nn.Module) -> bool:
    """Routed projections called in two halves, ``map`` (project, route) and ``reduce`` (project,
    weight, sum), with something else (attention) between them."""
    return callable(getattr(module, "map", None)) and callable(getattr(module, "reduce", None))


def _parallel_top_k(path: str, block: nn.Module, count: int) -> int:
    router = block.router
    top_k = getattr(router, "top_k", None)
    if not isinstance(top_k, int) or not 0 < top_k <= count or router.layer.out_features != count:
        raise AdapterError(f"{path}.router: expected a Linear to {count} logits and a top_k between 1 and {count}")
    return top_k


def _parallel_routing(module: nn.Module, tokens: torch.Tensor, top_k: int):
    """JetMoE's ``TopKGating`` written out without its sort and ``expert_size.tolist()``: the
    float32 logits, their ``topk``, ``softmax`` over the chosen ones in the tokens' dtype."""
    logits = module.router.layer(tokens).float()
    top_logits, ids = logits.topk(top_k, dim=1)
    return logits, ids, torch.softmax(top_logits, dim=1).type_as(tokens)


def _parallel_bias(path: str, block: nn.Module, hidden: int) -> None:
    bias = getattr(block, "bias", None)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (hidden,)):
        raise AdapterError(f"{path}: a bias of shape {tuple(bias.shape)} is not [hidden={hidden}]")


def _with_bias(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    return out + module.bias if getattr(module, "bias", None) is not None else out


def _mixture_of_attention_heads(path: str, block: nn.Module) -> _Recognised:
    """JetMoE's mixture of attention heads (``JetMoeMoA``): per-expert query projections
    ``input_linear.weight [E, Q, H]`` routed before attention and output projections
    ``output_linear.weight [E, H, Q]`` after it, called by the attention as two methods:

    * ``map(x [.., H]) -> (queries [.., k, Q], router_logits, topo_info)``: query ``j`` of a token
      is ``x @ input_linear.weight[ids[j]]^T``;
    * ``reduce(y [.., k, Q], topo_info) -> [.., H]``: ``sum_j gates[j] * y[j] @
      output_linear.weight[ids[j]]^T + bias``.

    Its router is the MoE MLP's (``topk`` of the float32 logits, ``softmax`` over the chosen),
    and the module's own methods sort the copies by expert and read the group sizes, which a
    static graph cannot follow; both halves are traced as ``routed_linear`` (every expert's
    product, the routed ones gathered: ``E / k`` times the routed FLOPs) with the routing written
    out, and ``topo_info`` becomes ``(ids, gates)``, which only ``reduce`` reads. The module's own
    ``map`` and ``reduce``, run on a float64 copy, must agree (queries, logits and output). The
    weights are not split over ep or tp: they stay whole on every rank."""
    queries, hidden = block.input_linear.weight.shape[1:]
    count = block.input_linear.weight.shape[0]
    if tuple(block.output_linear.weight.shape) != (count, hidden, queries):
        raise AdapterError(f"{path}: input_linear {tuple(block.input_linear.weight.shape)} and output_linear "
                           f"{tuple(block.output_linear.weight.shape)} are not [E, Q, H] and [E, H, Q]")
    top_k = _parallel_top_k(path, block, count)
    _parallel_bias(path, block, hidden)

    def make_methods(module: nn.Module) -> dict[str, Callable]:
        def map(layer_input, *args, **kwargs):  # noqa: A001 - the module's own method name
            tokens = layer_input.reshape(-1, hidden)
            logits, ids, gates = _parallel_routing(module, tokens, top_k)
            projected = routed_linear(tokens, ids, module.input_linear.weight)
            return projected.view(*layer_input.shape[:-1], top_k, queries), logits, (ids, gates)

        def reduce(layer_input, topo_info, *args, **kwargs):
            ids, gates = topo_info
            copies = layer_input.reshape(-1, top_k, queries)
            out = routed_linear_sum(copies, ids, gates, module.output_linear.weight)
            return _with_bias(module, out.view(*layer_input.shape[:-2], hidden))

        return {"map": map, "reduce": reduce}

    _verify_map_reduce(path, block, make_methods, (2, 6, hidden), top_k, queries)
    return _Recognised("mixture_of_attention_heads", None, covers_children=True, methods=make_methods(block))


def _verify_map_reduce(path: str, block: nn.Module, make_methods, probe_shape, top_k: int, queries: int) -> None:
    """Refuse ``block`` unless the adapter's ``map`` and ``reduce`` agree with the class's own on a
    float64 copy: the queries and logits of ``map`` on a probe, and ``reduce`` of one random
    ``[.., k, Q]`` input, each half given the routing information its own ``map`` returned."""
    what = ("a mixture of attention heads (router.layer, input_linear [E, Q, H] before attention, output_linear "
            "[E, H, Q] after it, through map/reduce)")
    key = ("map_reduce", type(block), tuple((n, tuple(p.shape)) for n, p in block.named_parameters()),
           _settings_key(block), tuple(probe_shape))
    if key in _VERIFIED:
        return
    twin = _verification_copy(block)
    with torch.no_grad():
        # Fresh weights: JetMoE leaves its expert weights uninitialised (torch.empty) and zeroes the
        # output bias, which would hide whether it is added; the computation is what is checked.
        generator = torch.Generator().manual_seed(4)
        for parameter in twin.parameters():
            parameter.copy_(torch.randn(parameter.shape, dtype=parameter.dtype, generator=generator) * 0.3)
    probe = torch.randn(*probe_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    attended = torch.randn(*probe_shape[:-1], top_k, queries, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        try:
            own_queries, own_logits, own_topo = type(twin).map(twin, probe)
            own_out = type(twin).reduce(twin, attended, own_topo)
        except Exception as error:  # noqa: BLE001 - methods that cannot run on a probe are not recognised
            raise AdapterError(f"{path}: {type(block).__name__} looks like {what} but its own map/reduce cannot run "
                               f"on a probe {list(probe_shape)} ({type(error).__name__}: {error}); register the "
                               f"class with register_experts") from None
        methods = make_methods(twin)
        queries_out, logits_out, topo = methods["map"](probe)
        out = methods["reduce"](attended, topo)
    pairs = (("map's queries", own_queries, queries_out), ("map's router logits", own_logits, logits_out),
             ("reduce", own_out, out))
    for name, expected, result in pairs:
        if not (isinstance(expected, torch.Tensor) and expected.shape == result.shape
                and torch.allclose(expected, result, rtol=1e-9, atol=1e-12)):
            raise AdapterError(f"{path}: {type(block).__name__} looks like {what} but its own {name} differs from "
                               f"what shardgraph would trace for it (checked on a float64 probe); register the "
                               f"class with register_experts")
    _VERIFIED[key] = True


def _parallel_experts_block(path: str, block: nn.Module) -> _Recognised:
    """JetMoE's MoE MLP (``JetMoeMoE``): ``input_linear.weight [E, 2I, H]`` (gate rows, then up
    rows: ``chunk(2)`` of the product), ``output_linear.weight [E, H, I]``, the router
    ``topk`` of the float32 logits, ``softmax`` over the chosen ones, and a bias ``[H]`` added to
    the block's output. Its mixture-of-attention-heads twin (``JetMoeMoA``: the same weights
    around attention, called through ``map`` / ``reduce``) is ``_mixture_of_attention_heads``."""
    gate_up, down = block.input_linear.weight, block.output_linear.weight
    count, two_intermediate, hidden = gate_up.shape
    if two_intermediate % 2 or tuple(down.shape) != (count, hidden, two_intermediate // 2):
        raise AdapterError(f"{path}: input_linear {tuple(gate_up.shape)} and output_linear {tuple(down.shape)} are not "
                           f"[E, 2I, H] and [E, H, I]")
    top_k = _parallel_top_k(path, block, count)
    act_fn = next((getattr(block, n) for n in _ACTIVATION_NAMES if callable(getattr(block, n, None))), None)
    if act_fn is None:
        raise AdapterError(f"{path}: no activation; register the class with register_experts")
    activation = identify_activation(act_fn, f"{path}.activation")
    _parallel_bias(path, block, hidden)

    def make_forward(module: nn.Module):
        def forward(layer_input, *args, **kwargs):
            tokens = layer_input.reshape(-1, hidden)
            _, ids, gates = _parallel_routing(module, tokens, top_k)
            out = torch.ops.shardgraph.moe_experts(tokens, ids, gates, module.input_linear.weight,
                                                   module.output_linear.weight, activation)
            return _with_bias(module, out.view(*layer_input.shape[:-1], hidden))
        return forward

    _verify_own_forward(path, block, make_forward, (2, 6, hidden), "a JetMoE MoE block (router.layer, input_linear "
                        "[E, 2I, H], output_linear [E, H, I])")
    return _Recognised("parallel_experts_block", make_forward(block), covers_children=True)


# ----------------------------------------------------------------------------- per-expert MLP modules
# Linear layer names of one expert MLP: (gate, up, down).
_MLP_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
# Where blocks keep their router (a Linear from hidden to one logit per expert), the number of
# experts a token goes to, and the always-on shared experts.
_ROUTER_NAMES = ("gate", "router", "gating", "wg", "gate_layer")
_TOP_K_NAMES = ("top_k", "num_experts_per_tok", "topk", "num_selected_experts", "k")
_SHARED_NAMES = ("shared_experts", "shared_expert")
_ACTIVATION_NAMES = ("act_fn", "act", "activation", "activation_fn", "act_func")


def _mlp_linears(expert: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
    for names in _MLP_NAMES:
        layers = [getattr(expert, name, None) for name in names]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            return tuple(layers)
    return None


def _is_expert_list(experts) -> bool:
    """An ``nn.ModuleList`` of MLP modules with gate/up/down (or w1/w3/w2) Linear layers: the
    shape of a per-expert block, whether or not it turns out to be recognised."""
    return (isinstance(experts, nn.ModuleList) and len(experts) > 0
            and all(_mlp_linears(expert) is not None for expert in experts))


def _expert_weights(expert: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gate, up, down = _mlp_linears(expert)
    return gate.weight, up.weight, down.weight


def _check_expert_list(path: str, experts: nn.ModuleList) -> tuple[int, int]:
    """(hidden, intermediate) shared by every expert; refuses what moe_experts cannot hold."""
    classes = {type(expert) for expert in experts}
    if len(classes) != 1:
        raise AdapterError(f"{path}: the experts are of several classes {sorted(c.__name__ for c in classes)}; "
                           f"moe_experts stacks identical experts")
    gate, up, down = _mlp_linears(experts[0])
    hidden, intermediate = gate.in_features, gate.out_features
    for index, expert in enumerate(experts):
        layers = _mlp_linears(expert)
        with_bias = [f"{path}.{index}.{name}" for name, layer in zip(("gate", "up", "down"), layers)
                     if layer.bias is not None]
        if with_bias:
            raise AdapterError(f"{path}: expert Linear layers with a bias ({', '.join(with_bias)}) have no place "
                               f"in moe_experts")
        shapes = [tuple(layer.weight.shape) for layer in layers]
        if shapes != [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]:
            raise AdapterError(f"{path}.{index}: gate/up/down weights {shapes} are not [I, H], [I, H], [H, I] "
                               f"with the I={intermediate}, H={hidden} of expert 0")
        if len({layer.weight.dtype for layer in layers}) != 1:
            raise AdapterError(f"{path}.{index}: gate/up/down weights have different dtypes")
    return hidden, intermediate


def _mlp_activation(path: str, expert: nn.Module) -> str:
    """The activation one expert applies to its gate, found by what its forward computes:
    ``down(act(gate(x)) * up(x))`` is checked against every moe_experts activation on a probe."""
    gate, up, down = _expert_weights(expert)
    hidden = gate.shape[1]
    probe = torch.randn(5, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            result = expert(probe)
        except Exception as error:  # noqa: BLE001 - any failure means the expert cannot be identified
            raise AdapterError(f"{path}: cannot run expert 0 ({type(expert).__name__}) on a probe "
                               f"({type(error).__name__}: {error})") from None
        for name in ACTIVATIONS:
            expected = F.linear(activation_function(name)(F.linear(probe, gate)) * F.linear(probe, up), down)
            if isinstance(result, torch.Tensor) and result.shape == expected.shape and torch.allclose(
                    result, expected, rtol=1e-9, atol=1e-12):
                return name
    act = next((getattr(expert, n) for n in _ACTIVATION_NAMES if callable(getattr(expert, n, None))), None)
    what = f" (its activation is {_describe(act)})" if act is not None else ""
    raise AdapterError(f"{path}: expert 0 ({type(expert).__name__}) does not compute down(act(gate(x)) * up(x)) "
                       f"with act one of {', '.join(ACTIVATIONS)}{what}")


def _router_of(block: nn.Module, experts: int) -> tuple[str, nn.Linear] | None:
    for name in _ROUTER_NAMES:
        router = getattr(block, name, None)
        if isinstance(router, nn.Linear) and router.out_features == experts:
            return name, router
    linears = [(name, child) for name, child in block.named_children()
               if isinstance(child, nn.Linear) and child.out_features == experts]
    return linears[0] if len(linears) == 1 else None


def _top_k_candidates(block: nn.Module, experts: int) -> list[int]:
    for holder in (block, getattr(block, "config", None)):
        for name in _TOP_K_NAMES:
            value = getattr(holder, name, None) if holder is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= experts:
                return [value]
    return list(range(1, min(experts, 8) + 1))


def _routing(kind: str, logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) of one routing convention; scores are computed in float32 and cast back, as
    routers in the wild do (identical in float32)."""
    scores = logits.float()
    if kind.startswith("topk_softmax"):  # choose on logits, softmax over the chosen ones
        chosen, ids = torch.topk(scores, top_k, dim=-1)
        return chosen.softmax(dim=-1).to(logits.dtype), ids
    probabilities = scores.softmax(dim=-1) if kind.startswith("softmax") else scores.sigmoid()
    weights, ids = torch.topk(probabilities, top_k, dim=-1)
    if kind.endswith("_renormalised"):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


_ROUTINGS = ("softmax_topk", "softmax_topk_renormalised", "topk_softmax", "sigmoid_topk", "sigmoid_topk_renormalised")


@dataclass(frozen=True)
class _ListRouting:
    """What the block's own forward was found to compute."""

    routing: str
    top_k: int
    activation: str
    returns_logits: bool  # the forward returns (output, router_logits)


# (block class, expert class, experts, gate shape, router name, shared, settings) -> _ListRouting.
# Found once per kind of block: the layers of one model share it.
_LIST_ROUTINGS: dict[tuple, _ListRouting] = {}


def _stacked_weights(experts: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_experts' ``[E, 2I, H]`` and ``[E, H, I]`` operands, built in the graph from the
    per-expert weights: the parameters stay the experts' own Linear weights (autograd carries
    each gradient back through the stack to its own name), and a per-expert piece placed on
    the expert view stacks into the layout moe_experts is lowered with."""
    weights = [_expert_weights(expert) for expert in experts]
    gates = torch.stack([gate for gate, _, _ in weights])
    ups = torch.stack([up for _, up, _ in weights])
    downs = torch.stack([down for _, _, down in weights])
    # Gate rows then up rows of every expert, as the w1/w3 concatenation.
    return torch.cat([gates, ups], dim=1), downs


def _list_forward(block: nn.Module, experts: nn.ModuleList, router: nn.Linear, shared, found: _ListRouting):
    def forward(hidden_states, *args, **kwargs):
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])
        logits = router(tokens)
        weights, ids = _routing(found.routing, logits, found.top_k)
        gate_up, down = _stacked_weights(experts)
        out = torch.ops.shardgraph.moe_experts(tokens, ids, weights.to(tokens.dtype), gate_up, down, found.activation)
        if shared is not None:
            out = out + shared(tokens)
        out = out.reshape(shape)
        return (out, logits) if found.returns_logits else out

    return forward


def _verification_copy(block: nn.Module) -> nn.Module:
    """A float64 CPU copy of ``block`` to run its own forward on; a block on the meta device gets
    random weights (what is checked is the computation, not the values)."""
    if any(t.is_meta for t in [*block.parameters(), *block.buffers()]):
        twin = copy.deepcopy(block).to_empty(device="cpu")
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in twin.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        return twin.double()
    return copy.deepcopy(block).to(device="cpu", dtype=torch.float64)


def _find_list_routing(path: str, block: nn.Module, router_name: str, shared_name: str | None) -> _ListRouting:
    """Run the block's own forward (its class's, eagerly, on a float64 copy) and find the routing
    convention and top-k that reproduce it with moe_experts; refuse when none does."""
    twin = _verification_copy(block)
    experts, router = twin.experts, getattr(twin, router_name)
    shared = getattr(twin, shared_name) if shared_name else None
    hidden = router.in_features
    activation = _mlp_activation(f"{path}.experts.0", experts[0])
    probe = torch.randn(2, 6, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        try:
            expected = type(twin).forward(twin, probe)
        except Exception as error:  # noqa: BLE001 - a forward that cannot run on a probe is not recognised
            raise AdapterError(f"{path}: {type(block).__name__} holds per-expert MLP modules but its forward cannot "
                               f"run on a [batch, seq, hidden] probe ({type(error).__name__}: {error}); its experts "
                               f"are not recognised and would not be expert-sharded: register the class with "
                               f"register_experts") from None
        returns_logits = isinstance(expected, (tuple, list))
        target = expected[0] if returns_logits else expected
        tried = []
        for top_k in _top_k_candidates(block, len(experts)):
            for routing in _ROUTINGS:
                found = _ListRouting(routing, top_k, activation, returns_logits)
                result = _list_forward(twin, experts, router, shared, found)(probe)
                result = result[0] if returns_logits else result
                tried.append(f"{routing} k={top_k}")
                if (isinstance(target, torch.Tensor) and target.shape == result.shape
                        and torch.allclose(result, target, rtol=1e-5, atol=1e-7)):
                    return found
    raise AdapterError(
        f"{path}: {type(block).__name__} holds per-expert MLP modules (experts: {len(experts)} x "
        f"{type(experts[0]).__name__}) but no routing shardgraph knows reproduces its forward (tried router "
        f"{router_name!r} with {', '.join(tried[:6])}{' ...' if len(tried) > 6 else ''}"
        f"{', plus ' + shared_name if shared_name else ''}); its experts are not recognised and would not be "
        f"expert-sharded: register the class with register_experts")


def _module_list_block(path: str, block: nn.Module) -> _Recognised:
    """A block whose ``experts`` are an ``nn.ModuleList`` of MLP modules and whose forward routes
    tokens with a Python loop over the experts (``(topk_ids == i).nonzero()``, ``index_add_``),
    which one static graph cannot follow. The block is traced as
    ``router(tokens)`` -> routing -> ``moe_experts`` on the stacked expert weights (+ shared experts).

    Which routing (softmax or sigmoid, top-k, renormalised or not) and activation the block
    computes is not read from its source: its own forward is run on a float64 copy and a probe
    batch and compared with each convention, and only an exact match is recognised. Anything
    else is refused, naming the block, so per-expert modules are never silently replicated."""
    experts = block.experts
    _check_expert_list(f"{path}.experts", experts)
    found_router = _router_of(block, len(experts))
    if found_router is None:
        raise AdapterError(
            f"{path}: {type(block).__name__} holds {len(experts)} per-expert MLP modules but no router (an "
            f"nn.Linear to {len(experts)} logits named {'/'.join(_ROUTER_NAMES)}); its experts are not recognised "
            f"and would not be expert-sharded: register the class with register_experts")
    router_name, router = found_router
    if router.bias is not None:
        raise AdapterError(f"{path}.{router_name}: a router with a bias is not a routing shardgraph knows; register "
                           f"the class with register_experts")
    shared_name = next((n for n in _SHARED_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
    gate = _expert_weights(experts[0])[0]
    # Blocks of one class and the same settings (top_k, norm_topk_prob, ...) compute the same
    # routing: their scalar attributes, and their config's, are part of the key.
    settings = tuple(sorted((name, value) for holder in (block, getattr(block, "config", None)) if holder is not None
                            for name, value in vars(holder).items()
                            if isinstance(value, (bool, int, float, str, type(None)))))
    key = (type(block), type(experts[0]), len(experts), tuple(gate.shape), router_name, shared_name, settings)
    if key not in _LIST_ROUTINGS:
        _LIST_ROUTINGS[key] = _find_list_routing(path, block, router_name, shared_name)
    shared = getattr(block, shared_name) if shared_name else None
    return _Recognised("module_list_experts", _list_forward(block, experts, router, shared, _LIST_ROUTINGS[key]),
                       covers_children=True)


def _recognise(path: str, module: nn.Module) -> _Recognised | None:
    for cls in type(module).__mro__:
        if cls in _REGISTERED:
            user_adapter = _REGISTERED[cls]
            return _Recognised(f"registered:{cls.__qualname__}",
                               lambda *args, **kwargs: user_adapter(module, *args, **kwargs), covers_children=True)
    if _is_llama4_block(module):
        return _llama4_block(path, module)
    if _is_parallel_experts_block(module):
        if _is_map_reduce(module):
            return _mixture_of_attention_heads(path, module)
        return _parallel_experts_block(path, module)
    if _flat_expert_mlp(module) is not None and _positional_arity(module.forward) == 3:
        return _flat_experts(path, module)
    experts = getattr(module, "experts", None)
    if (isinstance(experts, nn.Module) and hasattr(module, "router") and _has_grouped_weights(experts)
            and _positional_arity(experts.forward) == 2):
        # Experts that take (tokens grouped by expert, counts): the block is where routing is visible.
        return _titan_block(path, module)
    if _parameter(module, "gate_up_proj", 3) is not None and _parameter(module, "down_proj", 3) is not None:
        return _hf_fused_experts(path, module)
    if (getattr(module, "has_gate", True) is False and _parameter(module, "up_proj", 3) is not None
            and _parameter(module, "down_proj", 3) is not None):
        return _hf_ungated_experts(path, module)
    if _has_grouped_weights(module):
        return _grouped_experts(path, module)
    if _is_expert_list(getattr(module, "experts", None)):
        return _module_list_block(path, module)
    return None


def adapter_for(path: str, module: nn.Module) -> tuple[str, Callable | None] | None:
    """``(kind, forward)`` that ``trace`` would install on ``module``, or None; ``forward`` is None
    for a module adapted through other methods (``adapter_methods_for``)."""
    recognised = _recognise(path, module)
    return None if recognised is None else (recognised.kind, recognised.forward)


def adapter_methods_for(path: str, module: nn.Module) -> tuple[str, dict[str, Callable]] | None:
    """``(kind, {method name: function})`` that ``trace`` would install on ``module``, or None."""
    recognised = _recognise(path, module)
    return None if recognised is None else (recognised.kind, recognised.installed())


@contextlib.contextmanager
def adapters_installed(model: nn.Module) -> Iterator[dict[str, str]]:
    """Give every recognised expert module its adapter as forward (or as the methods its parent
    calls, JetMoE's ``map`` / ``reduce``); yield ``{path: kind}``.

    Everything is checked before any module is touched, so a refused module leaves the model
    as it was; on exit each instance's own attributes of those names are restored (or removed).
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
            for name, function in recognised.installed().items():
                patched.append((module, name, name in module.__dict__, module.__dict__.get(name)))
                setattr(module, name, function)
        yield {path or "<root>": recognised.kind for path, _, recognised in plan}
    finally:
        for module, name, had_own, previous in reversed(patched):
            if had_own:
                setattr(module, name, previous)
            else:
                delattr(module, name)
