"""Frontend: trace a single-device MoE model into one forward+backward fx graph."""

from .adapters import AdapterError, register_experts
from .trace import OutputRole, TracedGraph, TraceError, op_histogram, trace

__all__ = ["trace", "TracedGraph", "OutputRole", "TraceError", "AdapterError", "register_experts", "op_histogram"]
