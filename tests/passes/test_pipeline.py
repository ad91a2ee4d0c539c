"""The pass pipeline: each pass's requires / ensures are checked at its seam."""

import dataclasses

import pytest

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from passes.pipeline import PIPELINE, CompileOptions, PassContractError, run_pipeline


def _traced():
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=4, seq_len=4)
    return sg.trace(model, inputs, loss_fn)


def test_the_pipeline_lists_every_pass_in_order():
    assert [p.name for p in PIPELINE] == ["decompose_split_norms", "decompose_loss", "recompute", "gather_parameters", "pad_parameters", "propagate",
                                         "check_random_draws", "add_communicator", "lower_redistribute", "exact_partial_reductions",
                                         "lower_localize", "lower_moe", "fuse_linear_cross_entropy",
                                         "bucket_gradient_sync", "cast_gradient_reductions", "schedule_gradient_sync",
                                         "lower_collectives", "schedule_collectives", "donate_state", "fuse_wgrad_sgd"]


def test_a_lowering_without_its_communicator_is_refused_at_its_seam():
    without = tuple(p for p in PIPELINE if p.name != "add_communicator")
    with pytest.raises(PassContractError, match="pass lower_redistribute requires 'one communicator input'"):
        run_pipeline(_traced().graph_module, CompileOptions(sg.MeshSpec(2, tp=2)), without)


def test_a_pass_that_breaks_what_it_ensures_is_named():
    def drop_moe_lowering(gm, options, compiled):
        return gm  # leaves the MoE ops in place

    broken = tuple(dataclasses.replace(p, run=drop_moe_lowering) if p.name == "lower_moe" else p for p in PIPELINE)
    with pytest.raises(PassContractError, match="pass lower_moe did not ensure 'no MoE op left to lower'"):
        run_pipeline(_traced().graph_module, CompileOptions(sg.MeshSpec(2, ep=2)), broken)


def test_an_unlabelled_graph_is_refused_before_any_pass_runs():
    traced = _traced()
    gm = traced.graph_module
    # A plain make_fx graph: no GraphInput records on its placeholders.
    import torch.fx

    plain = torch.fx.GraphModule(gm, torch.fx.Graph())
    plain.graph.output(plain.graph.placeholder("x"))
    with pytest.raises(PassContractError, match="pass decompose_split_norms requires 'traced"):
        run_pipeline(plain, CompileOptions(sg.MeshSpec(1)))


def test_pass_times_are_recorded_per_pass():
    compiled = run_pipeline(_traced().graph_module, CompileOptions(sg.MeshSpec(2, tp=2)))
    assert set(compiled.pass_seconds) == {p.name for p in PIPELINE}


def _reads_before_definition(gm, options, compiled):
    """A broken pass: the first matrix product is moved above the first of its inputs that is computed."""
    product = next(n for n in gm.graph.nodes if n.op == "call_function" and "mm" in str(n.target)
                   and any(source.op == "call_function" for source in n.all_input_nodes))
    source = next(source for source in product.all_input_nodes if source.op == "call_function")
    source.prepend(product)
    return gm


def _with_broken(name):
    return tuple(dataclasses.replace(p, run=_reads_before_definition) if p.name == name else p for p in PIPELINE)


def test_with_lint_each_pass_the_pass_that_reads_a_value_before_its_definition_is_named():
    with pytest.raises(PassContractError, match="pass lower_localize did not ensure 'well-formed .*used before"):
        run_pipeline(_traced().graph_module, CompileOptions(sg.MeshSpec(2, tp=2), lint_each_pass=True),
                     _with_broken("lower_localize"))


def test_without_lint_each_pass_the_lowered_graph_is_still_linted():
    with pytest.raises(PassContractError, match="the lowered graph is not 'well-formed .*used before"):
        run_pipeline(_traced().graph_module, CompileOptions(sg.MeshSpec(2, tp=2), lint_each_pass=False),
                     _with_broken("lower_localize"))


def test_lint_each_pass_follows_the_environment(monkeypatch):
    monkeypatch.setenv("SHARDGRAPH_LINT_EACH_PASS", "1")
    assert CompileOptions(sg.MeshSpec(1)).lint_each_pass
    monkeypatch.delenv("SHARDGRAPH_LINT_EACH_PASS")
    assert not CompileOptions(sg.MeshSpec(1)).lint_each_pass
