"""``shardgraph.compile``: trace, then the pass pipeline, then a program.

    traced   = trace(model, example_inputs, loss_fn)            # one forward+backward fx graph
    compiled = run_pipeline(traced.graph_module, options)       # passes/pipeline.py, in order:
    #   decompose_split_norms norms whose weight the plan splits as aten ops
    #   decompose_loss        mean losses as sum / count
    #   recompute             activations recomputed in the backward (option)
    #   gather_parameters     zero=3: parameters gathered before their readers
    #   pad_parameters        zero>=1: state (zero=3: parameters) that dp/edp divides unevenly held padded
    #   propagate             a placement on every value (the placed graph, kept for reports)
    #   add_communicator      the rank's communicator as the first input
    #   lower_redistribute    collectives where placements change; gradient sync at the output
    #   exact_partial_reductions  partial products on the way into routing in float32, rounded once
    #   lower_localize        shape arguments to local sizes
    #   lower_moe             expert dispatch + grouped GEMMs
    #   fuse_linear_cross_entropy  output projection + loss + backward as one chunked op (option)
    #   bucket_gradient_sync  one all-reduce per gradient bucket
    #   cast_gradient_reductions  gradients reduced in reduce_dtype (option)
    #   donate_state          a training step's new state written into the old (option)
    #   fuse_wgrad_sgd        plain SGD steps where their gradients are made: expert wgrad epilogue,
    #                         embedding rows, fused loss op (option)
    return ShardedProgram(traced, compiled.placed, compiled.lowered, mesh)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from passes.optimizer_sharding import check_zero_stage
from passes.recompute import check_recompute_policy
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
    optimizer=None,
    clip_grad_norm: float | None = None,
    compute_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    donate_state: bool = True,
    zero: int = 0,
    recompute: str = "none",
    reshard_after_forward: bool = True,
    fused_loss: bool = True,
    loss_chunk_bytes: int | None = None,
    fused_update: bool = True,
) -> ShardedProgram:
    """Compile ``model`` for ``mesh``; see ``ShardedProgram`` for what comes back.

    With an ``optimizer`` (``shardgraph.optim.SGD`` / ``AdamW``) the program is the whole
    training step, a ``TrainingProgram``: the update, the gradient norm and the clipping
    (``clip_grad_norm``) are nodes of the graph, placed and lowered like the rest.
    ``compute_dtype=torch.bfloat16`` computes forward and backward in bf16 from the parameters
    kept in the model's dtype (fp32 master weights, fp32 gradients and optimizer state).
    ``reduce_dtype`` (``torch.bfloat16`` or ``torch.float32``) is the dtype gradients are summed in
    across ranks; by default each is reduced in its own dtype. A training step with
    ``donate_state`` (the default) writes the new parameters and optimizer state into the
    tensors of the state it is given, which is then consumed (as ``jax.jit``'s
    ``donate_argnums``): a step needs no second copy of the weights and state. ``zero=1``
    splits the optimizer state over the data-parallel axes (dp for dense parameters, edp for
    experts; ZeRO stage 1): gradients are reduce-scattered to the state's slices, updated there,
    and the new parameters all-gathered. ``zero=3`` (FSDP) holds the parameters split that way
    too: each is all-gathered right before its forward readers and, with
    ``reshard_after_forward`` (the default), again before its backward readers, so no layer's
    whole weights outlive their use; the update writes each rank's slice and nothing is gathered
    after it. ``recompute="selective"`` recomputes each layer's
    elementwise, norm and routing ops in the backward instead of keeping their outputs;
    ``"full"`` recomputes the whole layer from its input. ``fused_loss`` (on by default) computes a
    cross-entropy over a linear layer's output, with its backward, as one op over chunks of rows
    (``passes/fuse_linear_cross_entropy.py``), so the whole logits are never held; where the
    pattern does not match exactly the graph is left as traced. ``loss_chunk_bytes`` bounds the
    memory that op's chunk of logits takes (default 2 GiB,
    ``kernels.linear_cross_entropy.DEFAULT_CHUNK_BYTES``): fewer, larger chunks are faster, since
    each chunk passes once over a float32 copy of the output layer's weight gradient.
    ``fused_update`` (on by default) takes a donated plain SGD step (no momentum, no weight decay,
    no clipping) on an expert weight whose gradient no collective reduces inside its grouped
    wgrad kernel (``passes/fuse_wgrad_sgd.py``): the gradient is never written, and the update
    and the norm's term come from the kernel's tiles; likewise an embedding's step on its
    looked-up rows alone and the output projection's inside the fused loss op."""
    check_recompute_policy(recompute, "compile: recompute")
    check_zero_stage(zero, "compile: zero")
    if zero == 1 and optimizer is None:
        raise ValueError("compile: zero=1 shards optimizer state; pass an optimizer (zero=3 without one compiles "
                         "the gradient program with parameters and gradients split over the data-parallel axes)")
    _check_dtype_option("reduce_dtype", reduce_dtype)
    # Options are checked before tracing, so that a bad one loses no work (compile_traced checks
    # them again for callers that trace themselves).
    _check_flags(reshard_after_forward=reshard_after_forward, fused_update=fused_update)
    _check_loss_chunk_bytes(loss_chunk_bytes)
    if not isinstance(mesh, MeshSpec):
        raise TypeError(f"mesh must be a shardgraph.MeshSpec, got {type(mesh).__name__}")
    if mesh.pp != 1:
        raise NotImplementedError(f"pipeline parallelism is not compiled yet (mesh has pp={mesh.pp})")
    _refuse_empty_batch(model, tuple(example_inputs))
    traced = trace(model, tuple(example_inputs), loss_fn, optimizer=optimizer, clip_grad_norm=clip_grad_norm,
                   compute_dtype=compute_dtype)
    _refuse_empty_values(traced)
    program = compile_traced(traced, mesh, plan, batch_sharding=batch_sharding, link=link,
                             replicate_fallback=replicate_fallback, reduce_dtype=reduce_dtype,
                             donate_state=donate_state and optimizer is not None, zero=zero, recompute=recompute,
                             reshard_after_forward=reshard_after_forward,
                             fused_loss=fused_loss, loss_chunk_bytes=loss_chunk_bytes, fused_update=fused_update)
    # Buffers (rotary tables, running statistics) are state, not batch: the program keeps the
    # model's own unless a call passes others. Checkpoints hold the persistent ones only, as
    # the model's state_dict does.
    program.default_buffers = {name: buffer.detach() for name, buffer in model.named_buffers()}
    persistent = set(model.state_dict(keep_vars=True))
    program.persistent_buffer_names = [name for name in program.buffer_names if name in persistent]
    return program


