"""The MoE lowering: which dispatch steps a mesh gets, and that the local path reads nothing on the host."""

import pytest
import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from shardgraph import meta
from shardgraph.meta import Purpose
from shardgraph.runtime import c10d
from shardgraph.runtime import moe as moe_steps

EXCHANGE_STEPS = {moe_steps.split_sizes, moe_steps.group_by_local_expert, moe_steps.ungroup}


def lowered_program(mesh_text):
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=4, seq_len=8, num_layers=1)
    return sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn)


@pytest.mark.parametrize("mesh_text", ["world=1", "world=2,tp=2", "world=4,tp=2"])
def test_every_expert_local_means_no_exchange_steps_and_device_offsets(mesh_text):
    nodes = [n for n in lowered_program(mesh_text).graph_module.graph.nodes if n.op == "call_function"]
    targets = [n.target for n in nodes]
    assert not EXCHANGE_STEPS & set(targets), [t for t in targets if t in EXCHANGE_STEPS]
    # (an all-to-all that turns one dense shard into another is a redistribution, not a dispatch)
    assert not [n.name for n in nodes if (record := meta.collective(n)) is not None and record.purpose.family == "moe"]
    assert targets.count(moe_steps.expert_offsets) == 1
    assert targets.count(torch.ops.shardgraph.grouped_mm.default) == 2
    assert targets.count(torch.ops.shardgraph.grouped_mm_dgrad.default) == 2
    assert targets.count(torch.ops.shardgraph.grouped_mm_wgrad.default) == 2


@pytest.mark.parametrize("mesh_text", ["world=2,ep=2", "world=8,tp=2,ep=2,etp=2"])
def test_expert_parallel_meshes_keep_the_count_exchange_and_both_all_to_alls(mesh_text):
    nodes = [n for n in lowered_program(mesh_text).graph_module.graph.nodes if n.op == "call_function"]
    targets = [n.target for n in nodes]
    all_to_alls = [meta.collective(n).purpose for n in nodes if n.target is c10d.ALL_TO_ALL
                   and meta.collective(n).purpose.family == "moe" and meta.collective(n).purpose is not Purpose.MOE_ETP]
    # the count exchange; dispatch and return forward, and the same two for the gradients
    assert sorted(p.value for p in all_to_alls) == sorted(
        p.value for p in [Purpose.MOE_COUNTS] + [Purpose.MOE_DISPATCH, Purpose.MOE_RETURN] * 2)
    assert targets.count(moe_steps.split_sizes) == 1
    assert moe_steps.expert_offsets not in targets


def test_an_etp_gather_of_uneven_pieces_is_an_all_to_all_of_the_whole_piece_to_every_member():
    # No padding to the longest piece and no length read on the host: the output splits are the
    # members' row counts, the input is this rank's piece repeated once per member.
    nodes = [n for n in lowered_program("world=8,tp=2,ep=2,etp=2").graph_module.graph.nodes if n.op == "call_function"]
    gathers = [n for n in nodes if (record := meta.collective(n)) is not None and record.purpose is Purpose.MOE_ETP
               and record.kind.value == "all_gather" and n.target is c10d.ALL_TO_ALL]
    assert len(gathers) == 2  # the tokens forward, their gradients backward
    for issue in gathers:
        repeated, output_splits, input_splits = issue.args[:3]
        assert repeated.target is c10d.repeat_for_members and repeated.args[1] == 2
        assert input_splits.target is c10d.piece_splits
        assert output_splits.target is c10d.host_list  # the gathered row counts of the members


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
