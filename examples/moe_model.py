"""A small MoE transformer with HF-style parameter names, from tiny to Qwen3-30B-A3B-shaped.

Token embedding, RMSNorm, causal multi-head attention (``q_proj``/``k_proj``/``v_proj``/``o_proj``,
grouped KV heads, optional per-head q/k RMSNorm as in Qwen3; ``F.scaled_dot_product_attention``
with ``is_causal=True``, no position encoding), a router (``mlp.gate``: linear, softmax, top-k,
renormalise), routed experts stored fused like HF transformers 5.x
(``mlp.experts.gate_up_proj [E, 2I, H]``, gate rows then up rows; ``mlp.experts.down_proj
[E, H, I]``), an optional shared expert (``mlp.shared_expert.{gate_proj,up_proj,down_proj}``), a
final norm, an ``lm_head`` and a causal-LM loss. The experts compute with a plain per-expert
loop, so the model runs anywhere; the frontend recognises ``MoEExperts`` by its fused weights and
traces it as one ``moe_experts`` op.

``shardgraph_entry(config)`` returns ``(model, example_inputs, loss_fn)`` for the CLI; with
``device="meta"`` nothing is allocated, so the 48-layer config can be traced and compiled.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MoEConfig", "CONFIGS", "UnknownConfigError", "MoETransformer", "lm_loss", "make_batch",
           "shardgraph_entry", "count_parameters"]


@dataclass(frozen=True)
class MoEConfig:
    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_heads
    qk_norm: bool = False
    rotary: bool = False  # rotary position embedding of q and k (rotate-half form, base 10000)
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 16
    shared_expert_intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    norm_topk_prob: bool = True

    def __post_init__(self):
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"MoEConfig.{item.name} = {value} must not be negative")
        if self.num_heads <= 0 or self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"MoEConfig: num_heads {self.num_heads} must be a positive multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"MoEConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}; set head_dim")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"MoEConfig: top_k {self.top_k} must be in 1..num_experts={self.num_experts}")

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


CONFIGS = {
    "tiny": MoEConfig(),
    "tiny_shared": MoEConfig(shared_expert_intermediate_size=24),
    "small": MoEConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, num_experts=16,
                       top_k=4, moe_intermediate_size=128),
    # Qwen3-30B-A3B's shapes: 30.5e9 parameters, 3.3e9 active per token.
    "qwen3_30b_a3b": MoEConfig(vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
                               head_dim=128, qk_norm=True, num_experts=128, top_k=8, moe_intermediate_size=768),
}


class UnknownConfigError(KeyError, ValueError):
    """A config name that is not in ``CONFIGS``."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class Attention(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.heads, self.kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.attention_head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = config.rotary
        if config.rotary:
            if self.head_dim % 2:
                raise ValueError(f"MoEConfig: rotary embedding needs an even head_dim, got {self.head_dim}")
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
            self.register_buffer("inv_freq", 1.0 / (10000.0 ** exponents), persistent=False)

    def _rotated(self, q, k):
        seq = q.shape[2]
        angles = torch.arange(seq, dtype=torch.float32, device=q.device)[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)

        def rotate_half(x):
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def forward(self, x, attn_mask=None):
        """Causal self-attention; ``attn_mask`` (bool, or additive float) replaces the causal mask."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.rotary:
            q, k = self._rotated(q, k)
        # Each key/value head serves heads / kv_heads consecutive query heads.
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                                  enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(attended.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim))


class MoEExperts(nn.Module):
    """Routed experts, fused like HF transformers 5.x: per expert, gate rows then up rows."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        size, inner = config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.randn(config.num_experts, 2 * inner, size) * size**-0.5)
        self.down_proj = nn.Parameter(torch.randn(config.num_experts, size, inner) * inner**-0.5)
        self.act_fn = nn.SiLU()

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for expert in range(self.gate_up_proj.shape[0]):
            token, slot = torch.where(top_k_index == expert)
            if token.numel() == 0:
                continue
            gate, up = F.linear(hidden[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out = out.index_add(0, token, expert_out * top_k_weights[token, slot, None])
        return out


class SharedExpert(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        inner = config.shared_expert_intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.down_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.top_k, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = MoEExperts(config)
        self.shared_expert = SharedExpert(config) if config.shared_expert_intermediate_size else None

    def forward(self, x):
        batch, seq, size = x.shape
        tokens = x.reshape(-1, size)
        probabilities = self.gate(tokens).softmax(dim=-1)
        weights, ids = probabilities.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(tokens, ids, weights)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.reshape(batch, seq, size)


class DecoderLayer(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEBlock(config)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class MoETransformer(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def lm_loss(logits, input_ids):
    """Next-token cross entropy, mean over ``batch * (seq - 1)`` positions: position t predicts
    token t + 1. Accepts an HF ModelOutput (reads ``.logits``)."""
    logits = getattr(logits, "logits", logits)
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), input_ids[:, 1:].reshape(-1))


def make_batch(config: MoEConfig, batch_size: int = 8, seq_len: int = 8, seed: int = 0, device="cpu"):
    """``(input_ids,)``: uniform random token ids, ``[batch_size, seq_len]`` int64."""
    if batch_size <= 0 or seq_len < 2:
        raise ValueError(f"make_batch: batch_size {batch_size} must be positive and seq_len {seq_len} at least 2 "
                         f"(the loss predicts the next token)")
    if torch.device(device).type == "meta":
        return (torch.empty(batch_size, seq_len, dtype=torch.long, device="meta"),)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
    return (ids.to(device),)


def count_parameters(config: MoEConfig) -> dict[str, int]:
    """Total and per-token active parameter counts, from the config alone."""
    with torch.device("meta"):
        model = MoETransformer(replace(config, num_layers=1))
    per_layer = sum(p.numel() for p in model.layers[0].parameters())
    experts = model.layers[0].mlp.experts
    expert_size = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // config.num_experts
    outside = sum(p.numel() for p in model.parameters()) - per_layer
    total = outside + config.num_layers * per_layer
    active = total - config.num_layers * (config.num_experts - config.top_k) * expert_size
    return {"total": total, "active": active}


def shardgraph_entry(config: str = "tiny", device="cpu", batch_size: int = 8, seq_len: int = 8,
                     num_layers: int | None = None, seed: int = 0):
    """``(model, example_inputs, loss_fn)`` for ``config`` (a name in ``CONFIGS``).

    ``device="meta"`` builds weights and inputs without memory (for tracing and compiling
    large configs); ``num_layers`` overrides the config's depth.
    """
    if config not in CONFIGS:
        raise UnknownConfigError(f"unknown config {config!r}; known: {', '.join(CONFIGS)}")
    settings = CONFIGS[config] if num_layers is None else replace(CONFIGS[config], num_layers=num_layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = MoETransformer(settings)
    return model, make_batch(settings, batch_size, seq_len, seed, device), lm_loss
