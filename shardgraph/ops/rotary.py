"""``shardgraph::rotary``: rotary position embedding in its rotate-half form, forward and backward.

    rotary(x, cos, sin, layout)            = x * cos + cat(-x2, x1) * sin   (x1, x2: halves of the last dim)
    rotary_backward(grad, cos, sin, layout) = grad * cos + cat(s2, -s1)      (s = grad * sin)

with ``cos`` and ``sin`` of ``x``'s dtype broadcast to ``x``'s shape. Both outputs are stored in
``layout`` (``torch.empty_permuted``'s physical order of dims, the last innermost), which the
frontend takes from ``x`` as traced: attention's ``q`` and ``k`` are transposed views of the
projections' ``[batch, seq, heads, dim]``, and an output in that layout reaches the attention
kernels and (its gradient) the projections' backward without a copy. It is fixed when traced,
not read from the input at run time: a lowered program may feed the op an input laid out
otherwise (a collective's output is contiguous), and the views after the op were recorded
against the traced layout. The backward needs no
activation: it is linear in the gradient, with the same tables. The frontend traces the form as
this op where a model computes it (``shardgraph/frontend/rotary.py``), so the program runs one
node each way where the aten form runs about seven kernels forward and eight backward over the
whole of ``q`` and ``k``. On a GPU each node is one Triton kernel (``kernels/rotary.py``, equal
to the aten form bit for bit); elsewhere, or under ``torch.compile`` (``as_aten_ops``), the aten
form runs. The placement rule is ``passes/rules/rotary.py``: every dim but the last is independent.
"""

from __future__ import annotations

import torch

from kernels import op_bodies
from kernels import rotary as rotary_kernels

__all__ = ["rotary", "rotary_backward", "rotates", "ATEN_FORMS"]


def _check(op: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout) -> None:
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"{op}: the last dim of the input {list(x.shape)} must be even (its halves rotate)")
    if not (cos.dtype == sin.dtype == x.dtype) or not x.dtype.is_floating_point:
        raise ValueError(f"{op}: input, cos and sin must share one floating dtype, got {x.dtype}, {cos.dtype}, "
                         f"{sin.dtype}")
    if not (rotary_kernels.broadcasts_to(cos.shape, x.shape) and rotary_kernels.broadcasts_to(sin.shape, x.shape)):
        raise ValueError(f"{op}: cos {list(cos.shape)} and sin {list(sin.shape)} must broadcast to the input's "
                         f"shape {list(x.shape)}")
    if sorted(layout) != list(range(x.dim())) or layout[-1] != x.dim() - 1:
        raise ValueError(f"{op}: layout {list(layout)} must order all {x.dim()} dims of the input, its last dim "
                         f"innermost")


def rotates(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout) -> bool:
    """Whether the op takes these operands (``_check``'s rule, as a yes or no)."""
    try:
        _check("shardgraph.rotary", x, cos, sin, layout)
    except ValueError:
        return False
    return True


def _aten_forward(x, cos, sin, layout):
    # In the op's layout: the trace recorded the views after it against that layout.
    return rotary_kernels.laid_out(rotary_kernels.reference_forward(x, cos, sin), layout)


def _aten_backward(grad, cos, sin, layout):
    return rotary_kernels.laid_out(rotary_kernels.reference_backward(grad, cos, sin), layout)


@op_bodies.custom_op("shardgraph::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: list[int]) -> torch.Tensor:
    _check("shardgraph.rotary", x, cos, sin, layout)
    if rotary_kernels.runs(x, cos, sin):
        return rotary_kernels.forward(x, cos, sin, layout)
    return _aten_forward(x, cos, sin, layout)


@rotary.register_fake
def _(x, cos, sin, layout):
    _check("shardgraph.rotary", x, cos, sin, layout)
    return rotary_kernels.empty_laid_out(x, layout)


@op_bodies.custom_op("shardgraph::rotary_backward", mutates_args=())
def rotary_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: list[int]) -> torch.Tensor:
    _check("shardgraph.rotary_backward", grad, cos, sin, layout)
    if rotary_kernels.runs(grad, cos, sin):
        return rotary_kernels.backward(grad, cos, sin, layout)
    return _aten_backward(grad, cos, sin, layout)


@rotary_backward.register_fake
def _(grad, cos, sin, layout):
    _check("shardgraph.rotary_backward", grad, cos, sin, layout)
    return rotary_kernels.empty_laid_out(grad, layout)


def _setup_context(ctx, inputs, output):
    _x, cos, sin, layout = inputs
    ctx.save_for_backward(cos, sin)
    ctx.layout = layout


def _autograd_backward(ctx, grad):
    # The frontend forms the op only for tables that take no gradient.
    cos, sin = ctx.saved_tensors
    return torch.ops.shardgraph.rotary_backward(grad, cos, sin, ctx.layout), None, None, None


rotary.register_autograd(_autograd_backward, setup_context=_setup_context)


# The aten form of each node, for a graph run under torch.compile (``shardgraph.ops.as_aten_ops``).
ATEN_FORMS = {torch.ops.shardgraph.rotary.default: _aten_forward,
              torch.ops.shardgraph.rotary_backward.default: _aten_backward}
