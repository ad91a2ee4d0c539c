"""``trace``: a model's loss and every parameter gradient as one pure fx graph over aten ops.

    traced = trace(model, example_inputs, loss_fn)
    loss, *grads = traced.graph_module(*params, *buffers, *inputs)

is what ``jax.value_and_grad(lambda p: loss_fn(model(p, *inputs), *inputs))`` computes.

Machinery: ``make_fx`` in fake mode over a step function that runs the model with
``torch.func.functional_call`` and calls ``torch.autograd.grad``. Autograd runs for real during
tracing, so the graph records the very backward that eager training runs, and the custom op
``moe_experts`` (which has a fake kernel and a registered autograd formula) stays one forward
node and one ``moe_experts_backward`` node. The alternatives fit worse: ``torch.export`` stops
at the forward; ``aot_export_module(trace_joint=True)`` gives a joint graph too, but applies its
own decompositions (``silu_backward`` becomes sigmoid arithmetic) and adds
``_assert_tensor_metadata`` and ``empty_like`` + ``fill`` nodes (measured on the example model),
which widens the op set every later pass needs a rule for; ``torch.func.grad`` cannot see through ``register_autograd`` custom ops.
Fake mode means no kernel runs, so a model built on the meta device traces without memory.
A deep model whose ``nn.ModuleList`` repeats one layer (same class, shapes and attributes) is
traced with four layers of that run; the other layers' nodes are the middle layer's, written
out with the layer index renamed, after a check that the two middle layers agree node for node
(see "repeated layers" below; anything else traces every layer).

Then, in order:

1. In-place ops (HF routers divide their top-k weights in place, decompositions emit ``add_``)
   are removed by re-tracing the graph through ``torch.func.functionalize``, which also gets
   mutations through views right (``x[:, 0] = 0`` becomes ``select_scatter``). Node metadata
   (source lines, module stack) is carried over. A graph that would mutate a parameter, buffer
   or batch tensor is refused with the node's source line.
   Random ops (a router's noise or sampling, dropout) then draw from a generator state threaded
   through the graph from a ``seed`` input (``shardgraph/ops/random.py``), in the eager run's
   order, so the step stays a pure function and draws what the model draws eagerly after
   ``torch.manual_seed(seed)``; random ops it cannot seed are refused with their source line.
2. ``detach`` and ``alias`` nodes (identities once autograd is gone) and dead code are removed.
3. Placeholders are named after the parameter / buffer FQNs and the forward's argument names
   and labelled with a ``meta.GraphInput`` record; every op is marked forward or backward
   (``meta.Phase``) and the graph module carries the output roles (``meta.OutputRole``).

While tracing, ``F.scaled_dot_product_attention`` on 4-D operands without a mask becomes the op
``shardgraph.attention`` (``shardgraph/ops/attention.py``; ``scale`` defaults to
``1/sqrt(head_dim)``): one forward and one backward node that run the fused kernels, so the
program never holds ``[seq, seq]`` scores. The aten fused ops themselves would not do: they
differ per device and carry kernel-specific state to their backward ops. A call with an
explicit ``attn_mask`` is written as matmul + softmax, which a placement rule can follow
whatever the mask's shape; attention dropout is refused (a traced step is deterministic). HF
models given no position ids trace without a mask, as they run eagerly: see
``positions_not_packed``. HF models (wrapped or not) run with ``use_cache=False`` (a training
step keeps no KV cache), recognised expert modules run through their adapters
(``adapters.py``), and RMSNorm modules whose forward computes ``shardgraph.rms_norm`` run as that
op (``norms.py``; one node each way instead of about twenty aten ops), and rotary embedding
written as ``x * cos + rotate_half(x) * sin`` runs as ``shardgraph.rotary`` (``rotary.py``). A small decomposition table (``DECOMPOSITIONS``) rewrites a few composite ops
(layer norm, ``logsumexp``, ``baddbmm``, vector norms, ...) into the ops listed in
``docs/frontend.md``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import linecache
import logging
import operator
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx.traceback as fx_traceback
from torch import nn
from torch._decomp import get_decompositions
from torch.func import functional_call, functionalize
from torch.fx import GraphModule, Node
from torch.fx._lazy_graph_module import _make_graph_module, _use_lazy_graph_module
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot, make_fx

from .. import meta
from ..fx_graph import append_copy
from ..meta import GraphInput, InputKind, OutputRole, Phase
from .adapters import adapters_installed
from .norms import norms_installed
from .rotary import rotary_recognised
from .context import (FLOW, AttentionRouting, LayerMarks, ModuleTracker, collection_paused, positions_not_packed,
                      without_kv_cache)
from .errors import AdapterError, TraceError

_log = logging.getLogger(__name__)

__all__ = ["TraceError", "TracedGraph", "OutputRole", "trace", "op_histogram", "DECOMPOSITIONS"]

aten = torch.ops.aten

_DECOMPOSED_OPS = [
    aten.native_layer_norm, aten.native_layer_norm_backward, aten.var_mean, aten.var, aten.baddbmm,
    aten.logsumexp, aten.linalg_vector_norm, aten.repeat, aten.softplus, aten.softplus_backward,
    aten.mse_loss, aten.mse_loss_backward, aten.log_sigmoid_forward, aten.log_sigmoid_backward,
    aten.lerp,  # AdamW's first moment
]
for _name in ("_fused_rms_norm", "_fused_rms_norm_backward"):
    if hasattr(aten, _name):  # fused RMSNorm kernels exist on some builds and devices only
        _DECOMPOSED_OPS.append(getattr(aten, _name))

DECOMPOSITIONS = get_decompositions(_DECOMPOSED_OPS)
"""Composite ops rewritten during tracing, so the graph keeps to the op set of docs/frontend.md."""


@dataclass
class TracedGraph:
    """The traced step and the names that give its inputs and outputs meaning.

    ``graph_module(*parameters, *buffers, *inputs)`` returns ``(loss, *gradients)`` with one
    gradient per name in ``gradient_names`` (the trainable parameters, in parameter order), or
    the forward outputs when there is no loss.
    """

    graph_module: GraphModule
    parameter_names: list[str]
    buffer_names: list[str]
    input_names: list[str]
    parameter_shapes: dict[str, tuple[int, ...]]
    parameter_dtypes: dict[str, torch.dtype]
    output_spec: list[OutputRole]
    has_loss: bool
    gradient_names: list[str] = field(default_factory=list)
    buffer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    expert_modules: dict[str, str] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # A training step (traced with an optimizer): the state slots in input order, as
    # (parameter, slot), after the batch; then the learning rate and the step number.
    optimizer: Any = None
    clip_grad_norm: float | None = None
    state_slots: list[tuple[str, str]] = field(default_factory=list)
    compute_dtype: torch.dtype | None = None
    # The model draws random numbers (a router's jitter or sampling): the graph takes a seed as
    # its last input (``shardgraph/ops/random.py``).
    takes_seed: bool = False

    def arguments(self, model_or_state: nn.Module | Mapping[str, torch.Tensor], *inputs,
                  seed: int | None = None) -> list[torch.Tensor]:
        """The graph's positional arguments: parameters, buffers, then ``inputs`` (and the
        ``seed`` of a graph that draws random numbers)."""
        if len(inputs) != len(self.input_names):
            raise TypeError(f"the graph takes {len(self.input_names)} batch tensors {self.input_names}, "
                            f"got {len(inputs)}")
        if isinstance(model_or_state, nn.Module):
            state = {**dict(model_or_state.named_parameters(remove_duplicate=False)),
                     **dict(model_or_state.named_buffers(remove_duplicate=False))}
        elif isinstance(model_or_state, Mapping):
            state = model_or_state
        else:
            raise TypeError(f"expected an nn.Module or a state dict, got {type(model_or_state).__name__}")
        missing = [n for n in self.parameter_names + self.buffer_names if n not in state]
        if missing:
            raise KeyError(f"the state lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for name in self.parameter_names:
            if tuple(state[name].shape) != self.parameter_shapes[name]:
                raise ValueError(f"parameter {name} has shape {tuple(state[name].shape)}; the graph was traced with "
                                 f"{self.parameter_shapes[name]}")
        found = [state[n].detach() for n in self.parameter_names + self.buffer_names] + list(inputs)
        seed_input = seed_tensor(seed, self.takes_seed, "the traced graph")
        return found if seed_input is None else found + [seed_input]

    def run(self, model_or_state: nn.Module | Mapping[str, torch.Tensor], *inputs, seed: int | None = None):
        """Run the graph eagerly: ``(loss, {parameter name: gradient})``, or the forward outputs.
        A graph that draws random numbers draws what the model does after ``torch.manual_seed(seed)``."""
        outputs = self.graph_module(*self.arguments(model_or_state, *inputs, seed=seed))
        if not self.has_loss:
            return tuple(outputs)
        return outputs[0], dict(zip(self.gradient_names, outputs[1:]))


def seed_tensor(seed: int | None, takes_seed: bool, what: str) -> torch.Tensor | None:
    """The seed input of a graph that draws random numbers (None for one that does not)."""
    if not takes_seed:
        if seed is not None:
            raise TypeError(f"{what} draws no random numbers; it takes no seed")
        return None
    if isinstance(seed, torch.Tensor) and seed.dim() == 0 and not seed.is_floating_point():
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{what} draws random numbers (a router's noise or sampling): pass seed=<int>; the "
                        f"numbers are those the model draws eagerly after torch.manual_seed(seed), got {seed!r}")
    return torch.tensor(seed, dtype=torch.int64)


# ----------------------------------------------------------------------------- error messages
def _user_frame(error: BaseException) -> str:
    """``file:line: code`` of the innermost frame outside torch and this package."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if meta.is_library_frame(frame.filename):
            continue
        code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        return f"{frame.filename}:{frame.lineno}: {code}"
    return "(no source line outside torch)"


