"""Take a plain SGD step where its weight's gradient is made: in a grouped wgrad's epilogue, on
the embedding rows a batch looked up, or inside the fused output projection + loss op.

Reads
    a lowered training-step graph whose new parameters are written into the old ones
    (``donate_state``), holding for a weight ``W`` (a parameter placeholder), as the optimizer's
    trace and the lowering leave it:

        grad = shardgraph.grouped_mm_wgrad(x, dout, offsets, E, layout)        # an expert weight
            or aten.embedding_dense_backward(grad_output, indices, rows, padding_idx, False)
            or shardgraph.linear_cross_entropy(hidden, W, ...)[2]              # the output projection
               (read directly or through two transposes that cancel)
        new  = sub(W, mul(grad, lr_w))          # SGD, no momentum, no weight decay
        copy_(W, new)                           # donate_state
        sum(pow(grad, 2))                       # the gradient norm's term (grad cast to
                                                # float32 first where it is 16-bit)

    with ``lr_w`` a 0-dim value in ``W``'s dtype computed from placeholders only (the learning
    rate cast), and nothing else reading ``grad``.
Writes
    ``s = shardgraph.grouped_mm_wgrad_sgd_(W, x, dout, offsets, lr_w, E, layout, after)`` (or
    ``shardgraph.embedding_sgd_(W, grad_output, indices, lr_w, padding_idx, after)``) right after
    the last other reader of ``W`` (and after ``grad`` would have been computed): it updates ``W``
    in place and returns ``sum(float32(grad) ** 2)``, cast to the norm term's dtype in its place.
    The output projection's step is ``shardgraph.linear_cross_entropy_sgd_(hidden, W, ..., lr_w,
    after)`` in the fused loss op's place (every other reader of ``W`` must come before it): the
    same loss and hidden gradient, the norm's term as its third output. The parameter's output
    becomes None: the donated ``W`` holds its new value.
Assumes
    the graph is in execution order, and ``W`` is donated (the caller hands a tensor the step may
    overwrite). Anything else (a gradient that is reduced over ranks or read by a clipping
    factor, momentum, weight decay, AdamW, a tied embedding whose gradient is a sum, an
    embedding scaled by frequency, a norm term read before the gradient would exist, shapes that
    differ) leaves the graph as it is: the pass only ever removes work.

Why: the expert weights are most of an MoE model's parameters (2.4e9 of 3.1e9 in four layers of
Qwen3-30B-A3B). Unfused, the wgrad writes each gradient and the update reads it back with the
weight and writes the weight: three passes over the weight's size after the product. Fused, the
gradient never leaves the kernel: the update reads and writes the weight once, and the norm's
term comes from the same tile. The embedding's gradient is zero outside the looked-up rows (at
most one per token), and plain SGD leaves a row with a zero gradient as it is: the sparse step
(``kernels/embedding_sgd.py``) reads and writes those rows alone, where the dense one writes a
table-sized gradient and passes over the whole table three times (a 151936 x 2048 vocabulary
against 8192 rows per step). The output projection's gradient is summed in a float32 accumulator
inside the loss op: the step reads it there once, where the unfused graph casts it to the
weight's dtype and reads that for the step and again for the norm.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule, Node

import kernels  # noqa: F401 - registers torch.ops.shardgraph.grouped_mm_wgrad*, embedding_sgd_
import kernels.linear_cross_entropy  # noqa: F401 - registers torch.ops.shardgraph.linear_cross_entropy*
from shardgraph import meta
from shardgraph.fx_graph import ancestors, output_values, set_output_values
from shardgraph.meta import InputKind

from .donate_state import readers

__all__ = ["fuse_wgrad_sgd", "FUSED_OP", "EMBEDDING_OP", "OUTPUT_PROJECTION_OP"]

aten = torch.ops.aten
FUSED_OP = torch.ops.shardgraph.grouped_mm_wgrad_sgd_.default
EMBEDDING_OP = torch.ops.shardgraph.embedding_sgd_.default
OUTPUT_PROJECTION_OP = torch.ops.shardgraph.linear_cross_entropy_sgd_.default
_OUTPUT_PROJECTION = torch.ops.shardgraph.linear_cross_entropy.default
_WGRAD = torch.ops.shardgraph.grouped_mm_wgrad.default
_LR_OPS = (aten._to_copy.default, aten.clone.default, aten.alias.default)


def _only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _lr_chain(value: Node) -> list[Node] | None:
    """The nodes computing the learning rate ``value`` from placeholders (a cast or two), in
    order; None where it depends on anything else (it is moved before the gradient exists)."""
    if value.op == "placeholder":
        return []
    if value.op != "call_function" or value.target not in _LR_OPS:
        return None
    chain: list[Node] = []
    for argument in value.all_input_nodes:
        found = _lr_chain(argument)
        if found is None:
            return None
        chain.extend(found)
    return [*chain, value]


def _norm_term(grad: Node, step: Node) -> tuple[list[Node], Node] | None:
    """``(nodes, total)`` where ``grad``'s one other reader is the training step's gradient-norm
    term ``sum(pow(grad, 2))``, the gradient first cast to float32 where it is not already in it
    (as ``vector_norm`` computes a 16-bit tensor's norm); None otherwise."""
    others = [user for user in grad.users if user is not step]
    if len(others) != 1:
        return None
    square, nodes = others[0], []
    if square.target == aten._to_copy.default and square.args == (grad,) and square.kwargs == {"dtype": torch.float32}:
        nodes.append(square)
        square = _only_user(square)
    elif meta.tensor_value(grad) is None or meta.tensor_value(grad).dtype != torch.float32:
        return None
    if square is None or square.target != aten.pow.Tensor_Scalar or square.args[1:] != (2,) or square.kwargs:
        return None
    nodes.append(square)
    total = _only_user(square)
    if total is None or total.kwargs:
        return None
    if (total.target == aten.sum.default and total.args == (square,)) or (
            total.target == aten.sum.dim_IntList and total.args[0] is square and total.args[1:] in ((None,), ([],))):
        return nodes, total
    return None


def _returns_one_tensor(node: Node) -> bool:
    if meta.tensor_value(node) is not None:
        return True
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    returns = node.target._schema.returns
    return len(returns) == 1 and isinstance(returns[0].type, torch.TensorType)


def _same_piece(a: Node, b: Node) -> bool:
    """Whether two values are the same shape and dtype and placed alike (so the local pieces match)."""
    value_a, value_b = meta.tensor_value(a), meta.tensor_value(b)
    if value_a is None or value_b is None or value_a.shape != value_b.shape or value_a.dtype != value_b.dtype:
        return False
    placed_a, placed_b = meta.placed(a), meta.placed(b)
    return placed_a is None or placed_b is None or placed_a.sharding == placed_b.sharding


@dataclass
class _Site:
    """Where a fused step goes and what it replaces.

    ``op(*arguments(weight, lr, after))`` takes the step; ``inputs`` are its operands (what it
    already depends on); ``gradient`` lists the nodes computing the gradient, erased once unread
    (last first). ``replaces``: a multi-output op the fused one stands in for (it returns that
    op's other outputs, the norm's term in the gradient's place); None where the fused op
    returns the norm's term alone and goes after the gradient's producer."""

    op: torch._ops.OpOverload
    inputs: list[Node]
    arguments: Callable[[Node, Node, list[Node]], tuple]
    gradient: list[Node]
    replaces: Node | None = None


def _wgrad_site(grad: Node) -> _Site | None:
    x, dout, offsets, num_groups, layout = grad.args
    return _Site(FUSED_OP, [x, dout, offsets],
                 lambda weight, lr, after: (weight, x, dout, offsets, lr, num_groups, layout, after), [grad])


def _embedding_site(grad: Node) -> _Site | None:
    grad_output, indices, _, padding_idx, scale_grad_by_freq = grad.args
    if scale_grad_by_freq:  # the gradient depends on the counts, not the rows alone
        return None
    return _Site(EMBEDDING_OP, [grad_output, indices],
                 lambda weight, lr, after: (weight, grad_output, indices, lr, padding_idx, after), [grad])


def _output_projection_site(grad: Node) -> _Site | None:
    """The weight gradient of ``linear_cross_entropy`` (its third output), read directly or
    through two transposes that cancel (the trace of ``logits = hidden @ weight.t()``)."""
    chain = [grad]
    if grad.target == aten.t.default and isinstance(grad.args[0], Node) and grad.args[0].target == aten.t.default \
            and _only_user(grad.args[0]) is grad:
        chain += [grad.args[0], grad.args[0].args[0]]
    item = chain[-1]
    if not isinstance(item, Node) or item.target is not operator.getitem or item.args[1] != 2 \
            or (item is not grad and _only_user(item) is not chain[-2]):
        return None
    fused_loss = item.args[0]
    if fused_loss.target != _OUTPUT_PROJECTION:
        return None
    hidden, _, target, grad_scale, ignore_index, chunk_rows, loss_dtype = fused_loss.args
    return _Site(OUTPUT_PROJECTION_OP, [hidden, target, grad_scale],
                 lambda weight, lr, after: (hidden, weight, target, grad_scale, ignore_index, chunk_rows, loss_dtype,
                                            lr, after), chain, replaces=fused_loss)


def _site(grad: Node) -> _Site | None:
    if grad.op != "call_function":
        return None
    if grad.target == _WGRAD:
        return _wgrad_site(grad)
    if grad.target == aten.embedding_dense_backward.default:
        return _embedding_site(grad)
    return _output_projection_site(grad)


def fuse_wgrad_sgd(gm: GraphModule) -> GraphModule:
    graph = gm.graph
    parameters = {node for node, _ in meta.graph_inputs(graph, InputKind.PARAMETER)}
    order = {node: index for index, node in enumerate(graph.nodes)}
    fused_any = False
    for write in list(graph.nodes):
        if write.op != "call_function" or write.target != aten.copy_.default:
            continue
        weight, new = write.args
        if weight not in parameters or not isinstance(new, Node) or new.target != aten.sub.Tensor \
                or new.args[0] is not weight or new.kwargs or _only_user(new) is not write:
            continue
        step = new.args[1]
        if not isinstance(step, Node) or step.target != aten.mul.Tensor or _only_user(step) is not new:
            continue
        # The learning rate is the operand computed from placeholders alone.
        grad, lr = step.args if isinstance(step.args[1], Node) and _lr_chain(step.args[1]) is not None \
            else step.args[::-1]
        if not isinstance(grad, Node) or not isinstance(lr, Node):
            continue
        site = _site(grad)
        if site is None:
            continue
        lr_value, weight_value = meta.tensor_value(lr), meta.tensor_value(weight)
        lr_chain = _lr_chain(lr)
        if lr_value is None or weight_value is None or lr_value.dim() != 0 or lr_value.dtype != weight_value.dtype \
                or lr_chain is None or not _same_piece(grad, weight):
            continue
        norm = _norm_term(grad, step)
        if norm is None:
            continue
        norm_nodes, total = norm
        # After the gradient's inputs and every other reader of the old weight (the forward
        # product, the dgrad), before anything reads the norm term.
        others = [r for r in readers(weight) if r not in (new, write, step, site.replaces) and r.op != "output"]
        anchor = max([grad, *others], key=order.__getitem__)
        if any(order[user] <= order[anchor] for user in total.users):
            continue
        # A fused op that replaces its gradient's producer goes in its place: every other reader
        # of the old weight must come before it.
        if site.replaces is not None and any(order[r] >= order[site.replaces] for r in others):
            continue
        # Readers of the old weight that the step's inputs do not already depend on (the dgrad,
        # a sibling of the wgrad) become its ``after`` operands: a data dependency, so that
        # torch.compile, free to reorder a functional graph, keeps them before the update and
        # can then write the donated weight in place instead of cloning it first.
        inputs_from = ancestors(site.inputs)
        after = [r for r in others if r not in inputs_from]
        if not all(_returns_one_tensor(r) for r in after):
            continue
        # The learning-rate cast, replayed where the fused op needs it (each copy after the last:
        # fx inserts every node of one inserting_after block right after its anchor).
        # In the replaced op's place, each node before it (so in order), or else after the last.
        def insertion(point):
            return graph.inserting_before(site.replaces) if site.replaces is not None else graph.inserting_after(point)

        copies, point = {}, anchor
        for node in lr_chain:
            with insertion(point):
                copies[node] = point = graph.node_copy(node, lambda n: copies.get(n, n))
            meta.copy_node_records(node, copies[node])
        with insertion(point):
            fused = graph.call_function(site.op, site.arguments(weight, copies.get(lr, lr), after))
        meta.copy_source_location(grad, fused)
        total_value = meta.tensor_value(total)
        with total_value.fake_mode:
            squares_value = torch.empty((), dtype=torch.float32, device=total_value.device)
        # A sum of squares of the local piece: placed as the unfused term is (partial where the
        # gradient is split, then reduced as before).
        record = meta.placed(total)
        squares = fused
        if site.replaces is None:
            meta.set_value(fused, squares_value)
            if record is not None:
                meta.set_placed(fused, record)
        else:
            # The replaced op's other outputs come from the fused one, the norm's term third.
            meta.copy_node_records(site.replaces, fused)
            meta.set_value(fused, (*meta.value(site.replaces)[:2], squares_value))
            replaced_record = meta.placed(site.replaces)
            if replaced_record is not None and record is not None:
                meta.set_placed(fused, dataclasses.replace(
                    replaced_record, sharding=(*replaced_record.sharding[:2], record.sharding)))
            site.replaces.replace_all_uses_with(fused)
            with graph.inserting_after(fused):
                squares = graph.call_function(operator.getitem, (fused, 2))
            meta.copy_node_records(total, squares)
            meta.set_value(squares, squares_value)
        with graph.inserting_after(squares):
            term = graph.call_function(aten._to_copy.default, (squares,), {"dtype": total_value.dtype})
        meta.copy_node_records(total, term)
        total.replace_all_uses_with(term)
        # The parameter's output is None: "updated in place, the donated tensor is the new value"
        # (TrainingProgram takes the input). Returning the input itself would be a read of it
        # after the kernel, which keeps torch.compile from updating it in place (it would clone
        # the weight before the kernel and copy it back after).
        set_output_values(graph, [None if value is write else value for value in output_values(graph)])
        gone = [write, new, step, total, *reversed(norm_nodes), *site.gradient, *reversed(lr_chain)]
        for node in gone + ([site.replaces] if site.replaces is not None else []):
            if not node.users:
                graph.erase_node(node)
        order = {node: index for index, node in enumerate(graph.nodes)}
        fused_any = True
    if fused_any:
        gm.recompile()
    return gm
