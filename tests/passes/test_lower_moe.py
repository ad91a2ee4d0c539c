"""The MoE lowering: which dispatch steps a mesh gets, and that the local path reads nothing on the host."""

import pytest
import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from shardgraph.runtime import collectives
from shardgraph.runtime import moe as moe_steps

EXCHANGE_STEPS = {moe_steps.exchange_counts, moe_steps.split_sizes, moe_steps.group_by_local_expert,
                  moe_steps.ungroup, collectives.all_to_all}


def lowered_targets(mesh_text):
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=4, seq_len=8, num_layers=1)
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn)
    return [node.target for node in program.graph_module.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("mesh_text", ["world=1", "world=2,tp=2", "world=4,tp=2"])
def test_every_expert_local_means_no_exchange_steps_and_device_offsets(mesh_text):
    targets = lowered_targets(mesh_text)
    assert not EXCHANGE_STEPS & set(targets), [t for t in targets if t in EXCHANGE_STEPS]
    assert targets.count(moe_steps.expert_offsets) == 1
    assert targets.count(torch.ops.shardgraph.grouped_mm.default) == 2
    assert targets.count(torch.ops.shardgraph.grouped_mm_dgrad.default) == 2
    assert targets.count(torch.ops.shardgraph.grouped_mm_wgrad.default) == 2


@pytest.mark.parametrize("mesh_text", ["world=2,ep=2", "world=8,tp=2,ep=2,etp=2"])
def test_expert_parallel_meshes_keep_the_count_exchange_and_both_all_to_alls(mesh_text):
    targets = lowered_targets(mesh_text)
    assert targets.count(moe_steps.exchange_counts) == 1
    assert targets.count(moe_steps.split_sizes) == 1
    # dispatch and return forward, and the same two for the gradients
    assert targets.count(collectives.all_to_all) == 4
    assert moe_steps.expert_offsets not in targets


def test_counts_and_offsets_come_from_device_ops_and_match_bincount():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 6, (40, 2), generator=generator)
    ids[ids == 4] = 5  # one empty expert
    order, tokens_per_expert = moe_steps.sort_by_expert(ids, 6)
    assert torch.equal(tokens_per_expert, torch.bincount(ids.reshape(-1), minlength=6))
    assert torch.equal(moe_steps.expert_offsets(tokens_per_expert),
                       torch.cumsum(torch.bincount(ids.reshape(-1), minlength=6), 0).to(torch.int32))
    assert torch.equal(ids.reshape(-1)[order], ids.reshape(-1).sort(stable=True).values)


def test_expert_ids_out_of_range_are_refused_with_the_range():
    with pytest.raises(ValueError, match=r"expert ids outside 0\.\.3 \(min 0, max 4\)"):
        moe_steps.sort_by_expert(torch.tensor([[0, 4]]), 4)
