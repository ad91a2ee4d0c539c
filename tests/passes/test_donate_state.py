"""Donated training state: the step writes its new parameters and optimizer state into the
tensors it was given, gives the same bits as a step that does not, and refuses a state it
consumed."""

import pytest
import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from shardgraph.training import StateError


def _programs(mesh_text, **options):
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    compile_options = dict(optimizer=sg.optim.AdamW(lr=1e-2, weight_decay=0.1), clip_grad_norm=1.0, **options)
    mesh = sg.MeshSpec.parse(mesh_text)
    donating = sg.compile(model, mesh, inputs, loss_fn, donate_state=True, **compile_options)
    keeping = sg.compile(model, mesh, inputs, loss_fn, donate_state=False, **compile_options)
    return model, inputs, donating, keeping


@pytest.mark.parametrize("mesh_text", ["world=1", "world=4,tp=2,ep=2", "world=8,tp=2,ep=2,etp=2"])
def test_a_donating_step_gives_the_bits_of_a_step_that_keeps_its_state(mesh_text):
    model, inputs, donating, keeping = _programs(mesh_text)
    donated_states, kept_states = donating.init_states(model), keeping.init_states(model)
    for _ in range(3):
        donated_loss, donated_states, _ = donating.simulate_train_step(donated_states, inputs)
        kept_loss, kept_states, _ = keeping.simulate_train_step(kept_states, inputs)
        assert torch.equal(donated_loss, kept_loss)
    donated, kept = donating.gather_state(donated_states), keeping.gather_state(kept_states)
    for name, value in kept.parameters.items():
        assert torch.equal(donated.parameters[name], value), name
    for name, slots in kept.optimizer.items():
        for slot, value in slots.items():
            assert torch.equal(donated.optimizer[name][slot], value), f"{name}:{slot}"


def test_the_new_state_lives_in_the_given_tensors_and_the_model_is_not_written():
    model, inputs, donating, _ = _programs("world=1")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = donating.init_state(model, 0)
    where = {n: t.data_ptr() for n, t in state.parameters.items()}
    where_state = {(n, s): t.data_ptr() for n, slots in state.optimizer.items() for s, t in slots.items()}
    _, new_state, _ = donating.train_step(state, inputs)
    assert {n: t.data_ptr() for n, t in new_state.parameters.items()} == where
    assert {(n, s): t.data_ptr() for n, slots in new_state.optimizer.items() for s, t in slots.items()} == where_state
    assert any(not torch.equal(new_state.parameters[n], before[n]) for n in before)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_a_donated_state_is_refused_when_stepped_or_gathered_again():
    model, inputs, donating, _ = _programs("world=4,tp=2,ep=2")
    states = donating.init_states(model)
    _, new_states, _ = donating.simulate_train_step(states, inputs)
    with pytest.raises(StateError, match="donated to the next step"):
        donating.simulate_train_step(states, inputs)
    with pytest.raises(StateError, match="donated"):
        donating.gather_state(states)
    donating.simulate_train_step(new_states, inputs)


def test_tensors_that_share_memory_are_refused_before_a_donating_step():
    model, inputs, donating, _ = _programs("world=2,ep=2")
    states = donating.init_states(model)
    states[1].parameters["lm_head.weight"] = states[0].parameters["lm_head.weight"]
    before = states[0].parameters["lm_head.weight"].clone()
    with pytest.raises(StateError, match="lm_head.weight shares memory with lm_head.weight of rank 0"):
        donating.simulate_train_step(states, inputs)
    assert torch.equal(states[0].parameters["lm_head.weight"], before)


def test_donation_takes_the_second_copy_of_parameters_and_state_off_the_reported_peak():
    _, _, donating, keeping = _programs("world=4,tp=2,ep=2")
    donated = donating.report(format="dict")["totals"]
    kept = keeping.report(format="dict")["totals"]
    assert donated["peak_memory_bytes_per_rank"] < kept["peak_memory_bytes_per_rank"] - donated["parameter_bytes_per_rank"]
