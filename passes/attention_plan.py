"""Attention projections found by the role they play around attention, not by their names.

Reads a traced graph; writes nothing. ``attention_sites`` finds every attention in it and, for
each, the Linear weights that make its query, key and value per head and the Linear that reads
its output; ``attention_parameters`` turns them into plan styles (``colwise`` / ``rowwise``).

An attention is either the ``shardgraph.attention`` op (``F.scaled_dot_product_attention``
without a mask) or its math written out, as HF's eager attention and masked SDPA trace:
``bmm(query, key^T)``, then pointwise ops (scale, mask, soft-capping), a softmax, and
``bmm(probabilities, value)``, with the ``[batch, heads, ...]`` operands merged into
``[batch * heads, ...]`` around each bmm. Either way its operands are ``[batch, heads, seq, dim]``
and it is independent per head, so splitting heads over tp needs no communication inside it.

Walking back from query, key and value, the walk keeps one question: "is this value split over
tp on dim ``d`` the same as the operand split on heads?" It answers it through views, reshapes,
transposes, permutes, copies and casts; through rotary embedding (the ``shardgraph.rotary`` op, or
pointwise ops with ``cos``/``sin``, the slices, splits and concatenations of head_dim); through per-head norms
(Qwen3's q_norm/k_norm reduce head_dim only; a factor that is the same on every head, like the
``rsqrt`` of a norm over all heads' features, is not followed, and that norm's weight is split
with the features it scales); through GQA's ``repeat_kv`` (``expand`` then
``reshape``, which needs the key/value heads to divide by tp); and through the functional form of
a slice assignment (``new_empty`` + ``slice_scatter``, as DeepSeek's MLA builds its key). It
stops at the first Linear (``mm``/``addmm`` of a parameter through ``t``): when the split dim is
the Linear's output features, its weight (and bias) is ``colwise``. So MLA's ``q_b_proj`` and
``kv_b_proj`` are found, and the low-rank ``q_a_proj``/``kv_a_proj_with_mqa`` before them are not
reached through them. A value that reaches the heads dim through an ``expand`` of one head (MLA's
rotary key part, ``k_pe``, one head for all; MQA's single key/value head) is the same on every
head: its producer stays replicated and each rank slices its heads locally.

Walking forward from the attention's output through the transpose and reshape that merge heads
into features, the Linear reading it on that dim is ``rowwise``.

A site is planned only when every walk ends well: any op the walk does not know, a slice or a
concatenation across heads (a fused qkv projection, whose heads are not one contiguous block of
its rows), heads that tp does not divide, or a projection used some other way leaves the
attention's parameters replicated (the site records why). Nothing here fails a compile.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from shardgraph import meta
from shardgraph.meta import InputKind, Phase

__all__ = ["AttentionSite", "attention_parameters", "attention_sites", "site_styles"]

aten = torch.ops.aten

# Ops whose output is their first input's data, re-laid out or re-typed: the split dim maps
# through them as it does through an identity (views and reshapes are handled apart).
_SAME_DIM = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
             aten._to_copy.default, torch.ops.prims.convert_element_type.default, aten.lift_fresh_copy.default}
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
               aten.std.correction}
# Ops that make a tensor from shapes alone: no data reaches heads through them.
_FACTORIES = {aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
              aten.empty.memory_format, aten.zeros.default, aten.ones.default, aten.full.default,
              aten.zeros_like.default, aten.empty_like.default, aten.ones_like.default, aten.full_like.default,
              aten.scalar_tensor.default, aten.arange.default, aten.arange.start, aten.arange.start_step}
_SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default}


@dataclass(frozen=True)
class AttentionSite:
    """One attention of the graph and what the walks found around it."""

    node: Node  # the shardgraph.attention op, or the probabilities x value bmm of a written-out one
    heads: int
    colwise: tuple[str, ...] = ()  # projection weights (and biases) whose output features are heads x dim
    rowwise: tuple[str, ...] = ()  # the Linear weights reading the output, heads x dim as input features
    # What reaches heads through a single head broadcast to all (MLA's k_pe): parameter names, or
    # the names of the nodes broadcast; whole on every rank, each takes its heads locally.
    replicated: tuple[str, ...] = ()
    refused: str | None = None  # why the site is left replicated; None when it is planned

    @property
    def planned(self) -> bool:
        return self.refused is None


class _Refused(Exception):
    """A walk met something it cannot follow; the message says what."""


def _shape(node) -> tuple[int, ...] | None:
    value = meta.value(node) if isinstance(node, Node) and meta.has_value(node) else None
    return tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else None


def _dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _forward(node: Node) -> bool:
    return node.op == "call_function" and meta.phase(node) is not Phase.BACKWARD


def _parameter(node: Node) -> str | None:
    """The parameter a node reads, through casts, copies, zero=3 gathers and padding slices."""
    from .gather_parameters import is_parameter_gather

    while True:
        if node.op == "placeholder":
            record = meta.graph_input(node)
            return record.name if record is not None and record.kind is InputKind.PARAMETER else None
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
            return None
        if not (node.target in _SAME_DIM or is_parameter_gather(node) or meta.padding(node) is not None):
            return None
        node = node.args[0]


def _linear_weight(operand: Node) -> str | None:
    """The parameter ``W`` of an mm operand that is ``W^T`` (a Linear's ``[out, in]`` weight)."""
    node = operand
    while node.op == "call_function" and node.target in _SAME_DIM:
        node = node.args[0]
    if node.op != "call_function" or node.target not in _TRANSPOSES:
        return None
    if node.target is aten.permute.default and list(node.args[1]) != [1, 0]:
        return None
    shape = _shape(node.args[0])
    if shape is None or len(shape) != 2:
        return None
    return _parameter(node.args[0])


def _reshaped_dim(source: tuple[int, ...], target: tuple[int, ...], dim: int, factor: int) -> int:
    """The dim of ``target`` that a split of ``source`` on ``dim`` into ``factor`` blocks is, for a
    view between the two; raise where none is.

    Element ``i`` (row-major) of a view sits in block ``(i // (prod(shape[dim:]) / factor)) % factor``
    of a split on ``dim``; two splits agree for every element when their suffix products match
    and the dim divides.
    """
    suffix = math.prod(source[dim:])
    found = [d for d in range(len(target)) if math.prod(target[d:]) == suffix]
    if not found:
        raise _Refused(f"a reshape {list(source)} -> {list(target)} moves the split dim {dim} inside another dim")
    # Leading size-1 dims share the suffix product; the split is on the last one, the sized one.
    split = found[-1]
    if target[split] % factor:
        raise _Refused(f"a reshape {list(source)} -> {list(target)} leaves dim {split} of size {target[split]}, "
                       f"which {factor} does not divide")
    return split


@dataclass
class _Walk:
    """The state of one walk back from an attention's operands."""

    factor: int
    colwise: set = field(default_factory=set)
    replicated: set = field(default_factory=set)
    seen: set = field(default_factory=set)

    def back(self, node: Node, dim: int) -> None:
        """Follow ``node`` split on ``dim`` back to its producers."""
        pending = [(node, dim)]
        while pending:
            node, dim = pending.pop()
            if (node, dim) in self.seen:
                continue
            self.seen.add((node, dim))
            pending.extend(self._step(node, dim))

    def _step(self, node: Node, dim: int) -> list[tuple[Node, int]]:
        shape = _shape(node)
        if shape is not None and shape[dim] % self.factor:
            raise _Refused(f"{node.name} has size {shape[dim]} on the heads dim {dim}, which {self.factor} does not "
                           f"divide")
        if node.op == "placeholder":
            name = _parameter(node)
            if name is not None and len(shape) <= 2 and dim == 0:
                # A bias added to the projection's output features, or a per-head parameter.
                self.colwise.add(name)
            return []  # a buffer or batch input: whole on every rank, sliced locally
        if node.op != "call_function":
            raise _Refused(f"{node.name} ({node.op}) is not an op the walk follows")
        target, args = node.target, node.args
        if target in _FACTORIES:
            return []
        if target is operator.getitem:
            return self._getitem(node, dim)
        if target in (aten.mm.default, aten.addmm.default):
            return self._linear(node, dim)
        source_shape = _shape(args[0]) if isinstance(args[0], Node) else None
        if target in _SAME_DIM:
            return [(args[0], dim)]
        if target in _RESHAPES:
            return [(args[0], _reshaped_dim(shape, source_shape, dim, self.factor))]
        if target is aten.t.default:
            return [(args[0], 1 - dim)]
        if target is aten.transpose.int:
            a, b = _dim(args[1], len(shape)), _dim(args[2], len(shape))
            return [(args[0], b if dim == a else a if dim == b else dim)]
        if target is aten.permute.default:
            return [(args[0], _dim(list(args[1])[dim], len(shape)))]
        if target is aten.unsqueeze.default:
            added = _dim(args[1], len(shape))
            if dim == added:
                return self._broadcast(args[0])
            return [(args[0], dim - (dim > added))]
        if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            kept = [d for d in range(len(source_shape)) if not self._squeezed(node, d, source_shape)]
            return [(args[0], kept[dim])]
        if target is aten.expand.default:
            inner = dim - (len(shape) - len(source_shape))
            if inner < 0 or source_shape[inner] == 1 and shape[dim] != 1:
                return self._broadcast(args[0])
            return [(args[0], inner)]
        if target is aten.slice.Tensor:
            self._whole_on(node, dim, source_shape, "slices")
            return [(args[0], dim)]
        if target is aten.select.int:
            removed = _dim(args[1], len(source_shape))
            return [(args[0], dim + (dim >= removed))]
        if target is aten.stack.default:  # interleaved rotary embedding: stack([-x2, x1], -1)
            stacked = _dim(args[1] if len(args) > 1 else node.kwargs.get("dim", 0), len(shape))
            if stacked == dim:
                raise _Refused(f"{node.name} stacks along the heads dim")
            return [(part, dim - (dim > stacked)) for part in args[0]]
        if target in (aten.view_as_real.default, aten.view_as_complex.default):
            # Complex rotary embedding: a complex [..., n] is a real [..., n, 2]; heads never the last.
            if dim >= len(source_shape) - (target is aten.view_as_complex.default):
                raise _Refused(f"{node.name} reinterprets the heads dim")
            return [(args[0], dim)]
        if target is aten.cat.default:
            cat_dim = _dim(args[1] if len(args) > 1 else node.kwargs.get("dim", 0), len(shape))
            if cat_dim == dim:
                raise _Refused(f"{node.name} concatenates along the heads dim")
            return [(part, dim) for part in args[0] if _shape(part) is not None and len(_shape(part)) == len(shape)]
        if target is aten.slice_scatter.default:
            self._whole_on(node, dim, source_shape, "scatters into a part of")
            return [(args[0], dim), (args[1], dim)]
        if target is aten.copy.default:  # the destination's data is overwritten: only its shape counts
            return self._aligned(node, dim, shape, [args[1]])
        if target in _REDUCTIONS:
            reduced = args[1] if len(args) > 1 else node.kwargs.get("dim")
            keepdim = (args[2] if len(args) > 2 and isinstance(args[2], bool) else node.kwargs.get("keepdim", False))
            reduced = {_dim(d, len(source_shape)) for d in ([reduced] if isinstance(reduced, int) else reduced or [])}
            if not reduced:
                raise _Refused(f"{node.name} reduces every dim, heads included")
            inner = dim if keepdim else [d for d in range(len(source_shape)) if d not in reduced][dim]
            if inner in reduced:
                raise _Refused(f"{node.name} reduces the heads dim")
            return [(args[0], inner)]
        if target is torch.ops.shardgraph.rotary.default:
            # Rotary embedding mixes the halves of the last dim only: heads map through it, the
            # cos/sin tables (broadcast over heads) are not followed.
            if dim == len(shape) - 1:
                raise _Refused(f"{node.name} rotates the heads dim")
            return self._aligned(node, dim, shape, [a for a in args if isinstance(a, Node)])
        if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
            return self._aligned(node, dim, shape, [a for a in args if isinstance(a, Node)])
        raise _Refused(f"{node.name} ({target}) is not an op the walk follows")

    @staticmethod
    def _squeezed(node: Node, d: int, source_shape) -> bool:
        if source_shape[d] != 1:
            return False
        if node.target is aten.squeeze.default:
            return True
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        return d in {_dim(x, len(source_shape)) for x in dims}

    def _whole_on(self, node: Node, dim: int, source_shape, what: str) -> None:
        """Refuse a slice (``slice(x, dim, start, end, step)``) or slice assignment
        (``slice_scatter(x, src, dim, ...)``) that takes part of the heads dim."""
        args = list(node.args[1:] if node.target is aten.slice.Tensor else node.args[2:]) + [0, None, None, 1]
        sliced, start, end, step = _dim(args[0], len(source_shape)), args[1], args[2], args[3]
        if sliced != dim:
            return
        if (start or 0) != 0 or (end is not None and end < source_shape[dim]) or step != 1:
            raise _Refused(f"{node.name} {what} the heads dim")

    def _broadcast(self, producer: Node) -> list:
        """A value that is the same on every head: its producers stay whole."""
        name = _parameter(producer) if isinstance(producer, Node) else None
        self.replicated.add(producer if name is None else name)
        return []

    def _aligned(self, node: Node, dim: int, shape, operands) -> list[tuple[Node, int]]:
        """Pointwise operands, right-aligned: those that broadcast over heads are the same on every
        head (cos/sin of rotary embedding, a norm's weight) and are not followed."""
        found = []
        for operand in operands:
            operand_shape = _shape(operand)
            if operand_shape is None:
                continue
            inner = dim - (len(shape) - len(operand_shape))
            if inner < 0 or operand_shape[inner] == 1 and shape[dim] != 1:
                continue
            found.append((operand, inner))
        return found

    def _getitem(self, node: Node, dim: int) -> list[tuple[Node, int]]:
        producer = node.args[0]
        if producer.op != "call_function":
            raise _Refused(f"{node.name} picks from {producer.name}, which the walk does not follow")
        source_shape = _shape(producer.args[0])
        if producer.target in _SPLITS:
            split_dim = _dim(producer.args[2] if len(producer.args) > 2 else producer.kwargs.get("dim", 0),
                             len(source_shape))
            if split_dim == dim:
                raise _Refused(f"{producer.name} splits the heads dim")
            return [(producer.args[0], dim)]
        if producer.target is torch.ops.shardgraph.rms_norm.default and node.args[1] == 0:
            # Per-head norms (Qwen3's q_norm/k_norm) reduce head_dim only: the weight, per feature
            # of head_dim, is the same on every head. A norm over every head's features (OLMoE's)
            # has its weight split with them; its mean of squares is then a sum over ranks, which
            # the op cannot take (passes/decompose_split_norms.py writes it as aten ops).
            if dim == len(source_shape) - 1:
                return [(producer.args[0], dim), (producer.args[1], 0)]
            return [(producer.args[0], dim)]
        if producer.target is aten.unbind.int:
            removed = _dim(producer.args[1] if len(producer.args) > 1 else 0, len(source_shape))
            return [(producer.args[0], dim + (dim >= removed))]
        raise _Refused(f"{node.name} picks from {producer.name} ({producer.target}), which the walk does not follow")

    def _linear(self, node: Node, dim: int) -> list:
        bias, operand = (node.args[0], node.args[2]) if node.target is aten.addmm.default else (None, node.args[1])
        weight = _linear_weight(operand)
        if weight is None:
            raise _Refused(f"{node.name} multiplies by something other than a Linear weight [out, in]")
        if dim != 1:
            raise _Refused(f"{node.name}: the heads come from the Linear's tokens, not its output features")
        self.colwise.add(weight)
        if bias is not None:
            name = _parameter(bias)
            if name is None or len(_shape(bias)) != 1:
                raise _Refused(f"{node.name} adds a bias that is not a 1-d parameter")
            self.colwise.add(name)
        return []


def _output_linears(output: Node, factor: int) -> set[str]:
    """The Linear weights reading an attention output ``[batch, heads, seq, dim]`` split on heads
    with heads x dim as their input features: through transposes, reshapes, copies and
    pointwise ops (an output gate), forward-phase readers only."""
    found: set[str] = set()
    pending, seen = [(output, 1)], set()
    while pending:
        node, dim = pending.pop()
        if (node, dim) in seen:
            continue
        seen.add((node, dim))
        shape = _shape(node)
        for user in node.users:
            if not _forward(user):
                continue
            target, user_shape = user.target, _shape(user)
            if target in (aten.mm.default, aten.addmm.default):
                tokens, operand = (user.args[1], user.args[2]) if target is aten.addmm.default else user.args
                weight = _linear_weight(operand)
                if tokens is not node or dim != 1 or weight is None:
                    raise _Refused(f"{user.name} reads the attention output other than as a Linear's input features")
                found.add(weight)
            elif target in _SAME_DIM:
                pending.append((user, dim))
            elif target in _RESHAPES:
                pending.append((user, _reshaped_dim(shape, user_shape, dim, factor)))
            elif target is aten.transpose.int:
                a, b = _dim(user.args[1], len(shape)), _dim(user.args[2], len(shape))
                pending.append((user, b if dim == a else a if dim == b else dim))
            elif target is aten.t.default:
                pending.append((user, 1 - dim))
            elif target is aten.permute.default:
                pending.append((user, [_dim(d, len(shape)) for d in user.args[1]].index(dim)))
            elif isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
                if user_shape is None or len(user_shape) < len(shape):
                    raise _Refused(f"{user.name} ({target}) changes the attention output's rank")
                pending.append((user, dim + len(user_shape) - len(shape)))
            else:
                raise _Refused(f"{user.name} ({target}) reads the attention output")
    if not found:
        raise _Refused("no Linear reads the attention output")
    return found


# ---------------------------------------------------------------------------------- finding attention
def _unmerged(operand: Node, batch_heads: int) -> Node | None:
    """The ``[batch, heads, ...]`` value that a bmm operand ``[batch * heads, ...]`` was viewed from."""
    node = operand
    while node.op == "call_function" and node.target in _RESHAPES | _SAME_DIM:
        shape = _shape(node)
        if shape is not None and len(shape) >= 4 and shape[0] * shape[1] == batch_heads:
            return node
        node = node.args[0]
    shape = _shape(node)
    return node if shape is not None and len(shape) >= 4 and shape[0] * shape[1] == batch_heads else None


# Ops between the scores bmm and the softmax (scale, mask, soft-capping, sinks) and between the
# softmax and the value bmm (casts, masked rows zeroed, a sink column dropped).
_SCORE_OPS = _RESHAPES | _SAME_DIM | {aten.expand.default, aten.slice.Tensor, aten.cat.default, aten.unsqueeze.default}


def _scores_bmm(softmax: Node) -> Node | None:
    """The one ``bmm(query, key^T)`` a softmax reads through pointwise ops and views."""
    found, pending, seen = set(), [softmax.args[0]], set()
    while pending:
        node = pending.pop()
        if not isinstance(node, Node) or node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if node.target is aten.bmm.default:
            found.add(node)
            continue
        pointwise = isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags
        if node.target in _SCORE_OPS or pointwise:
            pending.extend(node.all_input_nodes)
    return found.pop() if len(found) == 1 else None


def _probabilities_softmax(operand: Node) -> Node | None:
    node = operand
    while node.op == "call_function":
        if node.target in _SOFTMAX:
            return node
        pointwise = isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags
        if not (node.target in _SCORE_OPS or pointwise) or not isinstance(node.args[0], Node):
            return None
        node = node.args[0]
    return None


def _attentions(graph_module: GraphModule):
    """``(site node, query, key, value, output)`` of every attention, each ``[batch, heads, ...]``."""
    for node in graph_module.graph.nodes:
        if not _forward(node):
            continue
        if str(node.target) == "shardgraph.attention.default":
            # The op returns (out, logsumexp); the projections read the first.
            outputs = [user for user in node.users if user.target is operator.getitem and user.args[1] == 0]
            if len(outputs) == 1:
                yield node, node.args[0], node.args[1], node.args[2], outputs[0]
        elif node.target is aten.bmm.default:
            softmax = _probabilities_softmax(node.args[0])
            scores = _scores_bmm(softmax) if softmax is not None else None
            if scores is None:
                continue
            batch_heads = _shape(node)[0]
            outputs = [user for user in node.users if _forward(user) and user.target in _RESHAPES
                       and len(_shape(user)) == 4 and math.prod(_shape(user)[:2]) == batch_heads]
            operands = [_unmerged(scores.args[0], batch_heads), _unmerged(scores.args[1], batch_heads),
                        _unmerged(node.args[1], batch_heads)]
            if len(outputs) == 1 and None not in operands:
                yield node, *operands, outputs[0]


def attention_sites(graph_module: GraphModule, tp: int | None = None) -> list[AttentionSite]:
    """Every attention of the graph with the projections around it.

    With ``tp`` every dim the split passes (the query and key/value heads included) must divide by
    it; without, only the structure is asked for (heads the outermost factor of each dim the walk
    passes, no head broadcast), and ``resolve_plan`` checks that the weights divide.
    """
    sites = []
    factor = tp or 1
    for node, query, key, value, output in _attentions(graph_module):
        heads = _shape(query)[1]
        walk = _Walk(factor=factor)
        try:
            for operand in (query, key, value):
                walk.back(operand, 1)
            if not walk.colwise:
                raise _Refused("no Linear makes its query, key or value per head")
            rowwise = _output_linears(output, factor)
        except _Refused as refusal:
            sites.append(AttentionSite(node, heads, refused=str(refusal)))
            continue
        sites.append(AttentionSite(node, heads, tuple(sorted(walk.colwise)), tuple(sorted(rowwise)),
                                   tuple(sorted(str(r) if isinstance(r, Node) else r for r in walk.replicated))))
    return sites


def attention_parameters(graph_module: GraphModule, tp: int | None = None) -> dict[str, str]:
    """``{parameter: "colwise" | "rowwise"}`` for the projections of every planned attention site."""
    return site_styles(attention_sites(graph_module, tp))


def site_styles(sites: list[AttentionSite]) -> dict[str, str]:
    """The plan styles of the planned sites. A parameter two sites give different styles (a weight
    shared in a way one split cannot serve) is left out."""
    styles: dict[str, set[str]] = {}
    for site in sites:
        for names, style in ((site.colwise, "colwise"), (site.rowwise, "rowwise")):
            for name in names:
                styles.setdefault(name, set()).add(style)
    return {name: found.pop() for name, found in styles.items() if len(found) == 1}
