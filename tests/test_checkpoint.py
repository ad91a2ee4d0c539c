"""Checkpoints: HF save_pretrained files loaded straight into per-rank pieces, saved back exactly."""

import pytest
import torch

import shardgraph as sg
from examples.moe_model import lm_loss
from shardgraph.checkpoint import CheckpointError, CheckpointIndex, load_local, plan_load, save_checkpoint, shard_optimizer_state


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, attn_implementation="eager"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_mixtral()
    directory = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(directory)
    return model, str(directory)


@pytest.mark.parametrize("mesh_text", ["world=8,tp=2,ep=2,etp=2", "world=4,tp=2,ep=4"])
def test_every_rank_loads_exactly_its_shard_and_saving_back_is_identical(saved, tmp_path, mesh_text):
    model, directory = saved
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(1))
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), (ids,), lm_loss)
    index = CheckpointIndex(directory)
    # HF writes Mixtral's experts as per-expert w1/w2/w3 under block_sparse_moe: fused on load.
    assert any("block_sparse_moe.experts.3.w1.weight" in key for key in index.shapes)
    plan = plan_load(index, program.traced.parameter_shapes)
    full = {n: p.detach() for n, p in model.named_parameters()}
    pieces = []
    for rank in program.mesh.ranks:
        local = load_local(index, program, rank, plan)
        expected = program.local_parameters(rank, full)
        for name in program.parameter_names:
            assert torch.equal(local[name], expected[name]), (rank, name)
        pieces.append(local)
    path = save_checkpoint(pieces, program, str(tmp_path / "out"), plan)
    written = CheckpointIndex(path)
    assert set(written.shapes) == set(index.shapes)
    for key in index.shapes:
        assert torch.equal(written.read(key, ()), index.read(key, ())), key


def test_a_train_step_saved_and_loaded_resumes_to_the_same_loss(saved, tmp_path):
    model, directory = saved
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(2))
    mesh = sg.MeshSpec(4, tp=2, ep=2)
    program = sg.compile(model, mesh, (ids,), lm_loss)
    index = CheckpointIndex(directory)
    plan = plan_load(index, program.traced.parameter_shapes)
    pieces = [load_local(index, program, r, plan) for r in mesh.ranks]
    simulator = sg.Simulator(mesh)
    batches = [program.local_batch(r, (ids,)) for r in mesh.ranks]
    steps = simulator.run(lambda comm, p, b: program.step(comm, p, b, program.default_buffers), list(zip(pieces, batches)))
    learning_rate = 0.05
    # SGD with momentum 0.9 on each rank's own pieces; the momentum is sharded like its parameter.
    momentum = [shard_optimizer_state({n: {"momentum": torch.zeros_like(full)} for n, full in
                                       ((n, p.detach()) for n, p in model.named_parameters())}, program, r)
                for r in mesh.ranks]
    for rank, (_, grads) in enumerate(steps):
        for name, grad in grads.items():
            buffer = momentum[rank][name]["momentum"]
            assert buffer.shape == pieces[rank][name].shape
            buffer.mul_(0.9).add_(grad)
            pieces[rank][name] = pieces[rank][name] - learning_rate * buffer
    save_checkpoint(pieces, program, str(tmp_path / "step1"), plan)
    resumed = [load_local(str(tmp_path / "step1"), program, r, plan) for r in mesh.ranks]
    loss_after = simulator.run(lambda comm, p, b: program.step(comm, p, b, program.default_buffers)[0],
                               list(zip(resumed, batches)))[0]
    # The same step on the unsharded model.
    reference = tiny_mixtral()
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(reference.parameters(), lr=learning_rate, momentum=0.9)
    lm_loss(reference(ids), ids).backward()
    optimizer.step()
    expected = lm_loss(reference(ids), ids).item()
    assert abs(loss_after.item() - expected) / abs(expected) < 1e-5


