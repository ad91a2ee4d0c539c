"""Module adapters: recognise the routed-expert blocks of real models without editing them.

An adapter is a function ``adapter(module, *args, **kwargs) -> Tensor`` that computes the
module's forward with ``torch.ops.shardgraph.moe_experts``. During tracing each matching
module's ``forward`` is replaced on the instance, and restored afterwards; parameters are read
from the module itself, so their names (and a plan written against them) are unchanged.

Built in:

* HF transformers fused experts (transformers 5.x Mixtral, Qwen2-MoE, Qwen3-MoE, ...): a module
  with 3-d ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` parameters, an ``act_fn``, and
  ``forward(hidden_states, top_k_index, top_k_weights)``. HF computes
  ``linear(x, gate_up_proj[e]).chunk(2, dim=-1)`` as (gate, up): the op's layout.
* torchtitan-style ``GroupedExperts`` with ``w1 [E, I, H]`` (gate), ``w3 [E, I, H]`` (up) and
  ``w2 [E, H, I]`` (down) whose forward takes ``(x, topk_ids, topk_weights)``: the fused weight is
  ``cat([w1, w3], dim=1)``, an ordinary aten op in the graph.

``register_experts(module_class, adapter)`` adds a user's own expert module.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

__all__ = ["register_experts", "adapter_for", "adapters_installed", "activation_name", "AdapterError"]


class AdapterError(TypeError):
    """An expert module whose layout or activation an adapter cannot map onto ``moe_experts``."""


_REGISTERED: dict[type, Callable] = {}


def register_experts(module_class: type, adapter: Callable) -> None:
    """Trace every instance of ``module_class`` as ``adapter(module, *args, **kwargs)``."""
    if not isinstance(module_class, type) or not issubclass(module_class, nn.Module):
        raise TypeError(f"register_experts needs an nn.Module subclass, got {module_class!r}")
    if not callable(adapter):
        raise TypeError(f"register_experts needs a callable adapter, got {adapter!r}")
    _REGISTERED[module_class] = adapter


def activation_name(act_fn, path: str) -> str:
    """The op's activation name for an HF ``act_fn`` module or function."""
    name = type(act_fn).__name__ if isinstance(act_fn, nn.Module) else getattr(act_fn, "__name__", repr(act_fn))
    lowered = name.lower()
    if "silu" in lowered or "swish" in lowered:
        return "silu"
    if "gelu" in lowered and "tanh" in lowered:
        return "gelu_tanh"
    if "gelu" in lowered:
        if getattr(act_fn, "approximate", "none") == "tanh":
            return "gelu_tanh"
        return "gelu"
    raise AdapterError(f"{path}: expert activation {name} has no moe_experts form (known: silu, gelu, gelu_tanh)")


def _is_hf_fused(module: nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
            and down.dim() == 3 and hasattr(module, "act_fn"))


def _hf_fused_adapter(path: str, module: nn.Module) -> Callable:
    activation = activation_name(module.act_fn, path)
    experts, two_intermediate, hidden = module.gate_up_proj.shape
    if tuple(module.down_proj.shape) != (experts, hidden, two_intermediate // 2):
        raise AdapterError(
            f"{path}: gate_up_proj {tuple(module.gate_up_proj.shape)} and down_proj {tuple(module.down_proj.shape)} "
            f"are not [E, 2I, H] and [E, H, I]"
        )

    def forward(hidden_states, top_k_index, top_k_weights):
        return torch.ops.shardgraph.moe_experts(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype),
                                                module.gate_up_proj, module.down_proj, activation)

    return forward


def _is_grouped_experts(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Parameter) and getattr(module, name).dim() == 3
               for name in ("w1", "w2", "w3"))


def _grouped_experts_adapter(path: str, module: nn.Module) -> Callable:
    activation = getattr(module, "activation", "silu")

    def forward(x, topk_ids, topk_weights):
        # Gate rows then up rows of each expert: the fused layout, built in the graph so the
        # parameters stay w1 and w3 (propagation turns two Shard(1) into InterleavedShard(1, 2)).
        w_gate_up = torch.cat([module.w1, module.w3], dim=1)
        return torch.ops.shardgraph.moe_experts(x, topk_ids, topk_weights.to(x.dtype), w_gate_up, module.w2, activation)

    return forward


def adapter_for(path: str, module: nn.Module) -> Callable | None:
    for cls in type(module).__mro__:
        if cls in _REGISTERED:
            user_adapter = _REGISTERED[cls]
            return lambda *args, **kwargs: user_adapter(module, *args, **kwargs)
    if _is_hf_fused(module):
        return _hf_fused_adapter(path, module)
    if _is_grouped_experts(module):
        return _grouped_experts_adapter(path, module)
    return None


@contextlib.contextmanager
def adapters_installed(model: nn.Module):
    """Swap every recognised expert module's forward for its adapter; yield their paths."""
    from ..ops import moe  # noqa: F401 - registers the op

    patched = []
    try:
        for path, module in model.named_modules():
            adapter = adapter_for(path, module)
            if adapter is not None:
                had_instance_forward = "forward" in module.__dict__
                previous = module.__dict__.get("forward")
                module.forward = adapter
                patched.append((path, module, had_instance_forward, previous))
        yield [path for path, *_ in patched]
    finally:
        for _path, module, had_instance_forward, previous in patched:
            if had_instance_forward:
                module.forward = previous
            else:
                del module.forward
