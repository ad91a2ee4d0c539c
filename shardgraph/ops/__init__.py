"""Custom ops the frontend keeps whole in the traced graph (importing this registers them)."""

from .attention import attention, attention_backward
from .moe import (
    ACTIVATIONS,
    GATED_ACTIVATIONS,
    GatedActivation,
    activation_derivative,
    activation_function,
    moe_experts,
    moe_experts_backward,
    moe_experts_reference,
)
from .aten_forms import as_aten_ops
from .norm import rms_norm, rms_norm_backward
from .random import random_draw, random_state
from .rotary import rotary, rotary_backward

__all__ = [
    "attention",
    "attention_backward",
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "GatedActivation",
    "activation_function",
    "activation_derivative",
    "moe_experts",
    "moe_experts_backward",
    "moe_experts_reference",
    "as_aten_ops",
    "rms_norm",
    "rms_norm_backward",
    "random_draw",
    "random_state",
    "rotary",
    "rotary_backward",
]
