"""Uneven data-parallel splits are padded, not refused: a parameter whose dp/edp divides none of
its free dims holds its optimizer state (zero=1) and itself (zero=3) padded with zeros, and every
step, gradient, state and checkpoint a user sees is the unpadded model's."""

import copy
from dataclasses import replace

import pytest
import torch

import shardgraph as sg
from examples.moe_model import CONFIGS, MoETransformer, lm_loss, make_batch
from passes.pad_parameters import pad_parameters
from shardgraph import meta
from shardgraph.check import parity_errors
from shardgraph.meta import InputKind, Purpose
from shardgraph.placement import Padding, local_shape
from tests.test_training import NO_DECAY, _step_alongside, _torch_adamw, relative

# A vocabulary of 67 rows (as 151936 over dp=3: no dp of 2 or 3 divides it) on the tiny model,
# whose other sizes (32, 16, 8 experts) dp=3 does not divide either.
CONFIG = replace(CONFIGS["tiny"], vocab_size=67)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = MoETransformer(CONFIG).to(dtype)
    return model, make_batch(CONFIG, batch_size=6, seq_len=8, seed=0)


def _adamw(mesh_text, zero, dtype=torch.float64, **options):
    model, inputs = _model(dtype)
    optimizer = options.pop("optimizer", sg.optim.AdamW(lr=1e-2, weight_decay=0.1, no_decay=NO_DECAY))
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, lm_loss, optimizer=optimizer, clip_grad_norm=1.0,
                         zero=zero, **options)
    return model, inputs, program


def test_padding_appends_zeros_on_one_dim_and_drops_them_again():
    padding = Padding(0, 67, 69)
    value = torch.randn(67, 4)
    held = padding.pad(value)
    assert held.shape == (69, 4) == padding.held_shape((67, 4)) and not held[67:].any()
    assert torch.equal(padding.unpad(held), value) and padding.logical_shape((69, 4)) == (67, 4)
    assert padding.pad_argument(2) == [0, 0, 0, 2]


@pytest.mark.parametrize("mesh_text,zero", [("world=3", 1), ("world=6,tp=2,ep=2", 3), ("world=6,tp=2", 3)],
                         ids=["dp3-zero1", "tp2ep2-dp3edp3-zero3", "tp2-dp3edp6-zero3"])
def test_adamw_steps_with_padded_state_and_parameters_equal_torch_optim(mesh_text, zero):
    model, inputs, program = _adamw(mesh_text, zero)
    padded = [name for name in program.trainable_names if program.state_padding(name) is not None]
    assert "lm_head.weight" in padded and any("experts" in name for name in padded), padded
    reference = copy.deepcopy(model)
    _step_alongside(program, program.init_states(model), reference, _torch_adamw(reference, 1e-2), inputs, lm_loss,
                    2, loss_tolerance=1e-9, norm_tolerance=1e-9, state_tolerance=1e-9)


def test_sgd_momentum_steps_with_padded_parameters_equal_torch_optim():
    optimizer = sg.optim.SGD(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    model, inputs, program = _adamw("world=6,tp=2,ep=2", 3, torch.float32, optimizer=optimizer)
    assert program.parameter_padding("lm_head.weight") is not None
    reference = copy.deepcopy(model)
    torch_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    _step_alongside(program, program.init_states(model), reference, torch_optimizer, inputs, lm_loss, 3,
                    loss_tolerance=1e-5, norm_tolerance=1e-6, state_tolerance=1e-5)


@pytest.mark.parametrize("mesh_text", ["world=3", "world=6,tp=2,ep=2"])
def test_zero3_sgd_gradients_and_weights_of_padded_parameters_match_the_unsharded_model(mesh_text):
    model, inputs = _model()
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, lm_loss, zero=3)
    assert program.parameter_padding("lm_head.weight") == Padding(0, 67, 69)
    errors, result = parity_errors(program, model, inputs, lm_loss, 0.1)
    assert errors.loss < 1e-5 and errors.gradients < 1e-5 and errors.weights < 1e-5, errors
    # Gradients come back in the parameters' own shapes.
    assert all(result.gradients[n].shape == p.shape for n, p in model.named_parameters())


