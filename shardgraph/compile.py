"""``shardgraph.compile``: trace, place, lower; the whole pipeline in one place.

    traced  = trace(model, example_inputs, loss_fn)          # one forward+backward fx graph
    graph   = decompose_loss(copy of traced graph)            # mean losses as sum / count
    placed  = propagate(graph, mesh, plan)                    # a sharding on every value
    lowered = lower_redistribute(placed, mesh)                # collectives, gradient sync
    lowered = lower_localize(lowered, mesh)                   # shape arguments to local sizes
    lowered = lower_moe(lowered, mesh)                        # expert dispatch + grouped GEMMs
    lowered = bucket_gradient_sync(lowered)                   # one all-reduce per gradient bucket
    return ShardedProgram(traced, placed, lowered, mesh)
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch.fx import GraphModule

from .mesh import MeshSpec
from .program import ShardedProgram

__all__ = ["compile", "compile_traced"]


def compile(  # noqa: A001 - the name users expect, as jax.jit / torch.compile
    model: torch.nn.Module,
    mesh: MeshSpec,
    example_inputs: Sequence[Any] = (),
    loss_fn=None,
    plan: Mapping[str, str] | None = None,
    *,
    batch_sharding=None,
    link=None,
    replicate_fallback: bool = False,
) -> ShardedProgram:
    """Compile ``model`` for ``mesh``; see ``ShardedProgram`` for what comes back."""
    from .frontend import trace

    if not isinstance(mesh, MeshSpec):
        raise TypeError(f"mesh must be a shardgraph.MeshSpec, got {type(mesh).__name__}")
    if mesh.pp != 1:
        raise NotImplementedError(f"pipeline parallelism is not compiled yet (mesh has pp={mesh.pp})")
    traced = trace(model, tuple(example_inputs), loss_fn)
    program = compile_traced(traced, mesh, plan, batch_sharding=batch_sharding, link=link,
                             replicate_fallback=replicate_fallback)
    # Buffers (rotary tables, running statistics) are state, not batch: the program keeps the
    # model's own unless a call passes others.
    program.default_buffers = {name: buffer.detach() for name, buffer in model.named_buffers()}
    return program


def compile_traced(traced, mesh: MeshSpec, plan: Mapping[str, str] | None = None, *, batch_sharding=None, link=None,
                   replicate_fallback: bool = False) -> ShardedProgram:
    """The passes after tracing, for a graph traced already (``shardgraph.frontend.trace``)."""
    # Imported here: the passes import shardgraph's mesh and placement modules, so importing
    # them while shardgraph itself loads would be circular.
    from passes.bucket_gradient_sync import bucket_gradient_sync
    from passes.decompose_loss import decompose_loss
    from passes.lower_localize import lower_localize
    from passes.lower_moe import lower_moe
    from passes.lower_redistribute import lower_redistribute
    from passes.propagate import propagate

    graph = GraphModule(traced.graph_module, copy.deepcopy(traced.graph_module.graph))
    graph.meta.update(getattr(traced.graph_module, "meta", {}))
    graph = decompose_loss(graph)
    placed = propagate(_with_graph(traced, graph), mesh, plan, batch_sharding=batch_sharding, link=link,
                       replicate_fallback=replicate_fallback)
    lowered = GraphModule(placed.graph_module, copy.deepcopy(placed.graph_module.graph))
    lowered = lower_redistribute(lowered, mesh)
    lowered = lower_localize(lowered, mesh)
    lowered = lower_moe(lowered, mesh)
    lowered = bucket_gradient_sync(lowered)
    return ShardedProgram(traced, placed, lowered, mesh)


class _TracedView:
    """The traced program's names with a rewritten graph (propagation reads both)."""

    def __init__(self, traced, graph_module):
        self._traced = traced
        self.graph_module = graph_module

    def __getattr__(self, name):
        return getattr(self._traced, name)


def _with_graph(traced, graph_module):
    return _TracedView(traced, graph_module)
