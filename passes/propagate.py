"""Placement propagation: a sharding on every value of the joint graph, with its reason.

Reads
    a traced joint graph module: every placeholder carries a ``meta.GraphInput`` record
    (parameter, buffer or batch input, by name) and the module its ``meta.OutputRole`` list;
    a ``MeshSpec`` and a parameter plan.
Writes (on a copy of the graph; the input is not modified)
    a ``meta.PlacedValue`` on every node: the value's sharding (a tuple for multi-output ops),
    its view, the sharding each tensor input must arrive in (where it differs from the
    producer's, lowering inserts the collective), the reason and the alternatives weighed. On the
    output node, the sharding every output must leave in: the loss replicated, each gradient in
    its parameter's sharding (so ``Partial`` gradients get reduced).
Assumes
    every value has a recorded fake tensor (make_fx sets it); batch inputs divide by their
    sharding (checked, with a message naming the input).

The pass is pure: no collectives are inserted here. It seeds the placeholders from the plan and
the batch sharding, then sweeps forward over the joint graph in topological order (the backward
is just more graph), and repeats with each node's ties broken toward what its consumers asked
for in the previous sweep, until nothing changes.

Repeated layers are placed once: a decision is keyed by everything the rules read (op,
constant arguments, shapes, entering shardings and views, consumers' demand), so the nodes of
the second and later identical layers find their decision made, and a layer whose entering
placements differ runs the rules again. ``PlacedGraph.decisions_reused`` counts the reuse.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch.fx import GraphModule, Node
from torch.fx._lazy_graph_module import _LazyGraphModule

from shardgraph import meta
from shardgraph.frontend.context import collection_paused
from shardgraph.fx_graph import op_name, output_node, output_values, tensor_inputs
from shardgraph.mesh import MeshSpec
from shardgraph.meta import GraphInput, InputKind, PlacedValue, View
from shardgraph.placement import Partial, Placement, Replicate, Shard, Sharding, ShardingError, local_shape

from .cost import LinkModel, redistribution
from .optimizer_sharding import optimizer_state_sharding
from .plan import ParameterPlacement, parameter_placements
from .routing_path import routing_path
from .rules import RuleContext, rule_for

__all__ = ["PropagationError", "PlacedGraph", "propagate"]

# Each sweep can settle one more link of a chain of demands (exact routing adds such chains: a
# reduction moved next to its product changes what the ops after it are asked for); reuse makes
# a sweep that changes little cheap.
_MAX_SWEEPS = 6


class PropagationError(ValueError):
    """An op without a rule, a value no rule can place, or inconsistent seeds."""


@dataclass
class PlacedGraph:
    graph_module: GraphModule
    mesh: MeshSpec
    parameters: dict[str, ParameterPlacement]
    input_shardings: dict[str, Sharding]
    sweeps: int
    seconds: float
    fallbacks: list[str] = field(default_factory=list)
    # Parameter name -> how its optimizer state is held padded (``placement.Padding``), for the
    # parameters whose state is split over a data-parallel axis that divides none of its dims.
    state_paddings: dict = field(default_factory=dict)
    # Op placements made by running the rules, and those reused from an identical earlier one
    # (the same op, shapes and entering placements: the nodes of repeated layers).
    decisions_made: int = 0
    decisions_reused: int = 0

    def sharding_of(self, name: str) -> Sharding:
        for node in self.graph_module.graph.nodes:
            if node.name == name or meta.display_name(node) == name:
                return meta.sharding(node)
        raise KeyError(name)

    def nodes(self):
        return [n for n in self.graph_module.graph.nodes if n.op != "output"]


@dataclass(frozen=True)
class Decision:
    """What propagation decided for one op node, before it is written as a ``PlacedValue``."""

    output: Any
    view: View
    inputs: tuple
    reason: str
    alternatives: tuple = ()

    def record(self) -> PlacedValue:
        return PlacedValue(self.output, self.view, self.inputs, self.reason, self.alternatives)


# ----------------------------------------------------------------------------- helpers
def _piece_bytes(node: Node, sharding: Sharding, mesh: MeshSpec) -> float:
    found = meta.tensor_value(node)
    if found is None:
        return 0.0
    numel = found.numel()
    for axis, placement in sharding.items():
        if placement.is_shard():
            numel /= mesh.size(axis)
    return numel * found.element_size()


def _as_sharding(axes, placements: dict[str, Placement | None]) -> Sharding:
    kept = [(a, placements[a]) for a in axes if placements[a] is not None and not placements[a].is_replicate()]
    return Sharding(tuple(a for a, _ in kept), tuple(p for _, p in kept))


def _fmt(value) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join("-" if v is None else repr(v) for v in value) + ")"
    return repr(value)


# ----------------------------------------------------------------------------- choosing
def _reduction_potential(axis: str, placement, piece_bytes: float, link: LinkModel, n: int) -> float:
    """Seconds it would take to make a partial value whole: what keeping it partial defers."""
    if not isinstance(placement, Partial):
        return 0.0
    return link.seconds(axis, redistribution(placement, Replicate(), piece_bytes, n).bytes)


def _choose_axis(ctx: RuleContext, rule, axis: str, placements: tuple, link: LinkModel, demand: Sharding | None,
                 fits=lambda candidate: True, shared: tuple = (), hints: tuple = ()):
    """The cheapest candidate on ``axis``.

    Cost is the seconds of the input redistributions plus a potential for partial values: a
    candidate whose output stays partial is charged what reducing that output would cost, and
    credited what reducing the partial inputs it absorbs would have cost. Deferring a reduction
    is then free only while the deferred value is no larger (so a partial hidden state is reduced
    before an lm_head would turn it into partial logits). A conversion that another consumer
    of the same input already needs (``shared``, from the previous sweep) is free: lowering
    makes it once and every consumer reads it, so a gradient reduced for the norm is read reduced
    by the update as well.
    """
    candidates = list(rule(ctx, axis, placements))
    replicated = tuple(Replicate() for _ in placements)
    if placements != replicated:
        candidates += [c for c in rule(ctx, axis, replicated) if c not in candidates]
    # A shard an input is known to be needed in (``hints``: a gradient in its zero=1 optimizer
    # state's sharding) is made anyway, so reading the input that way is a candidate too; the
    # norm then reads the reduce-scattered gradient as it is.
    for i, options in enumerate(hints):
        for option in options:
            if option.is_shard() and option != placements[i]:
                hypothetical = placements[:i] + (option,) + placements[i + 1:]
                candidates += [c for c in rule(ctx, axis, hypothetical) if c not in candidates]
    candidates = [c for c in candidates if fits(c)]
    if not candidates:
        return None, []
    n = ctx.mesh.size(axis)
    input_bytes = [_piece_bytes(node, sharding, ctx.mesh) for node, sharding in zip(ctx.inputs, ctx.input_shardings)]
    output_bytes = _estimated_output_bytes(ctx, input_bytes)
    scored = []
    for order, candidate in enumerate(candidates):
        seconds = 0.0
        for i, (current, wanted, nbytes) in enumerate(zip(placements, candidate.inputs, input_bytes)):
            if wanted is None:
                continue
            if i < len(shared) and wanted in shared[i] and isinstance(current, Partial):
                continue
            seconds += link.seconds(axis, redistribution(current, wanted, nbytes, n).bytes)
            if current.is_shard() and not wanted.is_shard() and _is_parameter_view(ctx.inputs[i]):
                # A parameter read gathered is differentiated gathered: each rank's gradient of it
                # then covers only the rank's own rows of the product, a partial sum that the
                # backward must reduce-scatter back to the parameter's split, one more collective
                # that the backward's own choice cannot avoid. Its latency is charged here; its
                # bytes are priced where the backward reduces the gradient.
                seconds += link.alpha(axis)
            # Only a pending reduction can be absorbed: making a whole value partial (a free local
            # zero) defers nothing, it creates a reduction someone must pay for later.
            # Nor is one that another consumer makes anyway (a gradient reduced for the norm).
            reduced_anyway = i < len(shared) and any(not isinstance(p, Partial) for p in shared[i])
            if isinstance(wanted, Partial) and isinstance(current, Partial) and not reduced_anyway:
                seconds -= _reduction_potential(axis, wanted, nbytes, link, n)
        outputs = candidate.output if isinstance(candidate.output, tuple) else (candidate.output,)
        for output, nbytes in zip(outputs, output_bytes):
            seconds += _reduction_potential(axis, output, nbytes, link, n)
        first = outputs[0]
        wanted_out = demand.placement(axis) if isinstance(demand, Sharding) else None
        # Ties go to the placement consumers asked for, then to staying sharded (less memory),
        # then to the order the rule listed its candidates in.
        matches_demand = 0 if wanted_out is not None and first == wanted_out else 1
        sharded = 0 if isinstance(first, Placement) and first.is_shard() else 1
        scored.append((round(seconds, 12), matches_demand, sharded, order, candidate))
    scored.sort(key=lambda item: item[:4])
    return scored[0][4], [(c, s) for s, _, _, _, c in scored]


# Ops through which a parameter keeps its values and layout up to a transpose: reading through
# them reads the parameter.
_PARAMETER_VIEWS = ("aten.t.", "aten.transpose.", "aten.view.", "aten._unsafe_view.", "aten.reshape.",
                    "aten.permute.", "aten._to_copy.", "prims.convert_element_type.", "aten.alias.", "aten.detach.")


def _is_parameter_view(node: Node) -> bool:
    while node.op == "call_function" and str(node.target).startswith(_PARAMETER_VIEWS):
        node = node.args[0]
    if node.op != "placeholder":
        return False
    record = meta.graph_input(node)
    return record is not None and record.kind is InputKind.PARAMETER


def _estimated_output_bytes(ctx: RuleContext, input_bytes: list[float]) -> list[float]:
    """Local byte size of each output, assuming it is split like the largest input."""
    values = ctx.output_value if isinstance(ctx.output_value, (tuple, list)) else (ctx.output_value,)
    ratio = 1.0
    if ctx.inputs:
        largest = max(range(len(ctx.inputs)), key=lambda i: meta.value(ctx.inputs[i]).numel())
        global_bytes = meta.value(ctx.inputs[largest]).numel() * meta.value(ctx.inputs[largest]).element_size()
        ratio = input_bytes[largest] / global_bytes if global_bytes else 1.0
    return [v.numel() * v.element_size() * ratio if isinstance(v, torch.Tensor) else 0.0 for v in values]



# ----------------------------------------------------------------------------- seeds
@dataclass
class _State:
    """The sharding and view of every value so far, and what the seeds were."""

    current: dict[Node, Any] = field(default_factory=dict)
    views: dict[Node, View] = field(default_factory=dict)
    parameters: dict[str, ParameterPlacement] = field(default_factory=dict)
    # Parameter name -> (its optimizer state's sharding, why, padding): ``optimizer_state_sharding``.
    state_shardings: dict[str, tuple[Sharding, str, Any]] = field(default_factory=dict)
    input_shardings: dict[str, Sharding] = field(default_factory=dict)
    # The shardings each value's consumers required in the previous sweep.
    required_of: dict[Node, set] = field(default_factory=dict)
    # Shardings a value is known to be needed in before any consumer asks: with zero=1, a
    # gradient in its optimizer state's sharding (the update reads it there).
    wanted_by_state: dict[Node, set] = field(default_factory=dict)
    # (shape, placements per axis) -> whether it splits evenly on this mesh: the same few recur
    # in every layer, and local_shape is the sweep's costliest call.
    even_splits: dict = field(default_factory=dict)
    # Each op node's tensor inputs and the part of its decision key that no sweep changes (see
    # ``_static_key``), computed once per propagation.
    inputs_of: dict[Node, list[Node]] = field(default_factory=dict)
    static_keys: dict[Node, Any] = field(default_factory=dict)
    # Decision key -> the decision made for it. Repeated layers present every op with the same
    # key, so only the first layer (and any layer whose entering placements differ) runs the rules.
    decisions: dict = field(default_factory=dict)
    reuse: bool = True
    # The ops a routing decision reads (``routing_path``): none of them reads a ``Partial`` input.
    routing: set = field(default_factory=set)
    made: int = 0
    reused: int = 0

    def place(self, node: Node, decision: Decision) -> None:
        self.current[node], self.views[node] = decision.output, decision.view
        meta.set_placed(node, decision.record())


def _seed(gm: GraphModule, mesh: MeshSpec, plan, batch_sharding, zero: int = 0) -> _State:
    """Placements of the placeholders (plan, batch sharding, replicated buffers, optimizer state
    by ``zero``) and constants."""
    state = _State()
    placeholders = meta.graph_inputs(gm.graph)
    parameter_nodes = {record.name: n for n, record in placeholders if record.kind is InputKind.PARAMETER}
    parameter_shapes = {name: _logical_shape(node) for name, node in parameter_nodes.items()}
    state.parameters = parameter_placements(gm, mesh, plan)
    if zero == 3:
        # The parameter is held split over dp/edp like its state; its readers see it gathered
        # (``gather_parameters`` put a gather_parameter node before them).
        for name, placement in list(state.parameters.items()):
            held, why, padding = optimizer_state_sharding(name, parameter_shapes[name], placement.sharding,
                                                          placement.view, mesh, zero)
            state.state_shardings[name] = (held, why, padding)
            state.parameters[name] = dataclasses.replace(placement, sharding=held, gathered=placement.sharding,
                                                         padding=padding)
    for name, node in parameter_nodes.items():
        _check_padding(node, f"parameter {name!r}", state.parameters[name].padding)
    for node, record in placeholders:
        if record.kind is not InputKind.OPTIMIZER_STATE:
            continue
        if record.parameter not in state.state_shardings:
            placement = state.parameters[record.parameter]
            state.state_shardings[record.parameter] = optimizer_state_sharding(
                record.parameter, parameter_shapes[record.parameter], placement.sharding, placement.view, mesh, zero)
        _check_padding(node, f"optimizer state {record.name!r}", state.state_shardings[record.parameter][2])
    for node, record in placeholders:
        state.place(node, _seed_decision(node, record, state, mesh, batch_sharding))
    for node in gm.graph.nodes:
        parameter = meta.gradient_of(node)
        if parameter in state.state_shardings:
            placement = state.parameters[parameter]
            if state.state_shardings[parameter][0] != (placement.gathered or placement.sharding):
                state.wanted_by_state[node] = {state.state_shardings[parameter][0]}
    state.required_of = {node: set(wanted) for node, wanted in state.wanted_by_state.items()}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            # Constants captured during tracing (a literal tensor in the model): every rank has them.
            state.place(node, Decision(Sharding.replicate(), View.DENSE, (), f"constant {node.target} replicated"))
    return state


def _logical_shape(node: Node) -> tuple:
    held, padding = tuple(meta.value(node).shape), meta.padding(node)
    return held if padding is None else padding.logical_shape(held)


def _check_padding(node: Node, what: str, needed) -> None:
    """The placeholder's value must be held as its sharding needs: padded where the data-parallel
    axis divides no dim (``passes/pad_parameters.py`` pads it before propagation)."""
    held = meta.padding(node)
    if held != needed:
        raise PropagationError(f"{what} is held {'with ' + repr(held) if held else 'unpadded'}, but its sharding "
                               f"over the data-parallel axis needs {'no padding' if needed is None else repr(needed)}; "
                               f"run passes/pad_parameters.py (with the same mesh, plan and zero) before propagate")


def _seed_decision(node: Node, record: GraphInput, state: _State, mesh: MeshSpec, batch_sharding) -> Decision:
    if record.kind is InputKind.PARAMETER:
        placement = state.parameters[record.name]
        how = (f"matched plan pattern {placement.pattern!r} -> {placement.style}" if placement.pattern
               else "matched no plan pattern -> replicate")
        return Decision(placement.sharding, placement.view, (), f"seed: parameter {record.name!r} {how}")
    if record.kind is InputKind.INPUT:
        sharding = _batch_sharding(record.name, meta.value(node), mesh, batch_sharding)
        state.input_shardings[record.name] = sharding
        return Decision(sharding, View.DENSE, (), f"seed: batch input {record.name!r} {sharding!r}")
    if record.kind is InputKind.BUFFER:
        return Decision(Sharding.replicate(), View.DENSE, (), f"seed: buffer {record.name!r} replicated")
    if record.kind is InputKind.OPTIMIZER_STATE:
        # State lives where its parameter lives (zero=0), so the update is local to every piece,
        # or on a 1/dp slice of it (zero=1).
        sharding, why, _ = state.state_shardings[record.parameter]
        return Decision(sharding, state.parameters[record.parameter].view, (),
                        f"seed: optimizer state {record.name!r} {why}")
    if record.kind is InputKind.SCALAR:
        return Decision(Sharding.replicate(), View.DENSE, (), f"seed: scalar {record.name!r} replicated")
    if record.kind is InputKind.SEED:
        return Decision(Sharding.replicate(), View.DENSE, (), "seed: the random draws' seed, replicated")
    raise PropagationError(f"placeholder {node.name} is a {record.kind.value}; propagation runs before any "
                           f"pass adds one")


def _batch_sharding(name: str, found: torch.Tensor, mesh: MeshSpec, batch_sharding) -> Sharding:
    sharding = batch_sharding.get(name) if isinstance(batch_sharding, Mapping) else batch_sharding
    if sharding is None:
        if found.dim() == 0 or mesh.dp == 1:
            return Sharding.replicate()
        sharding = Sharding.of(dp=Shard(0))
    try:
        local_shape(tuple(found.shape), sharding, mesh, name=f"batch input {name!r}")
    except ShardingError as error:
        raise PropagationError(f"{error}; choose a global batch divisible by dp={mesh.dp}") from None
    return sharding


# ----------------------------------------------------------------------------- one node
def _replicate_fallback(node: Node, inputs: list[Node]) -> Decision:
    replicated = Sharding.replicate()
    outputs = meta.value(node)
    out = tuple(replicated for _ in outputs) if isinstance(outputs, (tuple, list)) else replicated
    return Decision(out, View.DENSE, tuple(replicated for _ in inputs), "replicate fallback (no rule for this op)")


def _place_whole(node: Node, registered, inputs, input_shardings, mesh: MeshSpec, link: LinkModel,
                 exact: bool = False) -> Decision:
    """Rules that see every axis at once (the MoE ops): the strategy whose input changes cost least."""
    ctx = RuleContext(node, mesh, inputs, input_shardings, View.DENSE, View.DENSE.axes)
    best, best_cost, alternatives = None, None, []
    for strategy in registered.function(ctx):
        if exact and _reads_partial(strategy.inputs):
            continue
        seconds = 0.0
        for producer, have, want in zip(inputs, input_shardings, strategy.inputs):
            if want is None:
                continue
            for axis in set(have.axes) | set(want.axes):
                change = redistribution(have.placement(axis), want.placement(axis),
                                        _piece_bytes(producer, have, mesh), mesh.size(axis))
                seconds += link.seconds(axis, change.bytes)
        alternatives.append((strategy.note, seconds))
        if best is None or seconds < best_cost:
            best, best_cost = strategy, seconds
    if best is None:
        raise PropagationError(f"rule {registered.family} offered no strategy for node {node.name}; "
                               f"{meta.source_line(node)}")
    return Decision(best.output, best.view, best.inputs, f"{registered.family}: {best.note}", tuple(alternatives))


def _place_per_axis(node: Node, registered, inputs, input_shardings, view: View, mesh: MeshSpec, link: LinkModel,
                    demand: Sharding | None, shared_by_input: tuple = (), even_splits: dict | None = None,
                    hints_by_input: tuple = (), exact: bool = False) -> Decision:
    """Rules written per mesh axis: the cheapest candidate on each axis of the node's view.

    ``exact``: the node is on the way into a routing decision, so no candidate that reads a
    ``Partial`` input is taken (its inputs are reduced first, as ``routing_path`` explains)."""
    axes = view.axes
    ctx = RuleContext(node, mesh, inputs, input_shardings, view, axes)
    per_axis_in: dict[str, tuple] = {}
    per_axis_out: dict[str, Any] = {}
    reasons, alternatives = [], []
    for axis in axes:
        if mesh.size(axis) == 1:
            per_axis_in[axis] = tuple(Replicate() for _ in inputs)
            out = ctx.output_value
            per_axis_out[axis] = tuple(Replicate() for _ in out) if isinstance(out, (tuple, list)) else Replicate()
            continue
        placements = tuple(s.placement(axis) for s in input_shardings)
        fits = _even_split_check(ctx, axis, per_axis_in, per_axis_out, {} if even_splits is None else even_splits)
        if exact:
            fits = _and_reads_no_partial(fits)
        shared = tuple({s.placement(axis) for s in others} for others in shared_by_input)
        hints = tuple({s.placement(axis) for s in wanted} for wanted in hints_by_input)
        chosen, scored = _choose_axis(ctx, registered.function, axis, placements, link, demand, fits, shared, hints)
        if chosen is None:
            raise PropagationError(
                f"no placement of node {node.name} ({op_name(node.target)}) works on axis {axis} "
                f"for inputs {placements}; {meta.source_line(node)}"
            )
        per_axis_in[axis] = chosen.inputs
        per_axis_out[axis] = chosen.output
        reasons.append(f"{axis}: {_fmt(placements)} -> {_fmt(chosen.output)}" + (f" ({chosen.note})" if chosen.note else ""))
        if len(scored) > 1:
            alternatives.extend((f"{axis}: in {_fmt(c.inputs)} out {_fmt(c.output)}", s) for c, s in scored)
    required = tuple(
        _as_sharding(axes, {a: per_axis_in[a][i] if per_axis_in[a][i] is not None else input_shardings[i].placement(a)
                            for a in axes})
        for i in range(len(inputs))
    )
    sample = per_axis_out[axes[0]]
    if isinstance(sample, tuple):
        output = tuple(
            None if all(per_axis_out[a][k] is None for a in axes)
            else _as_sharding(axes, {a: per_axis_out[a][k] or Replicate() for a in axes})
            for k in range(len(sample))
        )
    else:
        output = _as_sharding(axes, per_axis_out)
    reason = f"{registered.family}: " + ("; ".join(reasons) if reasons else "every axis has size 1")
    return Decision(output, view, required, reason, tuple(alternatives))


def _even_split_check(ctx: RuleContext, axis: str, per_axis_in: dict, per_axis_out: dict, known: dict):
    """Whether a candidate on ``axis``, with the placements chosen on the axes before it, splits
    every input it asks for and every output evenly. A rule sees one axis at a time, so a shard
    of a dim that another axis already divides (6 rows over dp=2, then over tp=2) is caught here
    rather than as a ragged piece at run time."""

    def splits(found, placements: dict) -> bool:
        if not isinstance(found, torch.Tensor) or found.dim() == 0:
            return True
        if not any(p is not None and p.is_shard() for p in placements.values()):
            return True
        key = (tuple(found.shape), tuple(placements.items()))
        if key not in known:
            try:
                local_shape(key[0], _as_sharding(tuple(placements), placements), ctx.mesh)
                known[key] = True
            except ShardingError:
                known[key] = False
        return known[key]

    def fits(candidate) -> bool:
        for i, producer in enumerate(ctx.inputs):
            placements = {a: per_axis_in[a][i] or ctx.input_shardings[i].placement(a) for a in per_axis_in}
            placements[axis] = candidate.inputs[i] or ctx.input_shardings[i].placement(axis)
            if not splits(meta.value(producer), placements):
                return False
        outputs = candidate.output if isinstance(candidate.output, tuple) else (candidate.output,)
        values = ctx.output_value if isinstance(ctx.output_value, (tuple, list)) else (ctx.output_value,)
        for k, (found, placement) in enumerate(zip(values, outputs)):
            placements = {}
            for a, out in per_axis_out.items():
                earlier = out[k] if isinstance(out, tuple) else out
                placements[a] = earlier or Replicate()
            placements[axis] = placement or Replicate()
            if not splits(found, placements):
                return False
        return True

    return fits


def _reads_partial(placements) -> bool:
    for placement in placements:
        found = placement.items() if isinstance(placement, Sharding) else [(None, placement)]
        if any(isinstance(p, Partial) for _, p in found):
            return True
    return False


def _and_reads_no_partial(fits):
    return lambda candidate: fits(candidate) and not _reads_partial(candidate.inputs)


def _place_node(node: Node, inputs: list[Node], state: _State, mesh: MeshSpec, link: LinkModel,
                demand: Sharding | None, fallback: bool) -> Decision:
    input_shardings = [state.current[n] for n in inputs]
    for producer, have in zip(inputs, input_shardings):
        if isinstance(have, tuple):
            raise PropagationError(f"node {node.name} reads multi-output node {producer.name} directly")
    registered = rule_for(node.target)
    if registered is None:
        if not fallback:
            raise PropagationError(f"node {node.name} ({op_name(node.target)}) has no placement rule")
        return _replicate_fallback(node, inputs)
    exact = node in state.routing
    if registered.whole:
        return _place_whole(node, registered, inputs, input_shardings, mesh, link, exact)
    input_views = {state.views[n] for n, s in zip(inputs, input_shardings) if View.of_sharding(s) is not None}
    if len(input_views) > 1:
        raise PropagationError(
            f"node {node.name} ({op_name(node.target)}) mixes dense-view and expert-view inputs "
            f"{[(n.name, str(state.current[n])) for n in inputs]}; only the MoE ops bridge the two views"
        )
    view = input_views.pop() if input_views else View.DENSE
    shared = tuple(state.required_of.get(producer, set()) - {state.current[producer]} for producer in inputs)
    hints = tuple(state.wanted_by_state.get(producer, set()) - {state.current[producer]} for producer in inputs)
    return _place_per_axis(node, registered, inputs, input_shardings, view, mesh, link, demand, shared,
                           state.even_splits, hints, exact)


# ----------------------------------------------------------------------------- reuse
# A decision is a function of what ``_place_node`` reads: the op, its constant arguments, the
# shapes and dtypes of its inputs and outputs, which argument positions share a producer, the
# inputs' current shardings and views, the consumers' demand and the conversions other consumers
# already need. Two nodes that agree on all of it get the same decision, so it is made once: the
# nodes of identical layers agree whenever the placements entering the layer agree, and any
# difference (a first or last layer, a placement that changed between sweeps) is a different key
# and runs the rules. Rules read node names only to word their errors, which are not memoised.
class _Unkeyable(Exception):
    """An argument or value with no exact, hashable description: the node is placed without reuse."""


def _value_key(found) -> Any:
    if isinstance(found, torch.Tensor):
        return ("tensor", tuple(found.shape), found.dtype)
    if isinstance(found, (tuple, list)):
        return (type(found).__name__,) + tuple(_value_key(item) for item in found)
    if found is None or isinstance(found, (bool, int, str, torch.dtype)):
        return (type(found).__name__, found)
    raise _Unkeyable(type(found).__name__)


def _argument_key(item, producers: dict[Node, int]) -> Any:
    if isinstance(item, Node):
        found = meta.value(item) if meta.has_value(item) else None
        return ("node", producers.setdefault(item, len(producers)), _value_key(found))
    if isinstance(item, (tuple, list)):
        return (type(item).__name__,) + tuple(_argument_key(part, producers) for part in item)
    if isinstance(item, dict):
        return ("dict",) + tuple((name, _argument_key(part, producers)) for name, part in sorted(item.items()))
    if isinstance(item, float) and item != item:
        raise _Unkeyable("nan")  # nan != nan: no key would ever match, and none is needed
    if item is None or isinstance(item, (bool, int, float, str, torch.dtype, torch.device, torch.layout,
                                         torch.memory_format)):
        return (type(item).__name__, item)
    raise _Unkeyable(type(item).__name__)


def _static_key(node: Node) -> Any:
    """What a decision depends on that sweeps do not change; None where it cannot be described."""
    producers: dict[Node, int] = {}
    try:
        return (node.target, _argument_key(node.args, producers), _argument_key(node.kwargs, producers),
                _value_key(meta.value(node)))
    except (_Unkeyable, TypeError):
        return None


def _decision_key(node: Node, inputs: list[Node], state: _State, demand: Sharding | None) -> Any:
    static = state.static_keys[node]
    if static is None:
        return None
    current, required_of = state.current, state.required_of
    shardings = tuple(current[producer] for producer in inputs)
    shared = tuple(frozenset(required_of[producer] - {current[producer]}) if producer in required_of else frozenset()
                   for producer in inputs)
    return static, shardings, tuple(state.views[producer] for producer in inputs), demand, shared


def _prepare_keys(compute_nodes: list[Node], state: _State) -> None:
    interned: dict[Any, int] = {}
    for node in compute_nodes:
        state.inputs_of[node] = tensor_inputs(node)
        if node.target is operator.getitem:
            continue
        static = _static_key(node)
        if static is not None:
            # A routing op is placed under its own constraint, a pad of a held gradient
            # (``pad_parameters``) under its rule's own; an input that is a parameter is priced
            # with its gradient's reduction (``_choose_axis``).
            static = (static, node in state.routing, meta.padding(node) is not None,
                      tuple(_is_parameter_view(producer) for producer in state.inputs_of[node]))
        # A small int stands for the (deep) static key, so the per-sweep key hashes cheaply.
        state.static_keys[node] = None if static is None else interned.setdefault(static, len(interned))


# ----------------------------------------------------------------------------- sweeps
def _refuse_missing_rules(compute_nodes: list[Node], replicate_fallback: bool) -> None:
    missing = [n for n in compute_nodes if rule_for(n.target) is None and n.target is not operator.getitem]
    if missing and not replicate_fallback:
        listed = "\n".join(f"  {n.name}: {op_name(n.target)} at {meta.source_line(n)}" for n in missing)
        raise PropagationError(
            f"{len(missing)} op(s) have no placement rule (pass replicate_fallback=True to replicate them):\n{listed}"
        )


def _sweep(compute_nodes: list[Node], state: _State, mesh: MeshSpec, link: LinkModel,
           demands: dict[Node, Sharding], replicate_fallback: bool) -> list[str]:
    """One forward pass over the ops; returns the nodes replicated for lack of a rule."""
    fallbacks = []
    for node in compute_nodes:
        if node.target is operator.getitem:
            source, index = node.args
            produced = state.current[source]
            item = produced[index] if isinstance(produced, tuple) else produced
            state.place(node, Decision(item, View.of_sharding(item) or state.views[source], (),
                                       f"output {index} of {source.name}"))
            continue
        inputs = state.inputs_of[node]
        demand = demands.get(node)
        key = _decision_key(node, inputs, state, demand) if state.reuse else None
        decision = state.decisions.get(key) if key is not None else None
        if decision is None:
            try:
                decision = _place_node(node, inputs, state, mesh, link, demand, replicate_fallback)
            except ShardingError as error:
                raise PropagationError(f"node {node.name} ({op_name(node.target)}): {error}") from None
            state.made += 1
            if key is not None:
                state.decisions[key] = decision
        else:
            state.reused += 1
        if rule_for(node.target) is None:
            fallbacks.append(node.name)
        state.place(node, decision)
    return fallbacks


def _demands(compute_nodes: list[Node], inputs_of: dict[Node, list[Node]]) -> dict[Node, Sharding]:
    """What each value's consumers asked for (the last consumer in graph order wins ties)."""
    found: dict[Node, Sharding] = {}
    for node in reversed(compute_nodes):
        for producer, wanted in zip(inputs_of[node], meta.placed(node).input_shardings):
            if wanted is not None and producer not in found:
                found[producer] = wanted
    return found


