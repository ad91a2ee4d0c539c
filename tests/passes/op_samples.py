"""Small sample calls of every op that has a placement rule, for the rule registry test.

Like torch's OpInfo sample inputs: a ``Sample`` is one call ``op(*args, **kwargs)`` on small
float64 tensors (int64 where the op takes indices, bool for masks). Dims are 8 or 16, so every
``Shard`` over 2 or 4 ranks and most ``InterleavedShard`` splits are even; one odd dim checks
that a rule does not offer a split that would not be. Size-1 dims appear where a rule must
handle broadcasting or squeezing, and index tensors shorter than their source where aten allows
it (``gather``, ``scatter``), since a rule that shards both alike must not assume equal sizes.

A new rule brings its sample here: ``tests/passes/test_rule_registry.py`` fails for any
registered op without one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import shardgraph.ops  # noqa: F401  (registers shardgraph::attention)

aten = torch.ops.aten
prims = torch.ops.prims
F64 = torch.float64
INT_MAX = 9223372036854775807  # the ``end`` traced graphs carry for an open slice

__all__ = ["Sample", "samples"]


@dataclass(frozen=True)
class Sample:
    """``op(*args, **kwargs)``; tensors may sit inside lists (``cat``, ``index``)."""

    op: Any
    args: tuple
    kwargs: dict = field(default_factory=dict)
    # Values are random or uninitialised (``rand``, ``empty``): only shapes and dtypes compare.
    random: bool = False

    @property
    def label(self) -> str:
        """``mm.default(f8x16,f16x8)``: the op and what its arguments were, for test ids."""
        parts = [_describe(a) for a in self.args] + [f"{k}={_describe(v)}" for k, v in self.kwargs.items()]
        name = str(self.op).removeprefix("aten.")
        return f"{name}({','.join(parts)})"


def _describe(item) -> str:
    if isinstance(item, torch.Tensor):
        kind = "f" if item.dtype.is_floating_point else ("b" if item.dtype == torch.bool else "i")
        return kind + ("x".join(str(s) for s in item.shape) or "0d")
    if isinstance(item, (list, tuple)):
        return "[" + ",".join(_describe(i) for i in item) + "]"
    if isinstance(item, torch.dtype):
        return str(item).removeprefix("torch.")
    if item == INT_MAX:
        return "max"
    return repr(item)


class _Maker:
    """Tensors from one seeded generator, so the table is the same on every run."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def f(self, *shape):
        return torch.randn(shape, generator=self.generator, dtype=F64)

    def pos(self, *shape):
        """Positive floats, for ops with a restricted domain (log, sqrt, pow)."""
        return torch.rand(shape, generator=self.generator, dtype=F64) + 0.5

    def i(self, *shape, high):
        return torch.randint(0, high, shape, generator=self.generator)

    def b(self, *shape):
        return torch.rand(shape, generator=self.generator) > 0.5

    def special(self, *shape):
        """Floats with some nan and +-inf, for isnan / isinf / nan_to_num."""
        x = self.f(*shape).flatten()
        x[::5], x[1::7], x[2::11] = float("nan"), float("inf"), float("-inf")
        return x.view(shape)

    def distinct(self, rows, k, high):
        """``[rows, k]`` indices distinct within each row, so ``scatter`` is deterministic."""
        return torch.stack([torch.randperm(high, generator=self.generator)[:k] for _ in range(rows)])


_UNARY = [aten.neg.default, aten.abs.default, aten.exp.default, aten.expm1.default, aten.sin.default,
          aten.cos.default, aten.tanh.default, aten.sigmoid.default, aten.silu.default, aten.gelu.default,
          aten.relu.default, aten.erf.default, aten.sign.default, aten.clone.default, aten.alias.default,
          aten.detach.default, aten.lift_fresh_copy.default, aten.contiguous.default, aten.reciprocal.default,
          aten.floor.default, aten.sgn.default]
