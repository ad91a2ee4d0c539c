"""The torch.distributed communicator over real gloo processes agrees with the simulator."""

import pytest
import torch

from shardgraph.mesh import MeshSpec
from shardgraph.runtime.simulate import Simulator

pytestmark = pytest.mark.distributed

MESH = MeshSpec(4, tp=2, ep=4)


def inputs(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    splits = [(rank + peer) % 3 for peer in range(4)]
    return torch.randn(4, 6, generator=generator), torch.randn(sum(splits), 3, generator=generator), splits


def program(comm, rank):
    dense, rows, splits = inputs(rank)
    return [
        comm.all_reduce(dense, "tp"),
        comm.all_reduce(dense, "dp", op="avg"),
        comm.all_gather(dense, "ep", dim=1),
        comm.all_gather(rows, "tp", dim=0),  # unequal lengths
        comm.reduce_scatter(dense, "tp", dim=0),
        comm.reduce_scatter(dense, ("dp", "tp"), dim=0, op="avg"),
        comm.all_to_all(rows, "ep", splits),
    ]


def gloo_rank(rank):
    from shardgraph.runtime.distributed import DistributedCommunicator

    return program(DistributedCommunicator(MESH), rank)


def test_gloo_collectives_match_the_simulator():
    from shardgraph.runtime.distributed import spawn_gloo

    distributed = spawn_gloo(gloo_rank, MESH.world)
    simulated = Simulator(MESH).run(lambda comm: program(comm, comm.rank))
    for rank in MESH.ranks:
        for got, expected in zip(distributed[rank], simulated[rank]):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