def _is_data_dependent(error: BaseException) -> bool:
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    if isinstance(error, (DataDependentOutputException, DynamicOutputShapeException)):
        return True
    text = f"{type(error).__name__}: {error}"
    return any(marker in text for marker in ("data-dependent", "DataDependent", "_local_scalar_dense", "nonzero"))


def _looks_like_experts(module: nn.Module | None) -> bool:
    return module is not None and any(p.dim() == 3 for p in module.parameters())


def _explain(error: BaseException, module: nn.Module | None) -> str:
    if _is_data_dependent(error):
        text = ("Python control flow, a Python number or a tensor shape depends on tensor values, which one static "
                "graph cannot follow; compute it with tensor ops (torch.where, masks) instead")
        if _looks_like_experts(module):
            text += (f"; {type(module).__name__} holds 3-d expert weights but no adapter recognised it: register it "
                     f"with shardgraph.frontend.register_experts so it is traced as one moe_experts op")
        return text
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:400]}"


# ----------------------------------------------------------------------------- graph rewrites
def _is_mutating(node: Node) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    return _writes_an_argument(node.target)


@functools.lru_cache(maxsize=None)
def _writes_an_argument(op: torch._ops.OpOverload) -> bool:
    # Asked of every node of deep graphs: the schema walk is done once per op.
    return any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)


def _aliased_placeholder(node: Node) -> Node | None:
    """The graph input that ``node`` is a view of, following view ops back."""
    seen = 0
    while node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and seen < 1000:
        arguments = node.target._schema.arguments
        if not arguments or arguments[0].alias_info is None or arguments[0].alias_info.is_write:
            return None
        if not isinstance(node.args[0], Node):
            return None
        node, seen = node.args[0], seen + 1
    return node if node.op == "placeholder" else None


def _module_of(node: Node) -> str:
    paths = [path for path, _ in meta.module_stack(node).values() if path]
    return paths[-1] if paths else "<root>"


def _refuse_input_mutation(gm: GraphModule, labels: list[tuple[str, str]]) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    label_of = dict(zip(placeholders, labels))
    for node in gm.graph.nodes:
        if not _is_mutating(node):
            continue
        for argument, value in zip(node.target._schema.arguments, node.args):
            if argument.alias_info is None or not argument.alias_info.is_write or not isinstance(value, Node):
                continue
            base = _aliased_placeholder(value)
            if base is not None:
                kind, name = label_of[base]
                raise TraceError(
                    f"module '{_module_of(node)}' at {meta.source_line(node)} mutates the {kind} {name} in place "
                    f"({node.target}); a traced step is a pure function: compute a new tensor instead"
                )


# ----------------------------------------------------------------------------- seeded random numbers
# Random ops, by their functional form (in-place draws such as ``exponential_`` are functional
# by the time they are seeded): ``(distribution, a, b)`` from the normalised arguments.
_SEEDED_DRAWS: dict = {
    aten.rand_like.default: lambda kw: ("uniform", 0.0, 1.0),
    aten.rand.default: lambda kw: ("uniform", 0.0, 1.0),
    aten.randn_like.default: lambda kw: ("normal", 0.0, 1.0),
    aten.randn.default: lambda kw: ("normal", 0.0, 1.0),
    aten.uniform.default: lambda kw: ("uniform", float(kw.get("from", 0.0)), float(kw.get("to", 1.0))),
    aten.exponential.default: lambda kw: ("exponential", float(kw.get("lambd", 1.0)), 0.0),
    aten.normal_functional.default: lambda kw: ("normal", float(kw.get("mean", 0.0)), float(kw.get("std", 1.0))),
    aten.bernoulli.p: lambda kw: ("bernoulli", float(kw.get("p", 0.5)), 0.0),
}


def _is_random(node: Node) -> bool:
    tags = getattr(node.target, "tags", ()) if node.op == "call_function" else ()
    return torch.Tag.nondeterministic_seeded in tags


