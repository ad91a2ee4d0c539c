"""Sharded runs that once computed something else without a word: each case now matches the
unsharded model (float32, relative error under 1e-5) or is refused naming what is wrong."""

import pytest
import torch

import shardgraph as sg
from examples.moe_model import CONFIGS, MoETransformer, lm_loss, make_batch
from shardgraph.check import parity_errors
from shardgraph.placement import Shard, Sharding

TOLERANCE = 1e-5
CONFIG = CONFIGS["tiny"]


class BatchMixing(MoETransformer):
    """Subtracts the batch mean after the embedding: every row then depends on every other row."""

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        x = x - x.mean(0)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def _errors(mesh_text, model_class=MoETransformer, batch=8, seq=8, **options):
    torch.manual_seed(0)
    model = model_class(CONFIG)
    ids = make_batch(CONFIG, batch, seq)
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), ids, lm_loss, **options)
    errors, _ = parity_errors(program, model, ids, lm_loss)
    return errors, program


@pytest.mark.parametrize("mesh_text", ["world=2", "world=2,ep=2", "world=4,tp=2", "world=4,tp=2,ep=2"])
def test_a_model_that_mixes_the_batch_gets_its_expert_gradients_counted_once(mesh_text):
    # Before: the mixed hidden state reached the experts replicated over dp, every dp replica
    # dispatched all tokens, and expert gradients came out edp times too large.
    errors, _ = _errors(mesh_text, BatchMixing)
    assert errors.within(TOLERANCE), errors


def test_a_batch_replicated_over_dp_is_split_before_the_dispatch():
    # Before: expert gradients exactly 4x at world=8 tp=2 ep=4 with batch 2.
    errors, _ = _errors("world=8,tp=2,ep=4", batch=2, batch_sharding=Sharding.replicate())
    assert errors.within(TOLERANCE), errors


def test_a_batch_split_along_the_sequence_over_dp_matches():
    errors, _ = _errors("world=8,tp=2,ep=4", batch=2, batch_sharding=Sharding.of(dp=Shard(1)))
    assert errors.within(TOLERANCE), errors


def test_experts_replicated_over_etp_by_the_plan_are_sliced_to_the_etp_layout():
    # Before: with expert_replicate and etp=2 every etp rank summed whole products: loss off by
    # 6.8e-3 and gradients by 150%.
    errors, _ = _errors("world=8,tp=2,ep=2,etp=2", plan={"*.experts.*": "expert_replicate"})
    assert errors.within(TOLERANCE), errors


@pytest.mark.parametrize("plan", [{"*": "replicate"}, {"embed_tokens.weight": "vocab"}],
                         ids=["replicate-everything", "vocab-embedding-only"])
def test_a_plan_that_leaves_experts_unsharded_still_dispatches_by_expert(plan):
    # Before: the grouped GEMM got every expert's weights with offsets for the local ones only.
    errors, _ = _errors("world=8,tp=2,ep=4", plan=plan)
    assert errors.within(TOLERANCE), errors


def test_a_token_count_that_does_not_divide_over_dp_and_tp_counts_each_copy_once():
    # 6 tokens over dp=2 x tp=2: each dp rank's 3 tokens stay whole on both tp lanes, both lanes
    # dispatch them, and the expert gradients are divided by the 2 copies.
    errors, program = _errors("world=4,tp=2,ep=2", batch=2, seq=3)
    assert errors.within(TOLERANCE), errors
    reasons = [r["reason"] for r in program.report(format="dict")["values"] if r["op"].startswith("shardgraph.moe")]
    assert any("each token on 2 ranks" in reason for reason in reasons)


def test_copies_of_a_token_that_does_not_divide_give_every_rank_the_same_result_bit_for_bit():
    # 9 tokens over tp=2: both lanes dispatch every token, and each copy meets its expert in
    # another row of another rank's grouped product. Before: the copies' results differed in the
    # last bit, so "replicated" values (the final norm's gradient, its momentum) drifted apart
    # across ranks; run_simulated and gather_state, which compare replicas bit for bit, refused.
    torch.manual_seed(0)
    model = MoETransformer(CONFIG).double()
    ids = make_batch(CONFIG, 3, 3)
    program = sg.compile(model, sg.MeshSpec.parse("world=2,tp=2,ep=2"), ids, lm_loss)
    errors, _ = parity_errors(program, model, ids, lm_loss)  # replicas checked bit for bit
    assert errors.within(1e-12), errors
    reasons = [r["reason"] for r in program.report(format="dict")["values"] if r["op"].startswith("shardgraph.moe")]
    assert any("copies' results averaged" in reason for reason in reasons)
    training = sg.compile(model, sg.MeshSpec.parse("world=2,tp=2,ep=2"), ids, lm_loss,
                          optimizer=sg.optim.SGD(lr=0.1, momentum=0.9))
    states = training.init_states(model)
    for _ in range(2):
        _, states, _ = training.simulate_train_step(states, ids)
    training.gather_state(states)  # raises if two replicas of a parameter or its state differ


