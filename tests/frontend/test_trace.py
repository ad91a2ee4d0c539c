"""The joint graph equals each model's own loss, gradients and logits, and has the promised form."""

import operator
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples import hf_models
from examples.moe_model import CONFIGS, MoETransformer, lm_loss, make_batch, shardgraph_entry
from examples.titan_model import TitanConfig, TitanMoE
from passes.rules import rule_for
from shardgraph.frontend import TracedGraph, op_histogram, trace

from .models import MOE_BACKWARD, MOE_FORWARD, calls, reference_loss_and_gradients, relative_error, worst_gradient_error
from shardgraph import meta
from shardgraph.meta import Phase

TOLERANCE = 1e-6  # float32


def ids_for(vocab, batch=4, seq=6, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def check_against_eager(model, inputs, moe_layers, tolerance=TOLERANCE):
    """Loss, every gradient and the logits of the traced graphs against the eager model."""
    traced = trace(model, inputs, lm_loss)
    loss, gradients = traced.run(model, *inputs)
    reference_loss, reference_gradients = reference_loss_and_gradients(model, inputs, lm_loss)
    assert relative_error(loss, reference_loss) < tolerance
    error, name = worst_gradient_error(gradients, reference_gradients)
    assert error < tolerance, (name, error)
    assert len(calls(traced, MOE_FORWARD)) == moe_layers and len(calls(traced, MOE_BACKWARD)) == moe_layers
    forward_only = trace(model, inputs)
    (logits,) = forward_only.run(model, *inputs)
    expected = model(*inputs)
    expected = getattr(expected, "logits", expected)
    assert relative_error(logits, expected.detach()) < tolerance
    assert len(calls(forward_only, MOE_FORWARD)) == moe_layers and not calls(forward_only, MOE_BACKWARD)
    return traced


@pytest.fixture(scope="module")
def hf():
    return {family: hf_models.build(family) for family in hf_models.FAMILIES}


def test_example_model_graph_gives_its_loss_gradients_and_logits():
    model, inputs, _ = shardgraph_entry("tiny_shared")
    check_against_eager(model, inputs, moe_layers=2)


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_hf_models_graph_gives_their_loss_gradients_and_logits(hf, family):
    traced = check_against_eager(hf[family], (ids_for(hf_models.VOCAB_SIZE),), moe_layers=2)
    experts = [n for n in traced.parameter_names if n.endswith("mlp.experts.gate_up_proj")]
    assert experts == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    assert set(traced.expert_modules.values()) == {"hf_fused_experts"}
    if family == "qwen2_moe":  # the shared expert and its sigmoid gate stay ordinary aten ops
        assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in traced.gradient_names
        assert "model.layers.0.mlp.shared_expert_gate.weight" in traced.gradient_names


def score_matrices(traced, seq):
    """Nodes whose value ends in [seq, seq]: attention scores or probabilities (or a mask)."""
    return [n for n in traced.graph_module.graph.nodes
            if isinstance(meta.tensor_value(n), torch.Tensor) and tuple(meta.value(n).shape[-2:]) == (seq, seq)]


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_hf_sdpa_attention_is_one_fused_op_per_direction_and_no_score_matrix(family):
    # Given no attention mask and no position ids, HF calls SDPA with attn_mask=None and
    # is_causal=True (see _positions_not_packed), which the tracer keeps as shardgraph.attention.
    model = hf_models.build(family, attn_implementation="sdpa")
    inputs = (ids_for(hf_models.VOCAB_SIZE, seq=7),)
    traced = check_against_eager(model, inputs, moe_layers=2, tolerance=1e-5)
    histogram = op_histogram(traced)
    assert histogram["shardgraph.attention.default"] == 2 and histogram["shardgraph.attention_backward.default"] == 2
    forward = calls(traced, "shardgraph.attention.default")[0]
    assert forward.args[3:] == (True, pytest.approx(8 ** -0.5), True)  # causal, 1/sqrt(head_dim), 4 heads on 2
    # The forward returns (out, logsumexp); its backward reads both (no forward of its own), and
    # the log-sum-exp, read by the backward only, is still made by the forward.
    items = {user.args[1]: user for user in forward.users if user.target is operator.getitem}
    assert sorted(items) == [0, 1] and meta.value(items[1]).shape == meta.value(forward.args[0]).shape[:3]
    assert all(meta.phase(item) is Phase.FORWARD for item in items.values())
    (backward,) = [user for user in items[1].users if str(user.target) == "shardgraph.attention_backward.default"]
    assert backward.args[4:6] == (items[0], items[1]) and meta.phase(backward) is Phase.BACKWARD
    assert "aten.bmm.default" not in histogram and not score_matrices(traced, 7)
    assert histogram["aten._softmax.default"] == 2  # the two routers only


class _HFWithExtraInputs(nn.Module):
    """An HF model called with position ids or a padding mask from the batch."""

    def __init__(self, model, extra: str):
        super().__init__()
        self.model, self.extra = model, extra

    def forward(self, input_ids, extra):
        return self.model(input_ids=input_ids, **{self.extra: extra})


@pytest.mark.parametrize("extra", ["position_ids", "attention_mask"])
def test_hf_sdpa_given_position_ids_or_a_padding_mask_keeps_its_mask_as_matmul_and_softmax(extra):
    # Fake tensors cannot say whether position ids pack several sequences into a row, or whether
    # a padding mask masks anything, so HF builds a [batch, 1, seq, seq] boolean mask; turning it
    # into is_causal=True would be wrong for packed or padded batches, so it stays a mask.
    model = _HFWithExtraInputs(hf_models.build("mixtral", attn_implementation="sdpa"), extra)
    ids = ids_for(hf_models.VOCAB_SIZE, seq=7)
    given = torch.arange(7).expand(4, 7) if extra == "position_ids" else torch.ones(4, 7, dtype=torch.long)
    traced = trace(model, (ids, given), lambda output, ids, given: lm_loss(output, ids))
    histogram = op_histogram(traced)
    assert "shardgraph.attention.default" not in histogram and histogram["aten._softmax.default"] == 4
    loss, gradients = traced.run(model, ids, given)
    reference_loss, reference_gradients = reference_loss_and_gradients(
        model, (ids, given), lambda output, ids, given: lm_loss(output, ids))
    assert relative_error(loss, reference_loss) < 1e-5
    assert worst_gradient_error(gradients, reference_gradients)[0] < 1e-5


def test_hf_model_inside_a_wrapper_is_traced_without_kv_cache():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = hf_models.build("mixtral", attn_implementation="sdpa")
            self.seen = []

        def forward(self, input_ids):
            self.seen.append(self.inner.config.use_cache)
            return self.inner(input_ids=input_ids)

    model = Wrapper()
    traced = trace(model, (ids_for(hf_models.VOCAB_SIZE),), lm_loss)
    assert model.seen == [False] and model.inner.config.use_cache  # off while tracing, restored after
    assert op_histogram(traced)["shardgraph.attention.default"] == 2


def test_example_model_attention_is_one_fused_op_with_grouped_heads_and_no_score_matrix():
    config = replace(CONFIGS["tiny_shared"], num_kv_heads=2)
    torch.manual_seed(0)
    model = MoETransformer(config)
    inputs = make_batch(config, batch_size=4, seq_len=7)
    traced = check_against_eager(model, inputs, moe_layers=2, tolerance=1e-5)
    forward = calls(traced, "shardgraph.attention.default")
    assert len(forward) == 2 and len(calls(traced, "shardgraph.attention_backward.default")) == 2
    assert all(node.args[3:] == (True, pytest.approx(8 ** -0.5), True) for node in forward)
    assert not score_matrices(traced, 7)


def test_attention_with_an_explicit_mask_is_traced_as_matmul_and_softmax():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            q = self.proj(x).view(2, 3, 2, 4).transpose(1, 2)
            mask = torch.ones(3, 3, dtype=torch.bool).tril()
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    model, x = Masked(), torch.randn(2, 3, 8)
    traced = trace(model, (x,), lambda out, x: out.pow(2).sum())
    histogram = op_histogram(traced)
    assert "shardgraph.attention.default" not in histogram and histogram["aten._softmax.default"] == 1
    loss, gradients = traced.run(model, x)
    reference_loss, reference_gradients = reference_loss_and_gradients(model, (x,), lambda out, x: out.pow(2).sum())
    assert relative_error(loss, reference_loss) < TOLERANCE
    assert worst_gradient_error(gradients, reference_gradients)[0] < TOLERANCE


def test_torchtitan_style_block_is_one_moe_op_on_w1_w3_concatenated_in_the_graph():
    torch.manual_seed(0)
    config = TitanConfig(num_shared_experts=1, load_balance_coeff=1e-3, score_func="softmax")
    model = TitanMoE(config)
    for layer in model.layers:  # a non-zero bias steers selection, so gather picks up its scores
        layer.moe.expert_bias.copy_(torch.linspace(-0.05, 0.05, config.num_experts))
    traced = check_against_eager(model, (ids_for(config.vocab_size),), moe_layers=2)
    assert traced.expert_modules == {"layers.0.moe": "torchtitan_moe_block", "layers.1.moe": "torchtitan_moe_block"}
    (cat, _) = calls(traced, "aten.cat.default")
    fed = [meta.display_name(a) for a in cat.args[0]]
    assert fed == ["layers.0.moe.experts.w1", "layers.0.moe.experts.w3"]
    assert calls(traced, MOE_FORWARD)[0].args[3] is cat
    assert "layers.0.moe.experts.w2" in traced.gradient_names
    assert "layers.0.moe.expert_bias" in traced.buffer_names
    assert not calls(traced, "aten.histc.default")  # the unused token counts are dead code


def test_one_forward_and_one_backward_moe_node_per_layer_on_a_deeper_model():
    model, inputs, loss_fn = shardgraph_entry("tiny", num_layers=5)
    traced = trace(model, inputs, loss_fn)
    forward, backward = calls(traced, MOE_FORWARD), calls(traced, MOE_BACKWARD)
    assert len(forward) == len(backward) == 5
    weights = [meta.display_name(n.args[3]) for n in forward]
    assert weights == [f"layers.{i}.mlp.experts.gate_up_proj" for i in range(5)]
    # Each backward consumes its own layer's expert weights.
    assert [meta.display_name(n.args[4]) for n in backward] == sorted(weights, reverse=True)


def test_graph_inputs_are_named_parameters_then_buffers_then_batch():
    model = hf_models.build("qwen2_moe")
    traced = trace(model, (ids_for(hf_models.VOCAB_SIZE),), lm_loss)
    placeholders = [n for n in traced.graph_module.graph.nodes if n.op == "placeholder"]
    labels = [(meta.graph_input(n).kind.value, meta.display_name(n)) for n in placeholders]
    expected = ([("parameter", n) for n, _ in model.named_parameters()]
                + [("buffer", n) for n, _ in model.named_buffers()] + [("input", "input_ids")])
    assert labels == expected
    assert traced.buffer_names == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    assert placeholders[0].name == "model_embed_tokens_weight"
    assert placeholders[-1].name == "input_ids"
    assert traced.parameter_shapes["model.layers.0.mlp.experts.gate_up_proj"] == (4, 16, 32)
    assert traced.parameter_dtypes["model.norm.weight"] == torch.float32
    roles = traced.output_spec
    assert roles[0].kind == "loss" and [r.parameter for r in roles[1:]] == traced.parameter_names
    assert meta.output_roles(traced.graph_module)[1] == meta.OutputRole("grad", traced.parameter_names[0])


def test_graph_is_functional_with_no_mutation_detach_or_autograd_left():
    model = hf_models.build("mixtral")  # its router divides the top-k weights in place
    traced = trace(model, (ids_for(hf_models.VOCAB_SIZE),), lm_loss)
    for node in traced.graph_module.graph.nodes:
        if node.op == "call_function" and hasattr(node.target, "_schema"):
            schema = node.target._schema
            assert not schema.is_mutable, node.format_node()
            assert node.target not in (torch.ops.aten.detach.default, torch.ops.aten.alias.default)
    assert not [n for n in traced.graph_module.graph.nodes if n.op in ("call_module", "call_method")]
    assert "autograd" not in traced.graph_module.code


def test_in_place_writes_through_views_keep_their_meaning():
    class Writes(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            y = self.proj(x).clone()
            y[:, 0] = 0.0
            y[1:].mul_(3.0)
            return y

    torch.manual_seed(0)
    model, x = Writes(), torch.randn(3, 4)

    def loss_fn(out, x):
        return (out * torch.arange(4.0)).pow(2).sum()

    traced = trace(model, (x,), loss_fn)
    loss, gradients = traced.run(model, x)
    reference_loss, reference_gradients = reference_loss_and_gradients(model, (x,), loss_fn)
    assert relative_error(loss, reference_loss) < TOLERANCE
    assert worst_gradient_error(gradients, reference_gradients)[0] < TOLERANCE
    assert reference_gradients["proj.weight"][0].abs().sum() == 0  # column 0 was overwritten: no gradient


def test_every_op_of_the_model_families_has_a_placement_rule(hf):
    # The op catalogue is the rule registry (passes.rules): what these graphs use must place
    # without replicate_fallback.
    model, inputs, loss_fn = shardgraph_entry("tiny_shared")
    titan = TitanMoE(TitanConfig(num_shared_experts=1, load_balance_coeff=1e-3))
    sdpa = hf_models.build("mixtral", attn_implementation="sdpa")
    for candidate in (model, titan, sdpa, *hf.values()):
        graph = trace(candidate, inputs, loss_fn).graph_module.graph
        targets = {n.target for n in graph.nodes if n.op == "call_function" and n.target is not operator.getitem}
        assert not {str(t) for t in targets if rule_for(t) is None}, type(candidate).__name__


def test_frozen_parameters_are_inputs_without_gradients():
    model, inputs, loss_fn = shardgraph_entry("tiny")
    model.embed_tokens.weight.requires_grad_(False)
    traced = trace(model, inputs, loss_fn)
    assert "embed_tokens.weight" in traced.parameter_names
    assert traced.gradient_names == traced.parameter_names[1:]
    loss, gradients = traced.run(model, *inputs)
    reference_loss, reference_gradients = reference_loss_and_gradients(model, inputs, loss_fn)
    assert relative_error(loss, reference_loss) < TOLERANCE
    assert worst_gradient_error(gradients, reference_gradients)[0] < TOLERANCE
    assert not calls(traced, "aten.embedding_dense_backward.default")


def test_tied_embedding_is_one_parameter_whose_gradient_sums_both_uses():
    model = hf_models.build("qwen2_moe", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inputs = (ids_for(hf_models.VOCAB_SIZE),)
    traced = trace(model, inputs, lm_loss)
    assert "lm_head.weight" not in traced.parameter_names
    loss, gradients = traced.run(model, *inputs)
    reference_loss, reference_gradients = reference_loss_and_gradients(model, inputs, lm_loss)
    assert relative_error(loss, reference_loss) < TOLERANCE
    assert worst_gradient_error(gradients, reference_gradients)[0] < TOLERANCE
    assert not [n for n in traced.graph_module.graph.nodes if n.op == "get_attr"]  # no weight baked in


def test_run_accepts_a_state_dict_and_checks_it():
    model, inputs, loss_fn = shardgraph_entry("tiny")
    traced = trace(model, inputs, loss_fn)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    loss_from_state, gradients_from_state = traced.run(state, *inputs)
    loss_from_model, gradients_from_model = traced.run(model, *inputs)
    assert torch.equal(loss_from_state, loss_from_model)
    assert all(torch.equal(gradients_from_state[n], gradients_from_model[n]) for n in traced.gradient_names)
    del state["layers.1.mlp.gate.weight"]
    with pytest.raises(KeyError, match="layers.1.mlp.gate.weight"):
        traced.run(state, *inputs)
    state["layers.1.mlp.gate.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"layers.1.mlp.gate.weight has shape \(3, 3\)"):
        traced.run(state, *inputs)
    with pytest.raises(TypeError, match=r"takes 1 batch tensors \['input_ids'\], got 2"):
        traced.run(model, *inputs, *inputs)


def test_tracing_leaves_the_model_as_it_was():
    model = hf_models.build("mixtral")
    experts = model.model.layers[0].mlp.experts
    forward_before = experts.forward
    inputs = (ids_for(hf_models.VOCAB_SIZE),)
    before = model(*inputs).logits
    trace(model, inputs, lm_loss)
    assert "forward" not in experts.__dict__ and experts.forward == forward_before
    assert model.config.use_cache is True
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model(*inputs).logits, before)


def test_meta_device_model_traces_without_memory():
    model, inputs, loss_fn = shardgraph_entry("small", device="meta", batch_size=2, seq_len=16)
    assert all(p.device.type == "meta" for p in model.parameters())
    traced = trace(model, inputs, loss_fn)
    assert isinstance(traced, TracedGraph) and traced.device.type == "meta"
    assert len(calls(traced, MOE_FORWARD)) == len(calls(traced, MOE_BACKWARD)) == model.config.num_layers
    output = next(n for n in traced.graph_module.graph.nodes if n.op == "output")
    gradient_shapes = [tuple(meta.value(n).shape) for n in output.args[0][1:]]
    assert gradient_shapes == [traced.parameter_shapes[n] for n in traced.gradient_names]


def test_forward_nodes_record_their_module_and_source_line():
    model, inputs, loss_fn = shardgraph_entry("tiny")
    traced = trace(model, inputs, loss_fn)
    (forward, _) = calls(traced, MOE_FORWARD)
    assert list(meta.module_stack(forward))[-1] == "layers.0.mlp.experts"
    assert "moe_model.py" in meta.stack_trace(forward)
    topk = calls(traced, "aten.topk.default")[0]
    assert list(meta.module_stack(topk))[-1] == "layers.0.mlp"


def smoothed_loss(logits, ids):
    # label smoothing's decomposition writes in place: the trace is functionalized (re-traced)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), label_smoothing=0.1)


@pytest.mark.parametrize("loss_fn", [lm_loss, smoothed_loss], ids=["plain", "functionalized"])
def test_every_trainable_parameter_has_one_gradient_node_marked_after_a_retrace(loss_fn):
    # The gradients of routed experts are getitems of moe_experts_backward; a re-trace makes them
    # afresh and once dropped their marks, so ZeRO's padding and the fused updates missed them.
    import shardgraph as sg

    model, (ids,), _ = shardgraph_entry("tiny", batch_size=2, seq_len=6)
    traced = trace(model, (ids,), loss_fn, optimizer=sg.optim.SGD(lr=0.1))
    marked = {}
    for node in traced.graph_module.graph.nodes:
        if meta.gradient_of(node) is not None:
            marked.setdefault(meta.gradient_of(node), []).append(node.name)
    assert sorted(marked) == sorted(traced.gradient_names)
    assert all(len(nodes) == 1 for nodes in marked.values()), marked
    experts = [name for name in traced.gradient_names if ".experts." in name]
    assert experts and all(marked[name][0].startswith("getitem") for name in experts), marked
