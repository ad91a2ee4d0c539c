"""zero=3 (FSDP): parameters held split over dp/edp, gathered before their forward and backward
readers, gradients reduce-scattered to the held slices, and the same numbers as the unsharded
model."""

import copy

import pytest
import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from passes.gather_parameters import is_parameter_gather
from passes.pipeline import CompileOptions, run_pipeline
from shardgraph import meta
from shardgraph.meta import Purpose
from shardgraph.check import parity_errors
from tests.test_parity import LEARNING_RATE, MESHES, TOLERANCE
from tests.test_training import NO_DECAY, _step_alongside, _torch_adamw


@pytest.mark.parametrize("mesh_text", MESHES)
def test_zero3_loss_gradients_and_sgd_weights_match_the_unsharded_model_on_every_parity_mesh(mesh_text):
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn, zero=3)
    errors, _ = parity_errors(program, model, inputs, loss_fn, LEARNING_RATE)
    assert errors.loss < TOLERANCE and errors.gradients < TOLERANCE and errors.weights < TOLERANCE, errors


def _adamw_program(mesh_text, dtype=torch.float64, **options):
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    model = model.to(dtype)
    optimizer = sg.optim.AdamW(lr=1e-2, weight_decay=0.1, no_decay=NO_DECAY)
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn, optimizer=optimizer,
                         clip_grad_norm=1.0, zero=3, **options)
    return model, inputs, loss_fn, program


@pytest.mark.parametrize("mesh_text,options", [
    ("world=4,tp=2,ep=2", {}),
    ("world=8,tp=2,ep=4", {}),
    ("world=8,tp=2,ep=2,etp=2", {}),
    ("world=4,ep=4", {"reshard_after_forward": False}),
    ("world=8,tp=2,ep=4", {"recompute": "full"}),
    ("world=4,tp=2,ep=2", {"recompute": "selective"}),
], ids=["tp2ep2", "tp2ep4", "tp2ep2etp2", "ep4-keep-gathered", "tp2ep4-recompute-full", "tp2ep2-selective"])
def test_three_zero3_adamw_steps_equal_torch_optim(mesh_text, options):
    model, inputs, loss_fn, program = _adamw_program(mesh_text, **options)
    reference = copy.deepcopy(model)
    _step_alongside(program, program.init_states(model), reference, _torch_adamw(reference, 1e-2), inputs, loss_fn,
                    3, loss_tolerance=1e-9, norm_tolerance=1e-9, state_tolerance=1e-9)


def test_zero3_holds_each_parameter_and_its_state_split_over_dp_or_edp_on_top_of_its_plan():
    mesh = sg.MeshSpec.parse("world=8,tp=2,ep=4")  # dp=4, edp=2
    _, _, _, program = _adamw_program("world=8,tp=2,ep=4", torch.float32)
    split = 0
    for name in program.trainable_names:
        held, placement = program.parameter_sharding(name), program.placed.parameters[name]
        assert program.state_sharding(name) == held
        axis = "edp" if placement.view.name == "EXPERT" else "dp"
        if held.placement(axis).is_shard():
            split += 1
            assert {a: p for a, p in held.items() if a != axis} == dict(placement.gathered.items()), name
    assert split >= len(program.trainable_names) - 2, "only a parameter with no dividing free dim stays whole"
    assert mesh.dp == 4 and mesh.edp == 2


def _gather_bytes(program):
    by_phase = {}
    for node in program.graph_module.graph.nodes:
        record = meta.collective(node)
        if record is not None and record.purpose is Purpose.PARAMETER_GATHER:
            phase = record.detail.split(" ")[0]
            by_phase[phase] = by_phase.get(phase, 0.0) + record.bytes
    return by_phase


def test_zero3_moves_the_textbook_volumes_one_gather_per_pass_and_the_reduce_scatter_of_zero1():
    mesh = sg.MeshSpec.parse("world=8,tp=2,ep=4")
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    programs = {}
    for label, options in (("zero1", dict(zero=1)), ("zero3", dict(zero=3)),
                           ("zero3-keep", dict(zero=3, reshard_after_forward=False))):
        programs[label] = sg.compile(model, mesh, inputs, loss_fn, optimizer=sg.optim.AdamW(lr=1e-3), **options)
    # Every parameter is read by the forward: its gather sends the held slice to the other
    # members of its data-parallel group, (n - 1) / n of its gathered bytes.
    expected_forward = 0.0
    for name, parameter in model.named_parameters():
        placement = programs["zero3"].placed.parameters[name]
        axis = "edp" if placement.view.name == "EXPERT" else "dp"
        if programs["zero3"].parameter_sharding(name).placement(axis).is_shard():
            gathered = meta.local_bytes(parameter, placement.gathered, mesh)
            expected_forward += gathered * (mesh.size(axis) - 1) / mesh.size(axis)
    reshard, keep = _gather_bytes(programs["zero3"]), _gather_bytes(programs["zero3-keep"])
    assert reshard["forward"] == pytest.approx(expected_forward)
    assert keep == {"forward": pytest.approx(expected_forward)}
    # Gathered again for the backward: every weight the backward reads (all but the embedding,
    # whose gradient is a scatter of the output gradient).
    assert 0.8 * expected_forward < reshard["backward"] <= expected_forward
    totals = {label: p.report(format="dict")["totals"] for label, p in programs.items()}
    sync = {label: t["communication_bytes_per_rank_by_family"]["gradient sync"] for label, t in totals.items()}
    assert sync["zero3"] == pytest.approx(sync["zero1"]), "the same reduce-scatter of every gradient"
    assert totals["zero3"]["parameter_bytes_per_rank"] < totals["zero1"]["parameter_bytes_per_rank"] / 2