class _SeededReplay(torch.fx.Interpreter):
    """Replays a graph with every random op drawn from a generator state threaded through the
    graph from ``seed`` (``shardgraph/ops/random.py``): ``random_state(seed)`` before the first
    draw, ``random_draw(state, ...)`` for each, in the graph's (the eager run's) order."""

    def __init__(self, gm: GraphModule, seed):
        super().__init__(gm)
        self.seed, self.state, self.device, self.node = seed, None, None, None

    def run_node(self, node):
        self.node = node
        return super().run_node(node)

    def _refuse(self, why: str):
        node = self.node
        raise TraceError(f"module '{_module_of(node)}' at {meta.source_line(node)} draws random numbers "
                         f"({node.target}) {why}")

    def call_function(self, target, args, kwargs):
        if not _is_random(self.node):
            return super().call_function(target, args, kwargs)
        if target not in _SEEDED_DRAWS:
            self._refuse("that shardgraph does not seed (it seeds rand, randn, their _like forms, uniform_, "
                         "exponential_, normal_ and bernoulli_ with a probability); set dropout and noise to 0 or "
                         "call model.eval()")
        from torch.fx.operator_schemas import normalize_function

        found = normalize_function(target, tuple(args), dict(kwargs), normalize_to_only_use_kwargs=True)
        named = found.kwargs if found is not None else dict(kwargs)
        if named.get("generator") is not None:
            self._refuse("from a generator of its own; the program seeds the default generator only")
        like = named.get("self", named.get("input"))
        shape = list(like.shape) if isinstance(like, torch.Tensor) else list(named["size"])
        dtype = named.get("dtype") or (like.dtype if isinstance(like, torch.Tensor) else torch.get_default_dtype())
        device = torch.device(named.get("device") or (like.device if isinstance(like, torch.Tensor) else "cpu"))
        if self.state is None:
            self.device = device
            self.state = torch.ops.shardgraph.random_state(self.seed, device)
        elif device != self.device:
            self._refuse(f"on {device} after drawing on {self.device}; one program seeds one device's generator")
        distribution, a, b = _SEEDED_DRAWS[target](named)
        values, self.state = torch.ops.shardgraph.random_draw(self.state, distribution, shape, dtype, device, a, b)
        return values


def _seed_random_ops(gm: GraphModule) -> tuple[GraphModule, bool]:
    """``gm`` with its random ops drawn from a ``seed`` input (a 0-d int64 tensor, the last
    placeholder), and whether it draws any. A traced step stays a pure function of its inputs."""
    if not any(_is_random(node) for node in gm.graph.nodes):
        return gm, False
    import shardgraph.ops  # noqa: F401 - registers shardgraph::random_state / random_draw

    values = [meta.value(n) for n in gm.graph.nodes if n.op == "placeholder"]
    fake_mode = next((v.fake_mode for v in values if hasattr(v, "fake_mode")), None) or FakeTensorMode()
    with fake_mode:
        seed = torch.zeros((), dtype=torch.int64)

    def replay(*args):
        return _SeededReplay(gm, args[-1]).run(*args[:-1])

    with fx_traceback.preserve_node_meta():
        seeded = make_fx(replay, tracing_mode="fake", record_module_stack=True)(*values, seed)
    return seeded, True


def _broadcast_in_dim(value: torch.Tensor, shape, broadcast_dimensions) -> torch.Tensor:
    """``prims.broadcast_in_dim`` as aten ``unsqueeze`` + ``expand`` (the same view)."""
    for dim in range(len(shape)):
        if dim not in broadcast_dimensions:
            value = value.unsqueeze(dim)
    return value.expand(shape)


class _FunctionalReplay(torch.fx.Interpreter):
    """Replays a graph under ``functionalize``, which refuses custom ops whose output aliases an
    input: the one the decompositions emit (``prims.broadcast_in_dim``, from LayerNorm's
    ``var_mean``) is replayed as the aten views it stands for."""

    def call_function(self, target, args, kwargs):
        if target is torch.ops.prims.broadcast_in_dim.default:
            return _broadcast_in_dim(*args, **kwargs)
        return super().call_function(target, args, kwargs)


def _functionalize(gm: GraphModule) -> GraphModule:
    """Re-trace ``gm`` without mutations, keeping every node's source metadata."""
    values = [meta.value(n) for n in gm.graph.nodes if n.op == "placeholder"]

    def replay(*args):
        return _FunctionalReplay(gm).run(*args)

    with fx_traceback.preserve_node_meta():
        functional = make_fx(functionalize(replay, remove="mutations"), tracing_mode="fake",
                             record_module_stack=True)(*values)
    return functional


def _drop_identities(gm: GraphModule) -> None:
    identities = (aten.detach.default, aten.alias.default)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in identities:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    # Dead code, as Graph.eliminate_dead_code finds it, but asking about side effects only of
    # nodes nobody reads (that method asks of every node, and lints the graph first).
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and node.op not in ("placeholder", "output") and not node.is_impure():
            gm.graph.erase_node(node)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        candidate = name
        while candidate in seen:
            seen[name] += 1
            candidate = f"{name}_{seen[name]}"
        seen[candidate] = 0
        out.append(candidate)
    return out


