"""The link model prices a redistribution at the bytes of the steps lowering emits for it."""

import itertools

import pytest
import torch

from passes.cost import redistribution
from passes.lower_redistribute import _apply_placement, plan_redistribution, step_bytes
from shardgraph import meta
from shardgraph.mesh import MeshSpec
from shardgraph.placement import InterleavedShard, Partial, Replicate, Shard, Sharding

PLACEMENTS = [Replicate(), Shard(0), Shard(1), InterleavedShard(0, 2), InterleavedShard(1, 2), Partial("sum"),
              Partial("avg")]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("source, target", list(itertools.product(PLACEMENTS, PLACEMENTS)),
                         ids=lambda p: repr(p))
def test_the_price_of_a_change_on_one_axis_is_the_bytes_lowering_sends(n, source, target):
    mesh = MeshSpec(n, tp=n)
    value = torch.empty(8, 16)
    have, want = Sharding.of(tp=source), Sharding.of(tp=target)
    sent, current = 0.0, have
    for step in plan_redistribution(have, want, value.dim(), mesh):
        sent += step_bytes(step, meta.local_bytes(value, current, mesh), mesh)
        current = _apply_placement(current, step)
    priced = redistribution(source, target, meta.local_bytes(value, have, mesh), n).bytes
    assert priced == pytest.approx(sent)