def test_resharding_after_the_forward_lowers_the_planned_activation_peak():
    # Few tokens, so the gathered weights kept from the forward are what the peak is made of.
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=4, seq_len=2, num_layers=4)
    mesh = sg.MeshSpec.parse("world=4,ep=4")
    peaks = {}
    for reshard in (True, False):
        program = sg.compile(model, mesh, inputs, loss_fn, optimizer=sg.optim.AdamW(lr=1e-3), zero=3,
                             reshard_after_forward=reshard)
        peaks[reshard] = program.report(format="dict")["totals"]["peak_activation_bytes_per_rank"]
    assert peaks[True] < 0.75 * peaks[False], peaks


def test_bf16_compute_gathers_the_bf16_cast_not_the_fp32_master_weight():
    mesh = sg.MeshSpec.parse("world=4,tp=2,ep=2")
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    gathered = {}
    for dtype in (None, torch.bfloat16):
        program = sg.compile(model, mesh, inputs, loss_fn, optimizer=sg.optim.AdamW(lr=1e-3), zero=3,
                             compute_dtype=dtype)
        gathered[dtype] = sum(_gather_bytes(program).values())
    assert gathered[torch.bfloat16] == pytest.approx(gathered[None] / 2)


def test_the_gather_nodes_are_gone_after_lowering_and_each_backward_gather_follows_its_forward():
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    traced = sg.trace(model, inputs, loss_fn, optimizer=sg.optim.SGD(lr=0.1))
    compiled = run_pipeline(traced.graph_module, CompileOptions(sg.MeshSpec.parse("world=4,tp=2,ep=2"), zero=3))
    assert not any(is_parameter_gather(node) for node in compiled.lowered.graph.nodes)
    placed_gathers = [n for n in compiled.placed.graph_module.graph.nodes if is_parameter_gather(n)]
    order = {node: i for i, node in enumerate(compiled.placed.graph_module.graph.nodes)}
    by_source: dict = {}
    for node in placed_gathers:
        by_source.setdefault(node.args[0].name.split("_copy")[0], []).append(node)
    for gathers in by_source.values():
        phases = [meta.phase(node).value for node in sorted(gathers, key=order.__getitem__)]
        assert phases in (["forward"], ["forward", "backward"], ["backward"]), phases


def test_zero1_without_an_optimizer_is_refused_and_zero3_without_one_compiles_the_gradient_program():
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    mesh = sg.MeshSpec.parse("world=2,ep=2")
    with pytest.raises(ValueError, match="zero=1 shards optimizer state"):
        sg.compile(model, mesh, inputs, loss_fn, zero=1)
    program = sg.compile(model, mesh, inputs, loss_fn, zero=3)
    assert program.parameter_sharding("layers.0.self_attn.q_proj.weight").placement("dp").is_shard()
    with pytest.raises(ValueError, match="reshard_after_forward must be True or False"):
        sg.compile(model, mesh, inputs, loss_fn, zero=3, reshard_after_forward="yes")


@pytest.mark.parametrize("zero", [0, 3])
def test_no_compute_dtype_copy_of_a_weight_lives_from_its_forward_to_its_backward(zero):
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    traced = sg.trace(model, inputs, loss_fn, optimizer=sg.optim.AdamW(lr=1e-3), compute_dtype=torch.bfloat16)
    options = CompileOptions(sg.MeshSpec.parse("world=4,tp=2,ep=2"), zero=zero, donate_state=True)
    compiled = run_pipeline(traced.graph_module, options)
    casts = [node for node in compiled.placed.graph_module.graph.nodes
             if node.op == "call_function" and node.target is torch.ops.aten._to_copy.default
             and node.args[0].op == "placeholder" and meta.value(node).dtype == torch.bfloat16]
    assert casts
    for cast in casts:
        readers = {meta.phase(user) for user in cast.users if user.op == "call_function"}
        assert len(readers) <= 1, f"{cast.name} is read by {readers}"


def test_a_zero3_gradient_program_gathers_each_parameter_again_for_its_backward():
    # Without an optimizer no node is marked a gradient: the gradient outputs say what the
    # backward is, so its readers get their own gather instead of reading the held slice.
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    program = sg.compile(model, sg.MeshSpec.parse("world=4,tp=2,ep=2"), inputs, loss_fn, zero=3)
    gathered = _gather_bytes(program)
    assert 0.8 * gathered["forward"] < gathered["backward"] <= gathered["forward"], gathered
