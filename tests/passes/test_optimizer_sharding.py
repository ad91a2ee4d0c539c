"""zero=1: optimizer state split over the data-parallel axes, the update on the slices, and
the same steps as torch.optim on the unsharded model."""

import copy

import pytest
import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from passes.optimizer_sharding import optimizer_state_sharding
from shardgraph import meta
from shardgraph.meta import View
from shardgraph.placement import Padding, Shard, Sharding
from tests.test_parity import MESHES
from tests.test_training import NO_DECAY, _step_alongside, _torch_adamw, relative

ZERO_MESHES = ["world=2,ep=2", "world=4,tp=2,ep=2", "world=8,tp=2,ep=4", "world=8,tp=2,ep=2,etp=2", "world=4,ep=4"]


def _compile(mesh_text, zero, dtype=torch.float32):
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    model = model.to(dtype)
    optimizer = sg.optim.AdamW(lr=1e-2, weight_decay=0.1, no_decay=NO_DECAY)
    return model, inputs, sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn, optimizer=optimizer,
                                     clip_grad_norm=1.0, zero=zero)


@pytest.mark.parametrize("mesh_text", ZERO_MESHES)
def test_five_zero1_adamw_steps_equal_torch_optim(mesh_text):
    import copy

    model, inputs, program = _compile(mesh_text, 1, torch.float64)
    reference = copy.deepcopy(model)
    _step_alongside(program, program.init_states(model), reference, _torch_adamw(reference, 1e-2), inputs,
                    shardgraph_entry("tiny")[2], 5, loss_tolerance=1e-9, norm_tolerance=1e-9, state_tolerance=1e-9)


@pytest.mark.parametrize("mesh_text", ["world=4,tp=2,ep=2", "world=8,tp=2,ep=2,etp=2"])
def test_zero1_splits_the_state_over_dp_and_edp_without_moving_more_bytes(mesh_text):
    mesh = sg.MeshSpec.parse(mesh_text)
    _, _, plain = _compile(mesh_text, 0)
    _, _, split = _compile(mesh_text, 1)
    for name in split.trainable_names:
        state, parameter = split.state_sharding(name), split.parameter_sharding(name)
        axis = "edp" if "experts" in name else "dp"
        if mesh.size(axis) > 1:
            assert state.placement(axis).is_shard(), f"{name}: {state!r}"
            assert {a: p for a, p in state.items() if a != axis} == dict(parameter.items())
    plain_totals, split_totals = (p.report(format="dict")["totals"] for p in (plain, split))
    assert split_totals["optimizer_state_bytes_per_rank"] * min(mesh.dp, mesh.edp) <= \
        plain_totals["optimizer_state_bytes_per_rank"] * 1.0001
    # The gradients are reduce-scattered to the slices and the new slices all-gathered: the
    # bytes of the all-reduce they replace, plus the norm's scalars.
    assert split_totals["communication_bytes_per_rank"] <= plain_totals["communication_bytes_per_rank"] * 1.01
    kinds = {meta.collective(n).kind.value for n in split.graph_module.graph.nodes
             if meta.collective(n) is not None and meta.collective(n).purpose.name == "GRADIENT_SYNC"}
    assert "reduce_scatter" in kinds


def test_a_zero1_state_resumes_on_a_zero0_program_of_another_mesh():
    model, inputs, split = _compile("world=8,tp=2,ep=4", 1, torch.float64)
    _, _, plain = _compile("world=4,tp=2,ep=2", 0, torch.float64)
    _, _, straight = _compile("world=4,tp=2,ep=2", 0, torch.float64)
    states, straight_states = split.init_states(model), straight.init_states(model)
    for _ in range(3):
        _, states, _ = split.simulate_train_step(states, inputs)
        _, straight_states, _ = straight.simulate_train_step(straight_states, inputs)
    resumed = plain.init_states(split.gather_state(states))
    loss, resumed, _ = plain.simulate_train_step(resumed, inputs)
    expected, straight_states, _ = straight.simulate_train_step(straight_states, inputs)
    assert relative(loss, expected) < 1e-12
    full, reference = plain.gather_state(resumed), straight.gather_state(straight_states)
    assert max(relative(full.optimizer[n][s], reference.optimizer[n][s]) for n in reference.optimizer
               for s in reference.optimizer[n]) < 1e-9


def test_a_parameter_with_no_free_dim_keeps_its_state_whole_and_says_why():
    mesh = sg.MeshSpec.parse("world=4,tp=2")
    bias = Sharding.of(tp=Shard(0))
    sharding, why, padding = optimizer_state_sharding("proj.bias", (8,), bias, View.DENSE, mesh, 1)
    assert sharding == bias and padding is None and "no dim that no other axis splits" in why
    sharding, why, padding = optimizer_state_sharding("proj.weight", (8, 6), bias, View.DENSE, mesh, 1)
    assert sharding == Sharding.of(tp=Shard(0), dp=Shard(1)) and padding is None and "dim 1" in why


