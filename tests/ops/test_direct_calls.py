"""shardgraph.ops.as_direct_calls: a program run with its ops called as their Python bodies gives
the dispatched program's results bit for bit, every registered body takes its op's arguments by
the schema's names, and ``use_direct_calls(False)`` runs the program as lowered."""

from dataclasses import replace

import torch

import kernels.moe_rows  # noqa: F401 - registers the row ops' bodies
import kernels.linear_cross_entropy  # noqa: F401 - registers the loss ops' bodies
import shardgraph as sg
from examples.moe_model import CONFIGS, MoETransformer, make_batch, lm_loss
from shardgraph.ops.direct_calls import as_direct_calls, check_signature, direct_bodies, use_direct_calls


def test_every_body_takes_its_ops_arguments_by_the_schemas_names():
    bodies = direct_bodies()
    # The norm, rotary, attention, MoE, grouped-product, row and loss ops at least.
    for name in ("rms_norm", "rotary_backward", "attention", "grouped_mm_wgrad_sgd_", "swiglu", "linear_cross_entropy"):
        assert getattr(torch.ops.shardgraph, name).default in bodies
    for op, body in bodies.items():
        check_signature(op, body)


def _program(mesh_text):
    config = replace(CONFIGS["tiny"], rotary=True, num_layers=2)
    torch.manual_seed(0)
    model = MoETransformer(config)
    inputs = make_batch(config, 8, 8, 0, "cpu")
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, lm_loss, optimizer=sg.optim.SGD(lr=0.1))
    return model, inputs, program


def test_the_direct_program_calls_no_op_and_steps_as_the_dispatched_one_bit_for_bit():
    model, inputs, program = _program("world=2,tp=2")
    direct = as_direct_calls(program.graph_module)
    ops = {n.target for n in program.graph_module.graph.nodes if isinstance(n.target, torch._ops.OpOverload)
           and n.target.namespace == "shardgraph"}
    assert {torch.ops.shardgraph.rms_norm.default, torch.ops.shardgraph.rotary.default} <= ops
    assert not [n for n in direct.graph.nodes if n.target in ops]
    results = {}
    for enabled in (True, False):
        with use_direct_calls(enabled):
            states = program.init_states(model)
            losses = []
            for _ in range(2):
                loss, states, _ = program.simulate_train_step(states, inputs)
                losses.append(loss)
            results[enabled] = losses, states
            assert (program._plain_graph() is program.graph_module) is not enabled
    (direct_losses, direct_states), (losses, states) = results[True], results[False]
    assert all(torch.equal(a, b) for a, b in zip(direct_losses, losses))
    for mine, theirs in zip(direct_states, states):
        for name, value in theirs.parameters.items():
            assert torch.equal(mine.parameters[name], value), name


def test_a_graph_without_ops_is_returned_as_it_is():
    graph = torch.fx.symbolic_trace(torch.nn.Linear(3, 2))
    assert as_direct_calls(graph) is graph
