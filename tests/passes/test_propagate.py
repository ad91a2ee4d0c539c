"""Propagation: hand-derived placements on small joint graphs, reasons, and refusals."""

import pytest
import torch

from passes.decompose_loss import decompose_loss
from passes.plan import PlanError, resolve_plan
from passes.propagate import PropagationError, propagate
from shardgraph.mesh import MeshSpec
from shardgraph.placement import InterleavedShard, Partial, Replicate, Shard, Sharding, shard

from .graphs import attention_case, attention_loss, joint_graph, lm_loss
from shardgraph import meta

MEGATRON = {
    "q_proj.weight": "colwise",
    "k_proj.weight": "colwise",
    "v_proj.weight": "colwise",
    "o_proj.weight": "rowwise",
}


def nodes_by_target(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def test_megatron_attention_shards_heads_and_leaves_rowwise_output_partial():
    params, inputs = attention_case()
    gm = joint_graph(attention_loss, params, inputs)
    placed = propagate(gm, MeshSpec(2, tp=2), MEGATRON)
    graph = placed.graph_module.graph
    q_weight = next(n for n in graph.nodes if meta.display_name(n) == "q_proj.weight")
    assert meta.sharding(q_weight) == Sharding.of(tp=Shard(0))
    assert "matched plan pattern 'q_proj.weight' -> colwise" in meta.placed(q_weight).reason
    # The first three forward matmuls (q, k, v projections) produce head-sharded columns.
    mms = [n for n in graph.nodes if n.op == "call_function" and "mm" in str(n.target)]
    projections = [n for n in mms if meta.sharding(n) == Sharding.of(tp=Shard(2)) or meta.sharding(n) == Sharding.of(tp=Shard(1))]
    assert len(projections) >= 3
    # Heads: after view + transpose the value is sharded on the head dim.
    transposes = [n for n in nodes_by_target(placed.graph_module, torch.ops.aten.transpose.int)
                  if len(meta.value(n).shape) == 4 and meta.value(n).shape[1] == 4]
    assert any(meta.sharding(n) == Sharding.of(tp=Shard(1)) for n in transposes)
    # The o_proj product contracts the sharded head dim: partial sum over tp.
    o_products = [n for n in mms if any(meta.display_name(i) == "o_proj.weight" or
                                        (i.op == "call_function" and any(meta.display_name(a) == "o_proj.weight"
                                                                         for a in i.all_input_nodes))
                                        for i in n.all_input_nodes)]
    assert any(meta.sharding(n).placement("tp") == Partial("sum") for n in o_products)


def test_gradients_of_replicated_parameters_stay_partial_until_the_output_reduces_them():
    params, inputs = attention_case(batch=4)
    gm = joint_graph(attention_loss, params, inputs)
    placed = propagate(gm, MeshSpec(4, tp=2), MEGATRON)
    output = next(n for n in placed.graph_module.graph.nodes if n.op == "output")
    gradients = output.args[0][1:]
    for name, gradient, required in zip(params, gradients, meta.placed(output).input_shardings[1:]):
        # Each dp rank saw only its batch rows: the weight gradient is a partial sum over dp.
        assert meta.sharding(gradient).placement("dp") == Partial("sum"), name
        assert required == placed.parameters[name].sharding
        assert required.placement("dp") == Replicate()


def test_loss_mean_becomes_sum_over_count_and_is_exact_partials():
    generator = torch.Generator().manual_seed(1)
    params = {"embed.weight": torch.randn(11, 8, generator=generator), "head.weight": torch.randn(11, 8, generator=generator)}
    inputs = {"ids": torch.randint(0, 11, (4, 5), generator=generator)}
    gm = decompose_loss(joint_graph(lm_loss, params, inputs))
    forward = nodes_by_target(gm, torch.ops.aten.nll_loss_forward.default)
    assert forward and forward[0].args[3] == 2  # reduction=sum
    placed = propagate(gm, MeshSpec(2), {})
    loss_node = next(n for n in placed.graph_module.graph.nodes if n.op == "output").args[0][0]
    assert loss_node.target == torch.ops.aten.div.Tensor
    # The count enters the division replicated (all-reduced); the summed loss stays partial.
    assert meta.placed(loss_node).input_shardings[1] == Sharding.replicate()
    assert meta.sharding(loss_node) == Sharding.of(dp=Partial("sum"))


def test_reshape_merging_a_sharded_dim_is_proved_or_refused():
    def loss_of(params, batch):
        y = batch["x"] @ params["w"].t()  # [B, S, 12] sharded on 12 over tp
        return y.reshape(y.shape[0], -1).sum()  # merges S and the sharded dim

    generator = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(12, 4, generator=generator)}
    inputs = {"x": torch.randn(2, 3, 4, generator=generator)}
    gm = joint_graph(loss_of, params, inputs)
    placed = propagate(gm, MeshSpec(2, tp=2), {"w": "colwise"})
    views = [n for n in placed.graph_module.graph.nodes if n.op == "call_function" and "view" in str(n.target)
             and tuple(meta.value(n).shape) == (2, 36)]
    # [B, 3, 12] with 12 split over tp merges into 36 = 3 stripes of 12: interleaved, exact.
    assert views and meta.sharding(views[0]) == Sharding.of(tp=InterleavedShard(1, 3))

    def loss_of_split(params, batch):
        y = batch["x"] @ params["w"].t()  # [B, S, 6], 6 split over tp=4 is refused by the plan
        return y.sum()

    with pytest.raises(PlanError, match="dim 0 of size 6 is not divisible by tp=4"):
        propagate(joint_graph(loss_of_split, {"w": torch.randn(6, 4)}, inputs), MeshSpec(4, tp=4), {"w": "colwise"})