def test_a_free_dim_the_axis_does_not_divide_is_padded_the_first_dividing_one_is_preferred():
    mesh = sg.MeshSpec.parse("world=6,tp=2")  # dp=3
    rowwise = Sharding.of(tp=Shard(1))
    sharding, why, padding = optimizer_state_sharding("embed.weight", (151936, 64), rowwise, View.DENSE, mesh, 1)
    assert sharding == Sharding.of(tp=Shard(1), dp=Shard(0))
    assert padding == Padding(0, 151936, 151938) and "padded from 151936 to 151938" in why
    # A later free dim that divides is split as it is, with no padding.
    sharding, _, padding = optimizer_state_sharding("w", (7, 8, 9), rowwise, View.DENSE, mesh, 3)
    assert sharding == Sharding.of(tp=Shard(1), dp=Shard(2)) and padding is None


def test_an_unknown_zero_stage_or_zero_without_an_optimizer_is_refused():
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    with pytest.raises(ValueError, match="zero must be one of"):
        sg.compile(model, sg.MeshSpec.parse("world=2,ep=2"), inputs, loss_fn, optimizer=sg.optim.SGD(lr=0.1), zero=4)
    with pytest.raises(ValueError, match="stage 1 already reduce-scatters each gradient"):
        sg.compile(model, sg.MeshSpec.parse("world=2,ep=2"), inputs, loss_fn, optimizer=sg.optim.SGD(lr=0.1), zero=2)
    with pytest.raises(ValueError, match="pass an optimizer"):
        sg.compile(model, sg.MeshSpec.parse("world=2,ep=2"), inputs, loss_fn, zero=1)


@pytest.mark.parametrize("optimizer", [None, sg.optim.AdamW(lr=1e-3)], ids=["gradients", "zero1-step"])
def test_propagation_settles_before_its_sweep_cap_with_and_without_state_hints(optimizer):
    from passes.propagate import _MAX_SWEEPS

    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    options = dict(optimizer=optimizer, zero=1) if optimizer is not None else {}
    program = sg.compile(model, sg.MeshSpec.parse("world=8,tp=2,ep=4"), inputs, loss_fn, **options)
    assert program.placed.sweeps < _MAX_SWEEPS


@pytest.mark.parametrize("mesh_text", MESHES)
def test_two_zero1_sgd_momentum_steps_in_float32_equal_torch_optim_on_every_parity_mesh(mesh_text):
    # SGD keeps the gradient's scale (Adam would hide a factor of tp or dp): the loss, the norm
    # and the weights after two steps with a momentum buffer split over dp / edp.
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    reference = copy.deepcopy(model)
    optimizer = sg.optim.SGD(lr=0.1, momentum=0.9)
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn, optimizer=optimizer,
                         clip_grad_norm=1.0, zero=1)
    torch_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    _step_alongside(program, program.init_states(model), reference, torch_optimizer, inputs, loss_fn, 2,
                    loss_tolerance=1e-5, norm_tolerance=1e-5, state_tolerance=1e-5)


@pytest.mark.parametrize("zero", [1, 3])
@pytest.mark.parametrize("mesh_text", ["world=2", "world=4,ep=2", "world=4,tp=2"])
def test_experts_the_plan_leaves_replicated_split_their_state_over_edp(mesh_text, zero):
    # The MoE op reads a routed expert's weight in the expert view even where the plan replicates
    # it, so its gradient arrives over edp; a split of its state over dp (the dense view's axis)
    # once made the update mix the two views and compile refused a plan it can run.
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    model = model.to(torch.float64)
    mesh = sg.MeshSpec.parse(mesh_text)
    optimizer = sg.optim.AdamW(lr=1e-2, weight_decay=0.1, no_decay=NO_DECAY)
    program = sg.compile(model, mesh, inputs, loss_fn, plan={}, optimizer=optimizer, clip_grad_norm=1.0, zero=zero)
    experts = [name for name in program.trainable_names if ".experts." in name]
    assert experts
    for name in experts:
        state = program.state_sharding(name)
        assert "dp" not in state.axes, f"{name}: {state!r}"
        if mesh.edp > 1:
            assert state.placement("edp").is_shard(), f"{name}: {state!r}"
    reference = copy.deepcopy(model)
    _step_alongside(program, program.init_states(model), reference, _torch_adamw(reference, 1e-2), inputs, loss_fn,
                    3, loss_tolerance=1e-9, norm_tolerance=1e-9, state_tolerance=1e-9)