def _label_placeholders(gm: GraphModule, labels: list[tuple[str, str]],
                        owners: Mapping[str, str] | None = None) -> None:
    """Name the placeholders after what they hold; ``owners`` maps an optimizer state slot's name
    to its parameter."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    identifiers = _unique([re.sub(r"\W", "_", name) if re.match(r"[A-Za-z_]", name) else f"input_{name}"
                           for _, name in labels])
    for node, (kind, name), identifier in zip(placeholders, labels, identifiers):
        meta.set_graph_input(node, GraphInput(InputKind(kind), name, (owners or {}).get(name)))
        node._rename(identifier)  # through the graph's namespace, so later passes cannot reuse the name
        node.target = node.name
    gm.graph.lint()
    gm.recompile()


# ----------------------------------------------------------------------------- inputs and outputs
def _input_names(model: nn.Module, count: int, given: Sequence[str] | None) -> list[str]:
    if given is not None:
        names = [str(n) for n in given]
        if len(names) != count or len(set(names)) != count:
            raise TypeError(f"input_names {names} must name each of the {count} example inputs once")
        return names
    try:
        parameters = [p for p in inspect.signature(model.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        parameters = []
    if len(parameters) >= count:
        return [p.name for p in parameters[:count]]
    return [f"input_{i}" for i in range(count)]


def _forward_outputs(output) -> tuple[list[torch.Tensor], list[str]]:
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return [logits], ["logits"]
    if isinstance(output, torch.Tensor):
        return [output], ["output"]
    leaves, spec = torch.utils._pytree.tree_flatten_with_path(output)
    tensors, paths = [], []
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
            paths.append(torch.utils._pytree.keystr(path) or "output")
    if not tensors:
        raise TraceError(f"the model returned {type(output).__name__} with no tensor in it")
    return tensors, paths


# ----------------------------------------------------------------------------- trace
def trace(model: nn.Module, example_inputs: Sequence[torch.Tensor], loss_fn: Callable | None = None, *,
          input_names: Sequence[str] | None = None, optimizer=None, clip_grad_norm: float | None = None,
          compute_dtype: torch.dtype | None = None, reuse_layers: bool = True) -> TracedGraph:
    """Trace ``model`` into one functional forward+backward graph (see the module docstring).

    ``loss = loss_fn(model(*example_inputs), *example_inputs)`` must be a scalar tensor; the
    graph returns it and the gradient of every parameter that requires grad. With
    ``loss_fn=None`` the graph returns the forward outputs (``.logits`` of an HF ModelOutput).
    With an ``optimizer`` (``shardgraph.optim``) the graph is the whole training step: it also
    takes every trainable parameter's optimizer state, the learning rate and the step number,
    and returns the loss, the new parameters, the new state and the gradient norm before
    clipping (``clip_grad_norm`` clips the gradients as ``torch.nn.utils.clip_grad_norm_``).
    ``compute_dtype`` (``torch.bfloat16``) runs the forward and backward on copies of the
    floating-point parameters cast to it, while the parameters themselves (the master weights),
    their gradients and the optimizer state keep the model's dtype.
    Build the model and inputs on the meta device to trace without allocating weights.
    ``reuse_layers=False`` traces every layer of a deep model instead of writing out the graph
    of repeated layers from a few traced ones (the same graph, node for node, only slower).
    """
    # Over 60 lines only by its docstring: each step below is one call, in the order they run.
    example_inputs = _checked_arguments(model, example_inputs, loss_fn)
    parameters = dict(model.named_parameters())  # tied weights appear once, under their first name
    buffers = dict(model.named_buffers())
    names = _input_names(model, len(example_inputs), input_names)
    trainable = [n for n in parameters if parameters[n].requires_grad] if loss_fn is not None else []
    if loss_fn is not None and not trainable:
        raise TraceError("trace: no parameter requires grad, so there is no gradient to trace")
    devices = {t.device for t in [*parameters.values(), *buffers.values(), *example_inputs]}
    if len(devices) > 1:
        raise TraceError(f"trace: parameters, buffers and inputs are on several devices {sorted(map(str, devices))}; "
                         f"put them on one (torch.device('meta') to trace without memory)")
    _check_step_options(loss_fn, optimizer, clip_grad_norm, compute_dtype)
    slots = [(n, slot) for n in trainable for slot in optimizer.state_slots()] if optimizer is not None else []
    step = _Step(model, list(parameters), list(buffers), trainable, loss_fn, len(example_inputs), optimizer,
                 clip_grad_norm, slots, compute_dtype)
    with collection_paused():  # also while the repeated layers are written out (see collection_paused)
        gm, expert_modules = _make_joint_graph(model, step, parameters, buffers, example_inputs, trainable, slots,
                                               optimizer is not None, reuse_layers)

    labels = _labels(parameters, buffers, names, slots, optimizer is not None)
    if any(_is_mutating(n) for n in gm.graph.nodes):
        _refuse_input_mutation(gm, labels)
        gm = _functionalize(gm)
    gm, draws_random = _seed_random_ops(gm)
    if draws_random:
        labels.append(("seed", "seed"))
    _drop_identities(gm)
    _label_placeholders(gm, labels, {f"{n}:{slot}": n for n, slot in slots})
    roles = _roles(step)
    meta.set_output_roles(gm, roles)
    _mark_phases(gm)
    return TracedGraph(
        graph_module=gm,
        parameter_names=list(parameters),
        buffer_names=list(buffers),
        input_names=names,
        parameter_shapes={n: tuple(p.shape) for n, p in parameters.items()},
        parameter_dtypes={n: p.dtype for n, p in parameters.items()},
        output_spec=roles,
        has_loss=loss_fn is not None,
        gradient_names=trainable,
        buffer_shapes={n: tuple(b.shape) for n, b in buffers.items()},
        input_shapes={n: tuple(t.shape) for n, t in zip(names, example_inputs)},
        expert_modules=dict(expert_modules),
        device=next(iter(devices)) if devices else torch.device("cpu"),
        optimizer=optimizer,
        clip_grad_norm=clip_grad_norm,
        state_slots=slots,
        compute_dtype=compute_dtype,
        takes_seed=draws_random,
    )


def _check_step_options(loss_fn, optimizer, clip_grad_norm, compute_dtype) -> None:
    if optimizer is not None and loss_fn is None:
        raise TraceError("trace: an optimizer needs a loss_fn to step on")
    if clip_grad_norm is not None and optimizer is None:
        raise TraceError("trace: clip_grad_norm clips the gradients an optimizer steps on; pass an optimizer")
    if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0):
        raise TraceError(f"trace: clip_grad_norm must be a positive number, got {clip_grad_norm!r}")
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise TraceError(f"trace: compute_dtype must be a floating-point torch.dtype, got {compute_dtype!r}")


def _labels(parameters, buffers, names, slots, scalars: bool) -> list[tuple[str, str]]:
    """(kind, name) of every placeholder, in the step's argument order."""
    labels = ([("parameter", n) for n in parameters] + [("buffer", n) for n in buffers]
              + [("input", n) for n in names] + [("optimizer state", f"{n}:{slot}") for n, slot in slots])
    return labels + ([("scalar", "lr"), ("scalar", "step")] if scalars else [])


def _roles(step: "_Step") -> list[OutputRole]:
    if step.loss_fn is None:
        return [OutputRole("output", path=p) for p in step.output_paths]
    if step.optimizer is not None:
        return ([OutputRole("loss")] + [OutputRole("param", n) for n in step.trainable]
                + [OutputRole("state", n, slot) for n, slot in step.slots] + [OutputRole("metric", path="grad_norm")])
    return [OutputRole("loss")] + [OutputRole("grad", n) for n in step.trainable]


def _checked_arguments(model, example_inputs, loss_fn) -> tuple:
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    for i, value in enumerate(example_inputs):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"trace: example input {i} is a {type(value).__name__}; the batch must be tensors")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"trace: loss_fn must be callable, got {type(loss_fn).__name__}")
    return example_inputs