_POSITIVE_UNARY = [aten.log.default, aten.log1p.default, aten.sqrt.default, aten.rsqrt.default]
_POSITIVE_WITH_SCALAR = [aten.pow.Tensor_Scalar]  # a negative base to the power 0.7 is nan
_BINARY = [aten.add.Tensor, aten.sub.Tensor, aten.rsub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default,
           aten.minimum.default, aten.eq.Tensor, aten.ne.Tensor, aten.lt.Tensor, aten.le.Tensor, aten.gt.Tensor,
           aten.ge.Tensor, aten.floor_divide.default, aten.copy.default]
_WITH_SCALAR = [aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar, aten.mul.Scalar, aten.div.Scalar,
                aten.eq.Scalar, aten.ne.Scalar, aten.lt.Scalar, aten.le.Scalar,
                aten.gt.Scalar, aten.ge.Scalar, aten.remainder.Scalar, aten.fmod.Scalar, aten.fill.Scalar,
                aten.clamp_min.default, aten.clamp_max.default]
_ACTIVATION_BACKWARD = [aten.silu_backward.default, aten.sigmoid_backward.default, aten.tanh_backward.default,
                        aten.gelu_backward.default]
_SHAPE_FACTORIES = [aten.ones.default, aten.zeros.default]
_LIKE = [aten.ones_like.default, aten.zeros_like.default]
_NEW = [aten.new_zeros.default, aten.new_ones.default]
_RANDOM_FACTORIES = [aten.empty.memory_format, aten.randn.default, aten.rand.default]
_RANDOM_LIKE = [aten.empty_like.default, aten.rand_like.default, aten.randn_like.default]


def _pointwise(m: _Maker) -> list[Sample]:
    found = [Sample(op, (m.f(8, 16),)) for op in _UNARY]
    found += [Sample(op, (m.pos(8, 16),)) for op in _POSITIVE_UNARY]
    for op in _BINARY:
        found += [Sample(op, (m.f(8, 16), m.f(8, 16))), Sample(op, (m.f(8, 16), m.f(16)))]
    found += [Sample(aten.add.Tensor, (m.f(8, 1), m.f(1, 16)), {"alpha": 2}),
              Sample(aten.sub.Tensor, (m.f(16), m.f(8, 16)), {"alpha": 3}),
              Sample(aten.mul.Tensor, (m.f(8, 16), m.f())),
              Sample(aten.div.Tensor, (m.f(8, 16), m.pos(8, 1))),
              Sample(aten.div.Tensor_mode, (m.f(8, 16), m.pos(8, 16)), {"rounding_mode": "floor"}),
              Sample(aten.pow.Tensor_Tensor, (m.pos(8, 16), m.f(8, 16))),
              Sample(aten.pow.Scalar, (1.5, m.f(8, 16))),
              Sample(aten.clamp.default, (m.f(8, 16), -0.5, 0.5)),
              Sample(aten.threshold_backward.default, (m.f(8, 16), m.f(8, 16), 0.0)),
              Sample(aten.where.self, (m.b(8, 16), m.f(8, 16), m.f(16))),
              Sample(aten.where.ScalarOther, (m.b(8, 16), m.f(8, 16), 0.0)),
              Sample(aten.where.ScalarSelf, (m.b(8, 1), 0.0, m.f(8, 16))),
              Sample(aten.masked_fill.Scalar, (m.f(8, 16), m.b(8, 16), -1.0)),
              Sample(aten.masked_fill.Tensor, (m.f(8, 16), m.b(16), m.f())),
              Sample(aten.logical_not.default, (m.b(8, 16),)),
              Sample(aten.logical_and.default, (m.b(8, 16), m.b(8, 16))),
              Sample(aten.logical_or.default, (m.b(8, 16), m.b(16))),
              Sample(aten.bitwise_not.default, (m.i(8, 16, high=100),)),
              Sample(aten.bitwise_and.Tensor, (m.i(8, 16, high=100), m.i(8, 16, high=100))),
              Sample(aten.bitwise_or.Tensor, (m.i(8, 16, high=100), m.i(16, high=100))),
              Sample(aten.isnan.default, (m.special(8, 16),)),
              Sample(aten.isinf.default, (m.special(8, 16),)),
              Sample(aten.nan_to_num.default, (m.special(8, 16),), {"nan": 0.0, "posinf": 9.0}),
              # Conversions: to a narrower float, and to an integer (truncation is not linear).
              Sample(aten._to_copy.default, (m.f(8, 16),), {"dtype": torch.float32}),
              Sample(aten._to_copy.default, (m.f(8, 16) * 4,), {"dtype": torch.int64}),
              Sample(aten.to.dtype, (m.f(8, 16) * 4, torch.int64)),
              Sample(aten.to.dtype_layout, (m.f(8, 16),), {"dtype": torch.float32}),
              Sample(prims.convert_element_type.default, (m.f(8, 16) * 4, torch.int64)),
              Sample(aten.type_as.default, (m.f(8, 16), m.f(8, 16).float()))]
    found += [Sample(op, (m.f(8, 16), 0.7)) for op in _WITH_SCALAR]
    found += [Sample(op, (m.pos(8, 16), 0.7)) for op in _POSITIVE_WITH_SCALAR]
    found += [Sample(op, (m.f(8, 16), m.f(8, 16))) for op in _ACTIVATION_BACKWARD]
    return found


