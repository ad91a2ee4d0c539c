"""``trace``: one pure fx graph of a model's loss and every parameter gradient.

Why ``make_fx`` over ``torch.autograd.grad``: it records the forward and the backward that
autograd actually runs as one graph of aten ops, exactly what ``jax.value_and_grad`` would see,
with custom ops (``moe_experts`` and its backward) kept whole because they carry fake kernels.
``torch.export`` stops at the forward, and ``aot_autograd`` splits the joint graph into a forward
and a backward graph with tangents as inputs, which later passes would have to glue back.
Tracing runs in fake mode, so a model built on the meta device traces without its memory.

The graph's inputs are the parameters (placeholders named after their fully qualified names,
with ``meta["shardgraph_name"]`` and ``meta["shardgraph_kind"]``), then buffers, then the batch.
Its outputs are ``(loss, *gradients)`` in parameter order, or the forward outputs when there
is no loss function. In-place ops that autograd emits on fresh intermediates are rewritten to
their functional forms, so the graph mutates nothing.
"""

from __future__ import annotations

import linecache
import operator
import os
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

from .adapters import AdapterError, adapters_installed

__all__ = ["TraceError", "TracedGraph", "OutputRole", "trace", "op_histogram"]


class TraceError(RuntimeError):
    """A model construct that cannot become a static graph, with the module and source line."""


@dataclass(frozen=True)
class OutputRole:
    kind: str  # "loss" | "grad" | "output"
    parameter: str | None = None


@dataclass
class TracedGraph:
    graph_module: GraphModule
    parameter_names: list[str]
    buffer_names: list[str]
    input_names: list[str]
    parameter_shapes: dict[str, tuple[int, ...]]
    parameter_dtypes: dict[str, torch.dtype]
    output_spec: list[OutputRole]
    has_loss: bool
    expert_modules: list[str] = field(default_factory=list)

    def run(self, model_or_state, *inputs):
        """Run the graph eagerly: ``(loss, {name: gradient})``, or the forward outputs."""
        state = model_or_state.state_dict(keep_vars=True) if isinstance(model_or_state, nn.Module) else model_or_state
        named = dict(model_or_state.named_parameters()) if isinstance(model_or_state, nn.Module) else state
        buffers = dict(model_or_state.named_buffers()) if isinstance(model_or_state, nn.Module) else state
        args = [named[n].detach() for n in self.parameter_names] + [buffers[n] for n in self.buffer_names] + list(inputs)
        outputs = self.graph_module(*args)
        if not self.has_loss:
            return outputs
        return outputs[0], dict(zip(self.parameter_names, outputs[1:]))


def _placeholder_name(name: str) -> str:
    return re.sub(r"\W", "_", name)


class _ModuleTracker:
    """Which module is running, so an error can name it."""

    def __init__(self, model: nn.Module):
        self.stack: list[str] = []
        self.handles = []
        for path, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(lambda m, a, p=path: self._enter(p or "<root>")))
            self.handles.append(module.register_forward_hook(lambda m, a, o: self._leave()))

    # Hooks must return None: a forward hook's return value would replace the module's output.
    def _enter(self, path: str) -> None:
        self.stack.append(path)

    def _leave(self) -> None:
        if self.stack:
            self.stack.pop()

    def remove(self):
        for handle in self.handles:
            handle.remove()


_INTERNAL = (os.sep + "torch" + os.sep, os.sep + "shardgraph" + os.sep + "frontend" + os.sep, "<frozen", os.sep + "functorch" + os.sep)