def _required_of(compute_nodes: list[Node], inputs_of: dict[Node, list[Node]]) -> dict[Node, set]:
    found: dict[Node, set] = {}
    for node in compute_nodes:
        for producer, wanted in zip(inputs_of[node], meta.placed(node).input_shardings):
            if isinstance(wanted, Sharding):
                found.setdefault(producer, set()).add(wanted)
    return found


def _sweep_to_fixed_point(compute_nodes: list[Node], state: _State, mesh: MeshSpec, link: LinkModel,
                          replicate_fallback: bool) -> tuple[int, list[str]]:
    demands: dict[Node, Sharding] = {}
    previous: dict[Node, Any] | None = None
    sweeps = 0
    while sweeps < _MAX_SWEEPS:
        sweeps += 1
        fallbacks = _sweep(compute_nodes, state, mesh, link, demands, replicate_fallback)
        snapshot = dict(state.current)
        if snapshot == previous:
            break
        previous, demands = snapshot, _demands(compute_nodes, state.inputs_of)
        state.required_of = _required_of(compute_nodes, state.inputs_of)
        for node, wanted in state.wanted_by_state.items():
            state.required_of.setdefault(node, set()).update(wanted)
    return sweeps, fallbacks


def propagate(
    graph_module: GraphModule,
    mesh: MeshSpec,
    plan: Mapping[str, str] | None = None,
    *,
    batch_sharding: Sharding | Mapping[str, Sharding] | None = None,
    link: LinkModel | None = None,
    replicate_fallback: bool = False,
    reuse_decisions: bool = True,
    zero: int = 0,
    in_place: bool = False,
) -> PlacedGraph:
    """Place every value of a traced joint graph on ``mesh``. See the module docstring.

    ``reuse_decisions=False`` runs the rules for every node in every sweep (the result is the
    same; it is there to check that reuse changes nothing). ``in_place=True`` records the
    placements on ``graph_module`` itself instead of on a copy (the pipeline, whose graph is
    its own copy already)."""
    if not isinstance(graph_module, GraphModule):
        raise TypeError(f"propagate takes the traced fx GraphModule, got {type(graph_module).__name__}")
    started = time.perf_counter()
    link = link or LinkModel()
    gm = graph_module if in_place else _copy(graph_module)
    state = _seed(gm, mesh, plan, batch_sharding, zero)
    state.reuse = reuse_decisions
    state.routing = routing_path(gm)
    compute_nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    _refuse_missing_rules(compute_nodes, replicate_fallback)
    _prepare_keys(compute_nodes, state)

    with collection_paused():
        sweeps, fallbacks = _sweep_to_fixed_point(compute_nodes, state, mesh, link, replicate_fallback)

    _place_outputs(gm, state)
    _check_every_value_placed(gm)
    with_state = {record.parameter for _, record in meta.graph_inputs(gm.graph, InputKind.OPTIMIZER_STATE)}
    paddings = {name: held[2] for name, held in state.state_shardings.items()
                if held[2] is not None and name in with_state}
    return PlacedGraph(gm, mesh, state.parameters, state.input_shardings, sweeps, time.perf_counter() - started,
                       fallbacks, paddings, state.made, state.reused)


