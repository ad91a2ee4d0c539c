"""Custom ops the frontend keeps whole in the traced graph (importing this registers them)."""

from .moe import (
    ACTIVATIONS,
    activation_derivative,
    activation_function,
    moe_experts,
    moe_experts_backward,
    moe_experts_reference,
)

__all__ = [
    "ACTIVATIONS",
    "activation_function",
    "activation_derivative",
    "moe_experts",
    "moe_experts_backward",
    "moe_experts_reference",
]
