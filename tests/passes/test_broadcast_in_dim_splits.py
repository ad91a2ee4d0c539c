"""LayerNorm's decomposition broadcasts its statistics with prims.broadcast_in_dim; the tokens'
dp/tp splits pass through it (its shape argument is rewritten to local sizes), and the sharded
step matches eager."""

import torch

import shardgraph as sg
from shardgraph import meta
from shardgraph.check import parity_errors
from tests.frontend.expert_list_models import build


def test_layer_norm_statistics_keep_the_token_splits_and_match_eager_at_tp2():
    model, inputs, loss_fn = build(norm="layer")
    assert any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    program = sg.compile(model, sg.MeshSpec.parse("world=4,tp=2,ep=2"), inputs, loss_fn)
    broadcasts = [n for n in program.placed.graph_module.graph.nodes
                  if n.target is torch.ops.prims.broadcast_in_dim.default]
    assert broadcasts
    assert all(meta.sharding(n).placement("dp") == sg.Shard(0) for n in broadcasts)
    assert any(meta.sharding(n).placement("tp") == sg.Shard(0) for n in broadcasts)
    # The lowered program computes on local pieces: its shape arguments are the local sizes.
    local = [n.args[1] for n in program.graph_module.graph.nodes
             if n.target is torch.ops.prims.broadcast_in_dim.default]
    assert [4, 8, 1] in local or [2, 8, 1] in local
    errors, _ = parity_errors(program, model, inputs, loss_fn)
    assert errors.within(1e-5), errors
