"""Runtime guards in one process: non-finite values, batches of another shape, replicas that
differ, buffers taken from the model, frozen parameters, and what compile refuses up front."""

import pytest
import torch

import shardgraph as sg
from shardgraph.check import parity_errors
from shardgraph.program import BatchError
from shardgraph.runtime.guards import (
    NonFiniteError,
    ReplicaMismatchError,
    bit_checksum,
    fingerprint_mismatch,
    program_fingerprint,
)
from tests.runtime.tiny_model import Tiny, build, full_parameters, next_token_loss

MESH = sg.MeshSpec(4, tp=2, ep=4)


@pytest.fixture(scope="module")
def compiled():
    model, inputs, loss_fn = build()
    return model, inputs, sg.compile(model, MESH, inputs, loss_fn)


def eager(model, inputs):
    loss = next_token_loss(model(*inputs), *inputs)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss.detach(), dict(zip(names, grads))


# ----------------------------------------------------------------------------- non-finite values
def test_a_nan_weight_is_refused_naming_the_parameter_not_reported_as_ranks_disagreeing(compiled):
    model, inputs, program = compiled
    parameters = full_parameters(model)
    parameters["norm_weight"][3] = float("nan")
    with pytest.raises(NonFiniteError) as info:
        program.run_simulated(parameters, inputs)
    message = str(info.value)
    assert "the loss is nan" in message and "parameter 'norm_weight' holds 1 NaN of 8 values" in message
    assert "debug=True" in message and "computed loss" not in message


def test_debug_from_the_environment_refuses_a_nan_weight_before_the_step(compiled, monkeypatch):
    model, inputs, program = compiled
    parameters = full_parameters(model)
    parameters["head.weight"][0, 0] = float("inf")
    monkeypatch.setenv("SHARDGRAPH_DEBUG", "1")
    monkeypatch.setattr(program, "step", lambda *a, **k: pytest.fail("the step ran on a non-finite weight"))
    with pytest.raises(NonFiniteError, match=r"before the step:\n  parameter 'head.weight' holds 1 inf of 128"):
        program.run_simulated(parameters, inputs)


def test_debug_names_the_first_node_that_overflowed_with_its_rank_and_source_line(compiled):
    model, inputs, program = compiled
    parameters = full_parameters(model)
    # Finite weights whose product overflows float32: the head's matmul makes the first inf.
    parameters["head.weight"] = parameters["head.weight"].sign() * 3e38
    with pytest.raises(NonFiniteError) as info:
        program.run_simulated(parameters, inputs, debug=True)
    message = str(info.value)
    assert "the loss is nan" in message
    assert "the first non-finite value appeared on ranks [0, 1, 2, 3] at node mm (aten.mm.default)" in message
    assert "tiny_model.py" in message and "return self.head(x * self.scale + self.scratch)" in message


