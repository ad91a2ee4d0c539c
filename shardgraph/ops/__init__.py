"""Custom ops the frontend keeps whole in the traced graph."""

from .moe import moe_experts, moe_experts_backward, moe_experts_reference

__all__ = ["moe_experts", "moe_experts_backward", "moe_experts_reference"]
