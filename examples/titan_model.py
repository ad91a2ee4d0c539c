"""A torchtitan-style MoE transformer, self-contained (no torchtitan dependency).

The MoE block has torchtitan's structure and names: a token-choice ``router`` (``router.gate``
linear, softmax or sigmoid scores in float32, optional ``expert_bias`` that steers selection
only, optional renormalisation and scale, returning ``(top_scores, expert_ids,
tokens_per_expert)``), a token reorderer that sorts token copies by expert, ``GroupedExperts``
with separate ``w1 [E, I, H]`` (gate), ``w3 [E, I, H]`` (up), ``w2 [E, H, I]`` (down) whose forward
takes the reordered tokens and the per-expert counts, optional ``shared_experts`` (a SwiGLU
``FeedForward`` with ``w1``/``w2``/``w3`` linears), and the ``tokens_per_expert`` /
``expert_bias`` buffers of auxiliary-loss-free load balancing. Eagerly the experts run as a
per-expert loop over data-dependent group sizes; the frontend's torchtitan adapter traces the
block as the router plus one ``moe_experts`` op on ``cat([w1, w3], dim=1)`` and ``w2``.

Other names follow torchtitan too: ``tok_embeddings``, ``layers.N.attention.wq/wk/wv/wo``,
``attention_norm``, ``ffn_norm``, ``moe``, ``norm``, ``output``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TitanConfig", "FeedForward", "GroupedExperts", "TokenChoiceTopKRouter", "MoE", "TitanMoE"]


@dataclass(frozen=True)
class TitanConfig:
    vocab_size: int = 64
    dim: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_experts: int = 4
    top_k: int = 2
    hidden_dim: int = 16
    num_shared_experts: int = 0
    score_func: str = "sigmoid"  # "softmax" or "sigmoid"
    route_norm: bool = True
    route_scale: float = 1.0
    score_before_experts: bool = False  # True scales expert inputs instead of outputs (not traceable as moe_experts)
    load_balance_coeff: float | None = None  # not None: an expert_bias buffer steers expert selection


class FeedForward(nn.Module):
    """SwiGLU MLP with three linears (used as the shared experts)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GroupedExperts(nn.Module):
    """Experts stored as three 3-d weights; the input is already grouped by expert."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.randn(num_experts, hidden_dim, dim) * dim**-0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, hidden_dim) * hidden_dim**-0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, hidden_dim, dim) * dim**-0.5)

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        outputs = []
        # Group sizes are values, not shapes: this loop runs eagerly only.
        for expert, rows in enumerate(torch.split(x, [int(n) for n in num_tokens_per_expert.tolist()], dim=0)):
            hidden = F.silu(rows @ self.w1[expert].T) * (rows @ self.w3[expert].T)
            outputs.append(hidden @ self.w2[expert].T)
        return torch.cat(outputs, dim=0)


class TokenChoiceTopKRouter(nn.Module):
    def __init__(self, config: TitanConfig):
        super().__init__()
        self.gate = nn.Linear(config.dim, config.num_experts, bias=False)
        self.num_experts, self.top_k = config.num_experts, config.top_k
        self.score_func, self.route_norm, self.route_scale = config.score_func, config.route_norm, config.route_scale

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor | None = None):
        logits = self.gate(x).to(torch.float32)
        scores = torch.sigmoid(logits) if self.score_func == "sigmoid" else torch.softmax(logits, dim=-1)
        if expert_bias is not None:
            # The bias changes which experts are chosen, not how much each counts.
            expert_ids = torch.topk(scores + expert_bias, self.top_k, dim=-1).indices
            top_scores = scores.gather(-1, expert_ids)
        else:
            top_scores, expert_ids = torch.topk(scores, self.top_k, dim=-1)
        if self.route_norm:
            top_scores = top_scores / (top_scores.sum(dim=-1, keepdim=True) + 1e-20)
        top_scores = top_scores * self.route_scale
        tokens_per_expert = torch.histc(expert_ids.reshape(-1).float(), bins=self.num_experts, min=0,
                                        max=self.num_experts)
        return top_scores, expert_ids, tokens_per_expert


class MoE(nn.Module):
    def __init__(self, config: TitanConfig):
        super().__init__()
        self.top_k = config.top_k
        self.router = TokenChoiceTopKRouter(config)
        self.experts = GroupedExperts(config.dim, config.hidden_dim, config.num_experts)
        self.shared_experts = (FeedForward(config.dim, config.hidden_dim * config.num_shared_experts)
                               if config.num_shared_experts else None)
        self.score_before_experts = config.score_before_experts
        if config.load_balance_coeff is not None:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts), persistent=True)
        else:
            self.expert_bias = None
        self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        tokens = x.reshape(-1, dim)
        top_scores, expert_ids, tokens_per_expert = self.router(tokens, self.expert_bias)
        with torch.no_grad():
            self.tokens_per_expert.add_(tokens_per_expert)
        # Copies of each token, one per selected expert, sorted by expert.
        order = torch.argsort(expert_ids.reshape(-1), stable=True)
        scores_sorted = top_scores.reshape(-1)[order].unsqueeze(-1)
        token_of_copy = (order // self.top_k).unsqueeze(-1).expand(-1, dim)
        routed = tokens.gather(0, token_of_copy)
        if self.score_before_experts:
            routed = (routed.to(torch.float32) * scores_sorted).to(x.dtype)
        routed = self.experts(routed, tokens_per_expert)
        if not self.score_before_experts:
            routed = (routed.to(torch.float32) * scores_sorted).to(x.dtype)
        out = self.shared_experts(tokens) if self.shared_experts is not None else torch.zeros_like(tokens)
        return out.scatter_add(0, token_of_copy, routed).reshape(batch, seq, dim)


class Attention(nn.Module):
    def __init__(self, config: TitanConfig):
        super().__init__()
        self.heads = config.num_heads
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wk = nn.Linear(config.dim, config.dim, bias=False)
        self.wv = nn.Linear(config.dim, config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x):
        batch, seq, dim = x.shape
        q, k, v = (w(x).view(batch, seq, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(attended.transpose(1, 2).reshape(batch, seq, dim))


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
