"""DBRX's experts store w1 / v1 / w2 flattened as [E * I, H]: they trace as one moe_experts op
over views of the stored weights, which the plan splits by whole experts over ep and by
intermediate rows of every expert over etp; a mesh whose ep does not divide the experts is
refused naming the weight."""

import pytest
import torch
import torch.nn.functional as F

import shardgraph as sg
from passes.plan import PlanError
from shardgraph.check import parity_errors

from .models import assert_moe_operands_read_as_computed_over_ep_etp


def _loss(out, ids):
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _model(experts: int = 4):
    from transformers import DbrxConfig, DbrxForCausalLM

    torch.manual_seed(0)
    config = DbrxConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                        attn_config={"kv_n_heads": 2, "clip_qkv": 8.0},
                        ffn_config={"ffn_hidden_size": 16, "moe_num_experts": experts, "moe_top_k": 2},
                        attn_implementation="eager", use_cache=False)
    if not hasattr(config.attn_config, "rope_theta"):
        config.attn_config.rope_theta = 10000.0  # transformers 5.24's DbrxAttention reads it; its config lacks it
    return DbrxForCausalLM(config).float().eval(), torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(3))


def test_dbrx_flattened_experts_match_eager_split_by_whole_experts_over_ep_and_rows_over_etp():
    model, ids = _model()
    program = sg.compile(model, sg.MeshSpec.parse("world=8,tp=2,ep=2,etp=2"), (ids,), _loss)
    assert program.traced.expert_modules["transformer.blocks.0.ffn.experts"] == "flat_experts"
    for name in ("w1", "v1", "w2"):
        # [64, 32] = 4 experts x 16 rows: ep ranks hold experts {0, 1} / {2, 3}; etp ranks 8 rows of each.
        sharding = program.parameter_sharding(f"transformer.blocks.1.ffn.experts.mlp.{name}")
        assert sharding == sg.Sharding.of(ep=sg.Shard(0), etp=sg.InterleavedShard(0, stripes=2)), (name, sharding)
    assert_moe_operands_read_as_computed_over_ep_etp(program.placed)
    errors, _ = parity_errors(program, model, (ids,), _loss)
    assert errors.within(1e-5), errors


def test_dbrx_experts_that_ep_does_not_divide_are_refused_naming_the_weight():
    model, ids = _model(experts=3)  # 48 rows divide over ep=2, 3 experts do not
    with pytest.raises(PlanError, match=r"expert weight 'transformer\.blocks\.0\.ffn\.experts\.mlp\.w1'.*ep=2 does not "
                                        r"divide dim 0 \(size 3\).*parts of experts"):
        sg.compile(model, sg.MeshSpec.parse("world=2,ep=2"), (ids,), _loss)


def test_dbrx_flattened_experts_under_zero3_are_gathered_into_whole_experts_split_as_the_op_reads_them():
    model, ids = _model()
    program = sg.compile(model, sg.MeshSpec.parse("world=8,tp=2,ep=2,etp=2"), (ids,), _loss, zero=3)
    for name in ("w1", "v1", "w2"):
        # The split carried back from the op reaches the parameter through its zero=3 gather too.
        placement = program.placed.parameters[f"transformer.blocks.0.ffn.experts.mlp.{name}"]
        assert placement.gathered == sg.Sharding.of(ep=sg.Shard(0), etp=sg.InterleavedShard(0, stripes=2)), name
        assert placement.sharding.placement("edp").is_shard(), name
