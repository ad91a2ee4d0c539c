"""The context a model is traced in: what ``shardgraph.frontend.trace`` changes while make_fx runs.

* ``F.scaled_dot_product_attention`` becomes ``shardgraph.attention`` where there is no mask, and
  its math definition (with torch's zeros for fully masked rows) where there is one;
* packed-position detection and KV caches of HF models are turned off (they read values on the host);
* a module tracker records which module each traced node came from, for error messages and the
  report's layers.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot
from torch.overrides import TorchFunctionMode

from .. import meta
from .errors import TraceError

def _attention_as_matmul(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False):
    """``F.scaled_dot_product_attention`` written with matmul and softmax (its math definition)."""
    if dropout_p:
        raise TraceError(f"attention dropout (p={dropout_p}) draws random numbers; a traced step must be "
                         f"deterministic: set the attention dropout to 0 or put the model in eval mode")
    query_length, key_length = query.shape[-2], key.shape[-2]
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        # Each key/value head serves query_heads / kv_heads consecutive query heads.
        repeat = query.shape[-3] // key.shape[-3]

        def widen(t):
            return t.unsqueeze(-3).expand(*t.shape[:-2], repeat, *t.shape[-2:]).reshape(
                *t.shape[:-3], t.shape[-3] * repeat, *t.shape[-2:])

        key, value = widen(key), widen(value)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        future = torch.ones(query_length, key_length, dtype=torch.bool, device=query.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if attn_mask is None:
        return torch.matmul(torch.softmax(scores, dim=-1), value)
    if attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
    else:
        scores = scores + attn_mask
    # A query whose every key is masked (a left-padding position) gets zeros, as torch's own
    # attention gives it, not 0/0. Its scores are zeroed before the softmax so that the backward,
    # too, stays finite for that row.
    masked_row = scores.eq(float("-inf")).all(dim=-1, keepdim=True)
    probabilities = torch.softmax(scores.masked_fill(masked_row, 0.0), dim=-1).masked_fill(masked_row, 0.0)
    return torch.matmul(probabilities, value)


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` as ``shardgraph.attention`` where there is no mask."""
    if attn_mask is not None or dropout_p or query.dim() != 4:
        return _attention_as_matmul(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    from ..ops import attention  # noqa: F401 - registers torch.ops.shardgraph.attention

    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    gqa = bool(enable_gqa) and key.shape[-3] != query.shape[-3]
    # The op also returns the log-sum-exp its backward reads; the model sees the output only.
    out, _ = torch.ops.shardgraph.attention(query, key, value, bool(is_causal), scale, gqa)
    return out


class AttentionRouting(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _attention(*args, **kwargs)
        return func(*args, **kwargs)


def _depends_on_no_input(tensor: torch.Tensor) -> bool:
    """Whether a value being traced is computed from no graph input: a function of shapes alone."""
    mode = get_proxy_mode()
    slot = get_proxy_slot(tensor, mode.tracer, None) if mode is not None else None
    if slot is None:
        return False
    pending, seen = [slot.proxy.node], set()
    while pending:
        node = pending.pop()
        if node.op == "placeholder":
            return False
        for source in node.all_input_nodes:
            if source not in seen:
                seen.add(source)
                pending.append(source)
    return True


@contextlib.contextmanager
def positions_not_packed() -> Iterator[None]:
    """HF transformers' packed-sequence check, answered for position ids the model made itself.

    Given no ``attention_mask``, HF masks look for packed sequences (several per row) in the
    position ids; on fake tensors that check cannot read values, so HF builds an explicit boolean
    mask, which rules out the fused attention op. Position ids computed from no batch input are
    the ones the model makes itself when it is given none, ``arange(seq)`` per row: one sequence
    per row, never packed, so "not packed" (what the eager check returns for them) is right, and
    HF calls attention with ``is_causal=True`` and no mask, as it does eagerly. Position ids that
    come from the batch (under any argument name) keep HF's own check, and so their mask: a
    packed batch needs it.

    Only an HF model reaches this check, and its modeling file imported ``masking_utils`` when
    the model was built: a model that did not is traced without importing transformers (a
    second or more of imports that no other step needs).
    """
    module = sys.modules.get("transformers.masking_utils")
    if module is None or not hasattr(module, "find_packed_sequence_indices"):
        yield
        return
    original = module.find_packed_sequence_indices

    def find_packed_sequence_indices(position_ids):
        return None if _depends_on_no_input(position_ids) else original(position_ids)

    module.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        module.find_packed_sequence_indices = original


@contextlib.contextmanager
def without_kv_cache(model: nn.Module) -> Iterator[None]:
    """``config.use_cache = False`` on the model and on every HF model inside it, then restored.

    An HF model wrapped in a user module still builds a ``DynamicCache`` from its own config;
    with a cache HF skips its packed-sequence check on the position ids, so the traced masks
    would depend on how the model is wrapped.
    """
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            configs[id(config)] = config
    previous = {key: config.use_cache for key, config in configs.items()}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for key, config in configs.items():
            config.use_cache = previous[key]


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while tracing, then back as it was.

    Tracing allocates fake tensors, proxies and nodes that all stay alive until the graph is
    built; every full collection walks all of them, so its cost grows with the square of the
    depth (a 48-layer model spent a tenth of its trace there). Writing out repeated layers and
    the pass pipeline (each copy of the graph, each pass's new nodes) are paused alike. Cycles
    made meanwhile are collected after, by the collector's next run.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class ModuleTracker:
    """Which module is running: for error messages, and for each forward node's module stack.

    ``make_fx`` records ``nn_module_stack`` only for modules it reaches from a module root; the
    traced root here is a step function, so the hooks note how many graph nodes exist whenever
    a module is entered or left, and ``annotate`` gives each forward node the modules that were
    open when it was created, in ``nn_module_stack``'s format ``{path: (path, class)}``.
    """

    def __init__(self, model: nn.Module):
        self.stack: list[str] = []
        self.events: list[tuple[int, tuple[str, ...]]] = []
        self.classes: dict[str, str] = {}
        self.handles = []
        for path, module in model.named_modules():
            path = path or "<root>"
            self.classes[path] = f"{type(module).__module__}.{type(module).__qualname__}"
            self.handles.append(module.register_forward_pre_hook(self._enter_hook(path)))
            self.handles.append(module.register_forward_hook(self._leave_hook()))

    def _note(self) -> None:
        mode = get_proxy_mode()
        if mode is not None:
            self.events.append((len(mode.tracer.graph.nodes), tuple(self.stack)))

    # Hooks return None: a forward hook's return value would replace the module's output.
    def _enter_hook(self, path: str):
        def hook(module, args):
            self.stack.append(path)
            self._note()

        return hook

    def _leave_hook(self):
        def hook(module, args, output):
            if self.stack:
                self.stack.pop()
            self._note()

        return hook

    def annotate(self, gm: GraphModule) -> None:
        events = iter(self.events)
        upcoming = next(events, None)
        open_modules: tuple[str, ...] = ()
        for index, node in enumerate(gm.graph.nodes):
            while upcoming is not None and upcoming[0] <= index:
                open_modules = upcoming[1]
                upcoming = next(events, None)
            if node.op == "call_function" and open_modules:
                meta.set_module_stack(node, {path: (path, self.classes[path]) for path in open_modules})

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


FLOW = "flow"
"""A mark that leaves each node's layer to its inputs: the layer all its tensor inputs share, if one."""
_BACKWARD_DONE = "backward done"  # a layer's backward has produced its input's gradient


class LayerMarks:
    """Which of a list of layers each traced node belongs to, for replicating identical layers.

    Events ``(graph length, layer)`` are noted as tracing goes: a layer's forward begins when the
    layer is entered and ends when it returns; its backward begins when autograd is about to run
    the op that produced the layer's output (a prehook on that output's ``grad_fn``) and ends when
    it is about to run the producer of the layer's input. The step function adds its own marks
    around per-parameter work (casts, zero gradients, optimizer updates), and ``FLOW`` where the
    layer is best read from the inputs. ``layer=None`` marks work no layer owns.
    Hooks on autograd nodes that return nothing add no op, so the traced graph is unchanged.
    """

    def __init__(self, layers: nn.ModuleList):
        self.events: list[tuple[int, Any]] = []
        self.handles = []
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._enter_hook(index), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._leave_hook(index)))

    def mark(self, layer) -> None:
        mode = get_proxy_mode()
        if mode is not None:
            self.events.append((len(mode.tracer.graph.nodes), layer))

    def on_gradient(self, tensor, layer) -> None:
        """Mark ``layer`` when autograd is about to run the op that produced ``tensor``."""
        grad_fn = getattr(tensor, "grad_fn", None) if isinstance(tensor, torch.Tensor) else None
        if grad_fn is not None:
            grad_fn.register_prehook(lambda grad_outputs: self.mark(layer))

    def _enter_hook(self, index: int):
        def hook(module, args, kwargs):
            found = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.requires_grad]
            if found:
                self.on_gradient(found[0], _BACKWARD_DONE)
            self.mark(index)

        return hook

    def _leave_hook(self, index: int):
        def hook(module, args, output):
            self.mark(None)
            found = [output] if isinstance(output, torch.Tensor) else [
                t for t in (output if isinstance(output, (tuple, list)) else ()) if isinstance(t, torch.Tensor)]
            if found:
                self.on_gradient(found[0], index)

        return hook

    def layers(self, count: int) -> list:
        """The mark in force at each of the first ``count`` nodes (None before the first one).

        Of several marks noted at one graph length the last holds, except the end of a layer's
        backward: it coincides with the start of the previous layer's backward (the input's
        producer is that layer's output), which holds whichever hook ran first."""
        found: list = [None] * count
        current, position = None, 0
        events = sorted(self.events, key=lambda event: event[0])
        for index in range(count):
            pending = []
            while position < len(events) and events[position][0] <= index:
                pending.append(events[position][1])
                position += 1
            if pending:
                others = [mark for mark in pending if mark is not _BACKWARD_DONE]
                current = others[-1] if others else None
            found[index] = current
        return found

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
