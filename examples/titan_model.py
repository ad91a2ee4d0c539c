"""A torchtitan-style MoE model: ``GroupedExperts`` with separate ``w1`` (gate), ``w3`` (up), ``w2`` (down).

The names follow torchtitan (``attention.wq``, ``moe.router.gate``, ``moe.experts.w1``...). The
frontend fuses ``w1`` and ``w3`` into the ``moe_experts`` gate/up operand with an aten ``cat``
inside the graph, so a plan still addresses ``w1``/``w2``/``w3`` by their own names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TitanConfig", "GroupedExperts", "TitanMoE"]


@dataclass(frozen=True)
class TitanConfig:
    vocab_size: int = 64
    dim: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_experts: int = 4
    top_k: int = 2
    hidden_dim: int = 16


class GroupedExperts(nn.Module):
    def __init__(self, config: TitanConfig):
        super().__init__()
        e, d, h = config.num_experts, config.dim, config.hidden_dim
        self.w1 = nn.Parameter(torch.randn(e, h, d) * d**-0.5)
        self.w2 = nn.Parameter(torch.randn(e, d, h) * h**-0.5)
        self.w3 = nn.Parameter(torch.randn(e, h, d) * d**-0.5)

    def forward(self, x, topk_ids, topk_weights):
        out = torch.zeros_like(x)
        for expert in range(self.w1.shape[0]):
            token, slot = torch.where(topk_ids == expert)
            y = (F.silu(x[token] @ self.w1[expert].T) * (x[token] @ self.w3[expert].T)) @ self.w2[expert].T
            out = out.index_add(0, token, y * topk_weights[token, slot, None])
        return out


class Router(nn.Module):
    def __init__(self, config: TitanConfig):
        super().__init__()
        self.gate = nn.Linear(config.dim, config.num_experts, bias=False)
        self.top_k = config.top_k

    def forward(self, x):
        scores = torch.sigmoid(self.gate(x))
        weights, ids = scores.topk(self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), ids


class MoE(nn.Module):
    def __init__(self, config: TitanConfig):
        super().__init__()
        self.router = Router(config)
        self.experts = GroupedExperts(config)

    def forward(self, x):
        b, s, d = x.shape
        tokens = x.reshape(-1, d)
        weights, ids = self.router(tokens)
        return self.experts(tokens, ids, weights).reshape(b, s, d)


class Attention(nn.Module):
    def __init__(self, config: TitanConfig):
        super().__init__()
        self.heads = config.num_heads
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wk = nn.Linear(config.dim, config.dim, bias=False)
        self.wv = nn.Linear(config.dim, config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (w(x).view(b, s, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return self.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, config: TitanConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.dim)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim)
        self.moe = MoE(config)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.moe(self.ffn_norm(x))


class TitanMoE(nn.Module):
    def __init__(self, config: TitanConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.dim)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))