def _factories(m: _Maker) -> list[Sample]:
    found = [Sample(op, ([8, 16],), {"dtype": F64}) for op in _SHAPE_FACTORIES]
    found += [Sample(op, ([8, 16],), {"dtype": F64}, random=True) for op in _RANDOM_FACTORIES]
    found += [Sample(op, (m.f(8, 16),)) for op in _LIKE]
    found += [Sample(op, (m.f(8, 16),), random=True) for op in _RANDOM_LIKE]
    found += [Sample(op, (m.f(8, 16), [16, 8])) for op in _NEW]
    found += [Sample(aten.full.default, ([8, 16], 2.5), {"dtype": F64}),
              Sample(aten.arange.default, (16,), {"dtype": F64}),
              Sample(aten.arange.start, (2, 18), {"dtype": F64}),
              Sample(aten.arange.start_step, (0, 32, 2), {"dtype": F64}),
              Sample(aten.scalar_tensor.default, (2.5,), {"dtype": F64}),
              Sample(aten.empty_strided.default, ([8, 16], [16, 1]), {"dtype": F64}, random=True),
              Sample(aten.eye.default, (8,), {"dtype": F64}),
              Sample(aten.linspace.default, (0.0, 1.0, 16), {"dtype": F64}),
              Sample(aten.full_like.default, (m.f(8, 16), 2.5)),
              Sample(aten.new_full.default, (m.f(8, 16), [16, 8], 2.5)),
              Sample(aten.new_empty.default, (m.f(8, 16), [16, 8]), random=True),
              Sample(aten.new_empty_strided.default, (m.f(8, 16), [16, 8], [8, 1]), random=True),
              Sample(aten.triu.default, (m.f(8, 8, 16), 1)),
              Sample(aten.tril.default, (m.f(8, 16, 8),))]
    return found


def _matmul(m: _Maker) -> list[Sample]:
    return [Sample(aten.mm.default, (m.f(8, 16), m.f(16, 8))),
            # 6 columns: a column split over 4 ranks would be uneven, so the rule must not offer it.
            Sample(aten.mm.default, (m.f(8, 16), m.f(16, 6))),
            Sample(aten.bmm.default, (m.f(8, 8, 16), m.f(8, 16, 8))),
            Sample(aten.addmm.default, (m.f(8), m.f(16, 16), m.f(16, 8))),
            Sample(aten.addmm.default, (m.f(16, 8), m.f(16, 16), m.f(16, 8)), {"beta": 0.5})]