def _copy(graph_module: GraphModule) -> GraphModule:
    """A copy to place, writing its Python code only if it is run or read: the placed graph is
    for reports, and lowering works on a copy of its own."""
    copied = _LazyGraphModule(graph_module, copy.deepcopy(graph_module.graph))
    meta.copy_module_records(graph_module, copied)
    return copied


def _place_outputs(gm: GraphModule, state: _State) -> None:
    flat = output_values(gm.graph)
    roles = meta.output_roles(gm)
    if len(roles) != len(flat):
        raise PropagationError(f"the graph has {len(flat)} outputs but {len(roles)} output roles")
    required = []
    for found, role in zip(flat, roles):
        if not isinstance(found, Node):
            required.append(None)
        elif role.kind == "state" and role.parameter in state.state_shardings:
            required.append(state.state_shardings[role.parameter][0])
        elif role.kind in ("grad", "param", "state") and role.parameter in state.parameters:
            required.append(state.parameters[role.parameter].sharding)
        elif role.kind in ("loss", "metric"):
            required.append(Sharding.replicate())
        else:
            required.append(state.current.get(found))
    meta.set_placed(output_node(gm.graph), PlacedValue(
        None, None, tuple(required), "loss and metrics replicated; each gradient and updated parameter in its "
                                     "parameter's sharding, each optimizer state as it came in"))


def _check_every_value_placed(gm: GraphModule) -> None:
    unplaced = [n.name for n in gm.graph.nodes if meta.placed(n) is None]
    if unplaced:
        raise PropagationError(f"values without a placement after propagation: {unplaced}")