def test_the_padded_state_is_split_over_dp_and_edp_and_the_report_counts_the_padded_pieces():
    mesh = sg.MeshSpec.parse("world=6,tp=2,ep=2")  # dp = edp = 3
    model, _, program = _adamw("world=6,tp=2,ep=2", 1, torch.float32)
    state = program.init_state(model, 0)
    expected = 0
    for name, parameter in model.named_parameters():
        padding, sharding = program.state_padding(name), program.state_sharding(name)
        axis = "edp" if "experts" in name else "dp"
        assert padding is not None and sharding.placement(axis).is_shard(padding.dim), (name, sharding)
        held = padding.held_shape(parameter.shape)
        piece = tuple(local_shape(held, sharding, mesh))
        unsplit = tuple(local_shape(held, program.parameter_sharding(name), mesh))
        assert piece[padding.dim] * 3 == unsplit[padding.dim] == held[padding.dim] > parameter.shape[padding.dim]
        assert all(tuple(state.optimizer[name][slot].shape) == piece for slot in ("exp_avg", "exp_avg_sq"))
        expected += 2 * torch.Size(piece).numel() * 4
    totals = program.report(format="dict")["totals"]
    assert totals["optimizer_state_bytes_per_rank"] == expected
    whole = 2 * sum(torch.Size(local_shape(tuple(p.shape), program.parameter_sharding(n), mesh)).numel() * 4
                    for n, p in model.named_parameters())
    assert whole / 3 < expected < whole / 3 * 1.1, "a third of the state, and a few padded rows"
    # The padded gradients are reduce-scattered (the gradient sync) and the updated slices
    # all-gathered, the textbook bytes of the padded parameters; nothing is all-reduced over dp
    # or edp but the loss and the norm's scalars.
    sent, all_reduced = {}, []
    for node in program.graph_module.graph.nodes:
        record = meta.collective(node)
        if record is not None and record.axis in ("dp", "edp"):
            key = (record.kind.value, record.axis, record.purpose)
            sent[key] = sent.get(key, 0.0) + record.bytes
            if record.kind.value == "all_reduce":
                all_reduced.append(record.bytes)
    for axis in ("dp", "edp"):
        assert sent[("reduce_scatter", axis, Purpose.GRADIENT_SYNC)] == sent[("all_gather", axis, Purpose.REDISTRIBUTE)]
    assert max(all_reduced) <= 2 * 8, "a scalar at most (2 (n-1)/n of 8 bytes)"
    padded = {row["name"]: row for row in totals["padded"]}
    assert set(padded) == {n for n, _ in model.named_parameters()}
    assert padded["lm_head.weight"] == {"name": "lm_head.weight", "held": ["optimizer state"], "dim": 0, "size": 67,
                                        "padded": 69}
    assert "held padded for an even dp/edp split (optimizer state): 21 parameters (embed_tokens.weight dim 0 67 -> 69" in program.report(format="summary")