def _reductions(m: _Maker) -> list[Sample]:
    x = m.f(8, 16)
    return [Sample(aten.sum.dim_IntList, (x, [1])),
            Sample(aten.sum.dim_IntList, (x, [0], True)),
            Sample(aten.sum.default, (x,)),
            Sample(aten.mean.dim, (x, [1])),
            Sample(aten.mean.dim, (m.f(8, 16, 8), [0, 2], True)),
            Sample(aten.mean.default, (x,)),
            Sample(aten.amax.default, (x, [1])),
            Sample(aten.amin.default, (x, [0], True)),
            Sample(aten.argmax.default, (x, 1)),
            Sample(aten.argmax.default, (x,)),
            Sample(aten.argmin.default, (x, 0, True)),
            Sample(aten.any.dim, (m.b(8, 16), 1)),
            Sample(aten.all.dim, (m.b(8, 16), 0)),
            Sample(aten.max.dim, (x, 1)),
            Sample(aten.min.dim, (x, 0, True)),
            Sample(aten.var.correction, (x, [1]), {"correction": 1}),
            Sample(aten._softmax.default, (x, 1, False)),
            Sample(aten._log_softmax.default, (x, 0, False)),
            Sample(aten.cumsum.default, (x, 1)),
            Sample(aten._softmax_backward_data.default, (m.f(8, 16), torch.softmax(x, 1), 1, F64)),
            Sample(aten._log_softmax_backward_data.default, (m.f(8, 16), torch.log_softmax(x, 0), 0, F64)),
            Sample(aten.topk.default, (x, 4, 1)),
            Sample(aten.topk.default, (x, 2, 0, False)),
            Sample(aten.sort.default, (x, 1)),
            Sample(aten.sort.stable, (x,), {"stable": True, "dim": 0, "descending": True})]


def _shapes(m: _Maker) -> list[Sample]:
    found = []
    for op in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.view_copy.default):
        found += [Sample(op, (m.f(8, 16), [128])),  # merge: a sharded inner dim becomes interleaved
                  Sample(op, (m.f(128), [8, 16]))]  # split
    found += [Sample(aten.view.default, (m.f(8, 16), [2, 4, 16])),  # outer split into a dim too small for 4
              Sample(aten.view.default, (m.f(16, 8), [2, 8, 8])),  # an interleaved dim split at its stripes
              Sample(aten.view.default, (m.f(8, 1, 16), [8, 16])),
              Sample(aten.view.default, (m.f(8, 16), [4, 32])),  # one group of two dims each side
              Sample(aten.view.default, (m.f(8, 16), [32, 4])),
              Sample(aten.view.default, (m.f(8, 16, 8), [8, 2, 8, 8])),
              Sample(aten.t.default, (m.f(8, 16),)),
              Sample(aten.t.default, (m.f(16),)),
              Sample(aten.transpose.int, (m.f(8, 16, 8), 0, 2)),
              Sample(aten.transpose.int, (m.f(8, 16, 8), -1, 1)),
              Sample(aten.permute.default, (m.f(8, 16, 8), [2, 0, 1])),
              Sample(aten.unsqueeze.default, (m.f(8, 16), 1)),
              Sample(aten.unsqueeze.default, (m.f(8, 16), -1)),
              Sample(aten.squeeze.dim, (m.f(8, 1, 16), 1)),
              Sample(aten.squeeze.dims, (m.f(8, 1, 16, 1), [1, 3])),
              Sample(aten.squeeze.default, (m.f(1, 8, 1, 16),)),
              Sample(aten.expand.default, (m.f(8, 1), [8, 16])),
              Sample(aten.expand.default, (m.f(16), [8, 16])),
              Sample(aten.expand.default, (m.f(8, 1, 16), [8, 8, -1])),
              Sample(aten.slice.Tensor, (m.f(16, 8), 0, 4, 12)),
              Sample(aten.slice.Tensor, (m.f(16, 8), 0, 8, INT_MAX)),  # the second of two stripes
              Sample(aten.slice.Tensor, (m.f(8, 16), 1, 0, 16, 2)),
              Sample(aten.slice.Tensor, (m.f(8, 16), 1, 0, INT_MAX)),  # the whole dim
              Sample(aten.select.int, (m.f(8, 16), 0, 3)),
              Sample(aten.select.int, (m.f(8, 16, 8), 1, -1)),
              Sample(aten.slice_backward.default, (m.f(8, 8), [16, 8], 0, 4, 12, 1)),
              Sample(aten.slice_backward.default, (m.f(8, 8), [8, 16], 1, 8, INT_MAX, 1)),
              Sample(aten.select_backward.default, (m.f(8, 16), [8, 8, 16], 1, 3)),
              Sample(aten.cat.default, ([m.f(8, 16), m.f(8, 16)],)),
              Sample(aten.cat.default, ([m.f(8, 16), m.f(8, 8)], 1)),
              Sample(aten.cat.default, ([m.f(8, 16), m.f(8, 16), m.f(8, 16)], -1)),
              Sample(aten.stack.default, ([m.f(8, 16), m.f(8, 16)],)),
              Sample(aten.stack.default, ([m.f(8, 16), m.f(8, 16)], 1)),
              Sample(aten.split.Tensor, (m.f(16, 8), 8)),
              Sample(aten.split.Tensor, (m.f(8, 16), 4, 1)),
              Sample(aten.split_with_sizes.default, (m.f(16, 8), [8, 8])),
              Sample(aten.split_with_sizes.default, (m.f(16, 8), [4, 12])),
              Sample(aten.unbind.int, (m.f(4, 16, 8),)),
              Sample(aten.unbind.int, (m.f(8, 4, 16), 1))]
    return found


