"""Fuse the output projection, its cross-entropy loss and their backward into one chunked op.

Reads
    a lowered, localized graph (shape arguments in local sizes, a PlacedValue and a global fake
    value on every node) holding, as make_fx traces ``F.cross_entropy(hidden @ W.T)``:

        logits = mm(h, t(W))  ─ row ops ─▶  _log_softmax  ─▶  nll_loss_forward  ─▶ loss, count
        nll_loss_backward(grad_out, ...) ─▶ _log_softmax_backward_data ─ row ops ─▶ G
        mm(t(G), h) = grad W            mm(G, t(t(W))) = grad h

    where the row ops are views, reshapes, slices on a leading dim, clones and dtype casts that
    leave the vocabulary dim alone (a next-token loss slices off the last position), and the
    backward's row ops are the forward's adjoints in reverse.
Writes
    ``shardgraph.linear_cross_entropy(rows(h), W, target, grad_scale, ...)`` (kernels/
    linear_cross_entropy.py) in place of all of it: the forward row ops replayed on ``h`` with
    the hidden width for the vocabulary, the loss sum and both gradients from one loop over row
    chunks, the gradient of ``rows(h)`` taken back through the backward row ops. The count of
    counted rows becomes ``sum(target != ignore_index)``, and a scalar ``ones_like`` of the loss
    (the seed of the backward) becomes a ``new_ones``, so the op (which needs the backward's
    ``grad_scale = grad_out / total_weight``) depends on nothing computed from the loss; the
    loss's readers move after the op.
Assumes
    the graph is in execution order; nothing but the pattern reads the logits, the log-softmax or
    the logits' gradient. Anything else (a vocabulary-sharded weight or logits, a collective
    between the ops, class weights, ``reduction="none"``, label smoothing or a z-loss reading the
    log-softmax or the logits, a bias) leaves the graph as it is.

Why: the unfused program holds the ``[tokens, vocab]`` logits, their log-softmax and their
gradient (151936 columns x 8192 tokens is 5 GB in float32 for each); the fused op holds one
chunk of rows at a time.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from kernels.linear_cross_entropy import DEFAULT_CHUNK_BYTES, chunk_rows_for_budget
from shardgraph import meta
from shardgraph.fx_graph import descendants
from shardgraph.mesh import MeshSpec
from shardgraph.meta import PlacedValue, View
from shardgraph.placement import local_shape

__all__ = ["fuse_linear_cross_entropy", "FUSED_OP"]

aten = torch.ops.aten
FUSED_OP = torch.ops.shardgraph.linear_cross_entropy.default
_MEAN, _SUM = 1, 2

_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.view_copy.default)
_CLONES = (aten.clone.default, aten.contiguous.default)
_CAST = aten._to_copy.default
_FORWARD_ROW_OPS = (*_VIEWS, aten.slice.Tensor, *_CLONES, _CAST)
_BACKWARD_ROW_OPS = (*_VIEWS, aten.slice_backward.default, *_CLONES, _CAST)
_SCALAR_LIKE = {aten.ones_like.default: (aten.new_ones.default, None), aten.zeros_like.default: (
    aten.new_zeros.default, None), aten.full_like.default: (aten.new_full.default, 1)}


@dataclass
class _Match:
    mm: Node  # logits = mm(hidden, weight_t)
    hidden: Node
    weight_t: Node  # t(weight)
    weight: Node  # [V, H]
    forward_ops: list[Node]  # mm's output to the log-softmax's input, in order
    log_softmax: Node
    nll: Node
    nll_backward: Node
    log_softmax_backward: Node
    backward_ops: list[Node]  # the log-softmax backward's output to G, in order
    grad_weight_mm: Node  # mm(t(G), hidden): [V, H]
    grad_weight_t: Node  # t(G)
    grad_hidden_mm: Node  # mm(G, t(weight_t)): [T, H]
    loss_items: list[Node]  # getitem(nll, 0)
    count_items: list[Node]  # getitem(nll, 1)
    scalar_seeds: list[Node]  # ones_like(...) of a value made from the loss, read by the backward
    target: Node
    ignore_index: int
    forward_reduction: int
    backward_reduction: int


def _argument(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _shape(node: Node) -> tuple[int, ...] | None:
    found = meta.tensor_value(node)
    return tuple(found.shape) if found is not None else None


def _only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _leaves_last_dim(node: Node, vocab: int) -> bool:
    """A row op that keeps the vocabulary as its (whole) last dim, in and out."""
    shape, source = _shape(node), _shape(node.args[0])
    if shape is None or source is None or not shape or not source or shape[-1] != vocab or source[-1] != vocab:
        return False
    if node.target in _VIEWS:
        sizes = node.args[1]
        return isinstance(sizes, (list, tuple)) and len(sizes) > 0 and sizes[-1] == vocab
    if node.target == aten.slice.Tensor:
        return _argument(node, 1, "dim", 0) % len(source) != len(source) - 1
    if node.target == aten.slice_backward.default:
        return node.args[2] % len(shape) != len(shape) - 1 and list(node.args[1])[-1] == vocab
    if node.target == _CAST:
        return set(node.kwargs) <= {"dtype"} and meta.tensor_value(node).dtype.is_floating_point
    return node.target in _CLONES


def _sharding_keeps_vocab_whole(node: Node) -> bool:
    """No partial sum, and the last (vocabulary) dim split over no axis."""
    sharding = meta.sharding(node)
    shape = _shape(node)
    if sharding is None or shape is None:
        return sharding is None
    for _, placement in sharding.items():
        if placement.is_partial() or (placement.is_shard() and placement.dim % len(shape) == len(shape) - 1):
            return False
    return True


def _slice_arguments(node: Node, rank: int) -> tuple:
    """(dim, start, end, step) of a forward ``slice`` or a ``slice_backward``."""
    if node.target == aten.slice.Tensor:
        dim, start, end, step = (_argument(node, 1, "dim", 0), _argument(node, 2, "start"),
                                 _argument(node, 3, "end"), _argument(node, 4, "step", 1))
    else:
        dim, start, end, step = node.args[2:6]
    return dim % rank, start or 0, end, step


def _adjoint(forward_ops: list[Node], backward_ops: list[Node]) -> bool:
    """The backward row ops undo the forward ones in reverse: views to the forward input's shape,
    ``slice_backward`` for each ``slice`` with the same bounds (clones and casts aside)."""
    forward = [n for n in forward_ops if n.target in _VIEWS or n.target == aten.slice.Tensor]
    backward = [n for n in backward_ops if n.target in _VIEWS or n.target == aten.slice_backward.default]
    if len(forward) != len(backward):
        return False
    for f, b in zip(reversed(forward), backward):
        if _shape(b) != _shape(f.args[0]):
            return False
        if (f.target in _VIEWS) != (b.target in _VIEWS):
            return False
        if f.target == aten.slice.Tensor:
            rank = len(_shape(f.args[0]))
            if _slice_arguments(f, rank) != _slice_arguments(b, rank):
                return False
    return True


def _ancestors_reach(starts: list[Node], forbidden: set[Node], cut: set[Node]) -> bool:
    seen, pending = set(), list(starts)
    while pending:
        node = pending.pop()
        if node in seen or node in cut:
            continue
        if node in forbidden:
            return True
        seen.add(node)
        pending.extend(node.all_input_nodes)
    return False


def _match(nll: Node) -> _Match | None:
    log_softmax, target = nll.args[0], nll.args[1]
    if _argument(nll, 2, "weight") is not None:
        return None
    forward_reduction = _argument(nll, 3, "reduction", _MEAN)
    ignore_index = _argument(nll, 4, "ignore_index", -100)
    if forward_reduction not in (_MEAN, _SUM) or not isinstance(log_softmax, Node):
        return None
    if log_softmax.target != aten._log_softmax.default or _argument(log_softmax, 2, "half_to_float", False):
        return None
    logits_rows = log_softmax.args[0]
    shape = _shape(logits_rows)
    if shape is None or len(shape) != 2 or log_softmax.args[1] % 2 != 1:
        return None
    vocab = shape[1]
    # The log-softmax is read by the loss and its backward only (label smoothing reads it too).
    readers = {u.target: u for u in log_softmax.users}
    if len(log_softmax.users) != 3 or set(readers) != {aten.nll_loss_forward.default, aten.nll_loss_backward.default,
                                                       aten._log_softmax_backward_data.default}:
        return None
    nll_backward, log_softmax_backward = (readers[aten.nll_loss_backward.default],
                                          readers[aten._log_softmax_backward_data.default])
    if readers[aten.nll_loss_forward.default] is not nll:
        return None
    grad_out, _, backward_target, backward_weight, backward_reduction, backward_ignore, _ = nll_backward.args[:7]
    if (backward_target is not target or backward_weight is not None or backward_ignore != ignore_index
            or backward_reduction not in (_MEAN, _SUM) or nll_backward.args[1] is not log_softmax):
        return None
    if (log_softmax_backward.args[0] is not nll_backward or log_softmax_backward.args[1] is not log_softmax
            or list(nll_backward.users) != [log_softmax_backward]):
        return None
    if not all(u.target is operator.getitem and u.args[1] in (0, 1) for u in nll.users):
        return None
    # Forward row ops, walked back from the log-softmax's input to the matrix product.
    forward_ops, node = [], logits_rows
    while node.target in _FORWARD_ROW_OPS:
        if len(node.users) != 1 or not _leaves_last_dim(node, vocab):
            return None
        forward_ops.insert(0, node)
        node = node.args[0]
    mm = node
    if mm.target != aten.mm.default or len(mm.users) != 1 or _shape(mm)[-1] != vocab:
        return None
    hidden, weight_t = mm.args
    if weight_t.target != aten.t.default or _shape(weight_t.args[0]) != (vocab, _shape(hidden)[-1]):
        return None
    weight = weight_t.args[0]
    # Backward row ops, walked forward from the log-softmax backward to G.
    backward_ops, node = [], log_softmax_backward
    while (following := _only_user(node)) is not None and following.target in _BACKWARD_ROW_OPS:
        if not _leaves_last_dim(following, vocab):
            return None
        backward_ops.append(following)
        node = following
    grad_logits = node
    if _shape(grad_logits) != _shape(mm) or not _adjoint(forward_ops, backward_ops):
        return None
    grad_weight_t = grad_weight_mm = grad_hidden_mm = None
    for user in grad_logits.users:
        if user.target == aten.t.default and len(user.users) == 1:
            product = _only_user(user)
            if product.target == aten.mm.default and product.args == (user, hidden):
                grad_weight_t, grad_weight_mm = user, product
                continue
        if (user.target == aten.mm.default and user.args[0] is grad_logits and user.args[1].target == aten.t.default
                and _same_value(user.args[1].args[0], weight_t)):
            grad_hidden_mm = user
            continue
        return None
    if grad_weight_mm is None or grad_hidden_mm is None or len(grad_logits.users) != 2:
        return None
    if not all(_sharding_keeps_vocab_whole(n) for n in (mm, *forward_ops, log_softmax, grad_logits, hidden)):
        return None
    weight_sharding = meta.sharding(weight)
    if weight_sharding is not None and not weight_sharding.is_replicated():
        return None
    loss_items = [u for u in nll.users if u.args[1] == 0]
    count_items = [u for u in nll.users if u.args[1] == 1]
    # The op runs where the backward's grad_out and total weight are known: they may read the
    # count (rewritten from the target) and a ones_like of the loss (its shape only), nothing else
    # made from the loss.
    from_loss = {nll}.union(*(descendants([item]) for item in loss_items))
    seeds = [n for n in from_loss if n.target in _SCALAR_LIKE and _shape(n) == () and n.args
             and isinstance(n.args[0], Node)]
    if _ancestors_reach([grad_out, nll_backward.args[6]], from_loss, set(count_items) | set(seeds)):
        return None
    return _Match(mm, hidden, weight_t, weight, forward_ops, log_softmax, nll, nll_backward, log_softmax_backward,
                  backward_ops, grad_weight_mm, grad_weight_t, grad_hidden_mm, loss_items, count_items, seeds,
                  target, ignore_index, forward_reduction, backward_reduction)


def _same_value(left, right) -> bool:
    """Whether two nodes compute the same value by the same ops from the same inputs: the
    backward may read a copy of the forward's transposed weight, made again from the parameter
    (``gather_parameters`` casts a weight again for the backward rather than keep the forward's)."""
    if left is right:
        return True
    if not (isinstance(left, Node) and isinstance(right, Node)) or left.op != "call_function" \
            or right.op != "call_function" or left.target != right.target or left.kwargs != right.kwargs \
            or len(left.args) != len(right.args):
        return False
    return all(_same_value(a, b) if isinstance(a, Node) else a == b for a, b in zip(left.args, right.args))


class _Emitter:
    """Inserts nodes before ``anchor`` with a global fake value and a placement."""

    def __init__(self, graph: Graph, anchor: Node):
        self.graph, self.anchor = graph, anchor

    def call(self, target, args, kwargs=None, *, value, sharding, like: Node, reason: str) -> Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, tuple(args), kwargs or {})
        meta.copy_source_location(like, node)
        meta.set_value(node, value)
        meta.set_placed(node, PlacedValue(sharding, _view_of(sharding), (), reason))
        return node