def test_pad_and_slice_are_graph_nodes_and_the_values_have_the_padded_shapes():
    model, inputs = _model()
    mesh = sg.MeshSpec.parse("world=3")
    traced = sg.trace(model, inputs, lm_loss, optimizer=sg.optim.AdamW(lr=1e-3))
    from passes.gather_parameters import gather_parameters

    gm = pad_parameters(gather_parameters(copy.deepcopy(traced.graph_module), 3), mesh, None, 3)
    placeholder = next(n for n, r in meta.graph_inputs(gm.graph, InputKind.PARAMETER) if r.name == "lm_head.weight")
    assert meta.value(placeholder).shape == (69, 32) and meta.padding(placeholder) == Padding(0, 67, 69)
    gathers = [u for u in placeholder.users if u.op == "call_function" and u.target.__name__ == "gather_parameter"]
    assert gathers and all(meta.value(g).shape == (69, 32) for g in gathers)
    for gather in gathers:
        (sliced,) = gather.users
        assert sliced.target is torch.ops.aten.slice.Tensor and meta.value(sliced).shape == (67, 32)
    (gradient,) = [n for n in gm.graph.nodes if meta.gradient_of(n) == "lm_head.weight"]
    assert gradient.target is torch.ops.aten.constant_pad_nd.default and meta.value(gradient).shape == (69, 32)
    assert meta.value(gradient.args[0]).shape == (67, 32)
    # The update reads and writes the held value: every state placeholder is padded too.
    states = [n for n, r in meta.graph_inputs(gm.graph, InputKind.OPTIMIZER_STATE) if r.parameter == "lm_head.weight"]
    assert states and all(meta.value(n).shape == (69, 32) for n in states)
    # Lowered: the padded gradient is reduce-scattered as the gradient synchronisation.
    program = sg.compile(model, mesh, inputs, lm_loss, optimizer=sg.optim.AdamW(lr=1e-3), zero=3)
    synced = {meta.collective(n).of for n in program.graph_module.graph.nodes
              if meta.collective(n) is not None and meta.collective(n).purpose is Purpose.GRADIENT_SYNC
              and meta.collective(n).kind.value == "reduce_scatter"}
    assert any(name.startswith("constant_pad_nd") for name in synced), synced


def test_a_padded_state_resumes_on_another_mesh_through_gather_state():
    model, inputs, padded = _adamw("world=3", 3)
    _, _, other = _adamw("world=6,tp=2,ep=2", 1)
    _, _, straight = _adamw("world=2,ep=2", 0)
    states, straight_states = padded.init_states(model), straight.init_states(model)
    for _ in range(2):
        _, states, _ = padded.simulate_train_step(states, inputs)
        _, straight_states, _ = straight.simulate_train_step(straight_states, inputs)
    full = padded.gather_state(states)
    assert all(full.parameters[n].shape == p.shape for n, p in model.named_parameters())
    resumed = other.init_states(full)
    loss, resumed, _ = other.simulate_train_step(resumed, inputs)
    expected, straight_states, _ = straight.simulate_train_step(straight_states, inputs)
    assert relative(loss, expected) < 1e-12
    after, reference = other.gather_state(resumed), straight.gather_state(straight_states)
    assert max(relative(after.optimizer[n][s], reference.optimizer[n][s]) for n in reference.optimizer
               for s in reference.optimizer[n]) < 1e-9
    assert max(relative(after.parameters[n], reference.parameters[n]) for n in reference.parameters) < 1e-12


def test_a_checkpoint_of_padded_pieces_holds_the_logical_tensors_and_loads_back_padded(tmp_path):
    from shardgraph.checkpoint import load_local, save_checkpoint

    model, inputs = _model()
    program = sg.compile(model, sg.MeshSpec.parse("world=6,tp=2"), inputs, lm_loss, zero=3)
    full = {n: p.detach() for n, p in model.named_parameters()}
    pieces = [program.local_parameters(rank, full) for rank in program.mesh.ranks]
    path = save_checkpoint(pieces, program, str(tmp_path))
    from safetensors.torch import load_file

    saved = load_file(path)
    assert all(torch.equal(saved[n], value) for n, value in full.items())
    for rank in program.mesh.ranks:
        loaded = load_local(str(tmp_path), program, rank)
        assert all(torch.equal(loaded[n], pieces[rank][n]) for n in full), rank


def test_adamw_without_eps_is_refused_where_a_state_is_padded():
    with pytest.raises(ValueError, match=r"eps=0\) would write 0/0 into the padding"):
        _adamw("world=3", 1, torch.float32, optimizer=sg.optim.AdamW(lr=1e-3, eps=0.0))
