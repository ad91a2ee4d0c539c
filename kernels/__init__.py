"""Grouped matrix products for MoE experts: forward, dgrad and wgrad.

``grouped_mm(x, w, offsets, w_layout="ekn" | "enk")``: ``out[rows of group g] = x[rows] @ W[g]``
with group ends in ``offsets`` (int32, cumulative, on the device: no host read of the
boundaries). ``w_layout="ekn"`` stores ``W[g]`` as ``[K, N]``; ``"enk"`` as ``[N, K]`` (HF's
``gate_up_proj [E, 2I, H]``, so ``out = x @ w[g].T``). ``grouped_mm_dgrad`` gives
``dout @ W[g].T`` and ``grouped_mm_wgrad`` gives ``x_g.T @ dout_g`` in the weight's own layout.
``grouped_mm`` is differentiable. Rows after ``offsets[-1]`` come out as zeros, and wgrad gives
zeros for empty groups, whatever the backend.

Backends (callers do not care which runs; each falls back to ``loop`` where it cannot run):

``triton``  the Triton kernels (``kernels/grouped_gemm*.py``): float16/bfloat16/float32 on a CUDA device
            (the TMA kernels on Hopper, a portable kernel elsewhere), or on the CPU under
            ``TRITON_INTERPRET=1``
``torch``   ``torch._grouped_mm``: bfloat16 on Hopper; float32/bfloat16/float16 on the CPU; strides
            must be 16-byte aligned
``loop``    one ``torch.mm`` per group: any device and dtype, the reference (reads ``offsets`` on
            the host)
``auto``    ``triton`` where it runs (a CUDA device, or the interpreter), ``loop`` otherwise

Choose with ``set_backend(name)``, ``with use_backend(name):`` or the environment variable
``SHARDGRAPH_GROUPED_MM_BACKEND`` (read at import). The same functions are registered as
``torch.ops.shardgraph.grouped_mm`` / ``grouped_mm_dgrad`` / ``grouped_mm_wgrad`` with fake
kernels and, on the forward op, autograd, so traced graphs keep each as one node.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import op_bodies
from .reference import grouped_mm_dgrad_loop, grouped_mm_loop, grouped_mm_wgrad_loop, sgd_step_
from .validation import GroupedGemmError, check_dgrad, check_forward, check_wgrad

__all__ = [
    "grouped_mm",
    "grouped_mm_dgrad",
    "grouped_mm_wgrad",
    "GroupedMatmul",
    "GroupedGemmError",
    "set_backend",
    "use_backend",
    "current_backend",
    "resolve_backend",
    "BACKENDS",
]

BACKENDS = ("auto", "triton", "torch", "loop")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _checked_backend(name, source: str) -> str:
    if name not in BACKENDS:
        raise GroupedGemmError(f"{source}: unknown grouped GEMM backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


_backend = _checked_backend(os.environ.get("SHARDGRAPH_GROUPED_MM_BACKEND", "auto"), "SHARDGRAPH_GROUPED_MM_BACKEND")


def set_backend(name: str) -> None:
    global _backend
    _backend = _checked_backend(name, "set_backend")


def current_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _triton_runs(tensor: torch.Tensor) -> bool:
    if tensor.dtype not in _TRITON_DTYPES:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(*tensors: torch.Tensor) -> str:
    """The backend that runs for these operands under the current selection."""
    if _backend in ("auto", "triton"):
        return "triton" if _triton_runs(tensors[0]) else "loop"
    if _backend == "torch":
        from . import grouped_gemm_vendor

        return "torch" if grouped_gemm_vendor.runs(*tensors) else "loop"
    return "loop"


def _forward(x, w, offsets, w_layout):
    backend = resolve_backend(x, w)
    if backend == "triton":
        from .grouped_gemm import triton_grouped_mm

        return triton_grouped_mm(x, w, offsets, w_layout)
    if backend == "torch" and w.shape[0] > 0:
        from . import grouped_gemm_vendor

        weight = w if w_layout == "ekn" else w.transpose(1, 2)
        return grouped_gemm_vendor.product(x, weight, offsets)
    return grouped_mm_loop(x, w, offsets, w_layout)


def _dgrad(dout, w, offsets, w_layout):
    backend = resolve_backend(dout, w)
    if backend == "triton":
        from .grouped_gemm import triton_grouped_mm

        return triton_grouped_mm(dout, w, offsets, w_layout, transpose_weight=True)
    if backend == "torch" and w.shape[0] > 0:
        from . import grouped_gemm_vendor

        weight = w.transpose(1, 2) if w_layout == "ekn" else w
        return grouped_gemm_vendor.product(dout, weight, offsets)
    return grouped_mm_dgrad_loop(dout, w, offsets, w_layout)


def _wgrad(x, dout, offsets, num_groups, w_layout):
    backend = resolve_backend(x, dout)
    if backend == "triton":
        from .grouped_gemm import triton_grouped_mm_wgrad

        return triton_grouped_mm_wgrad(x, dout, offsets, num_groups, w_layout)
    if backend == "torch" and num_groups > 0:
        from . import grouped_gemm_vendor

        # dW[g] = left_g.T @ right_g lands in the weight's own layout with no transposed copy.
        left, right = (x, dout) if w_layout == "ekn" else (dout, x)
        return grouped_gemm_vendor.wgrad(left, right, offsets)
    return grouped_mm_wgrad_loop(x, dout, offsets, num_groups, w_layout)


# ----------------------------------------------------------------------------------------------
# Custom ops: what lowered graphs call
# ----------------------------------------------------------------------------------------------

# Defined through torch.library's schema-level API rather than the torch.library.custom_op
# decorator, whose Python wrapper around every call costs several microseconds of host time
# (benchmarks/grouped_gemm_host.py measures it), paid six times per MoE layer per training step:
# two products, two dgrads, two wgrads. Fake kernels and the forward's autograd are registered
# through torch.library's public functions, as the decorator would.
_library = torch.library.Library("shardgraph", "FRAGMENT")
_library.define("grouped_mm(Tensor x, Tensor w, Tensor offsets, str w_layout) -> Tensor")
_library.define("grouped_mm_dgrad(Tensor dout, Tensor w, Tensor offsets, str w_layout) -> Tensor")
_library.define("grouped_mm_wgrad(Tensor x, Tensor dout, Tensor offsets, SymInt num_groups, str w_layout) -> Tensor")
# ``after``: tensors the step is ordered after and does not read (the other readers of the old
# weight, so that a compiler's reordering cannot move one of them past the in-place update).
_library.define("grouped_mm_wgrad_sgd_(Tensor(a!) param, Tensor x, Tensor dout, Tensor offsets, Tensor lr, "
                "SymInt num_groups, str w_layout, Tensor[] after) -> Tensor")


def _grouped_mm_op(x, w, offsets, w_layout):
    check_forward(x, w, offsets, w_layout)
    return _forward(x, w, offsets, w_layout)


def _grouped_mm_dgrad_op(dout, w, offsets, w_layout):
    check_dgrad(dout, w, offsets, w_layout)
    return _dgrad(dout, w, offsets, w_layout)


def _grouped_mm_wgrad_op(x, dout, offsets, num_groups, w_layout):
    check_wgrad(x, dout, offsets, num_groups, w_layout)
    return _wgrad(x, dout, offsets, num_groups, w_layout)


def _check_wgrad_sgd(param, x, dout, offsets, lr, num_groups, w_layout):
    check_wgrad(x, dout, offsets, num_groups, w_layout)
    shape = (num_groups, x.shape[1], dout.shape[1]) if w_layout == "ekn" else (num_groups, dout.shape[1], x.shape[1])
    if tuple(param.shape) != shape or param.dtype != x.dtype:
        raise GroupedGemmError(f"grouped_mm_wgrad_sgd_: param is {tuple(param.shape)} {param.dtype}; the gradient "
                               f"of x {tuple(x.shape)} and dout {tuple(dout.shape)} in layout {w_layout!r} is "
                               f"{shape} {x.dtype}")
    if lr.dim() != 0 or lr.dtype != param.dtype:
        raise GroupedGemmError(f"grouped_mm_wgrad_sgd_: lr must be a 0-dim tensor in the parameter's dtype "
                               f"{param.dtype}, got {lr.dtype} of shape {tuple(lr.shape)}")


def _grouped_mm_wgrad_sgd_op(param, x, dout, offsets, lr, num_groups, w_layout, after):
    """``param -= lr * dW`` in place (``dW`` the grouped wgrad, never held whole on the Triton
    backend) and ``sum(float32(dW) ** 2)``. Elsewhere: the wgrad, then the same step and sum as
    the unfused graph's ops."""
    _check_wgrad_sgd(param, x, dout, offsets, lr, num_groups, w_layout)
    if resolve_backend(x, dout) == "triton":
        from .grouped_gemm import triton_grouped_mm_wgrad_sgd_

        return triton_grouped_mm_wgrad_sgd_(param, x, dout, offsets, lr, num_groups, w_layout)
    return sgd_step_(param, _wgrad(x, dout, offsets, num_groups, w_layout), lr)


