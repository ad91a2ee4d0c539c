"""Every value of the real models' joint graphs gets a placement on the folded meshes, by rule."""

import pytest
import torch

import shardgraph as sg
from examples.moe_model import lm_loss, shardgraph_entry
from passes.propagate import propagate
from shardgraph.frontend import trace

from ..test_parity import hf_models
from shardgraph import meta

MESHES = ["world=8,tp=2,ep=4", "world=4,tp=4,ep=4", "world=8,tp=2,ep=2,etp=2"]


@pytest.fixture(scope="module")
def traced_models():
    model, inputs, loss_fn = shardgraph_entry("tiny_shared", batch_size=8, seq_len=8)
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    models = {"example": trace(model, inputs, loss_fn)}
    for name, hf_model in hf_models().items():
        models[name] = trace(hf_model, (ids,), lm_loss)
    return models


@pytest.mark.parametrize("mesh_text", MESHES)
@pytest.mark.parametrize("family", ["example", "mixtral", "qwen2_moe"])
def test_every_value_is_placed_by_a_rule(traced_models, family, mesh_text):
    placed = propagate(traced_models[family].graph_module, sg.MeshSpec.parse(mesh_text))
    assert placed.fallbacks == []
    nodes = [n for n in placed.graph_module.graph.nodes if n.op != "output"]
    assert all(meta.sharding(n) is not None and meta.placed(n).reason for n in nodes)
    # Routed experts live on the expert view, split over ep.
    experts = [n for n in nodes if str(meta.display_name(n)).endswith("experts.gate_up_proj")]
    assert experts and all(meta.sharding(n).placement("ep") == sg.Shard(0) for n in experts)
    assert all(meta.view(n) is meta.View.EXPERT for n in experts)