def _indexing(m: _Maker) -> list[Sample]:
    return [Sample(aten.gather.default, (m.f(8, 16), 1, m.i(8, 4, high=16))),
            Sample(aten.gather.default, (m.f(16, 16), 1, m.i(8, 4, high=16))),  # index rows fewer than source
            Sample(aten.gather.default, (m.f(8, 16), 0, m.i(4, 16, high=8))),
            Sample(aten.scatter_add.default, (m.f(8, 16), 1, m.i(8, 4, high=16), m.f(8, 4))),
            Sample(aten.scatter_add.default, (m.f(16, 16), 1, m.i(8, 4, high=16), m.f(8, 8))),
            Sample(aten.scatter.src, (m.f(8, 16), 1, m.distinct(8, 4, 16), m.f(8, 4))),
            Sample(aten.scatter.src, (m.f(16, 8), 1, m.distinct(8, 4, 8), m.f(8, 8))),
            Sample(aten.scatter.value, (m.f(8, 16), 1, m.i(8, 4, high=16), 2.5)),
            Sample(aten.index_select.default, (m.f(8, 16), 0, m.i(4, high=8))),
            Sample(aten.index_select.default, (m.f(8, 16), 1, m.i(8, high=16))),
            Sample(aten.index.Tensor, (m.f(8, 16), [m.i(4, high=8)])),
            Sample(aten.index.Tensor, (m.f(8, 16, 8), [m.i(4, 2, high=8), m.i(4, 2, high=16)])),
            Sample(aten.index.Tensor, (m.f(8, 16, 8), [None, m.i(8, high=16)])),
            Sample(aten.select_scatter.default, (m.f(8, 16), m.f(8), 1, 3)),
            Sample(aten.select_scatter.default, (m.f(8, 16, 8), m.f(8, 8), 1, 5)),
            Sample(aten.slice_scatter.default, (m.f(8, 16), m.f(8, 4), 1, 4, 8)),
            Sample(aten.slice_scatter.default, (m.f(16, 8), m.f(8, 8), 0, 8, 16)),
            Sample(aten.fill.Tensor, (m.f(8, 16), m.f())),
            Sample(aten.index_put.default, (m.f(8, 16), [m.b(8, 16)], m.f())),
            Sample(aten.index_put.default, (m.f(8, 16), [m.i(4, high=8)], m.f(4, 16))),
            Sample(aten.embedding.default, (m.f(32, 16), m.i(8, 4, high=32))),
            Sample(aten.embedding_dense_backward.default, (m.f(8, 4, 16), m.i(8, 4, high=32), 32, -1, False))]