def _check_dtype_option(name: str, dtype) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"compile: {name} must be a floating-point torch.dtype (torch.bfloat16, torch.float32), "
                         f"got {dtype!r}")


def _refuse_empty_batch(model: torch.nn.Module, example_inputs: tuple) -> None:
    """An example input with a zero-size dim compiles to a program with no rows to split or
    count; placement rules assume at least one element per dim, so refuse it here, by name."""
    from .frontend.trace import _input_names

    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    if len(tensors) != len(example_inputs):
        return  # trace names the input that is not a tensor
    for name, tensor in zip(_input_names(model, len(tensors), None), tensors):
        if tensor.numel() == 0:
            dims = [d for d, size in enumerate(tensor.shape) if size == 0]
            raise ValueError(f"compile: batch input {name!r} has shape {tuple(tensor.shape)}, empty along dim "
                             f"{dims[0]}; a program is compiled for a non-empty batch (every dim at least 1)")


def _refuse_empty_values(traced) -> None:
    """A value computed from the batch that has no elements and that the loss counts (a next-token
    loss on sequences of length 1 keeps ``seq - 1 = 0`` positions) leaves the loss an average over
    nothing, and no placement rule splits a zero-size dim: refuse it with the op and the model's
    source line.

    Empty values the loss does not count are fine: a pass-through slice ``q[..., rotary_dim:]``
    is empty when the rotary embedding covers the whole head, and is concatenated back onto the
    rotated part. An empty value counts when it is reduced into a non-empty one with nothing else
    from the batch (a sum, a mean or a loss over zero positions, a product over a zero-size
    contraction) on the way to the loss, or when the loss itself is empty."""
    from . import meta
    from .meta import InputKind

    def elements(node) -> int | None:
        found = meta.value(node) if meta.has_value(node) else None
        tensors = [found] if isinstance(found, torch.Tensor) else [
            t for t in (found if isinstance(found, (tuple, list)) else ()) if isinstance(t, torch.Tensor)]
        return sum(t.numel() for t in tensors) if tensors else None

    graph = traced.graph_module.graph
    from_batch = {node for node, _ in meta.graph_inputs(graph, InputKind.INPUT)}
    empty = set()
    for node in graph.nodes:
        if node.op != "call_function" or not any(source in from_batch for source in node.all_input_nodes):
            continue
        from_batch.add(node)
        if elements(node) == 0:
            empty.add(node)
    if not empty:
        return
    outputs = next(n for n in graph.nodes if n.op == "output").args[0]
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    roots = [outputs[0]] if getattr(traced, "has_loss", True) else list(outputs)
    feeds_loss, pending = set(), [n for n in roots if isinstance(n, torch.fx.Node)]
    while pending:
        node = pending.pop()
        if node not in feeds_loss:
            feeds_loss.add(node)
            pending.extend(node.all_input_nodes)
    counted = set()
    for node in graph.nodes:
        if node not in feeds_loss or node not in from_batch:
            continue
        batch_inputs = [source for source in node.all_input_nodes if source in from_batch]
        made_from_nothing = (node not in empty and batch_inputs and all(source in empty for source in batch_inputs))
        if node in empty and node in roots or made_from_nothing:
            # Every empty value that leads into it counts, back to the first one.
            pending = [node] if node in empty else list(batch_inputs)
            while pending:
                source = pending.pop()
                if source in empty and source not in counted:
                    counted.add(source)
                    pending.extend(source.all_input_nodes)
    for node in graph.nodes:
        if node not in counted:
            continue
        value = meta.tensor_value(node)
        empty_shape = tuple(value.shape) if value is not None else "()"
        shapes = ", ".join(f"{name!r} {shape}" for name, shape in traced.input_shapes.items())
        source = meta.source_line(node)
        where = "in the model or its loss_fn" if source.startswith("(") else f"at {source}"
        raise ValueError(
            f"compile: {node.name} ({node.target}) {where} is empty (shape "
            f"{empty_shape}) for the batch {shapes}: the loss would count zero positions "
            f"(a next-token loss needs sequences of length 2 or more); compile for a longer batch")


