"""Tiny HF transformers MoE models built from configs (nothing downloaded).

``mixtral`` (``MixtralForCausalLM``: fused ``MixtralExperts``, softmax router in float32, no
shared expert), ``qwen2_moe`` (``Qwen2MoeForCausalLM``: fused ``Qwen2MoeExperts`` and a shared
expert behind a sigmoid ``shared_expert_gate``) and ``qwen3_moe`` (``Qwen3MoeForCausalLM``:
Qwen3-30B-A3B's structure, q/k norms, top-k weights renormalised, no shared expert). All use
SwiGLU experts (``hidden_act="silu"``) and rotary embeddings; attention is HF's eager
implementation unless ``attn_implementation`` says otherwise (``"sdpa"`` is HF's default).

``shardgraph_entry(config)`` returns ``(model, example_inputs, loss_fn)`` like
``examples/moe_model.py``, so the CLI can compile these too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FAMILIES", "UnknownConfigError", "build", "lm_loss", "shardgraph_entry"]

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
VOCAB_SIZE = 64


class UnknownConfigError(KeyError, ValueError):
    """A family name that is not in ``FAMILIES``."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def build(family: str, attn_implementation: str = "eager", seed: int = 0, **overrides):
    """A two-layer model of ``family`` with hidden size 32 and 4 experts, top-2."""
    from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)

    common = dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    if family == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**{**common, "intermediate_size": 16, "num_local_experts": 4,
                                                   **overrides}))
    if family == "qwen2_moe":
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**common, "intermediate_size": 16, "moe_intermediate_size": 8,
                                                     "shared_expert_intermediate_size": 16, "num_experts": 4,
                                                     **overrides}))
    if family == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**common, "intermediate_size": 16, "moe_intermediate_size": 8,
                                                     "num_experts": 4, "norm_topk_prob": True, **overrides}))
    raise UnknownConfigError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def lm_loss(output, input_ids):
    """Next-token cross entropy on ``output.logits`` (mean over ``batch * (seq - 1)`` positions)."""
    logits = getattr(output, "logits", output)
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), input_ids[:, 1:].reshape(-1))


def shardgraph_entry(config: str = "mixtral", device="cpu", batch_size: int = 8, seq_len: int = 8, seed: int = 0):
    if config not in FAMILIES:
        raise UnknownConfigError(f"unknown config {config!r}; known: {', '.join(FAMILIES)}")
    with torch.device(device):
        model = build(config, seed=seed)
    if torch.device(device).type == "meta":
        ids = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
    else:
        ids = torch.randint(0, VOCAB_SIZE, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
        ids = ids.to(device)
    return model, (ids,), lm_loss
