"""Placement propagation: a sharding on every value of the joint graph, with its reason.

Reads
    a traced joint graph (``shardgraph.frontend.TracedGraph`` or an fx GraphModule whose
    placeholders carry ``meta["shardgraph_kind"]`` and ``meta["shardgraph_name"]``), a
    ``MeshSpec``, and a parameter plan.
Writes (on a copy of the graph; the input is not modified)
    ``node.meta["sharding"]``        the value's ``Sharding`` (a tuple for multi-output ops)
    ``node.meta["view"]``            ``"dense"`` (dp, tp) or ``"expert"`` (edp, ep, etp)
    ``node.meta["input_shardings"]`` the sharding the op needs each tensor input in; where it
                                     differs from the producer's, lowering inserts the collective
    ``node.meta["placement_reason"]`` why (plan seed, batch seed, rule and candidate chosen)
    ``node.meta["placement_alternatives"]`` the candidates considered and their cost (seconds)
    and, on the output node, the sharding every output must leave in: the loss replicated,
    each gradient in its parameter's sharding (so ``Partial`` gradients get reduced).
Assumes
    every value has ``meta["val"]`` (make_fx sets it); the batch's dim 0 is divisible by dp.

The pass is pure: no collectives are inserted here. Propagation runs forward over the joint
graph in topological order (the backward is just more graph), then repeats with each node's
ties broken toward what its consumers asked for in the previous sweep, until nothing changes.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch.fx import GraphModule, Node

from shardgraph.mesh import DENSE_AXES, EXPERT_AXES, MeshSpec
from shardgraph.placement import Partial, Placement, Replicate, Shard, Sharding, ShardingError, local_shape

from .cost import LinkModel, redistribution
from .plan import ParameterPlacement, default_plan, resolve_plan
from .rules import RuleContext, Strategy, op_name, rule_for, tensor_inputs, value_of

__all__ = ["PropagationError", "PlacedGraph", "propagate"]

_MAX_SWEEPS = 4


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
    traced: Any = None

    def sharding_of(self, name: str) -> Sharding:
        for node in self.graph_module.graph.nodes:
            if node.name == name or node.meta.get("shardgraph_name") == name:
                return node.meta["sharding"]
        raise KeyError(name)

    def nodes(self):
        return [n for n in self.graph_module.graph.nodes if n.op != "output"]


# ----------------------------------------------------------------------------- helpers
def _axes(view: str) -> tuple[str, ...]:
    return EXPERT_AXES if view == "expert" else DENSE_AXES


def _piece_bytes(node: Node, sharding: Sharding, mesh: MeshSpec) -> float:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return 0.0
    numel = value.numel()
    for axis, placement in sharding.items():
        if placement.is_shard():
            numel /= mesh.size(axis)
    return numel * value.element_size()


def _view_of_sharding(sharding: Sharding) -> str | None:
    names = set(a for a, p in sharding.items() if not p.is_replicate())
    if names & set(EXPERT_AXES):
        return "expert"
    if names & set(DENSE_AXES):
        return "dense"
    return None


def _as_sharding(axes, placements: dict[str, Placement | None]) -> Sharding:
    kept = [(a, placements[a]) for a in axes if placements[a] is not None and not placements[a].is_replicate()]
    return Sharding(tuple(a for a, _ in kept), tuple(p for _, p in kept))


def _source_line(node: Node) -> str:
    trace = node.meta.get("stack_trace")
    if not trace:
        return "(no source line recorded)"
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip().startswith("File ")]
    return lines[-1] if lines else trace.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- seeds
def _placeholders(gm: GraphModule, traced) -> list[tuple[Node, str, str]]:
    """(node, kind, name) of every placeholder; kind in parameter / buffer / input."""
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if all("shardgraph_kind" in n.meta for n in nodes):
        return [(n, n.meta["shardgraph_kind"], n.meta.get("shardgraph_name", n.name)) for n in nodes]
    if traced is not None:
        names = (
            [("parameter", p) for p in traced.parameter_names]
            + [("buffer", b) for b in traced.buffer_names]
            + [("input", i) for i in traced.input_names]
        )
        if len(names) == len(nodes):
            return [(n, kind, name) for n, (kind, name) in zip(nodes, names)]
    raise PropagationError(
        "cannot tell parameters from inputs: placeholders need meta['shardgraph_kind'] "
        "(trace with shardgraph.frontend.trace)"
    )


def _output_roles(gm: GraphModule, traced, n_outputs: int) -> list[tuple[str, str | None]]:
    """(role, parameter name) per output: ("loss", None), ("grad", name) or ("output", None)."""
    spec = getattr(traced, "output_spec", None) if traced is not None else None
    if spec is not None:
        roles = []
        for item in spec:
            kind = getattr(item, "kind", None) or (item[0] if isinstance(item, tuple) else str(item))
            name = getattr(item, "parameter", None) or getattr(item, "name", None)
            if isinstance(item, tuple) and len(item) > 1:
                name = item[1]
            roles.append((kind, name))
        if len(roles) == n_outputs:
            return roles
    meta_roles = gm.meta.get("shardgraph_output_roles") if hasattr(gm, "meta") else None
    if meta_roles and len(meta_roles) == n_outputs:
        return [tuple(r) for r in meta_roles]
    return [("output", None)] * n_outputs


# ----------------------------------------------------------------------------- core
def _reduction_potential(axis: str, placement, piece_bytes: float, link: LinkModel, n: int) -> float:
    """Seconds it would take to make a partial value whole: what keeping it partial defers."""
    if not isinstance(placement, Partial):
        return 0.0
    return link.seconds(axis, redistribution(placement, Replicate(), piece_bytes, n).bytes)


def _choose_axis(ctx: RuleContext, rule, axis: str, placements: tuple, link: LinkModel, demand: Sharding | None):
    """The cheapest candidate on ``axis``.

    Cost is the seconds of the input redistributions plus a potential for partial values: a
    candidate whose output stays partial is charged what reducing that output would cost, and
    credited what reducing the partial inputs it absorbs would have cost. Deferring a reduction
    is then free only while the deferred value is no larger (so a partial hidden state is reduced
    before an lm_head would turn it into partial logits).
    """
    candidates = list(rule(ctx, axis, placements))
    replicated = tuple(Replicate() for _ in placements)
    if placements != replicated:
        candidates += [c for c in rule(ctx, axis, replicated) if c not in candidates]
    if not candidates:
        return None, []
    n = ctx.mesh.size(axis)
    input_bytes = [_piece_bytes(node, sharding, ctx.mesh) for node, sharding in zip(ctx.inputs, ctx.input_shardings)]
    output_bytes = _estimated_output_bytes(ctx, input_bytes)
    scored = []
    for order, candidate in enumerate(candidates):
        seconds = 0.0
        for current, wanted, nbytes in zip(placements, candidate.inputs, input_bytes):
            if wanted is None:
                continue
            seconds += link.seconds(axis, redistribution(current, wanted, nbytes, n).bytes)
            if isinstance(wanted, Partial):
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


def _estimated_output_bytes(ctx: RuleContext, input_bytes: list[float]) -> list[float]:
    """Local byte size of each output, assuming it is split like the largest input."""
    values = ctx.output_value if isinstance(ctx.output_value, (tuple, list)) else (ctx.output_value,)
    ratio = 1.0
    if ctx.inputs:
        largest = max(range(len(ctx.inputs)), key=lambda i: value_of(ctx.inputs[i]).numel())
        global_bytes = value_of(ctx.inputs[largest]).numel() * value_of(ctx.inputs[largest]).element_size()
        ratio = input_bytes[largest] / global_bytes if global_bytes else 1.0
    return [v.numel() * v.element_size() * ratio if isinstance(v, torch.Tensor) else 0.0 for v in values]


def _place_node(node: Node, current: dict[Node, Any], views: dict[Node, str], mesh: MeshSpec, link: LinkModel,
                demands: dict[Node, Sharding], fallback: bool) -> tuple[Any, str, tuple, str, list]:
    inputs = tensor_inputs(node)
    input_shardings = [current[n] for n in inputs]
    for n, s in zip(inputs, input_shardings):
        if isinstance(s, tuple):
            raise PropagationError(f"node {node.name} reads multi-output node {n.name} directly")
    registered = rule_for(node.target)
    if registered is None:
        if not fallback:
            return None, "", (), "", []
        replicated = Sharding.replicate()
        outputs = node.meta.get("val")
        out = tuple(replicated for _ in outputs) if isinstance(outputs, (tuple, list)) else replicated
        return out, "dense", tuple(replicated for _ in inputs), "replicate fallback (no rule for this op)", []

    input_views = {views[n] for n in inputs if _view_of_sharding(current[n]) is not None}
    if registered.whole:
        ctx = RuleContext(node, mesh, inputs, input_shardings, "dense", DENSE_AXES)
        strategies: list[Strategy] = list(registered.function(ctx))
        best, best_cost, alternatives = None, None, []
        for strategy in strategies:
            seconds = 0.0
            for n, have, want in zip(inputs, input_shardings, strategy.inputs):
                if want is None:
                    continue
                for axis in set(have.axes) | set(want.axes):
                    change = redistribution(have.placement(axis), want.placement(axis),
                                            _piece_bytes(n, have, mesh), mesh.size(axis))
                    seconds += link.seconds(axis, change.bytes)
            alternatives.append((strategy.note, seconds))
            if best is None or seconds < best_cost:
                best, best_cost = strategy, seconds
        if best is None:
            raise PropagationError(f"rule {registered.family} offered no strategy for node {node.name}")
        return best.output, best.view, best.inputs, f"{registered.family}: {best.note}", alternatives

    if len(input_views) > 1:
        raise PropagationError(
            f"node {node.name} ({op_name(node.target)}) mixes dense-view and expert-view inputs "
            f"{[(n.name, str(current[n])) for n in inputs]}; only the MoE ops bridge the two views"
        )
    view = input_views.pop() if input_views else "dense"
    axes = _axes(view)
    ctx = RuleContext(node, mesh, inputs, input_shardings, view, axes)
    per_axis_in: dict[str, tuple] = {}
    per_axis_out: dict[str, Any] = {}
    reasons, alternatives = [], []
    demand = demands.get(node)
    for axis in axes:
        if mesh.size(axis) == 1:
            per_axis_in[axis] = tuple(Replicate() for _ in inputs)
            out = ctx.output_value
            per_axis_out[axis] = tuple(Replicate() for _ in out) if isinstance(out, (tuple, list)) else Replicate()
            continue
        placements = tuple(s.placement(axis) for s in input_shardings)
        chosen, scored = _choose_axis(ctx, registered.function, axis, placements, link, demand)
        if chosen is None:
            raise PropagationError(
                f"no placement of node {node.name} ({op_name(node.target)}) works on axis {axis} "
                f"for inputs {placements}; {_source_line(node)}"
            )
        per_axis_in[axis] = chosen.inputs
        per_axis_out[axis] = chosen.output
        reasons.append(f"{axis}: {_fmt(placements)} -> {_fmt(chosen.output)}" + (f" ({chosen.note})" if chosen.note else ""))
        if len(scored) > 1:
            alternatives.extend((f"{axis}: in {_fmt(c.inputs)} out {_fmt(c.output)}", s) for c, s in scored)
    required = tuple(
        _as_sharding(axes, {a: (per_axis_in[a][i] if per_axis_in[a][i] is not None else input_shardings[i].placement(a)) for a in axes})
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
    return output, view, required, reason, alternatives


def _fmt(value) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join("-" if v is None else repr(v) for v in value) + ")"
    return repr(value)


def propagate(
    traced,
    mesh: MeshSpec,
    plan: Mapping[str, str] | None = None,
    *,
    batch_sharding: Sharding | Mapping[str, Sharding] | None = None,
    link: LinkModel | None = None,
    replicate_fallback: bool = False,
) -> PlacedGraph:
    """Place every value of ``traced``'s joint graph on ``mesh``. See the module docstring."""
    started = time.perf_counter()
    link = link or LinkModel()
    source_gm = traced.graph_module if hasattr(traced, "graph_module") else traced
    traced_info = traced if hasattr(traced, "graph_module") else None
    gm = GraphModule(source_gm, copy.deepcopy(source_gm.graph))
    gm.meta.update(getattr(source_gm, "meta", {}))

    placeholders = _placeholders(gm, traced_info)
    parameter_shapes = {name: tuple(n.meta["val"].shape) for n, kind, name in placeholders if kind == "parameter"}
    if plan is None:
        plan = default_plan(list(parameter_shapes))
    fused = [name for name in parameter_shapes if getattr(traced_info, "fused_gate_up", None) and name in traced_info.fused_gate_up]
    parameters = resolve_plan(parameter_shapes, plan, mesh, fused_names=fused)

    current: dict[Node, Any] = {}
    views: dict[Node, str] = {}
    input_shardings: dict[str, Sharding] = {}
    for node, kind, name in placeholders:
        value = node.meta["val"]
        if kind == "parameter":
            placement = parameters[name]
            current[node], views[node] = placement.sharding, placement.view
            reason = f"seed: parameter {name!r} " + (
                f"matched plan pattern {placement.pattern!r} -> {placement.style}" if placement.pattern
                else "matched no plan pattern -> replicate"
            )
        elif kind == "input":
            sharding = _batch_sharding(name, value, mesh, batch_sharding)
            current[node], views[node] = sharding, "dense"
            input_shardings[name] = sharding
            reason = f"seed: batch input {name!r} {sharding!r}"
        else:
            current[node], views[node] = Sharding.replicate(), "dense"
            reason = f"seed: buffer {name!r} replicated"
        node.meta["sharding"], node.meta["view"] = current[node], views[node]
        node.meta["placement_reason"], node.meta["input_shardings"] = reason, ()
        node.meta["placement_alternatives"] = []

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            # Constants captured during tracing (a literal tensor in the model): every rank has them.
            current[node], views[node] = Sharding.replicate(), "dense"
            node.meta.update(sharding=current[node], view="dense", input_shardings=(),
                             placement_reason=f"constant {node.target} replicated", placement_alternatives=[])

    compute_nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    missing = [n for n in compute_nodes if rule_for(n.target) is None and n.target is not _getitem]
    if missing and not replicate_fallback:
        listed = "\n".join(f"  {n.name}: {op_name(n.target)} at {_source_line(n)}" for n in missing)
        raise PropagationError(
            f"{len(missing)} op(s) have no placement rule (pass replicate_fallback=True to replicate them):\n{listed}"
        )

    demands: dict[Node, Sharding] = {}
    fallbacks: list[str] = []
    sweeps = 0
    previous: dict[Node, Any] | None = None
    while sweeps < _MAX_SWEEPS:
        sweeps += 1
        fallbacks = []
        for node in compute_nodes:
            if node.target is _getitem:
                source, index = node.args
                produced = current[source]
                current[node] = produced[index] if isinstance(produced, tuple) else produced
                views[node] = _view_of_sharding(current[node]) or views[source]
                node.meta.update(sharding=current[node], view=views[node], input_shardings=(),
                                 placement_reason=f"output {index} of {source.name}", placement_alternatives=[])
                continue
            try:
                output, view, required, reason, alternatives = _place_node(
                    node, current, views, mesh, link, demands, replicate_fallback
                )
            except ShardingError as error:
                raise PropagationError(f"node {node.name} ({op_name(node.target)}): {error}") from None
            if rule_for(node.target) is None:
                fallbacks.append(node.name)
            current[node], views[node] = output, view
            node.meta.update(sharding=output, view=view, input_shardings=required,
                             placement_reason=reason, placement_alternatives=alternatives)
        # Backward half of the sweep: each value learns what its consumers asked for.
        new_demands: dict[Node, Sharding] = {}
        for node in reversed(compute_nodes):
            for producer, wanted in zip(tensor_inputs(node), node.meta.get("input_shardings", ())):
                if wanted is not None and producer not in new_demands:
                    new_demands[producer] = wanted
        snapshot = dict(current)
        if previous is not None and snapshot == previous:
            break
        previous, demands = snapshot, new_demands

    _place_outputs(gm, traced_info, parameters, current, placeholders)
    _check_every_value_placed(gm)
    return PlacedGraph(gm, mesh, parameters, input_shardings, sweeps, time.perf_counter() - started, fallbacks,
                       traced=traced_info)


