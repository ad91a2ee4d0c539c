"""Insert the collectives that turn each producer's sharding into what its consumer needs.

Reads
    a placed graph (a ``meta.PlacedValue`` on every node, whose ``input_shardings`` say what
    each op and the output node need) with its communicator placeholder (``add_communicator``).
Writes
    before each consumer whose input sharding differs from the producer's, a chain of
    ``shardgraph.runtime.collectives`` calls (``all_reduce``, ``reduce_scatter``, ``all_gather``,
    ``local_slice``, ...). Each inserted node carries a ``PlacedValue`` (the sharding after the
    step) and a ``meta.Collective`` (kind, axis, group size, predicted bytes sent per rank,
    purpose). Conversions of one value are shared between its consumers: each starts from
    the cheapest sharding of the value already in the graph. On the output node this is the
    gradient synchronisation (``Purpose.GRADIENT_SYNC``): a gradient
    that is ``Partial`` over an axis is reduced over exactly that axis to its parameter's
    sharding.
Assumes
    shardings of one value and its requirement live on the same view (only the MoE ops bridge
    views, and they are lowered on their own).

The step order makes nested shards right: partial axes are reduced first (on the smaller
piece), sharded axes that change are gathered minor-to-major (a minor axis nests inside a
major one, so it must be undone first, and is undone too when a major axis on the same dim
changes), and new shards are cut major-to-minor.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule, Node

from shardgraph import meta
from shardgraph.fx_graph import map_tensor_inputs, output_values, set_output_values, tensor_inputs
from shardgraph.mesh import AxisName, MeshSpec
from shardgraph.meta import Collective, CollectiveKind, PlacedValue, Purpose, View
from shardgraph.placement import InterleavedShard, Partial, Replicate, Shard, Sharding
from shardgraph.runtime import collectives

from .gather_parameters import is_parameter_gather

__all__ = ["RedistributeStep", "plan_redistribution", "lower_redistribute", "step_bytes"]


@dataclass(frozen=True)
class RedistributeStep:
    kind: str  # all_reduce | reduce_scatter | all_gather | interleaved_all_gather | all_to_all | local_slice | ...
    axis: AxisName  # a tuple of axes only for an all-reduce over their product group
    dim: int | None = None
    source_dim: int | None = None  # all_to_all: the dim the pieces were cut along before it
    op: str | None = None
    stripes: int | None = None
    factor: float | None = None


@dataclass
class _Plan:
    """The placements on each axis while the steps are planned: ``current`` moves toward ``wanted``."""

    axes: list[str]
    current: dict
    wanted: dict
    ndim: int
    mesh: MeshSpec
    steps: list[RedistributeStep]

    def shards_dim(self, placement, dim: int) -> bool:
        return placement.is_shard() and placement.dim % self.ndim == dim

    def add(self, step: RedistributeStep, placement) -> None:
        self.steps.append(step)
        self.current[step.axis] = placement


def plan_redistribution(source: Sharding, target: Sharding, ndim: int, mesh: MeshSpec) -> list[RedistributeStep]:
    """The steps that turn pieces under ``source`` into pieces under ``target``."""
    try:
        view = View.of_shardings(source, target)
    except ValueError:
        raise ValueError(f"cannot redistribute between views: {source!r} -> {target!r}") from None
    axes = [a for a in view.axes if mesh.size(a) > 1]
    plan = _Plan(axes, {a: source.placement(a) for a in axes}, {a: target.placement(a) for a in axes}, ndim, mesh, [])
    _reduce_partials(plan)
    _pad_to_partials(plan)
    _swap_shard_dims(plan)
    _gather_changing_shards(plan)
    _cut_new_shards(plan)
    return plan.steps


def _reduce_partials(plan: _Plan) -> None:
    """Partial axes first, on the smaller piece: reduce-scatter when nothing else touches the
    target dim, all-reduce otherwise; a change of partial op is a local scale. All-reduces with
    one op over several axes are one all-reduce over the group of those axes together."""
    ndim = plan.ndim
    first = len(plan.steps)
    for axis in plan.axes:
        have, want = plan.current[axis], plan.wanted[axis]
        if not isinstance(have, Partial) or have == want:
            continue
        if isinstance(want, Partial):
            n = plan.mesh.size(axis)
            factor = n if (have.op == "sum" and want.op == "avg") else 1.0 / n
            plan.add(RedistributeStep("scale", axis, factor=float(factor)), want)
        elif isinstance(want, Shard) and not any(
            plan.shards_dim(plan.current[a], want.dim % ndim)
            or (a != axis and plan.shards_dim(plan.wanted[a], want.dim % ndim))
            for a in plan.axes
        ):
            plan.add(RedistributeStep("reduce_scatter", axis, dim=want.dim % ndim, op=have.op), Shard(want.dim % ndim))
        else:
            plan.add(RedistributeStep("all_reduce", axis, op=have.op), Replicate())
    _merge_all_reduces(plan, first)
    # Reduce-scatters before all-reduces: the all-reduce then sums a piece 1/n the size, and
    # being the chain's last step a gradient's all-reduce can share a bucket with others
    # (bucket_gradient_sync). The reductions act on different axes and commute.
    plan.steps[first:] = sorted(plan.steps[first:], key=lambda step: step.kind == "all_reduce")


def _merge_all_reduces(plan: _Plan, first: int) -> None:
    """One all-reduce over ``(dp, tp)`` instead of one over dp and another over tp: a gradient
    partial over both axes then pays one collective's latency, not two, and moves
    ``2 (n - 1) / n`` of its bytes over the product group of n ranks instead of the sum of the
    axes' shares. Summing over one axis commutes with reducing, scattering or scaling over
    another (all are linear and act on different ranks' pieces), so the merged all-reduce may
    stand where the first of them stood."""
    steps = plan.steps[first:]
    by_op: dict[str, list[int]] = {}
    for index, step in enumerate(steps):
        if step.kind == "all_reduce":
            by_op.setdefault(step.op, []).append(index)
    merged = list(steps)
    for op, indices in by_op.items():
        if len(indices) < 2:
            continue
        axes = tuple(a for a in plan.axes if any(steps[i].axis == a for i in indices))
        merged[indices[0]] = RedistributeStep("all_reduce", axes, op=op)
        for index in indices[1:]:
            merged[index] = None
    plan.steps[first:] = [step for step in merged if step is not None]


def _pad_to_partials(plan: _Plan) -> None:
    """Shard -> Partial("sum") as a local zero-pad when the dim is sharded by this axis alone."""
    for axis in plan.axes:
        have, want = plan.current[axis], plan.wanted[axis]
        if isinstance(have, Shard) and want == Partial("sum") and not any(
            a != axis and plan.shards_dim(plan.current[a], have.dim % plan.ndim) for a in plan.axes
        ):
            plan.add(RedistributeStep("pad_to_partial", axis, dim=have.dim % plan.ndim), want)


def _swap_shard_dims(plan: _Plan) -> None:
    """``Shard(i) -> Shard(j)`` on one axis as one all-to-all (each rank sends every other member
    the block of its piece that member keeps, 1/n of it, where a gather would bring n - 1 pieces).

    It is exact when this axis is the minor-most shard of dim i before and of dim j after, the
    other axes sharding either dim being major to it and unchanged: the members of its group
    then hold the same blocks of every other axis, dim i loses its innermost level and dim j
    gains one. Other cases are left to the gathers and cuts below."""
    for position, axis in enumerate(plan.axes):
        have, want = plan.current[axis], plan.wanted[axis]
        if type(have) is not Shard or type(want) is not Shard:
            continue
        source, target = have.dim % plan.ndim, want.dim % plan.ndim
        if source == target:
            continue
        others = [(index, a) for index, a in enumerate(plan.axes) if a != axis and any(
            plan.shards_dim(plan.current[a], d) or plan.shards_dim(plan.wanted[a], d) for d in (source, target))]
        if any(index > position or plan.current[a] != plan.wanted[a] for index, a in others):
            continue
        plan.add(RedistributeStep("all_to_all", axis, dim=target, source_dim=source), Shard(target))


def _gather_changing_shards(plan: _Plan) -> None:
    """Gather every changing shard, and every minor shard nested inside a changing one, minor first."""
    axes, current, wanted = plan.axes, plan.current, plan.wanted
    to_gather = {a for a in axes if current[a].is_shard() and current[a] != wanted[a]}
    # A shard that changes on a dim (gathered, or newly cut) must not have minor shards of the
    # same dim inside it: those are gathered too and cut again afterwards.
    for axis in axes:
        if current[axis] == wanted[axis]:
            continue
        dims = {p.dim % plan.ndim for p in (current[axis], wanted[axis]) if p.is_shard()}
        position = axes.index(axis)
        to_gather |= {a for a in axes[position + 1:] for d in dims if plan.shards_dim(current[a], d)}
    for axis in reversed(axes):
        if axis not in to_gather:
            continue
        have = current[axis]
        if isinstance(have, InterleavedShard):
            step = RedistributeStep("interleaved_all_gather", axis, dim=have.dim % plan.ndim, stripes=have.stripes)
        else:
            step = RedistributeStep("all_gather", axis, dim=have.dim % plan.ndim)
        plan.add(step, Replicate())


def _cut_new_shards(plan: _Plan) -> None:
    """Cut new shards major-to-minor; make replicated values partial where asked."""
    for axis in plan.axes:
        have, want = plan.current[axis], plan.wanted[axis]
        if have == want:
            continue
        if isinstance(want, InterleavedShard):
            plan.add(RedistributeStep("local_interleaved_slice", axis, dim=want.dim % plan.ndim,
                                      stripes=want.stripes), want)
        elif isinstance(want, Shard):
            plan.add(RedistributeStep("local_slice", axis, dim=want.dim % plan.ndim), want)
        elif isinstance(want, Partial) and want.op == "sum":
            plan.add(RedistributeStep("keep_on_first", axis), want)
        else:
            plan.current[axis] = want


def step_bytes(step: RedistributeStep, piece_bytes: float, mesh: MeshSpec) -> float:
    """Bytes sent per rank by one step applied to a piece of ``piece_bytes`` bytes."""
    n = mesh.size(step.axis)
    if step.kind in ("all_gather", "interleaved_all_gather"):
        return piece_bytes * (n - 1)
    if step.kind in ("reduce_scatter", "all_to_all"):
        return piece_bytes * (n - 1) / n
    if step.kind == "all_reduce":
        return 2 * piece_bytes * (n - 1) / n
    return 0.0


def _apply_placement(sharding: Sharding, step: RedistributeStep) -> Sharding:
    placements = dict(sharding.items())
    if step.kind == "all_reduce" and not isinstance(step.axis, str):
        placements.update({axis: Replicate() for axis in step.axis})
    elif step.kind in ("all_gather", "interleaved_all_gather", "all_reduce"):
        placements[step.axis] = Replicate()
    elif step.kind in ("reduce_scatter", "local_slice", "all_to_all"):
        placements[step.axis] = Shard(step.dim)
    elif step.kind == "local_interleaved_slice":
        placements[step.axis] = InterleavedShard(step.dim, step.stripes)
    elif step.kind in ("keep_on_first", "pad_to_partial"):
        placements[step.axis] = Partial("sum")
    elif step.kind == "scale":
        current = placements[step.axis]
        placements[step.axis] = Partial("avg" if current.op == "sum" else "sum")
    kept = [(a, p) for a, p in placements.items() if not p.is_replicate()]
    return Sharding(tuple(a for a, _ in kept), tuple(p for _, p in kept))


_STEP_FUNCTIONS = {
    "all_gather": lambda s: (collectives.all_gather, {"axis": s.axis, "dim": s.dim}),
    "interleaved_all_gather": lambda s: (collectives.interleaved_all_gather, {"axis": s.axis, "dim": s.dim, "stripes": s.stripes}),
    "all_to_all": lambda s: (collectives.shard_to_shard, {"axis": s.axis, "source_dim": s.source_dim, "dim": s.dim}),
    "reduce_scatter": lambda s: (collectives.reduce_scatter, {"axis": s.axis, "dim": s.dim, "op": s.op}),
    "all_reduce": lambda s: (collectives.all_reduce, {"axis": s.axis, "op": s.op}),
    "local_slice": lambda s: (collectives.local_slice, {"axis": s.axis, "dim": s.dim}),
    "local_interleaved_slice": lambda s: (collectives.local_interleaved_slice, {"axis": s.axis, "dim": s.dim, "stripes": s.stripes}),
    "keep_on_first": lambda s: (collectives.keep_on_first, {"axis": s.axis}),
    "pad_to_partial": lambda s: (collectives.pad_to_partial, {"axis": s.axis, "dim": s.dim}),
    "scale": lambda s: (collectives.scale, {"factor": s.factor}),
}


def _steps(source: Sharding, target: Sharding, found, producer: Node, mesh: MeshSpec):
    """Each step from ``source`` to ``target`` with the bytes it sends per rank and the sharding
    after it: what a chain costs and what its inserted nodes record."""
    ndim = found.dim() if found is not None else 0
    current = source
    for step in plan_redistribution(source, target, ndim, mesh):
        sent = step_bytes(step, meta.local_bytes(found, current, mesh, producer.name), mesh)
        current = _apply_placement(current, step)
        yield step, sent, current


def _insert_chain(graph, comm: Node, producer: Node, source: Sharding, target: Sharding, mesh: MeshSpec,
                  before: Node, purpose: Purpose, detail: str, cache: dict, key=None) -> Node:
    """The node holding ``producer`` under ``target``, starting from whichever sharding of it the
    graph already holds (the producer's own, or any step of an earlier consumer's chain) that
    sends the fewest bytes: a gradient reduced to ``Replicate`` for the norm is sliced locally
    for an update that wants it ``Shard``, not reduced a second time."""
    found = meta.tensor_value(producer)
    held = cache.setdefault(producer if key is None else key, [(source, producer)])
    for sharding, node in held:
        if sharding == target:
            return node
    # Ties keep the earliest holder (the producer first): fewer steps in flight, same bytes.
    start, current_node = min(held, key=lambda item: sum(
        sent for _, sent, _ in _steps(item[0], target, found, producer, mesh)))
    for step, sent, current in _steps(start, target, found, producer, mesh):
        function, kwargs = _STEP_FUNCTIONS[step.kind](step)
        with graph.inserting_before(before):
            node = graph.call_function(function, (comm, current_node), kwargs)
        meta.copy_source_info(producer, node)
        meta.set_placed(node, PlacedValue(current, meta.view(producer) or View.DENSE, (),
                                          f"{step.kind} over {step.axis}: {start!r} -> {target!r} for {detail}"))
        meta.set_collective(node, Collective(CollectiveKind(step.kind), step.axis, mesh.size(step.axis),
                                             sent, purpose, of=producer.name, detail=detail))
        current_node = node
        held.append((current, node))
    return current_node


def _output_purpose(role) -> Purpose:
    return Purpose.GRADIENT_SYNC if role.kind == "grad" else Purpose.OUTPUT


def lower_redistribute(gm: GraphModule, mesh: MeshSpec) -> GraphModule:
    graph = gm.graph
    comm = meta.communicator_node(graph)
    roles = meta.output_roles(gm)
    cache: dict = {}
    for node in list(graph.nodes):
        if node.op not in ("call_function", "output"):
            continue
        record = meta.placed(node)
        if record is None or not record.input_shardings:
            continue
        inputs = output_values(graph) if node.op == "output" else tensor_inputs(node)
        replacements: dict[int, Node] = {}
        for position, (producer, want) in enumerate(zip(inputs, record.input_shardings)):
            if not isinstance(producer, Node) or want is None:
                continue
            have = meta.sharding(producer)
            if have is None or have == want:
                continue
            if node.op == "output":
                purpose, detail = _output_purpose(roles[position]), f"output {position} ({roles[position].kind})"
            elif meta.gradient_of(producer) is not None and isinstance(have, Sharding) and any(
                    p.is_partial() for p in have.placements):
                # A training step consumes its gradients in the graph: their reduction is still
                # the gradient synchronisation, wherever it lands.
                purpose, detail = Purpose.GRADIENT_SYNC, f"gradient of {meta.gradient_of(producer)} for {node.name}"
            elif is_parameter_gather(node):
                purpose, detail = Purpose.PARAMETER_GATHER, f"{meta.phase(node).value} readers of {producer.name}"
            else:
                purpose, detail = Purpose.REDISTRIBUTE, node.name
            # The backward's gather of a parameter is its own: sharing the forward's gathered copy
            # would keep it alive through the step (gather_parameters, reshard_after_forward).
            key = (producer, meta.phase(node)) if is_parameter_gather(node) else producer
            replacements[position] = _insert_chain(graph, comm, producer, have, want, mesh, node, purpose, detail,
                                                   cache, key)
        if not replacements:
            continue
        if node.op == "output":
            set_output_values(graph, [replacements.get(i, o) for i, o in enumerate(inputs)])
        else:
            map_tensor_inputs(node, lambda position, producer: replacements.get(position, producer))
    gm.recompile()
    return gm