def _loss(m: _Maker) -> list[Sample]:
    logp = torch.log_softmax(m.f(8, 16), -1)
    target = m.i(8, high=16)
    target[3] = -100  # an ignored row: the counted rows differ per rank
    found = []
    for reduction in (0, 1, 2):  # none, mean, sum
        found.append(Sample(aten.nll_loss_forward.default, (logp, target, None, reduction, -100)))
        forward = aten.nll_loss_forward.default(logp, target, None, reduction, -100)
        grad = m.f(8) if reduction == 0 else m.f()
        found.append(Sample(aten.nll_loss_backward.default, (grad, logp, target, None, reduction, -100, forward[1])))
    weight = m.pos(16)
    found.append(Sample(aten.nll_loss_forward.default, (logp, target, weight, 2, -100)))
    total = aten.nll_loss_forward.default(logp, target, weight, 1, -100)[1]
    found.append(Sample(aten.nll_loss_backward.default, (m.f(), logp, target, weight, 1, -100, total)))
    return found


def _attention(m: _Maker) -> list[Sample]:
    attention, backward = torch.ops.shardgraph.attention.default, torch.ops.shardgraph.attention_backward.default
    q, k, v = m.f(8, 8, 8, 8), m.f(8, 8, 8, 8), m.f(8, 8, 8, 8)
    kv = (m.f(8, 4, 8, 8), m.f(8, 4, 8, 8))  # grouped: 4 key/value heads serve 8 query heads
    # The backward reads the forward's output and log-sum-exp: the real ones, so that they agree.
    saved, saved_grouped = attention(q, k, v, True, 0.25, False), attention(q, *kv, False, 0.25, True)
    return [Sample(attention, (q, k, v, True, 0.25, False)),
            Sample(attention, (q, *kv, False, 0.25, True)),
            Sample(backward, (m.f(8, 8, 8, 8), q, k, v, *saved, True, 0.25, False)),
            Sample(backward, (m.f(8, 8, 8, 8), q, *kv, *saved_grouped, False, 0.25, True))]


def _norms(m: _Maker) -> list[Sample]:
    """``shardgraph.rms_norm`` over the last dim, in both roundings, and its backward on the
    forward's own ``rstd``."""
    norm, backward = torch.ops.shardgraph.rms_norm.default, torch.ops.shardgraph.rms_norm_backward.default
    found = []
    for x, upcast in ((m.f(8, 16, 8), True), (m.f(8, 4, 8, 16), False)):
        weight = m.f(x.shape[-1])
        rstd = norm(x, weight, 1e-6, upcast)[1]
        found += [Sample(norm, (x, weight, 1e-6, upcast)),
                  Sample(backward, (m.f(*x.shape), x, weight, rstd, upcast))]
    return found


def _rotary(m: _Maker) -> list[Sample]:
    """``shardgraph.rotary`` and its backward: ``[batch, heads, seq, dim]`` with tables broadcast
    over heads (HF's), and tables of the input's own shape."""
    rotary, backward = torch.ops.shardgraph.rotary.default, torch.ops.shardgraph.rotary_backward.default
    found = []
    for x, table in ((m.f(4, 2, 8, 8), (4, 1, 8, 8)), (m.f(8, 4, 16), (8, 4, 16))):
        cos, sin = m.f(*table), m.f(*table)
        layout = list(range(x.dim()))
        found += [Sample(rotary, (x, cos, sin, layout)), Sample(backward, (m.f(*x.shape), cos, sin, layout))]
    return found


