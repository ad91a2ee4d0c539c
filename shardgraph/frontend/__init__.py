"""Frontend: trace a single-device MoE model into one forward+backward fx graph over aten ops."""

from .adapters import identify_activation, register_experts, unregister_experts
from .errors import AdapterError, TraceError
from .trace import DECOMPOSITIONS, OutputRole, TracedGraph, op_histogram, trace

__all__ = [
    "trace",
    "TracedGraph",
    "OutputRole",
    "TraceError",
    "AdapterError",
    "register_experts",
    "unregister_experts",
    "identify_activation",
    "op_histogram",
    "DECOMPOSITIONS",
]