def test_view_refuses_a_split_that_would_not_be_a_block_and_says_why():
    def loss_of(params, batch):
        y = batch["x"] @ params["w"].t()  # [8, 6] sharded on 6 over tp=2 -> 3 each
        return y.reshape(8, 2, 3).sum(dim=1).pow(2).sum()  # splits 6 into (2, 3): rank 0 would hold rows of both

    generator = torch.Generator().manual_seed(3)
    gm = joint_graph(loss_of, {"w": torch.randn(6, 4, generator=generator)}, {"x": torch.randn(8, 4, generator=generator)})
    placed = propagate(gm, MeshSpec(2, tp=2), {"w": "colwise"}, batch_sharding=Sharding.replicate())
    view = next(n for n in placed.graph_module.graph.nodes if n.op == "call_function" and "view" in str(n.target)
                and tuple(meta.value(n).shape) == (8, 2, 3))
    assert meta.sharding(view).placement("tp") in (Shard(1), Replicate())


def test_ops_without_rules_are_listed_with_their_source_lines():
    def loss_of(params, batch):
        return torch.roll(batch["x"] @ params["w"], 1, dims=1).pow(2).sum()

    gm = joint_graph(loss_of, {"w": torch.randn(4, 4)}, {"x": torch.randn(2, 4)})
    with pytest.raises(PropagationError) as info:
        propagate(gm, MeshSpec(2), {})
    assert "roll" in str(info.value) and "replicate_fallback" in str(info.value)
    placed = propagate(gm, MeshSpec(2), {}, replicate_fallback=True)
    assert placed.fallbacks


def test_plan_errors_name_the_pattern_or_the_parameter():
    shapes = {"layers.0.q_proj.weight": (8, 8), "layers.0.o_proj.weight": (8, 8)}
    mesh = MeshSpec(2, tp=2)
    with pytest.raises(PlanError, match="match no parameter: 'layers.*.v_proj.weight'"):
        resolve_plan(shapes, {"layers.*.v_proj.weight": "colwise"}, mesh)
    with pytest.raises(PlanError, match="'layers.0.q_proj.weight' is matched by patterns with different styles"):
        resolve_plan(shapes, {"layers.*.q_proj.weight": "colwise", "layers.0.q_*": "rowwise"}, mesh)
    with pytest.raises(PlanError, match="unknown style 'columnwise'"):
        resolve_plan(shapes, {"layers.*.q_proj.weight": "columnwise"}, mesh)


@pytest.mark.parametrize("etp", [2, 4])
def test_fused_gate_up_plan_keeps_gate_and_up_halves_aligned_on_every_etp_rank(etp):
    experts, intermediate, hidden = 4, 8, 3
    mesh = MeshSpec(2 * etp, ep=2, etp=etp)
    placement = resolve_plan({"layers.0.mlp.experts.gate_up_proj": (experts, 2 * intermediate, hidden)},
                             {"*experts.gate_up_proj": "expert_colwise"}, mesh)["layers.0.mlp.experts.gate_up_proj"]
    assert placement.sharding == Sharding.of(ep=Shard(0), etp=InterleavedShard(1, 2))
    weight = torch.randn(experts, 2 * intermediate, hidden)
    part = intermediate // etp
    for rank in mesh.ranks:
        _, ep_index, etp_index = mesh.expert_coords(rank)
        local = shard(weight, placement.sharding, mesh, rank)
        local_gate, local_up = local.chunk(2, dim=1)  # what the expert kernel does with its piece
        experts_here = slice(ep_index * 2, ep_index * 2 + 2)
        rows = slice(etp_index * part, (etp_index + 1) * part)
        assert torch.equal(local_gate, weight[experts_here, :intermediate][:, rows])
        assert torch.equal(local_up, weight[experts_here, intermediate:][:, rows])
    # A plain Shard hands etp rank 0 the first 2I/etp rows, all of them gate rows: chunk(2) of
    # that piece pairs gate with gate, the silent failure the interleaved layout prevents.
    plain = shard(weight, Sharding.of(ep=Shard(0), etp=Shard(1)), mesh, 0)
    assert 2 * part <= intermediate
    assert torch.equal(plain.chunk(2, dim=1)[1], weight[0:2, part : 2 * part])
