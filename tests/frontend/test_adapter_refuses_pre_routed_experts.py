"""Fused HF experts whose forward takes tokens already routed (Llama 4: every token once per
expert, scaled by its routing score before the experts) are refused by name, with the reason,
rather than with a shape complaint."""

import pytest
import torch
import torch.nn.functional as F

from shardgraph.frontend import AdapterError, trace


def test_llama4_text_experts_are_refused_naming_the_module_and_why():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    model = Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, intermediate_size_mlp=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
        attn_implementation="eager", use_cache=False))
    ids = torch.randint(0, 64, (2, 4))
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.feed_forward\.experts: Llama4TextExperts\.forward "
                                           r"takes 1 argument.*scaled by their routing score.*register_experts"):
        trace(model, (ids,), lambda out, ids: F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))