def test_a_finite_step_passes_the_checks_and_matches_the_model(compiled):
    model, inputs, program = compiled
    result = program.run_simulated(full_parameters(model), inputs, debug=True)
    loss, gradients = eager(model, inputs)
    torch.testing.assert_close(result.loss, loss)
    for name, gradient in gradients.items():
        torch.testing.assert_close(result.gradients[name], gradient, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("bad, said", [
    ((torch.zeros(4, 5, dtype=torch.long),), r"batch input 'ids' has shape \(4, 5\), but the program was compiled "
                                             r"for \(4, 4\) \(the global batch\)"),
    ((torch.zeros(4, 4, dtype=torch.int32),), r"batch input 'ids' has dtype torch.int32, but the program was compiled "
                                              r"for torch.int64"),
    ((), r"the program takes 1 batch tensors \['ids'\], got 0"),
])
def test_a_batch_unlike_the_compiled_one_is_refused_by_name_before_any_work(compiled, monkeypatch, bad, said):
    model, inputs, program = compiled
    monkeypatch.setattr(program, "step", lambda *a, **k: pytest.fail("the step ran on a wrong batch"))
    with pytest.raises(BatchError, match="run_simulated: " + said):
        program.run_simulated(full_parameters(model), bad)
    with pytest.raises(BatchError, match="local_batch: " + said):
        program.local_batch(0, bad)


def test_run_compares_a_local_batch_with_this_ranks_piece(compiled, monkeypatch):
    model, inputs, program = compiled
    local = program.local_parameters(1, full_parameters(model))
    monkeypatch.setattr(program, "step", lambda *a, **k: pytest.fail("the step ran on a wrong batch"))
    communicator = sg.Simulator(MESH).communicator(1)
    # The ids are split over dp=2: a rank's piece is (2, 4); the global batch is not.
    with pytest.raises(BatchError, match=r"run: batch input 'ids' has shape \(4, 4\), but the program was compiled "
                                         r"for \(2, 4\) \(this rank's piece of the global \(4, 4\)"):
        program.run(local, inputs, communicator=communicator)


def test_single_device_step_refuses_a_batch_of_another_shape():
    model, inputs, loss_fn = build()
    program = sg.compile(model, sg.MeshSpec(1), inputs, loss_fn)
    step = program.single_device_step()
    loss, _ = step(full_parameters(model), inputs)
    torch.testing.assert_close(loss, eager(model, inputs)[0])
    with pytest.raises(BatchError, match=r"single_device_step: batch input 'ids' has shape \(2, 4\)"):
        step(full_parameters(model), (inputs[0][:2],))


@pytest.mark.parametrize("shape, said", [
    ((0, 4), r"batch input 'ids' has shape \(0, 4\), empty along dim 0"),
    ((4, 0), r"batch input 'ids' has shape \(4, 0\), empty along dim 1"),
    ((4, 1), r"slice_\d+ \(aten.slice.Tensor\) .* is empty \(shape \(4, 0, 16\)\) for the batch 'ids' \(4, 1\): "
             r"the loss would count zero positions"),
])
def test_an_empty_batch_or_sequences_of_length_one_are_refused_at_compile(shape, said):
    with pytest.raises(ValueError, match="compile: " + said):
        sg.compile(Tiny(), MESH, (torch.zeros(shape, dtype=torch.long),), next_token_loss)


# ----------------------------------------------------------------------------- run() on the simulator
def run_on_simulator(program, pieces, batches, buffers=None):
    return sg.Simulator(program.mesh).run(
        lambda comm, p, b: program.run(p, b, buffers, communicator=comm), list(zip(pieces, batches)))


def test_run_takes_the_models_own_buffers_when_none_are_given(compiled):
    model, inputs, program = compiled
    pieces = [program.local_parameters(r, full_parameters(model)) for r in MESH.ranks]
    batches = [program.local_batch(r, inputs) for r in MESH.ranks]
    results = run_on_simulator(program, pieces, batches)
    for loss, _ in results:
        torch.testing.assert_close(loss, eager(model, inputs)[0])


def test_the_first_step_names_a_replica_that_differs_with_its_axis_and_ranks():
    model, inputs, loss_fn = build()
    program = sg.compile(model, MESH, inputs, loss_fn)
    pieces = [program.local_parameters(r, full_parameters(model)) for r in MESH.ranks]
    pieces[3]["norm_weight"] = pieces[3]["norm_weight"] + 1e-7  # one ulp-sized drift on one rank
    batches = [program.local_batch(r, inputs) for r in MESH.ranks]
    with pytest.raises(ReplicaMismatchError) as info:
        run_on_simulator(program, pieces, batches)
    # Rank 1 sees the drift in its dp group (1, 3), rank 2 in its tp group (2, 3). Whichever
    # raises first aborts the others' pending collectives, so the reporting rank depends on the
    # threads' timing; either report names the parameter, the axis, the group and the ranks.
    message = str(info.value)
    expected = {
        1: "parameter 'norm_weight' is replicated over dp (group (1, 3)) but its copies differ: ranks [1] | [3] "
           "hold different values",
        2: "parameter 'norm_weight' is replicated over tp (group (2, 3)) but its copies differ: ranks [2] | [3] "
           "hold different values",
        3: "parameter 'norm_weight' is replicated over",
    }
    rank = int(message.split(":", 1)[0].removeprefix("rank "))
    assert message.startswith(f"rank {rank}: replicated values differ between ranks before the first step")
    assert expected[rank] in message
    assert "embed.weight" not in message and "head.weight" not in message


def test_bit_checksums_are_equal_for_equal_bits_nan_included_and_differ_for_swapped_elements():
    values = torch.tensor([1.0, float("nan"), -2.5, 0.0])
    assert torch.equal(bit_checksum(values), bit_checksum(values.clone()))
    assert not torch.equal(bit_checksum(values), bit_checksum(values[[2, 1, 0, 3]]))
    assert not torch.equal(bit_checksum(values), bit_checksum(torch.tensor([1.0, float("nan"), -2.5, -0.0])))
    assert torch.equal(bit_checksum(torch.ones(3, dtype=torch.bfloat16)), bit_checksum(torch.ones(3, dtype=torch.bfloat16)))


def test_programs_for_another_batch_shape_differ_in_their_graph_fingerprint(compiled):
    _, _, program = compiled
    model, inputs, loss_fn = build(batch=8)
    other = program_fingerprint(sg.compile(model, MESH, inputs, loss_fn))
    mine = program_fingerprint(program)
    assert mine["mesh"] == other["mesh"] and mine["graph"] != other["graph"]
    assert fingerprint_mismatch([mine, mine, mine]) is None
    message = fingerprint_mismatch([mine, other, mine])
    assert message.startswith("ranks [1] run a different program from ranks [0, 2]")
    assert f"graph: ranks [0, 2] have {mine['graph']}; ranks [1] have {other['graph']}" in message


# ----------------------------------------------------------------------------- frozen parameters
def test_parity_check_handles_frozen_parameters():
    model, inputs, loss_fn = build()
    model.embed.weight.requires_grad_(False)
    program = sg.compile(model, MESH, inputs, loss_fn)
    assert "embed.weight" not in program.gradient_names
    errors, result = parity_errors(program, model, inputs, loss_fn)
    assert errors.within(1e-5), errors
    assert set(result.gradients) == {"norm_weight", "head.weight"}