# CompositeExplicitAutograd: one kernel for every device (the backends choose among themselves),
# with autograd registered separately below rather than traced through these bodies.
op_bodies.impl(_library, "grouped_mm", _grouped_mm_op)
op_bodies.impl(_library, "grouped_mm_dgrad", _grouped_mm_dgrad_op)
op_bodies.impl(_library, "grouped_mm_wgrad", _grouped_mm_wgrad_op)
op_bodies.impl(_library, "grouped_mm_wgrad_sgd_", _grouped_mm_wgrad_sgd_op)


@torch.library.register_fake("shardgraph::grouped_mm", lib=_library)
def _(x, w, offsets, w_layout):
    check_forward(x, w, offsets, w_layout)
    n = w.shape[2] if w_layout == "ekn" else w.shape[1]
    return x.new_empty((x.shape[0], n))


@torch.library.register_fake("shardgraph::grouped_mm_dgrad", lib=_library)
def _(dout, w, offsets, w_layout):
    check_dgrad(dout, w, offsets, w_layout)
    k = w.shape[1] if w_layout == "ekn" else w.shape[2]
    return dout.new_empty((dout.shape[0], k))


@torch.library.register_fake("shardgraph::grouped_mm_wgrad", lib=_library)
def _(x, dout, offsets, num_groups, w_layout):
    check_wgrad(x, dout, offsets, num_groups, w_layout)
    shape = (num_groups, x.shape[1], dout.shape[1]) if w_layout == "ekn" else (num_groups, dout.shape[1], x.shape[1])
    return x.new_empty(shape)