class _Step:
    """The function make_fx traces: parameters, buffers and batch in; loss and gradients out, or,
    with an optimizer, optimizer state, learning rate and step number in too, and the loss, new
    parameters, new state and gradient norm out."""

    def __init__(self, model, parameter_names, buffer_names, trainable, loss_fn, batch_count, optimizer=None,
                 clip_grad_norm=None, slots=(), compute_dtype=None):
        self.model, self.parameter_names, self.buffer_names = model, parameter_names, buffer_names
        self.trainable, self.loss_fn, self.batch_count = trainable, loss_fn, batch_count
        self.optimizer, self.clip_grad_norm, self.slots = optimizer, clip_grad_norm, list(slots)
        self.compute_dtype = compute_dtype
        self.output_paths: list[str] = []
        self.stage = "module '<root>'"  # where the step is when no module is running, for error messages
        # Set while a prefix of repeated layers is traced: which layer each parameter belongs to.
        self.marks: LayerMarks | None = None
        self.layer_of: Mapping[str, int] = {}

    def _mark(self, layer) -> None:
        if self.marks is not None:
            self.marks.mark(layer)

    def _mark_parameter(self, name: str) -> None:
        if self.marks is not None:
            self.marks.mark(self.layer_of.get(name))

    def __call__(self, *flat):
        count_p, count_b = len(self.parameter_names), len(self.buffer_names)
        params = dict(zip(self.parameter_names, flat[:count_p]))
        # Mixed precision: the model computes with cast copies; autograd carries each gradient back
        # through the cast, so it arrives in the master weight's dtype.
        compute = {}
        for name, param in params.items():
            self._mark_parameter(name)
            cast = self.compute_dtype is not None and param.is_floating_point()
            compute[name] = param.to(self.compute_dtype) if cast else param
            if cast and self.marks is not None and name in self.layer_of:
                # The cast's backward (to the master dtype) belongs to the parameter's layer.
                self.marks.on_gradient(compute[name], self.layer_of[name])
        self._mark(None)
        state = {**compute, **dict(zip(self.buffer_names, flat[count_p:count_p + count_b]))}
        batch = flat[count_p + count_b:count_p + count_b + self.batch_count]
        with AttentionRouting():
            output = functional_call(self.model, state, tuple(batch), tie_weights=True, strict=False)
            if self.loss_fn is None:
                tensors, paths = _forward_outputs(output)
                self.output_paths[:] = paths
                return tuple(tensors)
            self.stage = "loss_fn"
            loss = self.loss_fn(output, *batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.dtype.is_floating_point:
            raise TraceError(f"loss_fn must return a floating-point scalar tensor, got "
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
        self.stage = "the backward pass"
        wrt = [params[n] for n in self.trainable]
        grads = list(torch.autograd.grad(loss, wrt, allow_unused=True))
        self._mark(FLOW)
        # A parameter the loss does not reach has gradient zero, as an optimizer would see it.
        for index, (name, param) in enumerate(zip(self.trainable, wrt)):
            if grads[index] is None:
                self._mark_parameter(name)
                grads[index] = torch.zeros_like(param)
                self._mark(FLOW)
        if self.optimizer is None:
            return (loss, *grads)
        self.stage = "the optimizer step"
        extra = flat[count_p + count_b + self.batch_count:]
        return (loss.detach(), *self._optimizer_step(wrt, grads, extra))

    def _optimizer_step(self, wrt, grads, extra):
        from ..optim import clip_coefficient, global_norm

        slot_values = dict(zip(self.slots, extra[:len(self.slots)]))
        lr, step = extra[len(self.slots):]
        mode = get_proxy_mode()
        for name, grad in zip(self.trainable, grads):
            slot = get_proxy_slot(grad, mode.tracer, None) if mode is not None else None
            if slot is not None:
                meta.set_gradient_of(slot.proxy.node, name)
        with torch.no_grad():
            grads = [g.detach() for g in grads]
            norm = global_norm(grads)
            if self.clip_grad_norm is not None:
                coefficient = clip_coefficient(norm, self.clip_grad_norm)
                grads = [g * coefficient.to(g.dtype) for g in grads]
            new_params, new_state = [], []
            for name, param, grad in zip(self.trainable, wrt, grads):
                self._mark_parameter(name)
                slots = {slot: slot_values[(name, slot)] for slot in self.optimizer.state_slots()}
                updated, updated_state = self.optimizer.update(name, param.detach(), grad, slots, lr, step)
                new_params.append(updated)
                new_state.extend(updated_state[slot] for slot in self.optimizer.state_slots())
            self._mark(FLOW)
        return (*new_params, *new_state, norm)


def _traced_joint_graph(model, step: _Step, parameters, buffers, example_inputs, trainable, slots=(),
                        scalars: bool = False, run: "_LayerRun | None" = None):
    """make_fx of ``step`` on fake tensors, with the expert adapters installed; errors name the
    module and the user's line that caused them. With ``run``, the layers are marked (``step.marks``)."""
    # A fake mode without a shape environment keeps every shape static: an op whose output
    # shape depends on values (nonzero, boolean masking) or a Python number read from a tensor
    # raises where the model does it, instead of leaving unbacked symbolic sizes in the graph.
    fake_mode = FakeTensorMode()
    leaves = [fake_mode.from_tensor(p.detach()).requires_grad_(n in trainable) for n, p in parameters.items()]
    arguments = leaves + [fake_mode.from_tensor(t.detach()) for t in [*buffers.values(), *example_inputs]]
    # Optimizer state is shaped like its parameter; the learning rate and step are float64
    # scalars, as torch.optim computes its step size in Python doubles.
    with fake_mode:
        arguments += [torch.empty(parameters[name].shape, dtype=parameters[name].dtype, device=parameters[name].device)
                      for name, _ in slots]
        if scalars:
            arguments += [torch.zeros((), dtype=torch.float64, device=leaves[0].device) for _ in range(2)]
    tracker = ModuleTracker(model)
    step.marks = LayerMarks(run.layers) if run is not None else None
    modules = {path or "<root>": module for path, module in model.named_modules()}
    try:
        # A lazily compiled module: the passes that follow rewrite the graph, so Python code
        # written now would be thrown away; it is written when the module is first run or read.
        with adapters_installed(model) as expert_modules, norms_installed(model), without_kv_cache(model), \
                positions_not_packed(), torch.enable_grad(), _use_lazy_graph_module(True), collection_paused(), \
                rotary_recognised():
            gm = make_fx(step, tracing_mode="fake", decomposition_table=DECOMPOSITIONS, record_module_stack=True,
                         record_stack_traces=True)(*arguments)
    except AdapterError:
        raise
    except TraceError as error:
        where = f"module '{tracker.stack[-1]}'" if tracker.stack else step.stage
        raise TraceError(f"{where}: {error}") from None
    except Exception as error:  # noqa: BLE001 - re-raised naming the module and line that caused it
        where = f"module '{tracker.stack[-1]}'" if tracker.stack else step.stage
        module = modules.get(tracker.stack[-1]) if tracker.stack else None
        raise TraceError(f"cannot trace {where} at {_user_frame(error)}: {_explain(error, module)}") from None
    finally:
        tracker.remove()
        if step.marks is not None:
            step.marks.remove()
    tracker.annotate(gm)
    return gm, expert_modules


# ----------------------------------------------------------------------------- repeated layers
# A deep model repeats one layer class: its joint graph is the graph of a few layers with the
# middle layer's forward, backward and optimizer nodes written out once per further layer. Only
# ``_PREFIX`` layers of the longest run of interchangeable layers are traced (the first, two
# middle ones, the last); the two middle layers must give the same nodes up to the layer index
# (ops, constants, values, source records, and the same wiring relative to their neighbours),
# and the graph of every layer in between is then the middle layer's, renamed. Anything the
# pattern cannot express (layers that differ, a node outside the layers that reads a middle
# layer alone, in-place ops that functionalisation would rewrite) traces the whole model.

_PREFIX = 4
_SHORTEST_RUN = _PREFIX + 2  # below this, replication saves at most one layer's trace


class _NotReplicable(Exception):
    """The prefix's graph does not have the shape replication needs."""


@dataclass
class _LayerRun:
    """Layers ``start .. stop-1`` of the ``nn.ModuleList`` at ``path`` are interchangeable."""

    path: str
    layers: nn.ModuleList
    start: int
    stop: int
    _renamed: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def skipped(self) -> int:
        return self.stop - self.start - _PREFIX

    @property
    def middle(self) -> tuple[int, int]:
        """The prefix indices of the two middle layers, whose graphs must agree."""
        return self.start + 1, self.start + 2

    def full_index(self, index: int) -> int:
        """The model's layer that the prefix's layer ``index`` stands for (outside the middle)."""
        return index if index <= self.start + 1 else index + self.skipped

    def renamed(self, text: str, index: int, new: str | int) -> str:
        """``text`` (a module path or parameter name) with layer ``index`` of the list as ``new``."""
        key = (text, index, new)
        found = self._renamed.get(key)
        if found is None:
            head = f"{self.path}.{index}"
            found = f"{self.path}.{new}{text[len(head):]}" if text == head or text.startswith(head + ".") else text
            self._renamed[key] = found
        return found

    @contextlib.contextmanager
    def truncated(self) -> Iterator[None]:
        """The list holds only the traced layers meanwhile (renumbered from 0), then all again."""
        original = dict(self.layers._modules)
        modules = list(original.values())
        kept = [*range(self.start + _PREFIX), *range(self.stop, len(modules))]
        self.layers._modules.clear()
        for position, index in enumerate(kept):
            self.layers._modules[str(position)] = modules[index]
        try:
            yield
        finally:
            self.layers._modules.clear()
            self.layers._modules.update(original)


def _layer_state(layer: nn.Module) -> dict | None:
    """What decides a layer's graph besides its index: module classes, parameter and buffer
    shapes, plain attributes (objects by identity). None when a hook could treat it apart."""
    state: dict = {}
    for path, module in layer.named_modules():
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
            return None
        state[("module", path)] = type(module)
        for name, param in module._parameters.items():
            state[("parameter", path, name)] = None if param is None else (tuple(param.shape), param.dtype,
                                                                            param.requires_grad)
        for name, buffer in module._buffers.items():
            state[("buffer", path, name)] = None if buffer is None else (tuple(buffer.shape), buffer.dtype)
        for key, value in vars(module).items():
            if key.startswith("_"):
                continue
            plain = value is None or isinstance(value, (bool, int, float, str, torch.dtype)) or (
                isinstance(value, tuple) and all(isinstance(item, (bool, int, float, str)) for item in value))
            state[("attribute", path, key)] = value if plain else ("object", id(value))
    return state


def _repeated_layers(model: nn.Module) -> _LayerRun | None:
    """The longest run of interchangeable layers in an outermost ``nn.ModuleList`` of the model."""
    lists = [(path, module) for path, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    best = None
    for path, layers in lists:
        nested = any(other != path and (other == "" or path.startswith(other + ".")) for other, _ in lists)
        if not path or nested or len(layers) < _SHORTEST_RUN:
            continue
        states = [_layer_state(layer) for layer in layers]
        owners = [id(p) for layer in layers for _, p in layer.named_parameters(remove_duplicate=False)]
        if any(state is None for state in states) or len(owners) != len(set(owners)):
            continue  # hooks, or a parameter shared between layers
        # Every attribute must match, a layer index too: a forward that reads its own index (HF's
        # ``config.layer_types[self.layer_idx]``) may branch on it in ways two traced layers
        # cannot show, and a layer built the same way everywhere cannot tell its position.
        signatures = states
        start = 0
        for position in range(1, len(layers) + 1):
            if position == len(layers) or signatures[position] != signatures[start]:
                if position - start >= _SHORTEST_RUN and (best is None or position - start > best.stop - best.start):
                    best = _LayerRun(path, layers, start, position)
                start = position
    return best


def _make_joint_graph(model, step: _Step, parameters, buffers, example_inputs, trainable, slots=(),
                      scalars: bool = False, reuse_layers: bool = True):
    """The joint graph, from a prefix of repeated layers where the model has them (see above),
    else from tracing the whole model."""
    run = _repeated_layers(model) if reuse_layers and step.loss_fn is not None else None
    if run is not None:
        try:
            return _replicated_joint_graph(model, run, step, example_inputs, scalars)
        except Exception as error:  # noqa: BLE001 - the whole model is traced instead, which reports real errors
            _log.debug("trace: layers %d..%d of '%s' are traced one by one: %s", run.start, run.stop - 1, run.path,
                       error)
    return _traced_joint_graph(model, step, parameters, buffers, example_inputs, trainable, slots, scalars)


def _replicated_joint_graph(model, run: _LayerRun, step: _Step, example_inputs, scalars: bool):
    with run.truncated():
        parameters, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        trainable = [n for n in parameters if parameters[n].requires_grad]
        slots = [(n, slot) for n in trainable for slot in step.optimizer.state_slots()] if step.optimizer else []
        prefix = _Step(model, list(parameters), list(buffers), trainable, step.loss_fn, step.batch_count,
                       step.optimizer, step.clip_grad_norm, slots, step.compute_dtype)
        prefix.layer_of = {name: index for name in parameters
                           if (index := _layer_index(run, name)) is not None}
        gm, expert_modules = _traced_joint_graph(model, prefix, parameters, buffers, example_inputs, trainable,
                                                 slots, scalars, run)
    if any(_is_mutating(n) or n.op not in ("placeholder", "call_function", "output") for n in gm.graph.nodes):
        raise _NotReplicable("the graph mutates tensors or holds constants")
    labels = _labels(parameters, buffers, ["input"] * step.batch_count, slots, scalars)
    owners = [name.split(":")[0] if kind == "optimizer state" else name if kind == "parameter" else None
              for kind, name in labels]
    count = len(gm.graph.nodes)
    layers = prefix.marks.layers(count)
    position = {node: index for index, node in enumerate(gm.graph.nodes)}
    placeholder_count = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if placeholder_count != len(labels):
        raise _NotReplicable("placeholders and labels disagree")
    layers[:placeholder_count] = [prefix.layer_of.get(owner) if owner else None for owner in owners]
    for index, node in enumerate(gm.graph.nodes):
        if layers[index] == FLOW:  # the one layer the node's inputs come from, if they share one
            found = {layers[position[source]] for source in node.all_input_nodes} - {None}
            layers[index] = found.pop() if len(found) == 1 else None
    graph = _replicate_layers(gm, layers, run)
    expected = len(step.parameter_names) + len(step.buffer_names) + step.batch_count + len(step.slots) + 2 * scalars
    if sum(1 for n in graph.nodes if n.op == "placeholder") != expected:
        raise _NotReplicable("the replicated graph takes other inputs than the model")
    with _use_lazy_graph_module(True):
        replicated = _make_graph_module(gm, graph)
    meta.copy_module_records(gm, replicated)
    return replicated, _replicated_names(expert_modules, run)


def _layer_index(run: _LayerRun, name: str) -> int | None:
    head = run.path + "."
    if not name.startswith(head):
        return None
    index = name[len(head):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _replicated_names(names: Mapping[str, str], run: _LayerRun) -> dict[str, str]:
    """``{module path: kind}`` of the prefix, for the whole model."""
    first, second = run.middle
    out = {}
    for path, kind in names.items():
        index = _layer_index(run, path + ".")
        if index is None:
            out[path] = kind
        elif index == first:
            out.update({run.renamed(path, index, full): kind for full in range(first, run.stop - 1)})
        elif index != second:
            out[run.renamed(path, index, run.full_index(index))] = kind
    return out


def _base_name(name: str) -> str:
    """The name fx derived ``name`` from (``mm`` for ``mm_12``): given again, the graph's
    namespace numbers it as the full trace would, since nodes are created in the same order."""
    return re.sub(r"_\d+$", "", name)


def _value_signature(found) -> Any:
    if isinstance(found, torch.Tensor):
        return ("tensor", tuple(found.shape), tuple(found.stride()), found.dtype, found.device.type,
                found.requires_grad, found.storage_offset())
    if isinstance(found, (tuple, list)):
        return (type(found).__name__,) + tuple(_value_signature(item) for item in found)
    if isinstance(found, dict):
        return ("dict",) + tuple((key, _value_signature(item)) for key, item in found.items())
    return found


class _Replicator:
    """Writes the whole model's graph from the prefix's, node by node in the full trace's order."""

    def __init__(self, gm: GraphModule, layers: list, run: _LayerRun):
        self.run, self.nodes = run, list(gm.graph.nodes)
        self.layer = dict(zip(self.nodes, layers))
        self.layer[self.nodes[-1]] = None  # the output node belongs to no layer
        self.first, self.second = run.middle
        # Segments: a shared node, or a stretch of layer blocks ("runs"), each layer once, in
        # ascending or descending order; a node's place is (segment, position in its block).
        self.plan: list = []
        self.segment: dict[Node, int] = {}
        self.position: dict[Node, int] = {}
        self.blocks: dict[tuple[int, int], list[Node]] = {}
        self._split()
        self.base = {node: _base_name(node.name) for node in self.nodes}
        self.suffix = {}
        for node in self.nodes:
            if node.op == "placeholder":
                match = re.fullmatch(r"arg\d+(_\d+)", node.name)
                if match is None or node.target != node.name:
                    raise _NotReplicable(f"unexpected placeholder {node.name}")
                self.suffix[node] = match.group(1)
        self.graph = torch.fx.Graph(tracer_cls=gm.graph._tracer_cls, tracer_extras=gm.graph._tracer_extras)
        self.shared: dict[Node, Node] = {}
        self.built: dict[tuple[int, int], list[Node]] = {}
        self.changed: set[Node] = set()
        self.inputs = 0
        self.stacks: dict[tuple[int, int, int], dict] = {}

    def _split(self) -> None:
        previous = None
        for node in self.nodes:
            layer = self.layer[node]
            if layer is None:
                self.plan.append(("shared", node))
                previous = None
                continue
            if previous is None:
                self.plan.append(("run", len(self.plan), []))
            _, segment, order = self.plan[-1]
            if not order or order[-1] != layer:
                step = layer - order[-1] if order else 0
                if layer in order or (order and abs(step) != 1) or (len(order) > 1 and step != order[-1] - order[-2]):
                    raise _NotReplicable(f"layer {layer}'s nodes around {node.name} are not one block in layer order")
                order.append(layer)
                self.blocks[(segment, layer)] = []
            self.segment[node], self.position[node] = segment, len(self.blocks[(segment, layer)])
            self.blocks[(segment, layer)].append(node)
            previous = layer
        for item in self.plan:
            if item[0] == "run" and (self.first in item[2]) != (self.second in item[2]):
                raise _NotReplicable("a stretch of layer nodes holds one middle layer without the other")

    # ------------------------------------------------------------------------- the check
    def _reference(self, node: Node, layer: int):
        found = self.layer[node]
        if found is None:
            return ("shared", node)
        if abs(found - layer) > 1:
            raise _NotReplicable(f"a node of layer {layer} reads layer {found}")
        return ("layer", found - layer, self.segment[node], self.position[node])

    def _described(self, item, layer: int):
        if isinstance(item, Node):
            return self._reference(item, layer)
        if isinstance(item, (tuple, list)):
            return (type(item).__name__,) + tuple(self._described(part, layer) for part in item)
        if isinstance(item, dict):
            return ("dict",) + tuple((key, self._described(part, layer)) for key, part in item.items())
        return ("constant", type(item).__name__, item)

    def _meta_described(self, node: Node, layer: int):
        # fx's other records (tensor_meta, eager_input_vals) are derived from these values.
        gradient = meta.gradient_of(node)
        return (_value_signature(meta.value(node)) if meta.has_value(node) else None, meta.stack_trace(node),
                tuple((self.run.renamed(path, layer, "*"), self.run.renamed(inner, layer, "*"), kind)
                      for path, (inner, kind) in meta.module_stack(node).items()),
                self.run.renamed(gradient, layer, "*") if gradient else None)

    def _signature(self, node: Node, layer: int):
        named = node.op != "placeholder"
        return (node.op, node.target if named else None, _base_name(node.name) if named else None,
                self._described(node.args, layer), self._described(node.kwargs, layer),
                self._meta_described(node, layer), node.type)

    def check(self) -> None:
        """The two middle layers' blocks agree node for node, up to the layer index."""
        for item in self.plan:
            if item[0] != "run" or self.first not in item[2]:
                continue
            left, right = self.blocks[(item[1], self.first)], self.blocks[(item[1], self.second)]
            if len(left) != len(right):
                raise _NotReplicable(f"layers {self.first} and {self.second} have {len(left)} and {len(right)} nodes")
            for mine, theirs in zip(left, right):
                if self._signature(mine, self.first) != self._signature(theirs, self.second):
                    raise _NotReplicable(f"layers {self.first} and {self.second} differ at {mine.name} / {theirs.name}")

    # ------------------------------------------------------------------------- the build
    def _lookup(self, node: Node, source: int | None, full: int | None) -> Node:
        found = self.layer[node]
        if found is None:
            return self.shared[node]
        if source in (self.first, self.second):
            target = full + (found - source)
        elif found in (self.first, self.second) and source is None:
            raise _NotReplicable(f"a node outside the layers reads the middle layer {found} ({node.name})")
        else:
            if source is not None and abs(found - source) > 1:
                raise _NotReplicable(f"a node of layer {source} reads layer {found}")
            target = self.run.full_index(found)
        return self.built[(self.segment[node], target)][self.position[node]]

    def _middle_layers(self, leading: int) -> range:
        """The model's layers that the middle stretch stands for, in the order of the prefix."""
        if leading == self.first:
            return range(self.first, self.run.stop - 1)
        return range(self.run.stop - 2, self.first - 1, -1)

    def _shared_list(self, items):
        """A list argument of a shared node, a stretch of middle layers' entries written out for every layer."""
        out, index, middle = [], 0, (self.first, self.second)
        while index < len(items):
            item = items[index]
            if not (isinstance(item, Node) and self.layer[item] in middle):
                out.append(self._mapped(item, None, None))
                index += 1
                continue
            groups = []
            for layer in (self.layer[item], sum(middle) - self.layer[item]):
                group = []
                while index < len(items) and isinstance(items[index], Node) and self.layer[items[index]] == layer:
                    group.append((self.segment[items[index]], self.position[items[index]]))
                    index += 1
                groups.append(group)
            if groups[0] != groups[1]:
                raise _NotReplicable("a list holds the two middle layers' values in different patterns")
            for full in self._middle_layers(self.layer[item]):
                out.extend(self.built[(segment, full)][position] for segment, position in groups[0])
        return type(items)(out)

    def _mapped(self, item, source: int | None, full: int | None):
        if isinstance(item, Node):
            return self._lookup(item, source, full)
        if isinstance(item, (tuple, list)):
            if source is None:  # a list argument of a node outside the layers
                return self._shared_list(item)
            return type(item)(self._mapped(part, source, full) for part in item)
        if isinstance(item, dict):
            return {key: self._mapped(part, source, full) for key, part in item.items()}
        return item

    def _copy(self, node: Node, source: int | None, full: int | None) -> Node:
        """``node`` written into the new graph: ``append_copy`` carries every record; given the
        name fx derived the original's from, the graph's namespace numbers it as the full trace."""
        if node.op == "placeholder":
            name = f"arg{self.inputs}{self.suffix[node]}"
            self.inputs += 1
            node.name = node.target = name  # the prefix graph is not used again
            return append_copy(self.graph, node, node.args, node.kwargs)
        args = tuple(self._mapped(part, source, full) for part in node.args)
        kwargs = {key: self._mapped(part, source, full) for key, part in node.kwargs.items()}
        node.name = self.base[node]
        if source is None and node.op == "call_function" and (
                _flat_length(args, kwargs) != _flat_length(node.args, node.kwargs)
                or any(isinstance(n, Node) and n in self.changed for n in torch.utils._pytree.tree_leaves((args, kwargs)))):
            return self._recomputed(node, args, kwargs)
        new = append_copy(self.graph, node, args, kwargs)
        if source is not None and full != source:
            self._rename_records(new, source, full)
        return new

    def _rename_records(self, node: Node, source: int, full: int) -> None:
        stack = meta.module_stack(node)
        if stack:
            key = (id(stack), source, full)
            if key not in self.stacks:
                self.stacks[key] = {self.run.renamed(path, source, full): (self.run.renamed(inner, source, full), kind)
                                    for path, (inner, kind) in stack.items()}
            meta.set_module_stack(node, self.stacks[key])
        gradient = meta.gradient_of(node)
        if gradient:
            meta.set_gradient_of(node, self.run.renamed(gradient, source, full))

    def _recomputed(self, old: Node, args, kwargs) -> Node:
        """A shared node that reads every layer's values (``stack`` of per-parameter norms) may
        have another shape than in the prefix: its value is computed again on the fake values.
        Where the shape changed, the node carries the new value (and no fx ``tensor_meta``, which
        no pass reads) and the nodes reading it are computed again in turn."""
        if not (isinstance(old.target, torch._ops.OpOverload) and old.target.namespace == "aten"):
            raise _NotReplicable(f"{old.name} reads every layer and cannot be re-evaluated")
        values = torch.fx.node.map_arg((args, kwargs), meta.value)
        fake_mode = next((v.fake_mode for v in torch.utils._pytree.tree_leaves(values) if hasattr(v, "fake_mode")),
                         None)
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            found = old.target(*values[0], **values[1])
        if _value_signature(found) == _value_signature(meta.value(old)):
            return append_copy(self.graph, old, args, kwargs)
        new = self.graph.create_node(old.op, old.target, args, kwargs, name=old.name, type_expr=old.type)
        meta.copy_source_info(old, new)
        meta.set_value(new, found)
        self.changed.add(new)
        return new

    def build(self) -> torch.fx.Graph:
        for item in self.plan:
            if item[0] == "shared":
                self.shared[item[1]] = self._copy(item[1], None, None)
                continue
            _, segment, order = item
            for layer in order:
                if layer in (self.first, self.second):
                    leading = next(found for found in order if found in (self.first, self.second))
                    if layer != leading:
                        continue  # written out with the other middle layer
                    targets = list(self._middle_layers(leading))
                else:
                    targets = [self.run.full_index(layer)]
                for full in targets:
                    # The middle layer next to the run's last layer is the second middle layer's
                    # block, whose references to that last layer are the ones the prefix recorded;
                    # every other middle layer is the first's.
                    source = layer if layer not in (self.first, self.second) else (
                        self.second if full == self.run.stop - 2 else self.first)
                    new_block = self.built[(segment, full)] = []  # filled as it goes: a block reads itself
                    for node in self.blocks[(segment, source)]:
                        new_block.append(self._copy(node, source, full))
                    if self.changed and any(n in self.changed for new in new_block for n in new.all_input_nodes):
                        raise _NotReplicable("a layer reads a value whose shape grows with the layers")
        return self.graph


def _flat_length(args, kwargs) -> int:
    return sum(len(part) for part in (*args, *kwargs.values()) if isinstance(part, (tuple, list)))


def _replicate_layers(gm: GraphModule, layers: list, run: _LayerRun) -> torch.fx.Graph:
    replicator = _Replicator(gm, layers, run)
    replicator.check()
    return replicator.build()


def _mark_phases(gm: GraphModule) -> None:
    """Forward: every node the first output (the loss, or the forward outputs) depends on, and
    every item of a forward op's outputs (the log-sum-exp ``shardgraph.attention`` returns beside
    its output, a norm's saved statistics: the forward op makes them, whatever reads them);
    backward: the rest, which only the gradients need. Read from the graph's structure, so it
    holds for any op the model brings."""
    outputs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    roots = [outputs[0]] if meta.output_roles(gm)[0].kind == "loss" else list(outputs)
    forward: set[Node] = set()
    pending = [n for n in roots if isinstance(n, Node)]
    while pending:
        node = pending.pop()
        if node not in forward:
            forward.add(node)
            pending.extend(node.all_input_nodes)
    for node in gm.graph.nodes:  # in graph order, so an item of an item follows its source
        if node.target is operator.getitem and node.args[0] in forward:
            forward.add(node)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            meta.set_phase(node, Phase.FORWARD if node in forward else Phase.BACKWARD)


def op_histogram(traced: TracedGraph | GraphModule) -> dict[str, int]:
    """How often each op appears (``"aten.mm.default"``, ``"shardgraph.moe_experts.default"``,
    ``"getitem"``), most frequent first: the op families a placement rule table must cover."""
    gm = traced.graph_module if isinstance(traced, TracedGraph) else traced
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = "getitem" if node.target is operator.getitem else str(node.target)
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
