"""Gradient all-reduces are bucketed: one collective per (axis, op, dtype) bucket, every gradient in one."""

import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from passes.bucket_gradient_sync import flatten, unflatten
from shardgraph import meta


def test_each_partial_gradient_is_reduced_once_over_its_axis_in_a_shared_bucket():
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    program = sg.compile(model, sg.MeshSpec.parse("world=8,tp=2,ep=4"), inputs, loss_fn)
    rows = [r for r in program.report(format="dict")["collectives"] if r["family"] == "gradient sync"]
    buckets = [r for r in rows if len(r["members"]) > 1]
    assert buckets and all(r["kind"] == "all_reduce" for r in buckets)
    # no axis is reduced by more than one bucket of this small model (each under 64 MiB)
    assert len({r["axis"] for r in buckets}) == len(buckets)
    reduced = [(name, r["axis"]) for r in rows for name in r["members"]]
    assert len(reduced) == len(set(reduced))  # no gradient reduced twice over one axis
    # the bucket moves exactly the bytes its gradients would have moved one by one
    output = next(n for n in program.placed.graph_module.graph.nodes if n.op == "output")
    partial_over = {node.name: [axis for axis, p in meta.sharding(node).items() if isinstance(p, sg.Partial)]
                    for node in output.args[0][1:]}
    for r in buckets:
        # a gradient partial over both dp and tp is reduced once over their product group "dp*tp"
        assert all(set(r["axis"].split("*")) <= set(partial_over[name]) for name in r["members"]), r


def test_a_gradient_partial_over_two_axes_is_reduced_by_one_all_reduce_over_their_product_group():
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    program = sg.compile(model, sg.MeshSpec.parse("world=4,tp=2,ep=2"), inputs, loss_fn)
    output = next(n for n in program.placed.graph_module.graph.nodes if n.op == "output")
    partial_over = {node.name: {axis for axis, p in meta.sharding(node).items() if isinstance(p, sg.Partial)}
                    for node in output.args[0][1:]}
    rows = [r for r in program.report(format="dict")["collectives"] if r["family"] == "gradient sync"]
    # every gradient partial over dp and tp that is wanted replicated on both
    both = [r for r in rows if r["axis"] == "dp*tp"]
    assert both and all(r["kind"] == "all_reduce" for r in both)
    for name in (m for r in both for m in r["members"]):
        assert partial_over[name] == {"dp", "tp"}
        # and no other gradient-sync collective reduces it again over dp or tp alone
        assert not [r for r in rows if name in r["members"] and r["axis"] in ("dp", "tp")]


def test_flatten_and_unflatten_round_trip_and_give_views_of_the_buffer():
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 1, 2)]
    flat = flatten(tensors)
    pieces = unflatten(flat, tensors)
    assert all(torch.equal(a, b) for a, b in zip(pieces, tensors))
    assert all(piece.data_ptr() >= flat.data_ptr() for piece in pieces)
    flat.zero_()
    assert all(piece.abs().sum() == 0 for piece in pieces)
