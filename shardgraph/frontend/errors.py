"""Errors the frontend raises instead of letting an exception from inside torch escape."""

from __future__ import annotations

__all__ = ["TraceError", "AdapterError"]


class TraceError(ValueError):
    """A model, input or loss that cannot become one static functional graph.

    The message names the module path (as in ``model.named_modules()``) and the source
    ``file:line`` that caused it, and says what to change.
    """


class AdapterError(TraceError, TypeError):
    """An expert module whose layout or activation cannot be expressed as ``moe_experts``."""