def _user_frame(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if not any(part in frame.filename for part in _INTERNAL):
            code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
            return f"{frame.filename}:{frame.lineno}: {code}"
    return "(no source line outside torch)"


def _explain(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    if "data-dependent" in text.lower() or "DataDependent" in text or "_local_scalar_dense" in text or "item()" in text:
        return ("Python control flow or a Python number depends on tensor values, which a static graph cannot "
                "follow; compute it with tensor ops (torch.where, masks) instead")
    return text[:300]


def _functionalize_in_place(gm: GraphModule) -> None:
    """Rewrite ``x.op_(...)`` on fresh intermediates as ``op(...)``; later readers of x read the result."""
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        if not schema.name.endswith("_") or not schema.arguments or not schema.arguments[0].alias_info:
            continue
        if not schema.arguments[0].alias_info.is_write:
            continue
        functional_name = schema.name.split("::")[1][:-1]
        packet = getattr(torch.ops.aten, functional_name, None)
        overload = getattr(packet, node.target._overloadname, None) if packet is not None else None
        if overload is None:
            raise TraceError(f"in-place op {node.target} has no functional form to rewrite it to")
        mutated = node.args[0]
        if mutated.op == "placeholder":
            raise TraceError(f"the model mutates its input or parameter {mutated.name} in place ({node.target})")
        node.target = overload
        for user in list(mutated.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(mutated, node)
    graph.lint()
    gm.recompile()


def _label_placeholders(gm, parameter_names, buffer_names, input_names) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kinds = [("parameter", n) for n in parameter_names] + [("buffer", n) for n in buffer_names] + [("input", n) for n in input_names]
    for node, (kind, name) in zip(placeholders, kinds):
        node.meta["shardgraph_kind"] = kind
        node.meta["shardgraph_name"] = name
        node.target = node.name = _placeholder_name(name) if kind != "input" else _placeholder_name(f"input_{name}")
    gm.graph.lint()
    gm.recompile()


def trace(model: nn.Module, example_inputs: Sequence[Any], loss_fn: Callable | None = None,
          input_names: Sequence[str] | None = None) -> TracedGraph:
    """Trace ``model`` into one functional graph; see the module docstring.

    ``loss = loss_fn(model(*example_inputs), *example_inputs)``; with ``loss_fn=None`` the graph
    returns the forward outputs (``.logits`` of an HF ModelOutput).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace needs an nn.Module, got {type(model).__name__}")
    example_inputs = tuple(example_inputs)
    for i, value in enumerate(example_inputs):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"example input {i} is a {type(value).__name__}; the batch must be tensors")
    parameters = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    parameter_names = list(parameters)
    buffer_names = list(buffers)
    names = list(input_names) if input_names is not None else [f"{i}" for i in range(len(example_inputs))]
    trainable = [n for n in parameter_names if parameters[n].requires_grad]
    if loss_fn is not None and len(trainable) != len(parameter_names):
        frozen = [n for n in parameter_names if n not in trainable]
        raise TraceError(f"parameters {frozen[:4]} do not require grad; every parameter is trained in a joint graph")

    def step(*flat):
        count_p, count_b = len(parameter_names), len(buffer_names)
        params = dict(zip(parameter_names, flat[:count_p]))
        bufs = dict(zip(buffer_names, flat[count_p:count_p + count_b]))
        batch = flat[count_p + count_b:]
        output = functional_call(model, {**params, **bufs}, tuple(batch), tie_weights=False, strict=False)
        if loss_fn is None:
            logits = getattr(output, "logits", output)
            return tuple(logits) if isinstance(logits, (tuple, list)) else (logits,)
        loss = loss_fn(output, *batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TraceError(f"loss_fn must return a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
        grads = torch.autograd.grad(loss, [params[n] for n in parameter_names], allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(params[n]) for g, n in zip(grads, parameter_names)]
        return (loss, *grads)

    leaves = [p.detach().requires_grad_(loss_fn is not None) for p in parameters.values()]
    tracker = _ModuleTracker(model)
    try:
        with adapters_installed(model) as expert_modules, torch.enable_grad():
            gm = make_fx(step, tracing_mode="fake", record_module_stack=True, record_stack_traces=True)(
                *leaves, *[b.detach() for b in buffers.values()], *example_inputs)
    except (TraceError, AdapterError):
        raise
    except Exception as error:  # noqa: BLE001 - re-raised with the module and line that caused it
        where = tracker.stack[-1] if tracker.stack else "<root>"
        raise TraceError(f"cannot trace module '{where}' at {_user_frame(error)}: {_explain(error)}") from None
    finally:
        tracker.remove()
    _functionalize_in_place(gm)
    _label_placeholders(gm, parameter_names, buffer_names, names)
    if loss_fn is None:
        roles = [OutputRole("output") for _ in next(n for n in gm.graph.nodes if n.op == "output").args[0]]
    else:
        roles = [OutputRole("loss")] + [OutputRole("grad", n) for n in parameter_names]
    gm.meta["shardgraph_output_roles"] = [(r.kind, r.parameter) for r in roles]
    return TracedGraph(
        graph_module=gm,
        parameter_names=parameter_names,
        buffer_names=buffer_names,
        input_names=names,
        parameter_shapes={n: tuple(p.shape) for n, p in parameters.items()},
        parameter_dtypes={n: p.dtype for n, p in parameters.items()},
        output_spec=roles,
        has_loss=loss_fn is not None,
        expert_modules=list(expert_modules),
    )


def op_histogram(traced) -> dict[str, int]:
    """How often each op appears in the graph (the rule registry must cover every one)."""
    gm = traced.graph_module if hasattr(traced, "graph_module") else traced
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = "getitem" if node.target is operator.getitem else str(node.target)
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))

