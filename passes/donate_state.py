"""Write a training step's new parameters and optimizer state into the tensors they replace.

Reads
    a lowered training-step graph: output roles ``param`` (the new value of a parameter) and
    ``state`` (the new value of one optimizer state slot), and the placeholders of those
    parameters (``InputKind.PARAMETER``) and slots (``InputKind.OPTIMIZER_STATE``, named
    ``"<parameter>:<slot>"``).
Writes
    for each such output, an ``aten.copy_`` of the new value into its placeholder, placed after
    the new value exists and after the last other reader of the old one; the output then returns
    the placeholder (what ``copy_`` returns). The new value is dead right after its copy, so it is
    freed as the step goes instead of living to the end beside the old one.
Assumes
    the caller hands each step tensors it may overwrite and does not read the old state again
    (as ``jax.jit``'s ``donate_argnums``; ``TrainingProgram`` marks a donated ``TrainState``
    consumed and refuses to step on it twice). The new value has the placeholder's local shape
    and dtype: optimizer state is placed like its parameter, and the master weights keep their
    dtype under ``compute_dtype``.

Why: without it a step holds old and new parameters and state at once (about 24 bytes per
parameter for fp32 master weights with AdamW against the 16 an in-place optimizer needs), which
is what decides whether a model fits on the GPU.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from shardgraph import meta
from shardgraph.fx_graph import output_values, set_output_values
from shardgraph.meta import InputKind
from shardgraph.runtime import c10d

__all__ = ["donate_state", "donated_outputs", "readers"]


def donated_outputs(gm: GraphModule) -> dict[int, Node]:
    """Output position -> the placeholder that position's new value replaces."""
    placeholders = {}
    for node, record in meta.graph_inputs(gm.graph):
        if record.kind in (InputKind.PARAMETER, InputKind.OPTIMIZER_STATE):
            placeholders[record.name] = node
    found = {}
    for position, role in enumerate(meta.output_roles(gm)):
        if role.kind == "param":
            found[position] = placeholders[role.parameter]
        elif role.kind == "state":
            found[position] = placeholders[f"{role.parameter}:{role.path}"]
    return found


def _may_alias_input(node: Node) -> bool:
    """Whether ``node``'s result may share memory with an input: aten views (their schema says
    so), ``getitem`` and any function whose schema is unknown (the runtime's own functions, some
    of which return views). Unknown counts as aliasing: a late copy costs memory, an early one
    would change a value still to be read."""
    if node.op != "call_function":
        return False
    if c10d.is_issue(node):
        # A collective reads its input until its wait_tensor: the wait is a reader too.
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return any(r.alias_info is not None and not r.alias_info.is_write for r in node.target._schema.returns)
    return True


def readers(placeholder: Node) -> list[Node]:
    """Every node that reads the placeholder's memory: its users, and the users of any value
    that may alias it (a transposed weight read by the backward's matmul)."""
    seen, stack, found = {placeholder}, [placeholder], []
    while stack:
        for user in stack.pop().users:
            if user in seen:
                continue
            seen.add(user)
            found.append(user)
            if _may_alias_input(user):
                stack.append(user)
    return found


def donate_state(gm: GraphModule) -> GraphModule:
    graph = gm.graph
    targets = donated_outputs(gm)
    if not targets:
        return gm
    order = {node: index for index, node in enumerate(graph.nodes)}
    values = output_values(graph)
    for position, placeholder in targets.items():
        value = values[position]
        if value is placeholder:  # returned unchanged: nothing to write
            continue
        if not isinstance(value, Node) or value.op == "placeholder":
            raise ValueError(f"donate_state: output {position} ({meta.output_roles(gm)[position]}) is "
                             f"{value}, not a value the step computes")
        old_readers = [user for user in readers(placeholder) if user.op != "output"]
        anchor = max([value, *old_readers], key=order.__getitem__)
        with graph.inserting_after(anchor):
            write = graph.call_function(torch.ops.aten.copy_.default, (placeholder, value))
        # The copy holds the parameter's piece, placed as the parameter is.
        meta.copy_source_info(value, write)
        record = meta.placed(placeholder)
        if record is not None:
            meta.set_placed(write, record)
        order[write] = order[anchor] + 0.5
        values[position] = write
    set_output_values(graph, values)
    gm.recompile()
    return gm
