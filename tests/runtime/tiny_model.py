"""A model small enough to compile in a few seconds in every gloo process, with a buffer.

Embedding, an RMS norm, a scale held in a buffer (so a step needs the model's buffers) and a
head; ``next_token_loss`` is the usual shifted cross entropy (sequence length 1 leaves it no
positions).
"""

import torch
import torch.nn.functional as F

VOCAB, WIDTH = 16, 8


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.norm_weight = torch.nn.Parameter(torch.ones(WIDTH))
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, WIDTH))
        self.register_buffer("scratch", torch.zeros(WIDTH), persistent=False)

    def forward(self, ids):
        x = self.embed(ids)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight
        return self.head(x * self.scale + self.scratch)


def next_token_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def build(seed: int = 0, batch: int = 4, seq: int = 4):
    """``(model, (ids,), loss_fn)`` with weights from ``seed`` and a fixed batch."""
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():
        model.norm_weight.add_(torch.randn(WIDTH) * 0.1)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(100))
    return model, (ids,), next_token_loss


def full_parameters(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}