_getitem = __import__("operator").getitem


def _batch_sharding(name: str, value: torch.Tensor, mesh: MeshSpec, batch_sharding) -> Sharding:
    if isinstance(batch_sharding, Mapping):
        sharding = batch_sharding.get(name)
    else:
        sharding = batch_sharding
    if sharding is None:
        if value.dim() == 0 or mesh.dp == 1:
            return Sharding.replicate()
        sharding = Sharding.of(dp=Shard(0))
    try:
        local_shape(tuple(value.shape), sharding, mesh, name=f"batch input {name!r}")
    except ShardingError as error:
        raise PropagationError(f"{error}; choose a global batch divisible by dp={mesh.dp}") from None
    return sharding


def _place_outputs(gm, traced_info, parameters, current, placeholders) -> None:
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    flat = list(output_node.args[0]) if isinstance(output_node.args[0], (tuple, list)) else [output_node.args[0]]
    roles = _output_roles(gm, traced_info, len(flat))
    required = []
    for value, (role, name) in zip(flat, roles):
        if not isinstance(value, Node):
            required.append(None)
        elif role == "grad" and name in parameters:
            required.append(parameters[name].sharding)
        elif role == "loss":
            required.append(Sharding.replicate())
        else:
            required.append(current.get(value))
    output_node.meta["input_shardings"] = tuple(required)
    output_node.meta["output_roles"] = roles
    output_node.meta["placement_reason"] = "loss replicated; each gradient in its parameter's sharding"


def _check_every_value_placed(gm: GraphModule) -> None:
    unplaced = [n.name for n in gm.graph.nodes if n.op not in ("output",) and "sharding" not in n.meta]
    if unplaced:
        raise PropagationError(f"values without a placement after propagation: {unplaced}")
