"""compile refuses an empty value only where the loss would count zero positions: an empty
pass-through slice (rotary embedding over the whole head) compiles and matches eager."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardgraph as sg
from shardgraph.check import parity_errors


class WholeHeadRotary(nn.Module):
    """``cat([rotate(q[..., :rotary]), q[..., rotary:]])`` with ``rotary`` the whole width, as
    MiniMax-M2's partial rotary code does: the pass-through slice is empty."""

    def __init__(self, vocab=16, hidden=8, rotary=8):
        super().__init__()
        self.rotary = rotary
        self.embed = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.proj(self.embed(ids))
        rotated, passed = x[..., :self.rotary], x[..., self.rotary:]
        x = torch.cat([torch.cat([-rotated[..., 4:], rotated[..., :4]], dim=-1) * 0.5 + rotated, passed], dim=-1)
        return self.head(x)


def next_token_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("mesh", ["world=1", "world=4,tp=2,ep=2"])
def test_an_empty_pass_through_slice_compiles_and_matches_eager(mesh):
    torch.manual_seed(0)
    model = WholeHeadRotary()
    ids = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(1))
    program = sg.compile(model, sg.MeshSpec.parse(mesh), (ids,), next_token_loss)
    errors, _ = parity_errors(program, model, (ids,), next_token_loss)
    assert errors.within(1e-5), errors


def test_a_loss_over_an_empty_slice_is_still_refused_naming_the_slice():
    ids = torch.zeros(4, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"compile: slice_\d+ \(aten.slice.Tensor\) .* is empty \(shape \(4, 0, 16\)\)"
                                         r" for the batch 'ids' \(4, 1\): the loss would count zero positions"):
        sg.compile(WholeHeadRotary(), sg.MeshSpec(1), (ids,), next_token_loss)
