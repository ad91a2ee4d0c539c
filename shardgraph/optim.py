"""Optimizers traced into the training step: ``torch.optim`` semantics, written as graph ops.

``sg.compile(..., optimizer=sg.optim.AdamW(...))`` traces ``update`` after the backward, so the
optimizer's arithmetic is ordinary graph nodes that propagation places like any other: each
state tensor is an input placed like its parameter (experts split over ep/etp, dense weights over
tp), the update is elementwise on local pieces, and the only communication is what the
gradients' placements already require.

The arithmetic follows torch's single-tensor implementations (``torch/optim/sgd.py``,
``torch/optim/adamw.py``) operation for operation: AdamW's decoupled decay, bias correction and
``eps`` added outside the square root; SGD's momentum buffer taking the first gradient whole.
Scalars that torch computes in Python doubles (bias corrections, step size) are computed here in
float64 and cast once, as torch's kernels cast their double arguments.

The learning rate and the step count are inputs, so a schedule never recompiles. Parameters
whose name matches a ``no_decay`` pattern (fnmatch) get no weight decay, as users set up with
torch param groups.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["Optimizer", "SGD", "AdamW", "OptimizerError"]


class OptimizerError(ValueError):
    """An optimizer option torch.optim would refuse."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise OptimizerError(message)


@dataclass(frozen=True)
class Optimizer:
    lr: float = 1e-3
    weight_decay: float = 0.0
    no_decay: Sequence[str] = field(default=())

    def __post_init__(self):
        _check(isinstance(self.lr, (int, float)) and self.lr >= 0, f"{self.name}: invalid learning rate lr={self.lr!r}")
        _check(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
               f"{self.name}: invalid weight_decay={self.weight_decay!r}")
        _check(not isinstance(self.no_decay, str), f"{self.name}: no_decay takes a list of name patterns, "
                                                   f"got the string {self.no_decay!r}")
        object.__setattr__(self, "no_decay", tuple(self.no_decay))

    @property
    def name(self) -> str:
        return type(self).__name__

    def decay_of(self, parameter: str) -> float:
        if any(fnmatch.fnmatchcase(parameter, pattern) for pattern in self.no_decay):
            return 0.0
        return float(self.weight_decay)

    def state_slots(self) -> tuple[str, ...]:
        raise NotImplementedError

    def update(self, parameter: str, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
               lr: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The new parameter and state after one step; ``lr`` and ``step`` (the step being taken,
        counting from 1) are float64 scalars."""
        raise NotImplementedError


def _scalar(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float64 scalar cast to ``like``'s dtype, as torch casts a Python double argument."""
    return value.to(like.dtype)


@dataclass(frozen=True)
class SGD(Optimizer):
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check(self.momentum >= 0, f"SGD: invalid momentum={self.momentum!r}")
        _check(not self.nesterov or (self.momentum > 0 and self.dampening == 0),
               "SGD: nesterov momentum requires a momentum and zero dampening")

    def state_slots(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    def update(self, parameter, param, grad, state, lr, step):
        decay = self.decay_of(parameter)
        direction = grad + param * decay if decay else grad
        new_state = {}
        if self.momentum:
            previous = state["momentum_buffer"]
            # torch starts the buffer as the first step's gradient itself (no dampening).
            following = previous * self.momentum + direction * (1 - self.dampening)
            buffer = torch.where(step == 1, direction, following)
            new_state["momentum_buffer"] = buffer
            direction = direction + buffer * self.momentum if self.nesterov else buffer
        return param - direction * _scalar(lr, param), new_state


@dataclass(frozen=True)
class AdamW(Optimizer):
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def __post_init__(self):
        super().__post_init__()
        _check(isinstance(self.eps, (int, float)) and self.eps >= 0, f"AdamW: invalid epsilon value eps={self.eps!r}")
        _check(len(tuple(self.betas)) == 2, f"AdamW: betas must be two numbers, got {self.betas!r}")
        beta1, beta2 = self.betas
        _check(0.0 <= beta1 < 1.0, f"AdamW: invalid beta parameter at index 0: {beta1!r}")
        _check(0.0 <= beta2 < 1.0, f"AdamW: invalid beta parameter at index 1: {beta2!r}")
        object.__setattr__(self, "betas", (float(beta1), float(beta2)))

    def state_slots(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def update(self, parameter, param, grad, state, lr, step):
        beta1, beta2 = self.betas
        decay = self.decay_of(parameter)
        if decay:
            param = param * _scalar(1 - lr * decay, param)
        exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + grad * grad * (1 - beta2)
        bias_correction1 = 1 - torch.pow(beta1, step)
        bias_correction2 = 1 - torch.pow(beta2, step)
        step_size = _scalar(lr / bias_correction1, param)
        denominator = exp_avg_sq.sqrt() / _scalar(bias_correction2.sqrt(), param) + self.eps
        return param - step_size * (exp_avg / denominator), {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``'s factor: ``min(max_norm / (norm + 1e-6), 1)``."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def global_norm(gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together, as ``clip_grad_norm_`` computes it (norm of norms)."""
    norms = [torch.linalg.vector_norm(g, 2) for g in gradients]
    return torch.linalg.vector_norm(torch.stack(norms), 2)

