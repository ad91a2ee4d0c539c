"""Fused HF experts whose forward takes tokens already routed (Llama 4's experts: every token
once per expert, scaled by its routing score before the experts) are refused by name, with the
reason, when no recognised block around them shows the routing (Llama 4's own block is traced
whole: tests/frontend/test_llama4_block.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardgraph.frontend import AdapterError, trace


class RoutedElsewhere(nn.Module):
    """Llama 4's experts behind a router this block calls ``scorer``: no structure to recognise."""

    def __init__(self, config):
        from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

        super().__init__()
        self.experts = Llama4TextExperts(config)
        self.scorer = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        scores = torch.sigmoid(self.scorer(tokens)).transpose(0, 1).reshape(-1, 1)
        routed = self.experts(tokens.repeat(self.experts.num_experts, 1) * scores)
        return routed.reshape(self.experts.num_experts, -1, x.shape[-1]).sum(0).reshape(x.shape)


def test_llama4_text_experts_outside_their_block_are_refused_naming_the_module_and_why():
    from transformers import Llama4TextConfig

    torch.manual_seed(0)
    config = Llama4TextConfig(hidden_size=32, intermediate_size=16, num_local_experts=4)
    model = nn.Sequential(nn.Embedding(64, 32), RoutedElsewhere(config), nn.Linear(32, 64))
    ids = torch.randint(0, 64, (2, 4))
    with pytest.raises(AdapterError, match=r"1\.experts: Llama4TextExperts\.forward takes 1 argument.*scaled by their "
                                           r"routing score.*register_experts"):
        trace(model, (ids,), lambda out, ids: F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))