def _view_of(sharding) -> View:
    if isinstance(sharding, tuple):
        return View.DENSE
    return View.of_sharding(sharding) or View.DENSE


def _with_width(node: Node, width: int, dtype: torch.dtype):
    """A fake like ``node``'s value with ``width`` for its last dim."""
    found = meta.tensor_value(node)
    return found.new_empty((*found.shape[:-1], width), dtype=dtype)


def _replay(emit: _Emitter, ops: list[Node], source: Node, width: int, vocab: int, dtype: torch.dtype,
            reason: str) -> Node:
    """``ops`` (row ops over ``vocab`` columns) applied to ``source`` (``width`` columns); casts
    are left out, so the rows stay in ``dtype``."""
    node = source
    for op in ops:
        if op.target == _CAST:
            continue
        args = list(op.args)
        target = op.target
        if op.target in _VIEWS:
            target = aten.reshape.default  # a row subset of a view may be strided
            args[1] = [*args[1][:-1], width]
        elif op.target == aten.slice_backward.default:
            args[1] = [*args[1][:-1], width]
        args[0] = node
        node = emit.call(target, args, op.kwargs, value=_with_width(op, width, dtype), sharding=meta.sharding(op),
                         like=op, reason=reason)
    return node


def _rewrite(gm: GraphModule, match: _Match, mesh: MeshSpec, chunk_bytes: int) -> None:
    graph = gm.graph
    vocab = _shape(match.mm)[-1]
    width = _shape(match.hidden)[-1]
    dtype = meta.tensor_value(match.hidden).dtype
    reason = f"fused output projection and cross-entropy of {match.mm.name}"
    # The count of counted rows from the target alone.
    count_dtype = meta.value(match.nll)[1].dtype
    counter = _Emitter(graph, match.nll)
    target_value = meta.tensor_value(match.target)
    counted = counter.call(aten.ne.Scalar, (match.target, match.ignore_index),
                           value=target_value.new_empty(target_value.shape, dtype=torch.bool),
                           sharding=meta.sharding(match.target), like=match.nll, reason=reason)
    nll_sharding = meta.sharding(match.nll)
    loss_sharding, count_sharding = nll_sharding if isinstance(nll_sharding, tuple) else (nll_sharding,) * 2
    count = counter.call(aten.sum.default, (counted,), {"dtype": count_dtype},
                         value=meta.value(match.nll)[1], sharding=count_sharding, like=match.nll, reason=reason)
    for item in match.count_items:
        item.replace_all_uses_with(count)
        graph.erase_node(item)
    # The backward's seed depends on the loss's shape only.
    for seed in match.scalar_seeds:
        factory, fill_index = _SCALAR_LIKE[seed.target]
        args = [match.hidden, []] + ([seed.args[fill_index]] if fill_index is not None else [])
        kwargs = {"dtype": meta.tensor_value(seed).dtype}
        replacement = _Emitter(graph, seed).call(factory, args, kwargs, value=meta.value(seed),
                                                 sharding=meta.sharding(seed), like=seed, reason=reason)
        seed.replace_all_uses_with(replacement)
        graph.erase_node(seed)
    emit = _Emitter(graph, match.nll_backward)
    rows = _replay(emit, match.forward_ops, match.hidden, width, vocab, dtype, reason)
    grad_out, total_weight = match.nll_backward.args[0], match.nll_backward.args[6]
    grad_scale = grad_out
    if match.backward_reduction == _MEAN:
        grad_scale = emit.call(aten.div.Tensor, (grad_out, total_weight), value=meta.value(grad_out),
                               sharding=meta.sharding(grad_out), like=match.nll_backward, reason=reason)
    row_count = local_shape(_shape(rows), meta.sharding(rows), mesh, name=rows.name)[0] if meta.sharding(
        rows) is not None else _shape(rows)[0]
    # The chunk's working set depends on which path the op takes on the traced device (Triton
    # on CUDA works on the logits in place).
    triton_path = meta.tensor_value(match.hidden).device.type == "cuda" and dtype != torch.float64
    chunk_rows = chunk_rows_for_budget(int(row_count), vocab, dtype, chunk_bytes, triton_path)
    loss_dtype = meta.value(match.nll)[0].dtype
    loss_value = meta.value(match.nll)[0]
    grad_weight_value = meta.value(match.grad_weight_mm)
    fused = emit.call(FUSED_OP, (rows, match.weight, match.target, grad_scale, match.ignore_index, chunk_rows,
                                 loss_dtype),
                      value=(loss_value, _with_width(rows, width, dtype), grad_weight_value),
                      sharding=(loss_sharding, meta.sharding(rows), meta.sharding(match.grad_weight_mm)),
                      like=match.mm, reason=reason)
    items = [emit.call(operator.getitem, (fused, i), value=meta.value(fused)[i], sharding=meta.sharding(fused)[i],
                       like=like, reason=reason)
             for i, like in enumerate((match.nll, match.grad_hidden_mm, match.grad_weight_mm))]
    loss_sum, grad_rows, grad_weight = items
    loss = loss_sum
    if match.forward_reduction == _MEAN:
        loss = emit.call(aten.div.Tensor, (loss_sum, count), value=loss_value, sharding=loss_sharding,
                         like=match.nll, reason=reason)
    for item in match.loss_items:
        item.replace_all_uses_with(loss)
        graph.erase_node(item)
    grad_hidden = _replay(emit, match.backward_ops, grad_rows, width, vocab, dtype, reason)
    match.grad_hidden_mm.replace_all_uses_with(grad_hidden)
    match.grad_weight_mm.replace_all_uses_with(grad_weight)
    dead = [match.grad_hidden_mm, match.grad_hidden_mm.args[1], match.grad_weight_mm, match.grad_weight_t,
            *reversed(match.backward_ops), match.log_softmax_backward, match.nll_backward, match.nll,
            match.log_softmax, *reversed(match.forward_ops), match.mm, match.weight_t]
    for node in dead:
        if not node.users:
            graph.erase_node(node)
    _restore_topological_order(graph)