@pytest.mark.parametrize("mesh_text", ["world=1", "world=4,tp=2,ep=2"])
def test_a_left_padded_attention_mask_gives_padding_queries_zeros_not_nan(mesh_text):
    # Before: a query row whose keys are all masked went through softmax as 0/0 and the loss was
    # NaN; torch's own attention (and eager HF) gives that row zeros.
    import torch.nn.functional as F

    from examples.hf_models import build

    model = build("mixtral", attn_implementation="sdpa")
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, :1] = 0

    def loss_fn(output, ids, mask):
        logits = output.logits[:, :-1]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), (ids, mask), loss_fn)
    errors, result = parity_errors(program, model, (ids, mask), loss_fn)
    assert torch.isfinite(result.loss) and errors.within(TOLERANCE), errors


def _labels_sliced(logits, ids):
    labels = ids[:, 1:].clone()
    labels[:, -1] = -100  # select_scatter of a fill: no rule for either before
    labels[0, :] = -100
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _labels_masked(logits, ids):
    labels = ids[:, 1:].clone()
    labels[labels == 3] = -100  # index_put with a boolean mask
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))


@pytest.mark.parametrize("loss_fn", [_labels_sliced, _labels_masked], ids=["sliced", "masked"])
@pytest.mark.parametrize("mesh_text", ["world=1", "world=4,tp=2,ep=2"])
def test_a_loss_that_ignores_rows_written_in_place_matches(loss_fn, mesh_text):
    torch.manual_seed(0)
    model = MoETransformer(CONFIG)
    ids = make_batch(CONFIG, 8, 8)
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), ids, loss_fn)
    errors, _ = parity_errors(program, model, ids, loss_fn)
    assert errors.within(TOLERANCE), errors


def test_a_loss_whose_every_label_is_ignored_is_reported_not_returned_as_nan():
    from shardgraph.runtime.guards import NonFiniteError

    def every_row_ignored(logits, ids):
        labels = torch.full_like(ids[:, 1:], -100)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))

    torch.manual_seed(0)
    model = MoETransformer(CONFIG)
    ids = make_batch(CONFIG, 8, 8)
    program = sg.compile(model, sg.MeshSpec.parse("world=4,tp=2,ep=2"), ids, every_row_ignored)
    with pytest.raises(NonFiniteError, match="loss is nan"):
        program.run_simulated({n: p.detach() for n, p in model.named_parameters()}, ids)


def test_experts_that_ep_does_not_divide_are_refused_naming_the_parameter():
    # Before: a ShardingError naming an internal getitem node, from wherever the ragged piece
    # first showed up.
    from dataclasses import replace

    from passes.propagate import PropagationError

    config = replace(CONFIG, num_experts=4)
    model = MoETransformer(config)
    ids = make_batch(config, 8, 8)
    with pytest.raises(PropagationError, match=r"expert weight 'layers\.0\.mlp\.experts\.gate_up_proj'.*ep=8"):
        sg.compile(model, sg.MeshSpec(world=8, ep=8), ids, lm_loss, plan={})


def test_the_program_code_is_generated_before_the_simulators_threads_first_call_it():
    # fx generates a lazy graph module's code on the first call and renames nodes while it does;
    # ranks calling it for the first time from several threads at once read each other's names
    # (an UnboundLocalError or a None tensor, at random). The graph a step runs (the plain graph,
    # with direct op calls or as lowered) has its code generated before it is handed out.
    import shardgraph as sg
    from examples.moe_model import shardgraph_entry
    from shardgraph.ops.direct_calls import use_direct_calls
    from shardgraph.program import ShardedProgram
    from torch.fx._lazy_graph_module import _LazyGraphModule

    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    program = sg.compile(model, sg.MeshSpec.parse("world=4,tp=2,ep=2"), inputs, loss_fn)
    lazy = _LazyGraphModule.from_graphmodule(program.graph_module)
    lazy.recompile()
    assert lazy._needs_recompile()
    program = ShardedProgram(program.traced, program.placed, lazy, program.mesh)
    for direct in (True, False):
        with use_direct_calls(direct):
            graph = program._plain_graph()
        module = getattr(graph, "graph_module", graph)
        assert (module is lazy) is not direct
        assert not (isinstance(module, _LazyGraphModule) and module._needs_recompile())


class UnusedParameter(MoETransformer):
    """Holds a trainable parameter that the loss never reaches (as a sparse-attention indexer
    that only selects keys does)."""

    def __init__(self, config):
        super().__init__(config)
        self.unused = torch.nn.Parameter(torch.randn(4, 4))


def test_parity_compares_a_parameter_the_loss_does_not_reach_with_a_zero_gradient():
    # Before: the eager reference's autograd.grad raised on the unused parameter.
    errors, program = _errors("world=2,ep=2", UnusedParameter)
    assert "unused" in program.gradient_names
    assert errors.within(TOLERANCE), errors