def test_missing_or_misshaped_keys_fail_before_anything_is_loaded(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    model, directory = saved
    tensors = load_file(f"{directory}/model.safetensors")
    ids = torch.randint(0, 64, (8, 8))
    program = sg.compile(model, sg.MeshSpec(4, tp=2, ep=4), (ids,), lm_loss)
    broken = dict(tensors)
    del broken["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    broken["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 32)
    (tmp_path / "broken").mkdir()
    save_file(broken, str(tmp_path / "broken" / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        plan_load(CheckpointIndex(str(tmp_path / "broken")), program.traced.parameter_shapes)
    message = str(info.value)
    assert "'model.layers.1.block_sparse_moe.experts.2.w3.weight' is missing" in message
    assert "'model.layers.0.self_attn.q_proj.weight' has shape (8, 32), parameter 'model.layers.0.self_attn.q_proj.weight' needs (32, 32)" in message


# ----------------------------------------------------------------------------- safe saving
@pytest.fixture(scope="module")
def mixtral_program(saved):
    model, _ = saved
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(3))
    program = sg.compile(model, sg.MeshSpec(4, tp=2, ep=2), (ids,), lm_loss)
    full = {n: p.detach() for n, p in model.named_parameters()}
    return program, [program.local_parameters(r, full) for r in program.mesh.ranks]


def test_a_save_is_written_under_a_temporary_name_and_a_failed_write_leaves_the_old_checkpoint(mixtral_program,
                                                                                               tmp_path, monkeypatch):
    import safetensors.torch

    program, pieces = mixtral_program
    path = save_checkpoint(pieces, program, str(tmp_path))
    before = (tmp_path / "model.safetensors").read_bytes()
    written_to = []
    real_save = safetensors.torch.save_file

    def crash_midway(tensors, filename, metadata=None):
        written_to.append(filename)
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # a torn write: half the bytes, then the crash
            handle.truncate(len(before) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(pieces, program, str(tmp_path))
    assert written_to and written_to[0] != path and written_to[0].startswith(str(tmp_path))
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary left behind


def test_saving_into_a_directory_with_an_hf_sharded_index_is_refused(saved, mixtral_program, tmp_path):
    model, _ = saved
    program, pieces = mixtral_program
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError, match=r"holds a sharded checkpoint \(model.safetensors.index.json\); a "
                                              r"model.safetensors written beside it would never be read"):
        save_checkpoint(pieces, program, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_overwriting_a_checkpoint_of_another_layout_is_refused_and_of_the_same_layout_allowed(mixtral_program,
                                                                                              tmp_path):
    program, pieces = mixtral_program
    other, other_ids = titan_with_bias()
    other_program = sg.compile(other, sg.MeshSpec(2, ep=2), (other_ids,), lm_loss)
    other_pieces = [other_program.local_parameters(r, {n: p.detach() for n, p in other.named_parameters()})
                    for r in other_program.mesh.ranks]
    save_checkpoint(other_pieces, other_program, str(tmp_path))
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match=r"is a checkpoint of another layout \(\d+ keys differ: "):
        save_checkpoint(pieces, program, str(tmp_path))
    assert (tmp_path / "model.safetensors").read_bytes() == before
    save_checkpoint(other_pieces, other_program, str(tmp_path))  # the next step's save of the same model


def test_diverged_replicas_are_refused_by_name_unless_told_to_keep_rank0s(mixtral_program, tmp_path):
    program, pieces = mixtral_program
    name = "model.norm.weight"
    assert program.parameter_sharding(name).is_replicated()
    diverged = [dict(p) for p in pieces]
    diverged[3][name] = diverged[3][name] + 1.0
    with pytest.raises(CheckpointError, match=rf"parameter '{name}': rank 3's replica differs from rank 0's") as info:
        save_checkpoint(diverged, program, str(tmp_path))
    assert str(info.value).count("differs") == 1 and "keep='rank0'" in str(info.value)
    assert not (tmp_path / "model.safetensors").exists()
    path = save_checkpoint(diverged, program, str(tmp_path), keep="rank0")
    assert torch.equal(CheckpointIndex(path).read(name, ()), pieces[0][name])


# ----------------------------------------------------------------------------- persistent buffers
def titan_with_bias(bias=None):
    from examples.titan_model import TitanConfig, TitanMoE

    torch.manual_seed(0)
    model = TitanMoE(TitanConfig(load_balance_coeff=1e-3, num_layers=1))
    if bias is not None:
        model.layers[0].moe.expert_bias.copy_(bias)
    return model, torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(4))


def test_persistent_buffers_are_saved_and_loaded_back_and_non_persistent_ones_are_not(tmp_path):
    from shardgraph.checkpoint import load_buffers

    # A bias large enough to change which experts every token picks, so the loss shows it.
    bias = torch.tensor([2.0, -2.0, 2.0, -2.0])
    model, ids = titan_with_bias(bias)
    mesh = sg.MeshSpec(2, ep=2)
    program = sg.compile(model, mesh, (ids,), lm_loss)
    assert program.persistent_buffer_names == ["layers.0.moe.expert_bias"]
    full = {n: p.detach() for n, p in model.named_parameters()}
    path = save_checkpoint([program.local_parameters(r, full) for r in mesh.ranks], program, str(tmp_path))
    assert "layers.0.moe.expert_bias" in CheckpointIndex(path).shapes
    assert "layers.0.moe.tokens_per_expert" not in CheckpointIndex(path).shapes

    fresh, _ = titan_with_bias()  # expert_bias zero, as a model built to resume into
    resumed = sg.compile(fresh, mesh, (ids,), lm_loss)
    buffers = {**resumed.default_buffers, **load_buffers(path, resumed)}
    assert torch.equal(buffers["layers.0.moe.expert_bias"], bias)
    assert torch.equal(load_buffers(path, resumed, rank=1)["layers.0.moe.expert_bias"], bias)
    expected = program.run_simulated(full, (ids,)).loss
    assert torch.equal(resumed.run_simulated(full, (ids,), buffers=buffers).loss, expected)
    assert not torch.equal(resumed.run_simulated(full, (ids,)).loss, expected)  # the bias matters


def test_loading_buffers_from_a_checkpoint_without_them_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    from shardgraph.checkpoint import load_buffers

    model, ids = titan_with_bias()
    program = sg.compile(model, sg.MeshSpec(2, ep=2), (ids,), lm_loss)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"buffer 'layers.0.moe.expert_bias' is missing"):
        load_buffers(str(tmp_path), program)


