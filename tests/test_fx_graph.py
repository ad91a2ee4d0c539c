"""shardgraph.fx_graph: the graph copy passes rewrite is fx's deepcopy, node for node; an op is
inlined as the aten ops of its form with values, source lines and gradient marks kept."""

import copy

import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from shardgraph import meta
from shardgraph.fx_graph import copy_graph, copy_graph_module, inline_aten_form
from tests.passes.test_layer_reuse import _argument, _target


def _described(graph):
    return [(n.op, n.name, _target(n.target), _argument(n.args), _argument(n.kwargs), n.type,
             sorted(n.meta), [id(value) for value in n.meta.values()], sorted(user.name for user in n.users))
            for n in graph.nodes]


def _graph():
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=4, seq_len=4)
    return sg.trace(model, inputs, loss_fn).graph_module


def test_copy_graph_is_fx_deepcopy_node_for_node():
    gm = _graph()
    fast, fx = copy_graph(gm.graph), copy.deepcopy(gm.graph)
    assert _described(fast) == _described(fx) == _described(gm.graph)
    fast.lint()
    assert fast.python_code("self").src == fx.python_code("self").src
    # Records are copied shallowly (as fx's node_copy does): a new dict per node, the same values.
    for mine, theirs in zip(fast.nodes, gm.graph.nodes):
        assert mine.meta is not theirs.meta and mine.graph is fast


def test_a_copied_module_is_rewritten_without_touching_the_original():
    gm = _graph()
    before = _described(gm.graph)
    copied = copy_graph_module(gm)
    products = [n for n in copied.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.mm.default]
    assert products
    for node in products:
        node.meta["rewritten"] = True
        with copied.graph.inserting_after(node):
            negated = copied.graph.call_function(torch.ops.aten.neg.default, (node,))
        node.replace_all_uses_with(negated, delete_user_cb=lambda user: user is not negated)
    assert _described(gm.graph) == before
    assert len(copied.graph.nodes) == len(gm.graph.nodes) + len(products)
    copied.graph.lint()


def test_an_inlined_op_computes_the_same_and_keeps_values_source_lines_and_gradient_marks():
    from shardgraph.ops.norm import ATEN_FORMS as forms

    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=4, seq_len=4)
    traced = sg.trace(model, inputs, loss_fn)
    gm = copy_graph_module(traced.graph_module)
    norms = [n for n in gm.graph.nodes if n.target in forms]
    # Passes mark the node that is a parameter's gradient (here: a norm weight's, as getitem 1).
    weight_gradients = [user for n in norms if n.target is torch.ops.shardgraph.rms_norm_backward.default
                        for user in n.users if user.args[1] == 1]
    marks = {f"weight {i}" for i in range(len(weight_gradients))}
    for i, node in enumerate(weight_gradients):
        meta.set_gradient_of(node, f"weight {i}")
    assert norms and marks
    lines = {meta.source_line(n) for n in norms}
    before = {n.name for n in gm.graph.nodes}
    for node in norms:
        inline_aten_form(gm.graph, node, forms[node.target])
    gm.graph.lint()
    gm.recompile()
    assert not any(n.target in forms for n in gm.graph.nodes)
    added = [n for n in gm.graph.nodes if n.name not in before]
    assert added and all(meta.has_value(n) for n in added)
    assert {meta.source_line(n) for n in added} == lines
    assert marks <= {meta.gradient_of(n) for n in gm.graph.nodes}

    arguments = traced.arguments(model, *inputs)
    for expected, got in zip(traced.graph_module(*arguments), gm(*arguments)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
