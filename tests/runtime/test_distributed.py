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
    # Unequal pieces travel with their lengths; receive sizes may be given or exchanged.
    row_counts = [inputs(member)[1].shape[0] for member in MESH.group_of("tp", rank)]
    ep_group = MESH.group_of("ep", rank)
    receive = [inputs(member)[2][ep_group.index(rank)] for member in ep_group]
    return [
        comm.all_reduce(dense, "tp"),
        comm.all_reduce(dense, "dp", op="avg"),
        comm.all_gather(dense, "ep", dim=1),
        comm.all_gather(rows, "tp", dim=0, sizes=row_counts),
        comm.reduce_scatter(dense, "tp", dim=0),
        comm.reduce_scatter(dense, ("dp", "tp"), dim=0, op="avg"),
        comm.all_to_all(rows, "ep", splits),
        comm.all_to_all(rows, "ep", splits, output_splits=receive),
    ]


def gloo_rank(rank):
    import torch.distributed as dist

    from shardgraph.runtime.distributed import DistributedCommunicator

    communicator = DistributedCommunicator(MESH)
    workers = [group._get_backend(torch.device("cpu")).options._threads
               for _, group in communicator._groups.values() if group is not None]
    default_workers = dist.group.WORLD._get_backend(torch.device("cpu")).options._threads
    constructor_restored = dist.distributed_c10d.ProcessGroupGloo is torch._C._distributed_c10d.ProcessGroupGloo
    return program(communicator, rank), workers, default_workers, constructor_restored


@pytest.fixture(scope="module")
def gloo_results():
    from shardgraph.runtime.distributed import spawn_gloo

    return spawn_gloo(gloo_rank, MESH.world)


def test_gloo_collectives_match_the_simulator(gloo_results):
    distributed = gloo_results
    simulated = Simulator(MESH).run(lambda comm: program(comm, comm.rank))
    for rank in MESH.ranks:
        for got, expected in zip(distributed[rank][0], simulated[rank]):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_the_communicators_gloo_groups_run_their_collectives_on_one_worker_thread_in_issue_order(gloo_results):
    # Two workers (gloo's default, kept by the default group) run two in-flight collectives of
    # one group at once, which corrupted the ranks' heap under the overlapping schedule.
    for _, workers, default_workers, constructor_restored in gloo_results:
        assert workers and set(workers) == {1}
        assert default_workers == 2 and constructor_restored


def dtensor_rank(rank):
    from shardgraph.checkpoint import device_mesh_for, to_dtensor
    from shardgraph.placement import Partial, Shard, Sharding, shard

    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    results = {}
    for label, sharding in (("dense", Sharding.of(dp=Shard(0), tp=Shard(1))), ("expert", Sharding.of(ep=Shard(0)))):
        view = "expert" if label == "expert" else "dense"
        device_mesh = device_mesh_for(MESH, view)
        local = shard(full, sharding, MESH, rank)
        results[label] = to_dtensor(local, sharding, device_mesh, full.shape).full_tensor()
    partial = Sharding.of(tp=Partial("sum"))
    results["partial"] = to_dtensor(shard(full, partial, MESH, rank), partial, device_mesh_for(MESH), full.shape).full_tensor()
    return results


def test_local_pieces_become_dtensors_whose_full_tensor_is_the_original():
    from shardgraph.runtime.distributed import spawn_gloo

    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    for per_rank in spawn_gloo(dtensor_rank, MESH.world):
        for label, value in per_rank.items():
            assert torch.equal(value, full), label


def test_interleaved_placements_are_refused_as_dtensors():
    from shardgraph.checkpoint import CheckpointError, to_dtensor
    from shardgraph.placement import InterleavedShard, Sharding

    with pytest.raises(CheckpointError, match="no DTensor form"):
        to_dtensor(torch.zeros(2, 2), Sharding.of(etp=InterleavedShard(0, 2)), device_mesh=None)
