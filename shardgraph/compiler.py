"""``shardgraph.compile``: trace, then the pass pipeline, then a program.

    traced   = trace(model, example_inputs, loss_fn)            # one forward+backward fx graph
    compiled = run_pipeline(traced.graph_module, options)       # passes/pipeline.py, in order:
    #   decompose_loss        mean losses as sum / count
    #   propagate             a placement on every value (the placed graph, kept for reports)
    #   add_communicator      the rank's communicator as the first input
    #   lower_redistribute    collectives where placements change; gradient sync at the output
    #   lower_localize        shape arguments to local sizes
    #   lower_moe             expert dispatch + grouped GEMMs
    #   bucket_gradient_sync  one all-reduce per gradient bucket
    return ShardedProgram(traced, compiled.placed, compiled.lowered, mesh)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from passes.pipeline import CompileOptions, run_pipeline

from .frontend import trace
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
    options = CompileOptions(mesh, plan, batch_sharding, link, replicate_fallback)
    compiled = run_pipeline(traced.graph_module, options)
    return ShardedProgram(traced, compiled.placed, compiled.lowered, mesh)