def _restore_topological_order(graph: Graph) -> None:
    """Move each node that reads a value defined after it to right after its last input, keeping
    the order of everything else (the loss's readers, which now wait for the fused op)."""
    order, placed, waiting = [], set(), []
    for node in graph.nodes:
        waiting.append(node)
        progressed = True
        while progressed:
            progressed = False
            for candidate in list(waiting):
                if all(source in placed for source in candidate.all_input_nodes):
                    order.append(candidate)
                    placed.add(candidate)
                    waiting.remove(candidate)
                    progressed = True
                elif candidate is node:
                    break
    if waiting:
        raise AssertionError(f"fuse_linear_cross_entropy left a cycle through {[n.name for n in waiting][:5]}")
    if order == list(graph.nodes):
        return
    previous = None
    for node in order:
        if previous is not None and node.prev is not previous:
            previous.append(node)
        previous = node


def fuse_linear_cross_entropy(gm: GraphModule, mesh: MeshSpec, enabled: bool = True,
                              chunk_bytes: int | None = None) -> GraphModule:
    """Replace each matched output projection + cross-entropy (forward and backward) by
    ``shardgraph.linear_cross_entropy``; leave every other graph as it is. ``chunk_bytes``: the
    budget of the op's chunk of logits (None: ``DEFAULT_CHUNK_BYTES``)."""
    if not enabled:
        return gm
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES
    matches = [m for n in list(gm.graph.nodes) if n.target == aten.nll_loss_forward.default
               and (m := _match(n)) is not None]
    for match in matches:
        _rewrite(gm, match, mesh, chunk_bytes)
    if matches:
        gm.recompile()
    return gm
