"""Insert the collectives that turn each producer's sharding into what its consumer needs.

Reads
    a placed graph (``node.meta["sharding"]`` on every value, ``node.meta["input_shardings"]``
    on every op and on the output node).
Writes
    a ``comm`` placeholder first (the rank's communicator), and before each consumer whose
    input sharding differs from the producer's, a chain of ``shardgraph.runtime.collectives``
    calls (``all_reduce``, ``reduce_scatter``, ``all_gather``, ``local_slice``, ...). Each inserted
    node carries ``meta["sharding"]`` (after the step) and ``meta["collective"]`` (kind, axis,
    group size, predicted bytes sent per rank). Identical conversions of one value are shared
    between its consumers. On the output node this is the gradient synchronisation: a
    ``Partial`` gradient is reduced to its parameter's sharding.
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

import torch
from torch.fx import GraphModule, Node

from shardgraph.mesh import DENSE_AXES, EXPERT_AXES, MeshSpec
from shardgraph.placement import InterleavedShard, Partial, Replicate, Shard, Sharding, local_shape
from shardgraph.runtime import collectives

from .rules import map_tensor_inputs, tensor_inputs

__all__ = ["RedistributeStep", "plan_redistribution", "lower_redistribute", "step_bytes"]


@dataclass(frozen=True)
class RedistributeStep:
    kind: str  # all_reduce | reduce_scatter | all_gather | interleaved_all_gather | local_slice | ...
    axis: str
    dim: int | None = None
    op: str | None = None
    stripes: int | None = None
    factor: float | None = None


def _view_axes(*shardings: Sharding) -> tuple[str, ...]:
    names = set()
    for sharding in shardings:
        names |= set(sharding.axes)
    if names & set(EXPERT_AXES):
        if names & set(DENSE_AXES):
            raise ValueError(f"cannot redistribute between views: {shardings}")
        return EXPERT_AXES
    return DENSE_AXES


def plan_redistribution(source: Sharding, target: Sharding, ndim: int, mesh: MeshSpec) -> list[RedistributeStep]:
    """The steps that turn pieces under ``source`` into pieces under ``target``."""
    axes = [a for a in _view_axes(source, target) if mesh.size(a) > 1]
    current = {a: source.placement(a) for a in axes}
    wanted = {a: target.placement(a) for a in axes}
    steps: list[RedistributeStep] = []

    def shards_dim(placement, dim):
        return placement.is_shard() and placement.dim % ndim == dim

    # 1. Partial axes: reduce (scatter when nothing else touches the target dim).
    for axis in axes:
        have, want = current[axis], wanted[axis]
        if not isinstance(have, Partial) or have == want:
            continue
        if isinstance(want, Partial):
            n = mesh.size(axis)
            factor = n if (have.op == "sum" and want.op == "avg") else 1.0 / n
            steps.append(RedistributeStep("scale", axis, factor=float(factor)))
        elif isinstance(want, Shard) and not any(
            shards_dim(current[a], want.dim % ndim) or (a != axis and shards_dim(wanted[a], want.dim % ndim))
            for a in axes
        ):
            steps.append(RedistributeStep("reduce_scatter", axis, dim=want.dim % ndim, op=have.op))
            current[axis] = Shard(want.dim % ndim)
            continue
        else:
            steps.append(RedistributeStep("all_reduce", axis, op=have.op))
        current[axis] = want if isinstance(want, Partial) else Replicate()

    # 2. Shard -> Partial("sum") as a local zero-pad when the dim is sharded by this axis alone.
    for axis in axes:
        have, want = current[axis], wanted[axis]
        if isinstance(have, Shard) and want == Partial("sum") and not any(
            a != axis and shards_dim(current[a], have.dim % ndim) for a in axes
        ):
            steps.append(RedistributeStep("pad_to_partial", axis, dim=have.dim % ndim))
            current[axis] = want

    # 3. Gather every changing shard, and every minor shard nested inside a changing one.
    to_gather = {a for a in axes if current[a].is_shard() and current[a] != wanted[a]}
    # A shard that changes on a dim (gathered, or newly cut) must not have minor shards of the
    # same dim inside it: those are gathered too and cut again afterwards.
    for axis in axes:
        if current[axis] == wanted[axis]:
            continue
        dims = {p.dim % ndim for p in (current[axis], wanted[axis]) if p.is_shard()}
        position = axes.index(axis)
        to_gather |= {a for a in axes[position + 1 :] for d in dims if shards_dim(current[a], d)}
    for axis in reversed(axes):
        if axis not in to_gather:
            continue
        have = current[axis]
        if isinstance(have, InterleavedShard):
            steps.append(RedistributeStep("interleaved_all_gather", axis, dim=have.dim % ndim, stripes=have.stripes))
        else:
            steps.append(RedistributeStep("all_gather", axis, dim=have.dim % ndim))
        current[axis] = Replicate()

    # 4. Cut new shards major-to-minor; make replicated values partial where asked.
    for axis in axes:
        have, want = current[axis], wanted[axis]
        if have == want:
            continue
        if isinstance(want, InterleavedShard):
            steps.append(RedistributeStep("local_interleaved_slice", axis, dim=want.dim % ndim, stripes=want.stripes))
        elif isinstance(want, Shard):
            steps.append(RedistributeStep("local_slice", axis, dim=want.dim % ndim))
        elif isinstance(want, Partial):
            if want.op == "sum":
                steps.append(RedistributeStep("keep_on_first", axis))
        current[axis] = want
    return steps


def step_bytes(step: RedistributeStep, piece_bytes: float, mesh: MeshSpec) -> float:
    """Bytes sent per rank by one step applied to a piece of ``piece_bytes`` bytes."""
    n = mesh.size(step.axis)
    if step.kind in ("all_gather", "interleaved_all_gather"):
        return piece_bytes * (n - 1)
    if step.kind == "reduce_scatter":
        return piece_bytes * (n - 1) / n
    if step.kind == "all_reduce":
        return 2 * piece_bytes * (n - 1) / n
    return 0.0


def _apply_placement(sharding: Sharding, step: RedistributeStep) -> Sharding:
    placements = dict(sharding.items())
    if step.kind in ("all_gather", "interleaved_all_gather", "all_reduce"):
        placements[step.axis] = Replicate()
    elif step.kind == "reduce_scatter" or step.kind == "local_slice":
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
    "reduce_scatter": lambda s: (collectives.reduce_scatter, {"axis": s.axis, "dim": s.dim, "op": s.op}),
    "all_reduce": lambda s: (collectives.all_reduce, {"axis": s.axis, "op": s.op}),
    "local_slice": lambda s: (collectives.local_slice, {"axis": s.axis, "dim": s.dim}),
    "local_interleaved_slice": lambda s: (collectives.local_interleaved_slice, {"axis": s.axis, "dim": s.dim, "stripes": s.stripes}),
    "keep_on_first": lambda s: (collectives.keep_on_first, {"axis": s.axis}),
    "pad_to_partial": lambda s: (collectives.pad_to_partial, {"axis": s.axis, "dim": s.dim}),
    "scale": lambda s: (collectives.scale, {"factor": s.factor}),
}


def _local_bytes(value, sharding: Sharding, mesh: MeshSpec) -> float:
    if not isinstance(value, torch.Tensor):
        return 0.0
    shape = local_shape(tuple(value.shape), sharding, mesh) if value.dim() else ()
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel * value.element_size()


def _insert_chain(graph, comm: Node, producer: Node, source: Sharding, target: Sharding, mesh: MeshSpec,
                  before: Node, purpose: str, cache: dict) -> Node:
    value = producer.meta.get("val")
    ndim = value.dim() if isinstance(value, torch.Tensor) else 0
    key = (producer, source, target)
    if key in cache:
        return cache[key]
    current_node, current = producer, source
    for step in plan_redistribution(source, target, ndim, mesh):
        function, kwargs = _STEP_FUNCTIONS[step.kind](step)
        with graph.inserting_before(before):
            node = graph.call_function(function, (comm, current_node), kwargs)
        piece = _local_bytes(value, current, mesh)
        current = _apply_placement(current, step)
        node.meta["val"] = value
        node.meta["sharding"] = current
        node.meta["view"] = producer.meta.get("view", "dense")
        node.meta["collective"] = {
            "kind": step.kind,
            "axis": step.axis,
            "group_size": mesh.size(step.axis),
            "bytes": step_bytes(step, piece, mesh),
            "of": producer.name,
            "purpose": purpose,
        }
        node.meta["placement_reason"] = f"{step.kind} over {step.axis}: {source!r} -> {target!r} for {purpose}"
        current_node = node
    cache[key] = current_node
    return current_node


def lower_redistribute(gm: GraphModule, mesh: MeshSpec) -> GraphModule:
    graph = gm.graph
    first = next(iter(graph.nodes))
    with graph.inserting_before(first):
        comm = graph.placeholder("comm")
    comm.meta.update(shardgraph_kind="communicator", sharding=None, view=None)
    cache: dict = {}
    for node in list(graph.nodes):
        if node.op not in ("call_function", "output") or node is comm:
            continue
        required = node.meta.get("input_shardings")
        if not required:
            continue
        if node.op == "output":
            inputs = list(node.args[0]) if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
        else:
            inputs = tensor_inputs(node)
        replacements: dict[int, Node] = {}
        for position, (producer, want) in enumerate(zip(inputs, required)):
            if not isinstance(producer, Node) or want is None:
                continue
            have = producer.meta.get("sharding")
            if have is None or have == want:
                continue
            purpose = (
                f"output {position} ({node.meta.get('output_roles', [('output', None)] * len(inputs))[position][0]})"
                if node.op == "output" else node.name
            )
            replacements[position] = _insert_chain(graph, comm, producer, have, want, mesh, node, purpose, cache)
        if not replacements:
            continue
        if node.op == "output":
            outputs = node.args[0]
            if isinstance(outputs, (tuple, list)):
                node.args = (type(outputs)(replacements.get(i, o) for i, o in enumerate(outputs)),)
            else:
                node.args = (replacements.get(0, outputs),)
        else:
            map_tensor_inputs(node, lambda position, producer: replacements.get(position, producer))
    graph.lint()
    gm.recompile()
    return gm
