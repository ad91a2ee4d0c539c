"""Gradient reductions run as soon as the backward has produced each gradient: the reduce-scatter
of a zero=1 step frees the full partial gradient early, and nothing else moves."""

import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from passes.pipeline import PIPELINE, CompileOptions, run_pipeline
from passes.schedule_gradient_sync import _moves
from shardgraph import meta
from shardgraph.frontend import trace
from shardgraph.training import TrainingProgram


def _programs(mesh_text="world=4,tp=2,ep=2", **options):
    model, inputs, loss_fn = shardgraph_entry("small", batch_size=8, seq_len=8)
    traced = trace(model, inputs, loss_fn, optimizer=sg.optim.AdamW(lr=1e-3), clip_grad_norm=1.0)
    mesh = sg.MeshSpec.parse(mesh_text)
    compile_options = CompileOptions(mesh, donate_state=True, **options)
    # schedule_collectives issues every collective as early as its inputs allow, which moves the
    # reductions too (and prefetches others, within its bound): both are compared without it.
    pipeline = tuple(step for step in PIPELINE if step.name != "schedule_collectives")
    without = tuple(step for step in pipeline if step.name != "schedule_gradient_sync")
    built = []
    for passes in (pipeline, without):
        compiled = run_pipeline(traced.graph_module, compile_options, passes)
        built.append(TrainingProgram(traced, compiled.placed, compiled.lowered, mesh, donates_state=True))
    return model, inputs, built


def test_each_gradient_reduction_follows_its_input_with_only_its_own_chain_between():
    _, _, (scheduled, _) = _programs(zero=1, reduce_dtype=torch.bfloat16)
    nodes = list(scheduled.graph_module.graph.nodes)
    where = {node: index for index, node in enumerate(nodes)}
    moved = [node for node in nodes if _moves(node)]
    assert any(meta.collective(node) is not None and meta.collective(node).kind.value == "reduce_scatter"
               for node in moved)
    for node in moved:
        latest = max(where[source] for source in node.all_input_nodes if source.op != "placeholder")
        between = nodes[latest + 1:where[node]]
        assert all(_moves(other) for other in between), (node.name, [other.name for other in between])


def test_a_zero1_step_peaks_lower_with_reductions_where_gradients_are_made_and_computes_the_same():
    model, inputs, (scheduled, unscheduled) = _programs(zero=1)
    peaks = [p.report(format="dict")["totals"]["peak_memory_bytes_per_rank"] for p in (scheduled, unscheduled)]
    assert peaks[0] < peaks[1], peaks
    results = []
    for program in (scheduled, unscheduled):
        states = program.init_states(model)
        for _ in range(2):
            loss, states, _ = program.simulate_train_step(states, inputs)
        results.append((loss, program.gather_state(states)))
    assert torch.equal(results[0][0], results[1][0])
    for name, value in results[1][1].parameters.items():
        assert torch.equal(results[0][1].parameters[name], value), name
