"""The program with its ``shardgraph::`` ops called as Python functions, for running it as it is."""

from __future__ import annotations

import inspect
import sys

import torch
from torch.fx import GraphModule

from kernels.caches import switched
from kernels.op_bodies import BODIES

__all__ = ["as_direct_calls", "check_signature", "direct_bodies", "use_direct_calls", "without_autograd",
           "DIRECT_CALLS"]

DIRECT_CALLS = True


def use_direct_calls(enabled: bool):
    """``DIRECT_CALLS`` set to ``enabled`` inside the block: whether a step without a compiler runs
    the program's plain graph (its ops' bodies called directly, ``as_direct_calls``; its parameter
    updates as foreach ops) or the graph as lowered. Read at each step; each form is made once."""
    return switched(sys.modules[__name__], "DIRECT_CALLS", bool(enabled))


def direct_bodies() -> dict:
    """Every registered op's overload -> its body (``kernels.op_bodies.BODIES``)."""
    bodies = {}
    for qualname, body in BODIES.items():
        namespace, name = qualname.split("::")
        bodies[getattr(getattr(torch.ops, namespace), name).default] = body
    return bodies


def _named_in_profiles(qualname: str, body):
    """``body``, shown under the op's name in a torch.profiler trace while one records (as the
    dispatcher shows the op); otherwise called straight away."""
    def call(*args, **kwargs):
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.profiler.record_function(qualname):
                return body(*args, **kwargs)
        return body(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"direct_{body.__name__}"
    call.__wrapped__ = body
    return call


def check_signature(op, body) -> None:
    """Raise where ``body``'s parameters are not ``op``'s schema arguments, name for name in order:
    a node's keyword arguments are passed to the body by those names."""
    schema = [argument.name for argument in op._schema.arguments]
    parameters = list(inspect.signature(body).parameters)
    if schema != parameters:
        raise TypeError(f"{op}: the body {body.__module__}.{body.__qualname__} takes {parameters}, the schema "
                        f"{schema}")


def as_direct_calls(gm: GraphModule, copy: bool = True) -> GraphModule:
    """A copy of ``gm`` whose ``shardgraph::`` op nodes call the op's body (the function its kernel
    runs) instead of the op; ``gm`` itself where it has none (and, with ``copy=False``, ``gm``
    rewritten in place).

    Same values bit for bit: the body is what the dispatcher would have run. What is skipped is
    the dispatcher's own work, about a hundred times a step on a MoE model (norms, rotary,
    attention, grouped products): the custom-op wrapper's autograd and aliasing checks, which
    cost tens of microseconds a call of host time, so a host-bound step launches its kernels
    sooner. For real tensors with autograd off (``without_autograd``), as the dispatcher runs a
    custom op's body: under a fake or meta mode, autograd, or a compiler, run ``gm``.
    """
    from ..fx_graph import copy_graph_module

    bodies = direct_bodies()
    if not any(node.op == "call_function" and node.target in bodies for node in gm.graph.nodes):
        return gm
    copied = copy_graph_module(gm) if copy else gm
    for node in copied.graph.nodes:
        if node.op == "call_function" and node.target in bodies:
            node.target = _named_in_profiles(node.target._schema.name, bodies[node.target])
    copied.recompile()
    return copied


def without_autograd(graph_module):
    """``graph_module``'s call with autograd off. A lowered program computes its gradients in its
    own nodes, so nothing differentiates through it; parameters given as they are (requiring
    grad) would otherwise have autograd record every op, and a body that writes into ``out=``
    buffers refuses such inputs."""
    def call(*args):
        with torch.no_grad():
            return graph_module(*args)

    call.graph_module = graph_module
    return call
