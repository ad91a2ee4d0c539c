"""The default plan finds attention projections by the role they play around attention, not by name.

Whatever a model calls its projections, the Linears that make attention's query, key and value
per head are split on their output features over tp (colwise) and the Linear reading its output
on its input features (rowwise), and the sharded step matches eager. DeepSeek's MLA gets tensor
parallelism over heads: the up-projections ``q_b_proj``/``kv_b_proj`` are colwise, the low-rank
down-projections before them (whose output is not per head) stay whole.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardgraph as sg
from benchmarks.model_coverage import build, lm_loss
from passes.attention_plan import attention_sites
from passes.plan import default_plan
from shardgraph import meta
from shardgraph.check import parity_errors
from shardgraph.frontend import trace

TOLERANCE = 1e-5
MESH = "world=4,tp=2,ep=2"


class OddlyNamedAttention(nn.Module):
    """Grouped-query attention whose projections are named like nothing a name plan knows."""

    def __init__(self, hidden=16, heads=4, kv_heads=2, fused_qkv=False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.to_everything = nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        else:
            self.to_queries = nn.Linear(hidden, heads * self.head_dim, bias=True)
            self.to_keys = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
            self.to_values = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.mix_heads = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x):
        batch, seq, _ = x.shape
        if self.fused_qkv:
            q, k, v = self.to_everything(x).split(
                [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        else:
            q, k, v = self.to_queries(x), self.to_keys(x), self.to_values(x)
        q = q.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.mix_heads(out.transpose(1, 2).reshape(batch, seq, -1))


class TinyLM(nn.Module):
    def __init__(self, vocab=32, hidden=16, **attention):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mixer = OddlyNamedAttention(hidden, **attention)
        self.unembed = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        return self.unembed(x + self.mixer(x))


def ids(vocab=32):
    return torch.randint(0, vocab, (4, 8), generator=torch.Generator().manual_seed(1))


def test_oddly_named_projections_are_split_over_heads_by_structure_and_match_eager():
    torch.manual_seed(0)
    model = TinyLM()
    batch = ids()
    traced = trace(model, (batch,), lm_loss)
    (site,) = attention_sites(traced.graph_module, tp=2)
    assert site.planned, site.refused
    assert site.colwise == ("mixer.to_keys.weight", "mixer.to_queries.bias", "mixer.to_queries.weight",
                            "mixer.to_values.weight")
    assert site.rowwise == ("mixer.mix_heads.weight",)

    program = sg.compile(model, sg.MeshSpec.parse(MESH), (batch,), lm_loss)
    for name in site.colwise:
        assert program.parameter_sharding(name).placement("tp") == sg.Shard(0), name
    assert program.parameter_sharding("mixer.mix_heads.weight").placement("tp") == sg.Shard(1)
    assert program.parameter_sharding("unembed.weight").placement("tp") == sg.Replicate()
    # Attention itself runs on each rank's heads: its operands arrive split on heads over tp.
    (op,) = [n for n in program.placed.graph_module.graph.nodes if str(n.target) == "shardgraph.attention.default"]
    assert all(s.placement("tp") == sg.Shard(1) for s in meta.placed(op).input_shardings)

    errors, _ = parity_errors(program, model, (batch,), lm_loss)
    assert errors.within(TOLERANCE), errors


def test_a_fused_qkv_projection_is_left_whole_because_its_heads_are_not_one_block_of_rows():
    traced = trace(TinyLM(fused_qkv=True), (ids(),), lm_loss)
    (site,) = attention_sites(traced.graph_module, tp=2)
    assert not site.planned and "splits the heads dim" in site.refused
    plan = default_plan(traced.parameter_names, traced.graph_module, sg.MeshSpec.parse(MESH))
    assert plan == {}


def test_key_value_heads_that_tp_does_not_divide_leave_the_attention_whole():
    traced = trace(TinyLM(heads=4, kv_heads=2), (ids(),), lm_loss)
    (site,) = attention_sites(traced.graph_module, tp=4)
    assert not site.planned and "4 does not divide" in site.refused
    assert attention_sites(traced.graph_module, tp=2)[0].planned


def test_name_patterns_still_plan_attention_the_graph_does_not_show():
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"]
    assert default_plan(names) == {"*self_attn.q_proj.weight": "colwise", "*self_attn.o_proj.weight": "rowwise"}


MLA_LAYER = "model.layers.0.self_attn."


def test_deepseek_v3_mla_splits_heads_over_tp_and_matches_eager():
    model = build("deepseek_v3")
    batch = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(3))
    program = sg.compile(model, sg.MeshSpec.parse(MESH), (batch,), lm_loss)
    tp = {name: program.parameter_sharding(MLA_LAYER + name).placement("tp")
          for name in ("q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
                       "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight")}
    assert tp == {"q_a_proj.weight": sg.Replicate(), "q_a_layernorm.weight": sg.Replicate(),
                  "q_b_proj.weight": sg.Shard(0), "kv_a_proj_with_mqa.weight": sg.Replicate(),
                  "kv_a_layernorm.weight": sg.Replicate(), "kv_b_proj.weight": sg.Shard(0),
                  "o_proj.weight": sg.Shard(1)}
    # The written-out attention (bmm, softmax, bmm over [batch * heads]) keeps heads split over tp
    # and batch over dp, through the merge of batch and heads around each bmm.
    softmax = [n for n in program.placed.graph_module.graph.nodes if n.target is torch.ops.aten._softmax.default]
    assert softmax and all(meta.sharding(n) == sg.Sharding.of(dp=sg.Shard(0), tp=sg.Shard(1)) for n in softmax)

    errors, _ = parity_errors(program, model, (batch,), lm_loss)
    assert errors.within(TOLERANCE), errors


@pytest.mark.parametrize("q_lora_rank, query", [(16, "q_b_proj.weight"), (None, "q_proj.weight")])
def test_mla_query_projection_is_colwise_with_or_without_its_low_rank_step(q_lora_rank, query):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                              num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0,
                              kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_nope_head_dim=8, qk_rope_head_dim=8,
                              v_head_dim=8, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config)
    traced = trace(model, (torch.randint(0, 64, (2, 8)),), lm_loss)
    (site,) = attention_sites(traced.graph_module, tp=2)
    assert site.planned, site.refused
    assert site.colwise == tuple(sorted((MLA_LAYER + "kv_b_proj.weight", MLA_LAYER + query)))
    assert site.rowwise == (MLA_LAYER + "o_proj.weight",)
    assert str(site.node.target) == "shardgraph.attention.default"


def _norm_ops(graph_module) -> int:
    return sum(n.target is torch.ops.shardgraph.rms_norm.default for n in graph_module.graph.nodes)


def test_per_head_norms_traced_as_the_op_keep_the_attention_split_over_heads():
    """Qwen3's q_norm/k_norm normalise head_dim only: the walk goes through the op to q_proj/k_proj."""
    model = build("qwen3_moe")
    traced = trace(model, (torch.randint(0, 64, (2, 8)),), lm_loss)
    assert _norm_ops(traced.graph_module) > 0
    sites = attention_sites(traced.graph_module, tp=2)
    assert sites and all(site.planned for site in sites), [site.refused for site in sites]
    assert "model.layers.0.self_attn.q_proj.weight" in sites[0].colwise


def test_a_norm_over_every_heads_features_is_split_with_them_as_aten_ops_and_matches_eager():
    """OLMoE's q_norm/k_norm normalise all heads' features together: their weights are split with
    the heads and those norms (only those) become aten ops, whose mean of squares is summed over tp."""
    model = build("olmoe")
    batch = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(3))
    traced = trace(model, (batch,), lm_loss)
    norms = _norm_ops(traced.graph_module)
    (site, *_) = attention_sites(traced.graph_module, tp=2)
    assert site.planned, site.refused
    assert {MLA_LAYER + "q_norm.weight", MLA_LAYER + "k_norm.weight"} <= set(site.colwise)

    program = sg.compile(model, sg.MeshSpec.parse(MESH), (batch,), lm_loss)
    assert program.parameter_sharding(MLA_LAYER + "q_norm.weight").placement("tp") == sg.Shard(0)
    assert program.parameter_sharding(MLA_LAYER + "q_proj.weight").placement("tp") == sg.Shard(0)
    layers = model.config.num_hidden_layers
    assert _norm_ops(program.placed.graph_module) == norms - 2 * layers  # the layer norms keep the op
    errors, _ = parity_errors(program, model, (batch,), lm_loss)
    assert errors.within(TOLERANCE), errors