def _check_flags(**flags) -> None:
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"compile: {name} must be True or False, got {flag!r}")


def _check_loss_chunk_bytes(loss_chunk_bytes) -> None:
    if loss_chunk_bytes is not None and (isinstance(loss_chunk_bytes, bool) or not isinstance(loss_chunk_bytes, int)
                                         or loss_chunk_bytes < 1):
        raise ValueError(f"compile: loss_chunk_bytes must be a positive number of bytes (or None for the default), "
                         f"got {loss_chunk_bytes!r}")


def compile_traced(traced, mesh: MeshSpec, plan: Mapping[str, str] | None = None, *, batch_sharding=None, link=None,
                   replicate_fallback: bool = False, reduce_dtype: torch.dtype | None = None,
                   donate_state: bool = False, zero: int = 0, recompute: str = "none",
                   reshard_after_forward: bool = True, fused_loss: bool = True,
                   loss_chunk_bytes: int | None = None, fused_update: bool = True) -> ShardedProgram:
    """The passes after tracing, for a graph traced already (``shardgraph.frontend.trace``)."""
    _check_flags(reshard_after_forward=reshard_after_forward, fused_update=fused_update)
    _check_loss_chunk_bytes(loss_chunk_bytes)
    options = CompileOptions(mesh, plan, batch_sharding, link, replicate_fallback, reduce_dtype, donate_state,
                             zero=zero, recompute=recompute, reshard_after_forward=reshard_after_forward,
                             fused_loss=fused_loss, loss_chunk_bytes=loss_chunk_bytes, fused_update=fused_update)
    compiled = run_pipeline(traced.graph_module, options)
    _refuse_inexact_padding(getattr(traced, "optimizer", None), compiled.placed)
    if getattr(traced, "optimizer", None) is not None:
        from .training import TrainingProgram

        return TrainingProgram(traced, compiled.placed, compiled.lowered, mesh, donates_state=options.donate_state)
    return ShardedProgram(traced, compiled.placed, compiled.lowered, mesh)


def _refuse_inexact_padding(optimizer, placed) -> None:
    """A state held padded (``passes/pad_parameters.py``) stays zero in its padding only if the
    update maps zeros to zeros: AdamW with ``eps=0`` divides zero by zero there."""
    padded = sorted(placed.state_paddings)
    if padded and optimizer is not None and getattr(optimizer, "eps", None) == 0:
        raise ValueError(f"compile: {optimizer.name}(eps=0) would write 0/0 into the padding of {padded[0]!r} (held "
                         f"padded {placed.state_paddings[padded[0]]!r}, since its data-parallel axis divides none of "
                         f"its free dims); use eps > 0, or zero=0, or a mesh whose dp/edp divides the parameter")
