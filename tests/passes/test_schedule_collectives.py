"""schedule_collectives: ops issued early, waits late, independent compute in between, a prefetch bound."""

import pytest
import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from passes.pipeline import PIPELINE, CompileOptions, run_pipeline
from passes.schedule_collectives import collectives_in_flight, schedule_collectives
from shardgraph import meta
from shardgraph.fx_graph import copy_graph_module
from shardgraph.runtime import c10d

MESH = "world=4,tp=2,ep=2"


@pytest.fixture(scope="module")
def case():
    """The lowered program before schedule_collectives: each wait right after its op."""
    model, inputs, loss_fn = shardgraph_entry("tiny_shared", batch_size=8, seq_len=8)
    program = sg.compile(model, sg.MeshSpec.parse(MESH), inputs, loss_fn)
    passes = tuple(p for p in PIPELINE if p.name not in ("schedule_collectives", "donate_state"))
    compiled = run_pipeline(program.traced.graph_module, CompileOptions(mesh=sg.MeshSpec.parse(MESH)), passes)
    return model, inputs, loss_fn, compiled.lowered


@pytest.fixture(scope="module")
def unscheduled(case):
    return case[3]


def _compute(node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target.namespace == "aten" and meta.collective_or_part(node) is None)


def _descendants(node) -> set:
    seen, stack = set(), [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def _hoisted(before, after) -> list[str]:
    """Ops that ``after`` issues ahead of a node they followed in ``before`` (a node of the
    program's own, not a wait or layout step of another collective, which move late)."""
    old = {n.name: i for i, n in enumerate(before.graph.nodes)}
    own = {n.name for n in before.graph.nodes if meta.collective_or_part(n) is None}
    new_order = [n.name for n in after.graph.nodes]
    new = {name: i for i, name in enumerate(new_order)}
    moved = []
    for node in after.graph.nodes:
        if c10d.is_issue(node):
            passed = [name for name in new_order[new[node.name] + 1:]
                      if name in own and old[name] < old[node.name]]
            if passed:
                moved.append(node.name)
    return moved


def test_lowering_alone_waits_right_after_every_op(unscheduled):
    assert all(not between for _, between in collectives_in_flight(unscheduled))


def test_waits_come_after_independent_compute_and_only_independent_compute(unscheduled):
    scheduled = schedule_collectives(copy_graph_module(unscheduled))
    overlapped = 0
    for issue, between in collectives_in_flight(scheduled):
        depends = _descendants(issue)
        # Nothing between an op and its wait reads the op's result: the wait precedes every reader.
        assert not [n.name for n in between if n in depends], issue.name
        if any(_compute(n) for n in between):
            overlapped += 1
    # Most of this program's collectives sit between an op and the product that reads it (the
    # MoE all-to-alls, the tp gathers feeding the next matmul) with no independent compute to
    # hide behind; 7 of its 36 overlap some (gradient all-gathers, the next layer's gathers).
    assert overlapped >= len(collectives_in_flight(scheduled)) // 6, overlapped


def test_a_prefetch_bound_of_zero_issues_nothing_early(unscheduled):
    assert _hoisted(unscheduled, schedule_collectives(copy_graph_module(unscheduled), prefetch_bytes=0)) == []
    assert _hoisted(unscheduled, schedule_collectives(copy_graph_module(unscheduled)))


def test_the_scheduled_program_matches_the_unsharded_model_in_the_simulator(case):
    model, inputs, loss_fn, _ = case
    program = sg.compile(model, sg.MeshSpec.parse(MESH), inputs, loss_fn)
    assert any(between for _, between in collectives_in_flight(program.graph_module))
    parameters = {n: p.detach() for n, p in model.named_parameters()}
    result = program.run_simulated(parameters, inputs)
    reference = loss_fn(model(*inputs), *inputs)
    gradients = torch.autograd.grad(reference, list(model.parameters()))
    assert abs(result.loss.item() - reference.item()) <= 1e-5 * abs(reference.item())
    for (name, _), expected in zip(model.named_parameters(), gradients):
        assert ((result.gradients[name] - expected).norm() / expected.norm()).item() < 1e-5, name


def test_parameter_gathers_are_prefetched_one_ahead_even_with_an_unbounded_prefetch():
    # zero=3: each gather reads only its held parameter and could be issued at the very start,
    # which would keep every gathered weight alive from there; it goes after the previous
    # gather's wait instead.
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8, num_layers=4)
    mesh = sg.MeshSpec.parse("world=2,ep=2")
    traced = sg.trace(model, inputs, loss_fn)
    compiled = run_pipeline(traced.graph_module, CompileOptions(mesh=mesh, zero=3, prefetch_bytes=2**62))
    nodes = list(compiled.lowered.graph.nodes)
    where = {node: i for i, node in enumerate(nodes)}
    gathers = [node for node in nodes if c10d.is_issue(node)
               and meta.collective(node).purpose.name == "PARAMETER_GATHER"]
    assert len(gathers) > 20
    for previous, issue in zip(gathers, gathers[1:]):
        assert where[issue] > where[next(iter(previous.users))], (previous.name, issue.name)
    program = sg.compile(model, mesh, inputs, loss_fn, zero=3)
    # The simulator's ranks call the program from threads: its code is written once here first,
    # as ShardedProgram does for its own graph.
    compiled.lowered.real_recompile()
    program.graph_module = compiled.lowered
    from shardgraph.check import parity_errors

    errors, _ = parity_errors(program, model, inputs, loss_fn, 0.1)
    assert errors.loss < 1e-5 and errors.gradients < 1e-5, errors


def test_the_schedule_does_not_raise_the_planned_peak_of_a_zero1_step():
    # The new parameters the update gathers are program outputs: issued early or waited for at
    # the end, every one would be held to the end of the step together.
    from shardgraph.training import TrainingProgram

    model, inputs, loss_fn = shardgraph_entry("small", batch_size=8, seq_len=32)
    traced = sg.trace(model, inputs, loss_fn, optimizer=sg.optim.AdamW(lr=1e-3), clip_grad_norm=1.0)
    mesh = sg.MeshSpec.parse("world=8,tp=2,ep=4")
    options = CompileOptions(mesh, donate_state=True, zero=1)
    peaks = []
    for passes in (PIPELINE, tuple(p for p in PIPELINE if p.name != "schedule_collectives")):
        compiled = run_pipeline(traced.graph_module, options, passes)
        program = TrainingProgram(traced, compiled.placed, compiled.lowered, mesh, donates_state=True)
        peaks.append(program.report(format="dict")["totals"]["peak_memory_bytes_per_rank"])
    assert peaks[0] <= peaks[1], peaks
