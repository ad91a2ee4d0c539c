"""Redistribution plans: every (source, target) pair of shardings is realised exactly."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from passes.lower_redistribute import plan_redistribution, step_bytes
from shardgraph.mesh import MeshSpec
from shardgraph.placement import InterleavedShard, Partial, Replicate, Shard, Sharding, local_shape, shard, unshard
from shardgraph.runtime import collectives
from shardgraph.runtime.simulate import Simulator

STEP = {
    "all_gather": lambda comm, x, s: collectives.all_gather(comm, x, s.axis, s.dim),
    "interleaved_all_gather": lambda comm, x, s: collectives.interleaved_all_gather(comm, x, s.axis, s.dim, s.stripes),
    "all_to_all": lambda comm, x, s: collectives.shard_to_shard(comm, x, s.axis, s.source_dim, s.dim),
    "reduce_scatter": lambda comm, x, s: collectives.reduce_scatter(comm, x, s.axis, s.dim, s.op),
    "all_reduce": lambda comm, x, s: collectives.all_reduce(comm, x, s.axis, s.op),
    "local_slice": lambda comm, x, s: collectives.local_slice(comm, x, s.axis, s.dim),
    "local_interleaved_slice": lambda comm, x, s: collectives.local_interleaved_slice(comm, x, s.axis, s.dim, s.stripes),
    "keep_on_first": lambda comm, x, s: collectives.keep_on_first(comm, x, s.axis),
    "pad_to_partial": lambda comm, x, s: collectives.pad_to_partial(comm, x, s.axis, s.dim),
    "scale": lambda comm, x, s: collectives.scale(comm, x, s.factor),
}


def run_plan(mesh, tensor, source, target):
    steps = plan_redistribution(source, target, tensor.dim(), mesh)
    pieces = [shard(tensor, source, mesh, r) for r in mesh.ranks]
    sim = Simulator(mesh)

    def program(comm, piece):
        for step in steps:
            piece = STEP[step.kind](comm, piece, step)
        return piece

    return steps, sim, sim.run(program, [(p,) for p in pieces])


@st.composite
def redistribution_case(draw):
    tp = draw(st.sampled_from([1, 2, 4]))
    ep = draw(st.sampled_from([1, 2]))
    etp = draw(st.sampled_from([1, 2]))
    stage = max(tp, ep * etp) * draw(st.sampled_from([1, 2]))
    mesh = MeshSpec(world=stage, tp=tp, ep=ep, etp=etp)
    axes = draw(st.sampled_from([("dp", "tp"), ("edp", "ep", "etp")]))
    ndim = draw(st.integers(1, 3))
    factors = [1] * ndim

    def placement_for(axis):
        kind = draw(st.sampled_from(["R", "S", "IS", "Psum", "Pavg"]))
        dim = draw(st.integers(0, ndim - 1))
        if kind == "S":
            return Shard(dim), (dim, mesh.size(axis))
        if kind == "IS":
            return InterleavedShard(dim, 2), (dim, 2 * mesh.size(axis))
        if kind == "Psum":
            return Partial("sum"), None
        if kind == "Pavg":
            return Partial("avg"), None
        return Replicate(), None

    shardings = []
    for _ in range(2):
        chosen = {}
        for axis in axes:
            placement, need = placement_for(axis)
            chosen[axis] = placement
            if need:
                factors[need[0]] *= need[1]
        shardings.append(Sharding.of(**chosen))
    shape = [f * draw(st.integers(1, 2)) for f in factors]
    return mesh, torch.randn(shape, dtype=torch.float64), shardings[0], shardings[1]


@settings(max_examples=120, deadline=None)
@given(redistribution_case())
def test_every_plan_turns_source_pieces_into_target_pieces(case):
    mesh, tensor, source, target = case
    try:
        local_shape(tuple(tensor.shape), source, mesh)
        local_shape(tuple(tensor.shape), target, mesh)
    except Exception:
        return
    _steps, _sim, results = run_plan(mesh, tensor, source, target)
    rebuilt = unshard(results, target, mesh, global_shape=tuple(tensor.shape))
    torch.testing.assert_close(rebuilt, tensor, rtol=1e-12, atol=1e-12)
    if not any(p.is_partial() for p in target.placements):
        for rank in mesh.ranks:
            torch.testing.assert_close(results[rank], shard(tensor, target, mesh, rank), rtol=1e-12, atol=1e-12)


def test_partial_to_shard_is_one_reduce_scatter_and_bytes_match_the_simulator():
    mesh = MeshSpec(4, tp=4)
    tensor = torch.randn(8, 3)
    steps, sim, _ = run_plan(mesh, tensor, Sharding.of(tp=Partial("sum")), Sharding.of(tp=Shard(0)))
    assert [s.kind for s in steps] == ["reduce_scatter"]
    predicted = step_bytes(steps[0], tensor.numel() * 4, mesh)
    assert sim.records[0].bytes_sent == (predicted,) * 4


def test_nested_shards_are_gathered_minor_first():
    mesh = MeshSpec(8, tp=2)
    steps = plan_redistribution(Sharding.of(dp=Shard(0), tp=Shard(0)), Sharding.of(tp=Shard(0)), 2, mesh)
    assert [(s.kind, s.axis) for s in steps] == [("all_gather", "tp"), ("all_gather", "dp"), ("local_slice", "tp")]


def test_shard_to_partial_is_a_local_pad():
    mesh = MeshSpec(2, tp=2)
    steps = plan_redistribution(Sharding.of(tp=Shard(1)), Sharding.of(tp=Partial("sum")), 2, mesh)
    assert [s.kind for s in steps] == ["pad_to_partial"]


@pytest.mark.parametrize("stripes", [2, 4])
def test_interleaved_gather_restores_stripe_order(stripes):
    mesh = MeshSpec(2, etp=2)
    tensor = torch.arange(stripes * 4 * 3.0).reshape(stripes * 4, 3)
    source = Sharding.of(etp=InterleavedShard(0, stripes))
    _steps, _sim, results = run_plan(mesh, tensor, source, Sharding.replicate())
    assert all(torch.equal(r, tensor) for r in results)


def test_a_value_two_consumers_want_differently_is_reduced_once():
    """In the training step a tp-partial gradient feeds the norm (replicated) and the update
    (sharded like its parameter): the second consumer slices the reduced value locally instead
    of reducing the partial value again."""
    import shardgraph as sg
    from examples.moe_model import shardgraph_entry
    from shardgraph import meta

    model, inputs, loss_fn = shardgraph_entry("tiny")
    program = sg.compile(model, MeshSpec(world=4, tp=2, ep=2), inputs, loss_fn, optimizer=sg.optim.AdamW(lr=1e-3))
    reductions: dict = {}
    for node in program.graph_module.graph.nodes:
        record = meta.collective(node)
        if record is not None and record.kind.value in ("all_reduce", "reduce_scatter"):
            # ``of`` names the value a collective moves (through the layout steps around it).
            reductions.setdefault((record.of, record.axis), []).append(node.name)
    assert reductions, "the step has no reductions to check"
    twice = {key: names for key, names in reductions.items() if len(names) > 1}
    assert not twice, f"values reduced more than once over one axis: {twice}"
