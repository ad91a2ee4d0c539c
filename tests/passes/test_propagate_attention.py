"""Placement of the fused attention op: heads over tp, batch over dp, only splits that divide."""

from dataclasses import replace

import pytest
import torch

import shardgraph as sg
from examples.moe_model import CONFIGS, MoETransformer, lm_loss, make_batch
from passes.propagate import propagate
from shardgraph.frontend import trace
from shardgraph.placement import local_shape
from shardgraph import meta


def traced_example(heads: int, kv_heads: int, batch: int, seq: int = 16):
    """One layer of the example model on the meta device: the embedding output reaches attention
    replicated over tp, and the colwise q/k/v projections hand it heads split over tp."""
    config = replace(CONFIGS["small"], num_layers=1, num_heads=heads, num_kv_heads=kv_heads)
    with torch.device("meta"):
        model = MoETransformer(config)
    return trace(model, make_batch(config, batch, seq, device="meta"), lm_loss).graph_module


def attention_nodes(placed):
    nodes = [n for n in placed.graph_module.graph.nodes if str(n.target).startswith("shardgraph.attention")]
    assert sorted(str(n.target) for n in nodes) == ["shardgraph.attention.default",
                                                    "shardgraph.attention_backward.default"]
    return nodes


def common_sharding(node):
    """The one sharding the node's operands and results all share (the rule offers no other)."""
    results = meta.sharding(node) if isinstance(meta.sharding(node), tuple) else (meta.sharding(node),)
    shardings = set(results) | set(meta.placed(node).input_shardings)
    assert len(shardings) == 1, (node.name, shardings)
    return shardings.pop()


@pytest.mark.parametrize("mesh_text", ["world=2,tp=2", "world=4,tp=2,ep=2", "world=8,tp=2,ep=4"])
@pytest.mark.parametrize("kv_heads", [8, 4])
def test_attention_splits_heads_over_tp_and_batch_over_dp(mesh_text, kv_heads):
    mesh = sg.MeshSpec.parse(mesh_text)
    placed = propagate(traced_example(heads=8, kv_heads=kv_heads, batch=8), mesh)
    for node in attention_nodes(placed):
        sharding = common_sharding(node)
        assert sharding.placement("tp") == sg.Shard(1), (node.name, sharding)
        assert sharding.placement("dp") == (sg.Shard(0) if mesh.dp > 1 else sg.Replicate()), (node.name, sharding)


def test_key_value_heads_that_tp_does_not_divide_split_the_batch_instead():
    placed = propagate(traced_example(heads=8, kv_heads=4, batch=8), sg.MeshSpec.parse("world=8,tp=8"))
    for node in attention_nodes(placed):
        assert common_sharding(node) == sg.Sharding.of(tp=sg.Shard(0)), node.name


def test_batch_split_over_dp_and_tp_at_once_needs_dp_times_tp_rows():
    # dp=2 takes the 4 rows down to 2, which tp=4 cannot split again, and tp does not divide the
    # 2 key/value heads: attention runs whole over tp rather than failing at lowering.
    mesh = sg.MeshSpec.parse("world=8,tp=4,ep=4")
    placed = propagate(traced_example(heads=8, kv_heads=2, batch=4), mesh)
    for node in attention_nodes(placed):
        sharding = common_sharding(node)
        assert sharding == sg.Sharding.of(dp=sg.Shard(0)), (node.name, sharding)
        for operand in node.all_input_nodes:
            local_shape(tuple(meta.value(operand).shape), sharding, mesh, name=operand.name)  # even split