# ----------------------------------------------------------------------------- training state
def adam_state(model, step=3, seed=5):
    """A full TrainState of ``model`` with made-up moments, as ``gather_state`` returns one."""
    from shardgraph.training import TrainState

    generator = torch.Generator().manual_seed(seed)
    parameters = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = {n: {"exp_avg": torch.randn(p.shape, generator=generator),
                     "exp_avg_sq": torch.rand(p.shape, generator=generator)} for n, p in parameters.items()}
    return TrainState(parameters, optimizer, step)


def test_a_training_state_round_trips_bit_exactly_and_its_weights_load_per_rank(mixtral_program, saved, tmp_path):
    from shardgraph.checkpoint import TRAIN_STATE_FILE, load_train_state, save_train_state

    model, _ = saved
    program, pieces = mixtral_program
    state = adam_state(model)
    path = save_train_state(state, str(tmp_path), {"data_position": 96, "mesh": "world=4,tp=2,ep=2"})
    assert path == str(tmp_path / TRAIN_STATE_FILE)
    loaded, metadata = load_train_state(str(tmp_path))
    assert metadata == {"data_position": 96, "mesh": "world=4,tp=2,ep=2"} and loaded.step == 3
    assert set(loaded.parameters) == set(state.parameters) and set(loaded.optimizer) == set(state.optimizer)
    for name, value in state.parameters.items():
        assert torch.equal(loaded.parameters[name], value), name
        for slot in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded.optimizer[name][slot], state.optimizer[name][slot]), (name, slot)
    # The weights keep their names, so a rank reads just its slices as from any checkpoint.
    index = CheckpointIndex(path)
    for rank in program.mesh.ranks:
        local = load_local(index, program, rank)
        assert all(torch.equal(local[n], pieces[rank][n]) for n in program.parameter_names), rank


def test_a_failed_training_state_write_leaves_the_previous_one_and_another_models_is_refused(saved, tmp_path,
                                                                                             monkeypatch):
    import safetensors.torch

    from shardgraph.checkpoint import load_train_state, save_train_state

    model, _ = saved
    save_train_state(adam_state(model, step=3), str(tmp_path), {"data_position": 1})
    before = (tmp_path / "train_state.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", crash)
        with pytest.raises(OSError, match="disk full"):
            save_train_state(adam_state(model, step=4), str(tmp_path), {"data_position": 2})
    assert (tmp_path / "train_state.safetensors").read_bytes() == before
    other, _ = titan_with_bias()
    with pytest.raises(CheckpointError, match=r"is a checkpoint of another layout"):
        save_train_state(adam_state(other), str(tmp_path))
    assert (tmp_path / "train_state.safetensors").read_bytes() == before
    assert load_train_state(str(tmp_path))[0].step == 3


def test_a_model_checkpoint_is_not_read_as_a_training_state(saved, tmp_path):
    from shardgraph.checkpoint import load_train_state

    _, directory = saved
    with pytest.raises(CheckpointError, match="no training state at"):
        load_train_state(directory)
    with pytest.raises(CheckpointError, match="is a model checkpoint, not a training state"):
        load_train_state(directory + "/model.safetensors")
