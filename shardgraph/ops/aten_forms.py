"""The program with its opaque elementwise ops written as their aten form, for ``torch.compile``."""

from __future__ import annotations

from torch.fx import GraphModule

from . import norm, rotary

__all__ = ["as_aten_ops"]

ATEN_FORMS = {**norm.ATEN_FORMS, **rotary.ATEN_FORMS}


def as_aten_ops(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` whose ``rms_norm`` and ``rotary`` nodes (and their backwards) call their
    aten form; ``gm`` itself where it has none.

    Inductor fuses the aten form with its neighbours (the residual add before a norm, the casts
    around it) and launches it from its own generated code, where an opaque op would stay a kernel
    of its own and cost a Python call per launch: on the H100 the Qwen3-MoE step under inductor
    measured 71.2 ms with the norms' aten form against 73.9 with the op (``docs/performance.md``).
    Unfused, the ops win."""
    from ..fx_graph import copy_graph_module

    if not any(node.target in ATEN_FORMS for node in gm.graph.nodes):
        return gm
    copied = copy_graph_module(gm)
    for node in copied.graph.nodes:
        if node.op == "call_function" and node.target in ATEN_FORMS:
            node.target = ATEN_FORMS[node.target]
    copied.recompile()
    # The copy is a lazily compiled module, whose first call writes its code; dynamo does not
    # trace that call (a graph break before the first op), so the code is written now.
    if hasattr(copied, "real_recompile"):
        copied.real_recompile()
    return copied
