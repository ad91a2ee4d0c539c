"""The simulator: exact collective semantics on any group, byte records, determinism, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardgraph.mesh import MeshSpec
from shardgraph.runtime.simulate import CollectiveError, Simulator


def per_rank(mesh, shape, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return {r: torch.randn(shape, generator=generator, dtype=dtype) for r in mesh.ranks}


def test_all_reduce_sums_averages_and_maxes_within_each_group():
    mesh = MeshSpec(8, tp=2, ep=4)
    sim = Simulator(mesh)
    x = per_rank(mesh, (3,))
    for op, combine in (("sum", lambda ts: sum(ts[1:], ts[0])), ("max", lambda ts: torch.stack(ts).amax(0))):
        out = sim.all_reduce(x, "dp", op=op)
        for rank in mesh.ranks:
            group = mesh.group_of("dp", rank)
            torch.testing.assert_close(out[rank], combine([x[m] for m in group]), rtol=0, atol=0)
    avg = sim.all_reduce(x, "tp", op="avg")
    torch.testing.assert_close(avg[3], (x[2] + x[3]) / 2)


def test_all_gather_concatenates_in_group_order_on_any_dim():
    mesh = MeshSpec(4, tp=2, ep=4)
    sim = Simulator(mesh)
    x = per_rank(mesh, (2, 3))
    out = sim.all_gather(x, "ep", dim=1)
    assert torch.equal(out[2], torch.cat([x[0], x[1], x[2], x[3]], dim=1))
    out = sim.all_gather(x, "dp", dim=0)
    assert torch.equal(out[1], torch.cat([x[1], x[3]], dim=0))


def test_reduce_scatter_gives_each_member_its_chunk_of_the_reduction():
    mesh = MeshSpec(4, tp=4)
    sim = Simulator(mesh)
    x = per_rank(mesh, (8, 2))
    out = sim.reduce_scatter(x, "tp", dim=0, op="sum")
    total = x[0] + x[1] + x[2] + x[3]
    for rank in mesh.ranks:
        assert torch.equal(out[rank], total[2 * rank : 2 * rank + 2])
    avg = sim.reduce_scatter(x, "tp", dim=0, op="avg")
    torch.testing.assert_close(avg[1], total[2:4] / 4)


def test_all_to_all_with_unequal_splits_routes_rows_and_counts_bytes():
    mesh = MeshSpec(3, ep=3)
    sim = Simulator(mesh)
    splits = {0: [1, 2, 0], 1: [0, 0, 3], 2: [2, 1, 1]}
    x = {r: torch.arange(sum(splits[r]), dtype=torch.float32) + 10 * r for r in mesh.ranks}
    out = sim.all_to_all(x, "ep", input_splits=splits)
    # rank 2 holds [20, 21, 22, 23] and sends [20, 21] to 0, [22] to 1, keeps [23]
    assert out[0].tolist() == [0.0, 20.0, 21.0]
    assert out[1].tolist() == [1.0, 2.0, 22.0]
    assert out[2].tolist() == [10.0, 11.0, 12.0, 23.0]
    record = sim.records[-1]
    assert record.kind == "all_to_all" and record.group == (0, 1, 2)
    assert record.bytes_sent == (8, 12, 12)  # rows to other members only, 4 bytes each
    assert record.bytes_received == (8, 12, 12)


def test_broadcast_copies_the_source_member():
    mesh = MeshSpec(4, tp=2)
    sim = Simulator(mesh)
    x = per_rank(mesh, (2,))
    out = sim.broadcast(x, "tp", source_index=1)
    assert torch.equal(out[0], x[1]) and torch.equal(out[2], x[3])
    assert sim.records[-1].bytes_sent == (0, 8) and sim.records[-1].bytes_received == (8, 0)


def test_records_count_bytes_per_rank_per_axis():
    mesh = MeshSpec(8, tp=2, ep=4)
    sim = Simulator(mesh)
    x = per_rank(mesh, (16,))  # 64 bytes
    sim.all_reduce(x, "tp")  # 2 * 64 * 1/2 = 64 sent per rank
    sim.all_gather(x, "dp")  # 64 * 3 = 192
    sim.reduce_scatter(x, "edp")  # 64 * 1/2 = 32
    assert sim.bytes_sent_by_axis() == {"tp": 64, "dp": 192, "edp": 32}
    assert [r.kind for r in sim.records].count("all_reduce") == 4  # one record per tp group


def test_spmd_run_matches_collective_level_results_and_is_deterministic():
    mesh = MeshSpec(8, tp=2, ep=2, etp=2)
    x = per_rank(mesh, (4, 6), seed=3)

    def program(comm, tensor):
        summed = comm.all_reduce(tensor, "edp")
        gathered = comm.all_gather(summed, "etp", dim=1)
        scattered = comm.reduce_scatter(gathered, ("ep", "etp"), dim=0, op="avg")
        return comm.all_to_all(scattered, "ep", input_splits=[comm.index("ep"), 1 - comm.index("ep")])

    runs = [Simulator(mesh).run(program, [(x[r],) for r in mesh.ranks]) for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))

    sim = Simulator(mesh)
    step = sim.all_reduce(x, "edp")
    step = sim.all_gather(step, "etp", dim=1)
    step = sim.reduce_scatter(step, ("ep", "etp"), dim=0, op="avg")
    step = sim.all_to_all(step, "ep", input_splits={r: [mesh.index("ep", r), 1 - mesh.index("ep", r)] for r in mesh.ranks})
    assert all(torch.equal(runs[0][r], step[r]) for r in mesh.ranks)


def test_mismatched_collectives_are_reported_with_the_ranks():
    mesh = MeshSpec(2, tp=2)

    def program(comm, tensor):
        if comm.rank == 0:
            return comm.all_reduce(tensor, "tp")
        return comm.all_gather(tensor, "tp")

    with pytest.raises(CollectiveError, match="all_gather|all_reduce"):
        Simulator(mesh, timeout=5).run(program, [(torch.ones(2),), (torch.ones(2),)])

    def shapes_differ(comm, tensor):
        return comm.all_reduce(tensor[: comm.rank + 1], "tp")

    with pytest.raises(CollectiveError, match="rank 1 passed shape"):
        Simulator(mesh, timeout=5).run(shapes_differ, [(torch.ones(2),), (torch.ones(2),)])


def test_a_rank_that_never_arrives_times_out_naming_who_arrived():
    mesh = MeshSpec(2, tp=2)

    def program(comm, tensor):
        if comm.rank == 1:
            return tensor
        return comm.all_reduce(tensor, "tp")

    with pytest.raises(CollectiveError, match=r"only ranks \[0\] arrived"):
        Simulator(mesh, timeout=0.5).run(program, [(torch.ones(2),), (torch.ones(2),)])


def test_an_exception_on_one_rank_surfaces_instead_of_hanging():
    mesh = MeshSpec(2, tp=2)

    def program(comm, tensor):
        if comm.rank == 1:
            raise KeyError("boom on rank 1")
        return comm.all_reduce(tensor, "tp")

    with pytest.raises(KeyError, match="boom"):
        Simulator(mesh, timeout=30).run(program, [(torch.ones(2),), (torch.ones(2),)])


def test_bad_splits_are_refused():
    mesh = MeshSpec(2, ep=2)
    with pytest.raises(CollectiveError, match="do not partition dim 0 of size 3"):
        Simulator(mesh).all_to_all({0: torch.ones(3), 1: torch.ones(3)}, "ep", input_splits={0: [1, 1], 1: [2, 1]})


# ------------------------------------------------------------------ properties
@st.composite
def mesh_and_axis(draw):
    tp = draw(st.sampled_from([1, 2, 4]))
    ep = draw(st.sampled_from([1, 2, 4]))
    etp = draw(st.sampled_from([1, 2]))
    stage = max(tp, ep * etp) * draw(st.sampled_from([1, 2]))
    mesh = MeshSpec(world=stage, tp=tp, ep=ep, etp=etp)
    axis = draw(st.sampled_from(["tp", "dp", "ep", "etp", "edp", ("ep", "etp"), ("dp", "tp")]))
    return mesh, axis


@settings(max_examples=40, deadline=None)
@given(mesh_and_axis(), st.integers(0, 2**16), st.data())
def test_all_to_all_followed_by_its_inverse_is_identity(case, seed, data):
    mesh, axis = case
    n = mesh.size(axis)
    generator = torch.Generator().manual_seed(seed)
    splits = {r: data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)) for r in mesh.ranks}
    x = {r: torch.randn(sum(splits[r]), 2, generator=generator) for r in mesh.ranks}
    sim = Simulator(mesh)
    there = sim.all_to_all(x, axis, input_splits=splits)
    # The inverse sends back what each member received from each peer.
    received = {
        r: [splits[peer][mesh.index(axis, r)] for peer in mesh.group_of(axis, r)] for r in mesh.ranks
    }
    back = sim.all_to_all(there, axis, input_splits=received)
    assert all(torch.equal(back[r], x[r]) for r in mesh.ranks)


@settings(max_examples=40, deadline=None)
@given(mesh_and_axis(), st.integers(0, 2**16), st.sampled_from(["sum", "avg"]))
def test_reduce_scatter_then_all_gather_equals_all_reduce(case, seed, op):
    mesh, axis = case
    n = mesh.size(axis)
    generator = torch.Generator().manual_seed(seed)
    x = {r: torch.randn(2 * n, 3, generator=generator, dtype=torch.float64) for r in mesh.ranks}
    sim = Simulator(mesh)
    via_scatter = sim.all_gather(sim.reduce_scatter(x, axis, dim=0, op=op), axis, dim=0)
    direct = sim.all_reduce(x, axis, op=op)
    # Same additions in the same (group) order: bit-identical, not merely close.
    assert all(torch.equal(via_scatter[r], direct[r]) for r in mesh.ranks)


def test_pieces_of_different_lengths_need_their_sizes_and_wrong_receive_sizes_are_refused():
    from shardgraph.runtime.simulate import CollectiveError

    mesh = MeshSpec(2, tp=2)

    def uneven(comm):
        return comm.all_gather(torch.ones(comm.rank + 1, 2), "tp", dim=0)

    with pytest.raises(CollectiveError, match=r"pieces of different lengths need sizes"):
        Simulator(mesh).run(uneven)
    gathered = Simulator(mesh).run(lambda comm: comm.all_gather(torch.ones(comm.rank + 1, 2), "tp", sizes=[1, 2]))
    assert gathered[0].shape == (3, 2)

    def wrong_receive(comm):
        return comm.all_to_all(torch.ones(2, 1), "tp", [1, 1], output_splits=[2, 2])

    with pytest.raises(CollectiveError, match=r"received 2 rows, but output_splits \[2, 2\] say 4"):
        Simulator(mesh).run(wrong_receive)


def test_both_communicators_satisfy_the_communicator_protocol():
    from shardgraph.runtime import Communicator
    from shardgraph.runtime.distributed import DistributedCommunicator

    simulator = Simulator(MeshSpec(2, tp=2))
    assert isinstance(simulator.communicator(0), Communicator)
    missing = [name for name in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "group",
                                 "index") if not callable(getattr(DistributedCommunicator, name, None))]
    assert not missing
