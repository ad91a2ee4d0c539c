"""Placements: printing, local shapes (symbolic too), run plans, shard/unshard, DTensor mapping."""

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardgraph.mesh import MeshSpec
from shardgraph.placement import (
    InterleavedShard,
    Partial,
    Replicate,
    Run,
    Shard,
    Sharding,
    ShardingError,
    local_shape,
    run_plan,
    shard,
    to_dtensor_placements,
    unshard,
)


def test_placements_are_frozen_hashable_and_print_like_their_constructors():
    assert repr(Replicate()) == "Replicate()"
    assert repr(Shard(0)) == "Shard(0)"
    assert repr(InterleavedShard(0, stripes=8)) == "InterleavedShard(0, stripes=8)"
    assert repr(Partial("avg")) == "Partial('avg')"
    assert len({Shard(0), Shard(0), Shard(1), Replicate(), Replicate()}) == 3
    with pytest.raises(Exception):
        Shard(0).dim = 1
    with pytest.raises(ShardingError, match="Partial op must be"):
        Partial("max")
    with pytest.raises(ShardingError, match="stripes must be a positive int"):
        InterleavedShard(0, 0)


def test_sharding_orders_axes_major_first_and_refuses_mixed_views():
    s = Sharding.of(tp=Shard(0), dp=Shard(0))
    assert s.axes == ("dp", "tp")
    assert s.placement("tp") == Shard(0)
    assert Sharding.of(ep=Shard(0)).placement("etp") == Replicate()
    assert repr(Sharding.of(ep=Shard(0), etp=InterleavedShard(1, 2))) == (
        "Sharding(ep=Shard(0), etp=InterleavedShard(1, stripes=2))"
    )
    with pytest.raises(ShardingError, match="mixes the dense view"):
        Sharding.of(tp=Shard(0), ep=Shard(0))
    with pytest.raises(ShardingError, match="not a mesh axis"):
        Sharding.of(pp=Shard(0))


def test_interleaved_run_plan_gives_every_etp_rank_the_same_part_of_gate_and_up():
    # Fused gate/up of one expert: rows 0..7 gate, rows 8..15 up (I = 8), split over etp = 2.
    mesh = MeshSpec(2, ep=1, etp=2)
    sharding = Sharding.of(etp=InterleavedShard(0, stripes=2))
    assert run_plan((16, 4), sharding, mesh, rank=0, dim=0) == [Run(0, 0, 4), Run(8, 4, 4)]
    assert run_plan((16, 4), sharding, mesh, rank=1, dim=0) == [Run(4, 0, 4), Run(12, 4, 4)]


def test_interleaved_shard_keeps_gate_and_up_aligned_where_plain_shard_swaps_them():
    mesh = MeshSpec(2, etp=2)
    intermediate = 6
    gate = torch.randn(intermediate, 5)
    up = torch.randn(intermediate, 5)
    fused = torch.cat([gate, up])
    for rank in mesh.ranks:
        local = shard(fused, Sharding.of(etp=InterleavedShard(0, 2)), mesh, rank)
        local_gate, local_up = local.chunk(2)
        rows = slice(rank * 3, rank * 3 + 3)
        assert torch.equal(local_gate, gate[rows]) and torch.equal(local_up, up[rows])
    plain = shard(fused, Sharding.of(etp=Shard(0)), mesh, 0)
    assert torch.equal(plain, gate)  # rank 0 would hold all of gate and none of up