@torch.library.register_fake("shardgraph::grouped_mm_wgrad_sgd_", lib=_library)
def _(param, x, dout, offsets, lr, num_groups, w_layout, after):
    _check_wgrad_sgd(param, x, dout, offsets, lr, num_groups, w_layout)
    return x.new_empty((), dtype=torch.float32)


def _gradients(needs_input_grad, x, w, offsets, w_layout, grad):
    grad_x = grad_w = None
    if needs_input_grad[0]:
        grad_x = torch.ops.shardgraph.grouped_mm_dgrad(grad, w, offsets, w_layout)
    if needs_input_grad[1]:
        grad_w = torch.ops.shardgraph.grouped_mm_wgrad(x, grad, offsets, w.shape[0], w_layout)
    return grad_x, grad_w


def _setup(ctx, inputs, output):
    x, w, offsets, w_layout = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.w_layout = w_layout


def _backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    return (*_gradients(ctx.needs_input_grad, x, w, offsets, ctx.w_layout, grad), None, None)


torch.library.register_autograd("shardgraph::grouped_mm", _backward, setup_context=_setup, lib=_library)


class GroupedMatmul(torch.autograd.Function):
    """``grouped_mm`` as an autograd Function over the custom ops: forward ``grouped_mm``,
    backward ``grouped_mm_dgrad`` and ``grouped_mm_wgrad`` (each one graph node when traced)."""

    @staticmethod
    def forward(ctx, x, w, offsets, w_layout="ekn"):
        ctx.save_for_backward(x, w, offsets)
        ctx.w_layout = w_layout
        return torch.ops.shardgraph.grouped_mm(x, w, offsets, w_layout)

    @staticmethod
    def backward(ctx, grad):
        x, w, offsets = ctx.saved_tensors
        return (*_gradients(ctx.needs_input_grad, x, w, offsets, ctx.w_layout, grad), None, None)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, w_layout: str = "ekn") -> torch.Tensor:
    """``out[rows of g] = x[rows of g] @ W[g]`` (differentiable in ``x`` and ``w``)."""
    check_forward(x, w, offsets, w_layout)
    return GroupedMatmul.apply(x, w, offsets, w_layout)


def grouped_mm_dgrad(dout: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *,
                     w_layout: str = "ekn") -> torch.Tensor:
    """``dx[rows of g] = dout[rows of g] @ W[g].T``."""
    check_dgrad(dout, w, offsets, w_layout)
    return torch.ops.shardgraph.grouped_mm_dgrad(dout, w, offsets, w_layout)


def grouped_mm_wgrad(x: torch.Tensor, dout: torch.Tensor, offsets: torch.Tensor, num_groups: int, *,
                     w_layout: str = "ekn") -> torch.Tensor:
    """``dW[g] = x[rows of g].T @ dout[rows of g]`` in the weight's storage layout."""
    check_wgrad(x, dout, offsets, num_groups, w_layout)
    return torch.ops.shardgraph.grouped_mm_wgrad(x, dout, offsets, num_groups, w_layout)


# The fused MoE expert ops (torch.ops.shardgraph.gather_glu_grouped_mm and its backward ops)
# register themselves on import; they build on the backends above.
from . import fused_moe  # noqa: E402,F401
# The embedding's sparse SGD step (torch.ops.shardgraph.embedding_sgd_), placed by passes/fuse_wgrad_sgd.py.
from . import embedding_sgd  # noqa: E402,F401
