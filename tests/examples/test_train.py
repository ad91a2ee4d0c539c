"""examples/train.py: the schedule, a short run that learns and writes its log and plot, a resume on
another mesh equal to the straight run, and gloo processes taking the simulator's steps."""

import json
import struct
import zlib

import pytest

from examples import train
from shardgraph.checkpoint import load_train_state

# Ten short AdamW steps of the tiny model in float32 (the script's default): a few seconds each run.
SHORT = ["--model", "tiny", "--steps", "10", "--warmup", "2", "--batch", "8", "--seq", "32", "--lr", "1e-2",
         "--print-every", "100"]
SAVED_MESH, LOADED_MESH = "world=8,tp=2,ep=4", "world=4,tp=2,ep=2"


def relative(value, reference):
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def worst_state_error(path, reference_path):
    state, _ = load_train_state(path)
    reference, _ = load_train_state(reference_path)
    weights = max(relative(state.parameters[n], reference.parameters[n]) for n in reference.parameters)
    moments = max(relative(state.optimizer[n][slot], value) for n, slots in reference.optimizer.items()
                  for slot, value in slots.items())
    return weights, moments


def read_png(path):
    """``(width, height, pixel bytes)`` of an 8-bit RGB PNG, every chunk's CRC checked."""
    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks = 8, {}
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks[kind] = chunks.get(kind, b"") + body
        offset += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, color, interlace) == (8, 2, 0) and b"IEND" in chunks
    return width, height, zlib.decompress(chunks[b"IDAT"])


def test_the_schedule_warms_up_linearly_then_follows_a_cosine_down_to_the_minimum():
    rates = [train.learning_rate(step, peak=1.0, warmup=10, total=110, minimum=0.1) for step in range(1, 111)]
    assert rates[:10] == pytest.approx([step / 10 for step in range(1, 11)])
    assert max(rates) == rates[9] == 1.0
    assert all(later <= earlier for earlier, later in zip(rates[9:], rates[10:]))
    assert rates[59] == pytest.approx(0.55)  # half way through the cosine: half way down
    assert rates[-1] == pytest.approx(0.1)
    assert train.learning_rate(500, peak=1.0, warmup=10, total=110, minimum=0.1) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Ten steps on the saved mesh, with checkpoints at steps 5 and 10."""
    directory = tmp_path_factory.mktemp("straight")
    records = train.main(SHORT + ["--mesh", SAVED_MESH, "--checkpoint-dir", str(directory / "checkpoints"),
                                  "--checkpoint-every", "5", "--log", str(directory / "log.jsonl"),
                                  "--plot", str(directory / "loss.png")])
    return directory, records


@pytest.fixture(scope="module")
def resumed(straight, tmp_path_factory):
    """Step 5's checkpoint loaded in the simulator on another mesh, then steps 6 to 10."""
    directory, _ = straight
    checkpoints = tmp_path_factory.mktemp("resumed")
    records = train.main(SHORT + ["--mesh", LOADED_MESH, "--checkpoint-dir", str(checkpoints),
                                  "--resume", str(directory / "checkpoints" / "step_000005")])
    return checkpoints, records


def test_a_short_run_lowers_the_loss_and_writes_its_log_plot_and_checkpoints(straight):
    directory, records = straight
    assert [r["step"] for r in records] == list(range(1, 11))
    assert records[-1]["loss"] < 0.9 * records[0]["loss"]
    with open(directory / "log.jsonl") as handle:
        logged = [json.loads(line) for line in handle]
    assert logged == records
    assert set(logged[0]) == {"step", "loss", "grad_norm", "lr", "tokens_per_s", "memory_mb"}
    assert all(r["tokens_per_s"] > 0 and r["memory_mb"] > 0 and r["grad_norm"] > 0 for r in logged)
    width, height, pixels = read_png(directory / "loss.png")
    assert (width, height) == (800, 480) and len(pixels) == height * (1 + 3 * width)
    assert len(set(pixels)) > 3  # drawn on, not a blank canvas
    assert train.latest_checkpoint(str(directory / "checkpoints")).endswith("step_000010")
    state, metadata = load_train_state(str(directory / "checkpoints" / "step_000005"))
    assert state.step == 5 and metadata["data_position"] == 5 * 8 and metadata["mesh"] == SAVED_MESH
    assert set(state.optimizer["lm_head.weight"]) == {"exp_avg", "exp_avg_sq"}


def test_resuming_on_another_mesh_equals_the_straight_run(straight, resumed):
    # float32 AdamW: the two meshes reduce the gradients in another order, and the rounding that
    # leaves stays far below the tolerance on this data (no gradient element hovers at zero).
    directory, straight_records = straight
    checkpoints, records = resumed
    assert [r["step"] for r in records] == list(range(6, 11))
    assert max(abs(r["loss"] - s["loss"]) / s["loss"] for r, s in zip(records, straight_records[5:])) < 1e-6
    weights, moments = worst_state_error(str(checkpoints / "step_000010"),
                                         str(directory / "checkpoints" / "step_000010"))
    assert weights < 1e-6 and moments < 1e-5, (weights, moments)


def gloo_rank(rank, argv):
    return train.main(argv)


@pytest.mark.slow  # four processes each import torch and compile the step: 31 s on two busy cores
@pytest.mark.distributed
def test_four_gloo_processes_take_the_simulators_steps_and_save_the_same_state(straight, resumed, tmp_path):
    from shardgraph.runtime.distributed import spawn_gloo

    directory, _ = straight
    checkpoints, simulated = resumed
    argv = SHORT + ["--mesh", LOADED_MESH, "--backend", "distributed", "--checkpoint-dir", str(tmp_path),
                    "--resume", str(directory / "checkpoints" / "step_000005")]
    per_rank = spawn_gloo(gloo_rank, 4, argv, timeout=120)
    for records in per_rank:
        assert [r["step"] for r in records] == list(range(6, 11))
        assert max(abs(r["loss"] - s["loss"]) / s["loss"] for r, s in zip(records, simulated)) < 1e-6
    weights, moments = worst_state_error(str(tmp_path / "step_000010"), str(checkpoints / "step_000010"))
    assert weights < 1e-6 and moments < 1e-5, (weights, moments)