def test_interleaved_under_ep_uses_stripes_counted_in_the_local_piece():
    # [E * 2I, H] with E = 4 experts over ep = 2, then etp = 2: two local experts -> 4 stripes.
    mesh = MeshSpec(4, ep=2, etp=2)
    experts, intermediate, hidden = 4, 4, 3
    weight = torch.randn(experts, 2 * intermediate, hidden)
    flat = weight.reshape(experts * 2 * intermediate, hidden)
    sharding = Sharding.of(ep=Shard(0), etp=InterleavedShard(0, stripes=2 * experts // 2))
    for rank in mesh.ranks:
        edp, ep, etp = mesh.expert_coords(rank)
        local = shard(flat, sharding, mesh, rank).reshape(2, 2 * (intermediate // 2), hidden)
        for local_expert in range(2):
            expert = ep * 2 + local_expert
            gate, up = weight[expert].chunk(2)
            part = slice(etp * 2, etp * 2 + 2)
            local_gate, local_up = local[local_expert].chunk(2)
            assert torch.equal(local_gate, gate[part]) and torch.equal(local_up, up[part])
    pieces = [shard(flat, sharding, mesh, r) for r in mesh.ranks]
    assert torch.equal(unshard(pieces, sharding, mesh), flat)


def test_nested_shards_of_one_dim_follow_rank_order_in_the_stage():
    mesh = MeshSpec(8, tp=2)
    x = torch.arange(16.0).reshape(16, 1)
    sharding = Sharding.of(dp=Shard(0), tp=Shard(0))
    for rank in mesh.ranks:
        assert shard(x, sharding, mesh, rank).flatten().tolist() == [2.0 * rank, 2.0 * rank + 1]


def test_local_shape_is_symbolic_and_refuses_what_it_cannot_prove():
    mesh = MeshSpec(8, tp=2, ep=2, etp=2)
    experts, intermediate = sympy.symbols("E I", positive=True, integer=True)
    sharding = Sharding.of(ep=Shard(0), etp=InterleavedShard(1, 2))
    assert local_shape((2 * experts, 4 * intermediate, 16), sharding, mesh) == (experts, 2 * intermediate, 16)
    with pytest.raises(ShardingError) as info:
        local_shape((2 * experts, 2 * intermediate, 16), sharding, mesh, name="w_gate_up")
    message = str(info.value)
    assert "w_gate_up" in message and "dim 1" in message and "2*I" in message and "etp=2" in message


def test_uneven_and_out_of_range_shards_name_tensor_dim_size_and_axis():
    mesh = MeshSpec(4, tp=4)
    with pytest.raises(ShardingError, match=r"q_proj: dim 0 of size 6 is not divisible by tp=4"):
        local_shape((6, 8), Sharding.of(tp=Shard(0)), mesh, name="q_proj")
    with pytest.raises(ShardingError, match="names dim 2, but the tensor has 2 dims"):
        local_shape((8, 8), Sharding.of(tp=Shard(2)), mesh)


def test_partial_sum_and_avg_round_trip_bit_exact():
    mesh = MeshSpec(8, tp=2, ep=4)
    x = torch.randn(4, 6)
    for sharding in (
        Sharding.of(tp=Partial("sum")),
        Sharding.of(dp=Partial("avg"), tp=Shard(1)),
        Sharding.of(dp=Partial("sum"), tp=Partial("avg")),
    ):
        pieces = [shard(x, sharding, mesh, r) for r in mesh.ranks]
        assert torch.equal(unshard(pieces, sharding, mesh), x)


def test_unshard_reduces_genuine_partials_in_group_order():
    mesh = MeshSpec(4, tp=4)
    pieces = [torch.full((2,), float(r + 1)) for r in mesh.ranks]
    assert unshard(pieces, Sharding.of(tp=Partial("sum")), mesh).tolist() == [10.0, 10.0]
    assert unshard(pieces, Sharding.of(tp=Partial("avg")), mesh).tolist() == [2.5, 2.5]


def test_unshard_checks_replicas_and_piece_shapes():
    mesh = MeshSpec(4, tp=2)
    pieces = [torch.zeros(3) for _ in mesh.ranks]
    pieces[3] = torch.ones(3)
    with pytest.raises(ShardingError, match="should hold identical replicas"):
        unshard(pieces, Sharding.of(dp=Shard(0)), mesh, check_replicas=True)
    with pytest.raises(ShardingError, match="rank 0's piece has shape"):
        unshard([torch.zeros(2)] * 4, Sharding.of(tp=Shard(0)), mesh, global_shape=(6,))


def test_dtensor_placements_map_shard_replicate_partial_and_refuse_interleaved():
    from torch.distributed.tensor import Partial as DPartial
    from torch.distributed.tensor import Replicate as DReplicate
    from torch.distributed.tensor import Shard as DShard

    placements = to_dtensor_placements(Sharding.of(dp=Shard(0), tp=Partial("sum")))
    assert placements == (DShard(0), DPartial("sum"))
    assert to_dtensor_placements(Sharding.of(ep=Shard(0))) == (DReplicate(), DShard(0), DReplicate())
    with pytest.raises(ShardingError, match="cannot be expressed as a DTensor placement"):
        to_dtensor_placements(Sharding.of(etp=InterleavedShard(0, 2)))


# ------------------------------------------------------------------ properties
AXIS_CHOICES = {"dense": ("dp", "tp"), "expert": ("edp", "ep", "etp")}


@st.composite
def mesh_tensor_sharding(draw):
    tp = draw(st.sampled_from([1, 2, 4]))
    ep = draw(st.sampled_from([1, 2, 4]))
    etp = draw(st.sampled_from([1, 2]))
    stage = max(tp, ep * etp) * draw(st.sampled_from([1, 2]))
    mesh = MeshSpec(world=stage, tp=tp, ep=ep, etp=etp)
    view = draw(st.sampled_from(sorted(AXIS_CHOICES)))
    ndim = draw(st.integers(1, 3))
    placements = {}
    factors = [1] * ndim
    for axis in AXIS_CHOICES[view]:
        kind = draw(st.sampled_from(["replicate", "shard", "interleaved", "partial_sum", "partial_avg"]))
        dim = draw(st.integers(0, ndim - 1))
        if kind == "shard":
            placements[axis] = Shard(dim)
            factors[dim] *= mesh.size(axis)
        elif kind == "interleaved":
            stripes = draw(st.integers(1, 3))
            placements[axis] = InterleavedShard(dim, stripes)
            factors[dim] *= mesh.size(axis) * stripes
        elif kind == "partial_sum":
            placements[axis] = Partial("sum")
        elif kind == "partial_avg":
            placements[axis] = Partial("avg")
    shape = [f * draw(st.integers(1, 2)) for f in factors]
    return mesh, torch.randn(shape, dtype=torch.float64), Sharding.of(**placements)


@settings(max_examples=150, deadline=None)
@given(mesh_tensor_sharding())
def test_shard_then_unshard_is_identity(case):
    mesh, tensor, sharding = case
    pieces = [shard(tensor, sharding, mesh, r) for r in mesh.ranks]
    expected = local_shape(tuple(tensor.shape), sharding, mesh)
    assert all(tuple(p.shape) == tuple(expected) for p in pieces)
    rebuilt = unshard(pieces, sharding, mesh, global_shape=tuple(tensor.shape), check_replicas=True)
    if any(p.is_partial() and p.op == "avg" for p in sharding.placements):
        torch.testing.assert_close(rebuilt, tensor, rtol=0, atol=1e-12)
    else:
        assert torch.equal(rebuilt, tensor)


@settings(max_examples=60, deadline=None)
@given(mesh_tensor_sharding())
def test_run_plans_of_all_positions_cover_each_sharded_dim_exactly_once(case):
    mesh, tensor, sharding = case
    for dim in range(tensor.dim()):
        covered = []
        axes = [a for a, p in sharding.items() if p.is_shard(dim)]
        # one representative rank per distinct position on the axes that shard this dim
        seen = set()
        for rank in mesh.ranks:
            key = tuple(mesh.index(a, rank) for a in axes)
            if key in seen:
                continue
            seen.add(key)
            for run in run_plan(tuple(tensor.shape), sharding, mesh, rank, dim):
                covered.extend(range(run.global_start, run.global_start + run.length))
        assert sorted(covered) == list(range(tensor.shape[dim]))