def _sequence_mixers(m: _Maker) -> list[Sample]:
    """Ops of state-space, short-convolution and linear-attention layers, LayerNorm's prims and
    complex rotary embeddings."""
    x, weight, bias = m.f(8, 16, 8), m.f(16, 1, 4), m.f(16)
    conv = ([1], [3], [1], False, [0], 16)  # stride, padding, dilation, transposed, output_padding, groups
    grad = m.f(8, 16, 11)  # length 8 + 2 * 3 - 4 + 1
    upper = m.f(8, 8, 8).triu() + 4 * torch.eye(8, dtype=F64)  # well conditioned
    complex_values = torch.view_as_complex(m.f(8, 16, 2))
    return [Sample(aten.convolution.default, (x, weight, bias, *conv)),
            Sample(aten.convolution.default, (m.f(8, 16, 8), m.f(8, 16, 3), None, [1], [0], [1], False, [0], 1)),
            Sample(aten.convolution_backward.default, (grad, x, weight, [16], *conv, [True, True, True])),
            Sample(aten.convolution_backward.default, (grad, x, weight, [16], *conv, [True, True, False])),
            Sample(aten.linalg_solve_triangular.default, (upper, m.f(8, 8, 16)), {"upper": True}),
            Sample(aten.linalg_solve_triangular.default, (upper, m.f(8, 16, 8)), {"upper": True, "left": False}),
            Sample(aten.constant_pad_nd.default, (m.f(8, 16, 8), [2, 0])),
            Sample(aten.constant_pad_nd.default, (m.f(8, 16), [0, 0, 1, 1])),
            Sample(aten.constant_pad_nd.default, (m.f(8, 16), [1, 1], 2.5)),
            Sample(aten.flip.default, (m.f(8, 16), [1])),
            Sample(aten.flip.default, (m.f(8, 16, 8), [0, 2])),
            # a causal convolution's windows (Inkling 2): [batch, channels, length] -> [.., windows, size]
            Sample(aten.unfold.default, (m.f(8, 16, 11), -1, 4, 1)),
            Sample(aten.unfold.default, (m.f(8, 16, 8), 1, 4, 2)),
            Sample(aten.unfold_backward.default, (m.f(8, 16, 8, 4), [8, 16, 11], 2, 4, 1)),
            Sample(aten.unfold_backward.default, (m.f(8, 7, 8, 4), [8, 16, 8], 1, 4, 2)),
            Sample(prims.broadcast_in_dim.default, (m.f(8, 16), [8, 16, 1], [0, 1])),
            Sample(prims.broadcast_in_dim.default, (m.f(16), [8, 16], [1])),
            # LayerNorm's statistics [batch, seq, 1] and its weight [hidden] broadcast to the input
            Sample(prims.broadcast_in_dim.default, (m.f(8, 16, 1), [8, 16, 8], [0, 1, 2])),
            Sample(prims.broadcast_in_dim.default, (m.f(8, 16), [8, 4, 16], [0, 2])),
            Sample(prims.var.default, (m.f(8, 16), [1], 1.0)),
            Sample(prims.var.default, (m.f(8, 16, 8), [0, 2], 0.0)),
            Sample(prims.sum.default, (m.f(8, 16), [1])),
            Sample(prims.sum.default, (m.f(8, 16, 8), [0, 2])),
            Sample(prims.div.default, (m.f(8, 16), m.pos(8, 16))),
            Sample(prims.div.default, (m.f(8, 16), 32.0)),
            Sample(aten.clamp.Tensor, (m.f(8, 16), m.f(8, 1))),
            Sample(aten.clamp.Tensor, (m.f(8, 16),), {"max": m.f(16)}),
            Sample(aten.view_as_complex.default, (m.f(8, 16, 2),)),
            Sample(aten.view_as_real.default, (complex_values,)),
            Sample(aten._conj.default, (complex_values,)),
            Sample(aten.polar.default, (m.pos(8, 16), m.f(8, 16)))]


def _random_draws(m: _Maker) -> list[Sample]:
    """The seeded random ops a train-mode router becomes (``shardgraph/ops/random.py``)."""
    cpu = torch.device("cpu")
    state = torch.ops.shardgraph.random_state(torch.tensor(7), cpu)
    draw = torch.ops.shardgraph.random_draw.default
    return [Sample(torch.ops.shardgraph.random_state.default, (torch.tensor(7), cpu)),
            Sample(draw, (state, "uniform", [8, 16], F64, cpu, -1.0, 1.0)),
            Sample(draw, (state, "exponential", [8, 4], F64, cpu, 1.0, 0.0))]


def samples(seed: int = 0) -> list[Sample]:
    """Every sample, in a fixed order, from one seeded generator."""
    m = _Maker(seed)
    return [*_pointwise(m), *_factories(m), *_matmul(m), *_reductions(m), *_shapes(m), *_indexing(m), *_loss(m),
            *_attention(m), *_norms(m), *_rotary(m), *_sequence_mixers(m), *_random_draws(m)]
