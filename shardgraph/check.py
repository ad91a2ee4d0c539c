"""Parity against the unsharded model: loss, every gradient, and the weights after one SGD step.

SGD, not Adam: Adam normalises each gradient by its own scale, so a gradient off by a constant
factor (tp, dp) would leave Adam's update unchanged and the bug unseen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch



__all__ = ["ParityErrors", "parity_errors"]


@dataclass(frozen=True)
class ParityErrors:
    loss: float
    gradients: float
    weights: float
    worst_gradient: str

    def within(self, tolerance: float) -> bool:
        return max(self.loss, self.gradients, self.weights) < tolerance


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def parity_errors(program, model: torch.nn.Module, inputs, loss_fn, learning_rate: float = 0.1,
                  seed: int | None = None):
    """Relative errors of the simulated program against ``model`` run eagerly; and the step result.

    Only trainable parameters (``program.gradient_names``) have gradients and take the SGD step;
    frozen ones (``requires_grad=False``) are inputs that stay as they are. A program whose model
    draws random numbers (a train-mode router) runs with ``seed`` (default 0), and the eager model
    after ``torch.manual_seed(seed)``, so both draw the same numbers. A parameter the loss does
    not reach is compared with a zero gradient.
    """
    parameters = dict(model.named_parameters())
    trainable = list(program.gradient_names)
    if getattr(program, "takes_seed", False):
        seed = 0 if seed is None else seed
        torch.manual_seed(seed)
    loss = loss_fn(model(*inputs), *inputs)
    # A parameter the loss does not reach (a sparse-attention indexer that only selects keys) has
    # gradient zero, as the traced step gives it.
    reached = torch.autograd.grad(loss, [parameters[name] for name in trainable], allow_unused=True)
    gradients = {name: torch.zeros_like(parameters[name]) if gradient is None else gradient
                 for name, gradient in zip(trainable, reached)}
    full = {name: p.detach() for name, p in parameters.items()}
    result = program.run_simulated(full, inputs, seed=seed)
    gradient_errors = {name: _relative(result.gradients[name], g) for name, g in gradients.items()}
    weights_error = 0.0
    mesh = program.mesh
    for name in trainable:
        value, sharding = full[name], program.parameter_sharding(name)
        padding = program.parameter_padding(name)
        # Each rank steps its own piece (padded as the program holds it) with its own gradient
        # piece; then the pieces are rebuilt.
        pieces = [program.shard_held(value, sharding, padding, r, name)
                  - learning_rate * program.shard_held(result.gradients[name], sharding, padding, r, name)
                  for r in mesh.ranks]
        updated = program.unshard_held(pieces, sharding, padding, tuple(value.shape), name)
        weights_error = max(weights_error, _relative(updated, (value - learning_rate * gradients[name])))
    worst = max(gradient_errors, key=gradient_errors.get)
    errors = ParityErrors(_relative(result.loss, loss.detach()), gradient_errors[worst], weights_error, worst)
    return errors, result
