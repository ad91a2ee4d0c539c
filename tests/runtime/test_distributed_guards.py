"""Start-up and first-step guards under real torch.distributed (gloo processes, world 2).

Every scenario runs with a process-group timeout, so a regression that hangs fails in seconds
instead of blocking the suite.
"""

import time

import pytest
import torch

import shardgraph as sg
from tests.runtime.tiny_model import build, full_parameters

pytestmark = pytest.mark.distributed

MESH = sg.MeshSpec(2)  # dp = 2: the batch is split, gradients and the loss are all-reduced over dp


def compile_rank(rank, seed=0, mesh=MESH):
    model, inputs, loss_fn = build(seed)
    program = sg.compile(model, mesh, inputs, loss_fn)
    pieces = program.local_parameters(rank, full_parameters(model))
    return model, program, pieces, program.local_batch(rank, inputs)


def error_of(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - returned to the parent to be checked
        return f"{type(error).__name__}: {error}"
    return None


def same_program_rank(rank):
    model, program, pieces, batch = compile_rank(rank)
    # No buffers passed: the rank's pieces of the model's own ('scale') are used.
    loss, gradients = program.run(pieces, batch)
    # A second step under debug: a weight product that overflows is named on every rank.
    overflowing = dict(pieces, **{"head.weight": pieces["head.weight"].sign() * 3e38})
    return loss, gradients, error_of(lambda: program.run(overflowing, batch, debug=True))


def test_ranks_running_the_same_program_pass_the_checks_and_use_the_models_buffers():
    from shardgraph.runtime.distributed import spawn_gloo

    results = spawn_gloo(same_program_rank, MESH.world, timeout=20)
    model, inputs, loss_fn = build()
    reference = loss_fn(model(*inputs), *inputs)
    gradients = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(reference, model.parameters())))
    for loss, local_gradients, overflow in results:
        torch.testing.assert_close(loss, reference.detach())
        for name, gradient in local_gradients.items():  # every parameter is replicated
            torch.testing.assert_close(gradient, gradients[name], rtol=1e-5, atol=1e-6)
        assert overflow.startswith("NonFiniteError: run on rank")
        # The head's product and the loss run as one fused op (fuse_linear_cross_entropy).
        assert "(shardgraph.linear_cross_entropy.default)" in overflow
        assert "return self.head(x * self.scale" in overflow


def other_mesh_rank(rank):
    # Rank 1 compiled for ep=2, rank 0 for ep=1: without the check the ranks would create
    # different process groups and hang.
    _, program, pieces, batch = compile_rank(rank, mesh=sg.MeshSpec(2, ep=2) if rank == 1 else MESH)
    return error_of(lambda: program.run(pieces, batch))


def test_a_rank_compiled_for_another_mesh_is_named_at_start_up_not_left_to_hang():
    from shardgraph.runtime.distributed import spawn_gloo

    started = time.monotonic()
    errors = spawn_gloo(other_mesh_rank, 2, timeout=20)
    assert time.monotonic() - started < 90
    for rank, error in enumerate(errors):
        assert error.startswith(f"ProgramMismatchError: rank {rank}: ranks [1] run a different program from ranks [0]")
        assert "mesh: ranks [0] have MeshSpec(world=2, pp=1, tp=1, dp=2, ep=1" in error
        assert "ranks [1] have MeshSpec(world=2, pp=1, tp=1, dp=2, ep=2" in error


def other_seed_rank(rank):
    _, program, pieces, batch = compile_rank(rank, seed=rank)
    return error_of(lambda: program.run(pieces, batch))


def test_ranks_that_built_their_model_with_different_seeds_are_named_per_parameter():
    from shardgraph.runtime.distributed import spawn_gloo

    for rank, error in enumerate(spawn_gloo(other_seed_rank, 2, timeout=20)):
        assert error.startswith(f"ReplicaMismatchError: rank {rank}: replicated values differ between ranks")
        for name in ("embed.weight", "norm_weight", "head.weight"):
            assert (f"parameter {name!r} is replicated over dp (group (0, 1)) but its copies differ: "
                    f"ranks [0] | [1] hold different values") in error
        assert "buffer 'scale'" not in error  # the same on both ranks: not reported


def stopping_rank(rank):
    _, program, pieces, batch = compile_rank(rank)
    program.run(pieces, batch)
    if rank == 1:
        time.sleep(120)  # alive but no longer answering; killed when rank 0 fails
    program.run(pieces, batch)


def test_a_rank_that_stops_answering_becomes_an_error_naming_the_collective_and_the_rank_missing():
    from shardgraph.runtime.distributed import spawn_gloo

    started = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        spawn_gloo(stopping_rank, 2, timeout=3)
    assert time.monotonic() - started < 90  # rank 0 gave up after its timeout, not when rank 1 woke up
    message = str(info.value)
    assert "CollectiveFailure: rank 0: all_reduce over dp group (0, 1) (call #" in message
    assert "Timed out" in message
    assert "ranks missing: [1] (reported nothing within 3.0s" in message


def crashing_rank(rank, when):
    import atexit
    import os
    import signal

    if rank == 1:
        if when == "before":
            os.kill(os.getpid(), signal.SIGSEGV)
        # After fn returns and the result is saved: the interpreter's shutdown, where a backend's
        # native teardown would crash.
        atexit.register(os.kill, os.getpid(), signal.SIGSEGV)
    return rank


@pytest.mark.parametrize("when, words", [("before", "before finishing"), ("after", "after saving its result")])
def test_a_rank_killed_by_a_signal_is_named_with_the_signal_and_whether_its_result_was_saved(when, words):
    from shardgraph.runtime.distributed import spawn_gloo

    with pytest.raises(RuntimeError) as info:
        spawn_gloo(crashing_rank, 2, when, timeout=20)
    assert f"rank 1: died with signal SIGSEGV {words}" in str(info.value)
