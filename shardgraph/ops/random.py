"""Seeded random numbers as pure ops: ``random_state`` and ``random_draw``.

A traced training step is a pure function, so the random numbers a model draws (a router's
jitter, PhiMoE's sparsemixer sampling) cannot come from a hidden global generator. The frontend
rewrites every random op of the graph into a draw from an explicit generator state that the
graph threads from one draw to the next, starting from the program's ``seed`` input:

    state_0 = random_state(seed, device)                 # torch.Generator(device).manual_seed(seed)
    values_i, state_{i+1} = random_draw(state_i, distribution, shape, dtype, device, a, b)

Each draw is made whole (the global shape) into a contiguous tensor, as the eager op makes it, so

* every rank draws bit-identical numbers (routers are computed replicated; a rank that holds
  only its rows of the batch takes its rows of the draw);
* the unsharded model run eagerly after ``torch.manual_seed(seed)`` draws the same numbers in
  the same order: ``random_state`` is the state ``manual_seed`` leaves in the default generator
  of ``device``, and each draw calls the kernel the eager op calls (``uniform_``,
  ``exponential_``, ``normal_``, ``bernoulli_``) on that state;
* the values depend on the inputs only, so a recomputed or reordered draw is the same draw.

``distribution`` and its parameters: ``uniform`` on ``[a, b)``, ``exponential`` with rate ``a``,
``normal`` with mean ``a`` and standard deviation ``b``, ``bernoulli`` with probability ``a``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kernels import op_bodies

__all__ = ["DISTRIBUTIONS", "random_state", "random_draw", "state_size"]

DISTRIBUTIONS = ("uniform", "exponential", "normal", "bernoulli")


def state_size(device: torch.device) -> int:
    """Bytes of a generator state on ``device`` (meta: the CPU generator's)."""
    device = torch.device(device)
    kind = "cpu" if device.type == "meta" else device.type
    return torch.Generator(device=kind).get_state().numel()


@op_bodies.custom_op("shardgraph::random_state", mutates_args=())
def random_state(seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The state ``torch.manual_seed(seed)`` gives the default generator of ``device``."""
    if seed.dim() != 0 or seed.dtype != torch.int64:
        raise ValueError(f"random_state: seed must be a 0-d int64 tensor, got {tuple(seed.shape)} {seed.dtype}")
    return torch.Generator(device=device).manual_seed(int(seed)).get_state()


@random_state.register_fake
def _(seed, device):
    return torch.empty(state_size(device), dtype=torch.uint8)


def _check(distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"random_draw: unknown distribution {distribution!r}; known: {', '.join(DISTRIBUTIONS)}")


@op_bodies.custom_op("shardgraph::random_draw", mutates_args=())
def random_draw(state: torch.Tensor, distribution: str, shape: Sequence[int], dtype: torch.dtype,
                device: torch.device, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, state after the draw)``: ``values`` of ``shape`` drawn from ``distribution``
    with a generator of ``device`` set to ``state``."""
    _check(distribution)
    generator = torch.Generator(device=device)
    generator.set_state(state)
    values = torch.empty(tuple(shape), dtype=dtype, device=device)
    if distribution == "uniform":
        values.uniform_(a, b, generator=generator)
    elif distribution == "exponential":
        values.exponential_(a, generator=generator)
    elif distribution == "normal":
        values.normal_(a, b, generator=generator)
    else:
        values.bernoulli_(a, generator=generator)
    return values, generator.get_state()


@random_draw.register_fake
def _(state, distribution, shape, dtype, device, a, b):
    _check(distribution)
    return torch.empty(tuple(shape), dtype=dtype, device=device), torch.empty_like(state)
