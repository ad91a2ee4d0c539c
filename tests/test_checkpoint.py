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
