"""shardgraph.fx_graph: the graph copy passes rewrite is fx's deepcopy, node for node."""

import copy

import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from shardgraph.fx_graph import copy_graph, copy_graph_module
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
