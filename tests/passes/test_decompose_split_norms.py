"""A norm whose weight the plan splits runs as aten ops (its mean of squares summed over the ranks);
every other norm keeps the op, and the sharded step matches eager either way."""

import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from passes.decompose_split_norms import split_norms
from shardgraph.check import parity_errors

MESH = "world=4,tp=2,ep=2"
SPLIT = "layers.1.post_attention_layernorm.weight"


def _norm_weights(graph_module) -> list[str]:
    names = {node.name: node for node in graph_module.graph.nodes if node.op == "placeholder"}
    found = []
    for node in graph_module.graph.nodes:
        if node.target is torch.ops.shardgraph.rms_norm.default:
            weight = node.args[1]
            found.append(next(name for name, placeholder in names.items() if placeholder is weight))
    return found


def test_a_hand_plan_splitting_one_norm_weight_decomposes_that_norm_only_and_matches_eager():
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=4, seq_len=4)
    traced = sg.trace(model, inputs, loss_fn)
    mesh = sg.MeshSpec.parse(MESH)
    plan = {"*self_attn.[qkv]_proj.weight": "colwise", "*self_attn.o_proj.weight": "rowwise", SPLIT: "colwise"}
    assert len(split_norms(traced.graph_module, mesh, plan)) == 1
    assert split_norms(traced.graph_module, mesh) == []  # the default plan splits no norm weight here

    program = sg.compile(model, mesh, inputs, loss_fn, plan=plan)
    assert program.parameter_sharding(SPLIT).placement("tp") == sg.Shard(0)
    before = _norm_weights(traced.graph_module)
    after = _norm_weights(program.placed.graph_module)
    assert len(after) == len(before) - 1
    backward = [n for n in program.placed.graph_module.graph.nodes
                if n.target is torch.ops.shardgraph.rms_norm_backward.default]
    assert len(backward) == len(after)
    errors, _ = parity_errors(program, model, inputs, loss_fn)
    assert errors.within(1e-5), errors
