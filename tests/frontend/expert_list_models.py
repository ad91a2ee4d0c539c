"""A hand-written MoE whose experts are an ``nn.ModuleList`` of MLP modules, routed by a Python
loop over the experts, as transformers 4.x and many remote-code models write it."""

import torch
import torch.nn.functional as F
from torch import nn


class ExpertMLP(nn.Module):
    def __init__(self, hidden, intermediate, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        setattr(self, names[0], nn.Linear(hidden, intermediate, bias=False))
        setattr(self, names[1], nn.Linear(hidden, intermediate, bias=False))
        setattr(self, names[2], nn.Linear(intermediate, hidden, bias=False))
        self.act_fn = nn.SiLU()

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class LoopedMoE(nn.Module):
    """Softmax router, top-k (renormalised unless ``renormalise=False``), a loop over experts with
    nonzero and index_add_."""

    def __init__(self, hidden, intermediate, experts=4, top_k=2, names=("gate_proj", "up_proj", "down_proj"),
                 shared=False, renormalise=True):
        super().__init__()
        self.top_k, self.renormalise = top_k, renormalise
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(hidden, intermediate, names) for _ in range(experts))
        self.shared_experts = ExpertMLP(hidden, intermediate) if shared else None

    def forward(self, hidden_states):
        batch, seq, dim = hidden_states.shape
        x = hidden_states.view(-1, dim)
        logits = self.gate(x)
        weights = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, topk_ids = torch.topk(weights, self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            token, slot = (topk_ids == i).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(batch, seq, dim)


class Layer(nn.Module):
    def __init__(self, hidden, intermediate, norm="rms", **moe):
        super().__init__()
        self.norm = nn.RMSNorm(hidden) if norm == "rms" else nn.LayerNorm(hidden)
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.mlp = LoopedMoE(hidden, intermediate, **moe)

    def forward(self, x):
        x = x + self.q_proj(self.norm(x))
        return x + self.mlp(self.norm(x))


class ListMoEModel(nn.Module):
    def __init__(self, vocab=32, hidden=8, intermediate=4, layers=2, norm="rms", **moe):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Layer(hidden, intermediate, norm, **moe) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = ListMoEModel(**kwargs)
    ids = torch.randint(0, 32, (8, 8), generator=torch.Generator().manual_seed(seed + 1))
    return model, (ids,), lm_loss
