"""Rotary embedding traced as one ``shardgraph.rotary`` op, recognised by the ops a model runs.

HF's models (and most others) apply rotary embedding with a function, not a module, as

    x * cos + rotate_half(x) * sin,    rotate_half(x) = cat((-x[..., h:], x[..., :h]), dim=-1)

While ``trace`` runs, a ``TorchFunctionMode`` follows these calls as the model makes them: the two
halves of a last dim (``x[..., :h]``, ``x[..., h:]``, ``h`` half of it), the negated second half,
their concatenation in that order on the last dim (``rotate_half(x)``), its product with a tensor
``sin``, a product of ``x`` itself with a tensor ``cos``, and finally the sum of the two products.
That sum is then computed as ``shardgraph.rotary(x, cos, sin, layout)`` (``x``'s layout) instead, so its autograd is the
op's backward. The ops recorded on the way have no reader left and are removed as dead code.

The sum is replaced only where the op computes the same thing: ``cos``, ``sin`` and ``x`` share one
floating dtype, the tables broadcast to ``x``'s shape and take no gradient (a learned table keeps
the aten form, whose autograd gives its gradient), and the last dim is even. Anything else (the
interleaved form with ``stack``, complex multiplication, a partial rotary whose halves come from a
slice of ``x``, which is then ``x`` itself here) is traced as the aten ops the model runs, or, for
the partial form, as the op on the slice. ``rotary_traced_as_op(False)`` turns this off.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

from kernels.caches import switched
from kernels.rotary import layout_of

from ..ops.rotary import rotates

__all__ = ["rotary_recognised", "rotary_traced_as_op"]

# Off: rotary embedding is traced as the aten ops the model runs (to compare the two).
TRACE_AS_OP = True

_GETITEM = {torch.Tensor.__getitem__}
_NEG = {torch.Tensor.__neg__, torch.neg, torch.Tensor.neg}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_MUL = {torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.mul, torch.Tensor.mul}
_ADD = {torch.Tensor.__add__, torch.Tensor.__radd__, torch.add, torch.Tensor.add}


def rotary_traced_as_op(enabled: bool):
    """Rotary embedding traced as ``shardgraph.rotary`` (the default) or as the model's aten ops."""
    return switched(sys.modules[__name__], "TRACE_AS_OP", bool(enabled))


def _half_taken(x, index) -> int | None:
    """0 or 1 where ``x[index]`` is the first or second half of ``x``'s last dim, else None."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] % 2 or not isinstance(index, tuple):
        return None
    if len(index) == 2 and index[0] is Ellipsis:
        part = index[1]
    elif len(index) == x.dim() and all(i == slice(None) for i in index[:-1]):
        part = index[-1]
    else:
        return None
    if not isinstance(part, slice) or part.step not in (None, 1):
        return None
    width, half = x.shape[-1], x.shape[-1] // 2
    start = 0 if part.start is None else part.start
    stop = width if part.stop is None else part.stop
    if (start, stop) == (0, half):
        return 0
    if (start, stop) in ((half, width), (-half, width)):
        return 1
    return None


def _last_dim(args, kwargs, tensors) -> bool:
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    return isinstance(dim, int) and dim in (-1, tensors[0].dim() - 1)


class _RotaryRecogniser(TorchFunctionMode):
    """Tags each value on the way to ``x * cos + rotate_half(x) * sin`` and replaces the sum."""

    def __init__(self):
        super().__init__()
        # id(value) -> (value, tag). The value is held so that its id is not reused while tagged.
        self.tags: dict[int, tuple[torch.Tensor, tuple]] = {}

    def _tag(self, value):
        held = self.tags.get(id(value)) if isinstance(value, torch.Tensor) else None
        return held[1] if held is not None and held[0] is value else None

    def _set(self, value, tag) -> None:
        if isinstance(value, torch.Tensor):
            self.tags[id(value)] = (value, tag)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _GETITEM:
            half = _half_taken(args[0], args[1] if isinstance(args[1], tuple) else (args[1],))
            if half is not None:
                self._set(out, ("half", args[0], half))
        elif func in _NEG:
            tag = self._tag(args[0])
            if tag is not None and tag[0] == "half" and tag[2] == 1:
                self._set(out, ("negated second half", tag[1]))
        elif func in _CAT and not kwargs.get("out"):
            parts = args[0] if args else kwargs.get("tensors")
            if isinstance(parts, (list, tuple)) and len(parts) == 2 and _last_dim(args, kwargs, parts):
                first, second = self._tag(parts[0]), self._tag(parts[1])
                if (first is not None and second is not None and first[0] == "negated second half"
                        and second[0] == "half" and second[2] == 0 and first[1] is second[1]):
                    self._set(out, ("rotated", first[1]))
        elif func in _MUL and len(args) == 2 and not kwargs:
            a, b = args
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                rotated = next((t for t in (self._tag(a), self._tag(b)) if t is not None and t[0] == "rotated"), None)
                if rotated is not None:
                    self._set(out, ("rotated times", rotated[1], b if self._tag(a) is rotated else a))
                else:
                    self._set(out, ("product", a, b))
        elif func in _ADD and len(args) == 2 and not kwargs:
            replaced = self._rotary(*args)
            if replaced is not None:
                return replaced
        return out

    def _rotary(self, left, right):
        tags = [self._tag(left), self._tag(right)]
        if any(t is None for t in tags):
            return None
        by_kind = {t[0]: t for t in tags}
        if set(by_kind) != {"product", "rotated times"}:
            return None
        _, x, sin = by_kind["rotated times"]
        _, a, b = by_kind["product"]
        if a is x:
            cos = b
        elif b is x:
            cos = a
        else:
            return None
        layout = layout_of(x)  # the output keeps x's layout as traced, as the aten ops would have
        if cos.requires_grad or sin.requires_grad or not rotates(x, cos, sin, layout):
            return None
        return torch.ops.shardgraph.rotary(x, cos, sin, layout)


@contextlib.contextmanager
def rotary_recognised() -> Iterator[None]:
    """Inside the block, ``x * cos + rotate_half(x) * sin`` computes ``shardgraph.rotary``."""
    if not TRACE_AS_OP:
        yield
        return
    with _RotaryRecogniser():
        yield

