"""Propagation places repeated layers once and reuses the decisions: the program must not change.

Each case compiles the same traced graph twice, with decision reuse and with every node placed by
its rules in every sweep, and compares the placed and the lowered graphs node for node: op,
target, argument structure, placement record (sharding, view, input shardings, reason,
alternatives) and collective record.
"""

import pytest
import torch
from torch.fx import Node

import passes.pipeline as pipeline
from examples.moe_model import shardgraph_entry
from passes.pipeline import CompileOptions, run_pipeline
from passes.propagate import propagate
from shardgraph import meta
from shardgraph.frontend import trace
from shardgraph.mesh import MeshSpec


def _argument(item):
    if isinstance(item, Node):
        return ("node", item.name)
    if isinstance(item, (tuple, list)):
        return (type(item).__name__, tuple(_argument(part) for part in item))
    if isinstance(item, dict):
        return ("dict", tuple((name, _argument(part)) for name, part in sorted(item.items())))
    return ("constant", repr(item))


def _target(target) -> str:
    if isinstance(target, str) or isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{target.__module__}.{target.__qualname__}"


def _described(gm) -> list[tuple]:
    return [(node.op, node.name, _target(node.target), _argument(node.args), _argument(node.kwargs),
             meta.placed(node), meta.collective(node)) for node in gm.graph.nodes]


def _compile(traced, mesh: MeshSpec, plan=None, *, reuse: bool, monkeypatch):
    def placing(*args, **kwargs):
        return propagate(*args, **kwargs, reuse_decisions=reuse)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "propagate", placing)
        return run_pipeline(traced.graph_module, CompileOptions(mesh, plan=plan))


def _assert_same_program(reused, fresh) -> None:
    for stage in ("placed", "lowered"):
        left = _described(reused.placed.graph_module if stage == "placed" else reused.lowered)
        right = _described(fresh.placed.graph_module if stage == "placed" else fresh.lowered)
        assert len(left) == len(right), stage
        for mine, theirs in zip(left, right):
            assert mine == theirs, f"{stage} graphs differ at node {theirs[1]}"


@pytest.mark.parametrize("config, mesh_text", [
    ("tiny", "world=8,tp=2,ep=4"),
    ("tiny", "world=8,tp=2,ep=2,etp=2"),
    ("tiny_shared", "world=4,tp=4,ep=4"),
    ("small", "world=8,tp=2,ep=2,etp=2"),
])
def test_reused_decisions_give_the_same_program(config, mesh_text, monkeypatch):
    model, inputs, loss_fn = shardgraph_entry(config, device="meta", num_layers=4)
    traced = trace(model, inputs, loss_fn)
    mesh = MeshSpec.parse(mesh_text)
    reused = _compile(traced, mesh, reuse=True, monkeypatch=monkeypatch)
    fresh = _compile(traced, mesh, reuse=False, monkeypatch=monkeypatch)
    _assert_same_program(reused, fresh)
    assert fresh.placed.decisions_reused == 0
    # Four identical layers: most ops of layers 1..3 are not placed by their rules again.
    assert reused.placed.decisions_reused > 2 * reused.placed.decisions_made
    assert reused.placed.sweeps == fresh.placed.sweeps


def _layer_mm(placed, layer: int, projection: str) -> Node:
    path = f"layers.{layer}.self_attn.{projection}"
    found = [n for n in placed.graph_module.graph.nodes
             if n.op == "call_function" and n.target == torch.ops.aten.mm.default
             and meta.phase(n) is meta.Phase.FORWARD and path in meta.module_stack(n)]
    assert len(found) == 1, (path, found)
    return found[0]


def test_a_layer_entered_differently_is_placed_by_its_rules(monkeypatch):
    # Only layer 0's attention is tensor-parallel: layer 1 has the same ops and shapes but
    # different weight placements, so its decisions must not be taken from layer 0's.
    model, inputs, loss_fn = shardgraph_entry("tiny", device="meta", num_layers=4)
    traced = trace(model, inputs, loss_fn)
    plan = {
        "layers.0.self_attn.q_proj.weight": "colwise",
        "layers.0.self_attn.k_proj.weight": "colwise",
        "layers.0.self_attn.v_proj.weight": "colwise",
        "layers.0.self_attn.o_proj.weight": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "expert_colwise",
        "layers.*.mlp.experts.down_proj": "expert_rowwise",
    }
    mesh = MeshSpec.parse("world=8,tp=2,ep=4")
    reused = _compile(traced, mesh, plan, reuse=True, monkeypatch=monkeypatch)
    fresh = _compile(traced, mesh, plan, reuse=False, monkeypatch=monkeypatch)
    _assert_same_program(reused, fresh)
    # Layer 1 is entered with what layer 0 left, layers 2 and 3 alike: only those two can share.
    first, third, fourth = (_layer_mm(reused.placed, layer, "q_proj") for layer in (0, 2, 3))
    assert meta.sharding(first).placement("tp") != meta.sharding(third).placement("tp")
    assert meta.placed(third) == meta.placed(fourth)
    assert reused.placed.decisions_reused > 0


def test_a_mesh_axis_size_is_read_without_the_tuple_checks():
    mesh = MeshSpec.parse("world=8,tp=2,ep=2,etp=2")
    assert [mesh.size(axis) for axis in ("pp", "dp", "tp", "edp", "ep", "etp")] == [1, 4, 2, 2, 2, 2]
    assert mesh.size(("ep", "etp")) == 4
    with pytest.raises(ValueError, match="unknown mesh axis"):
        mesh.size("world")
