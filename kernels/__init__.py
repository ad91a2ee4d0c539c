"""Grouped matrix products for MoE experts: forward, dgrad and wgrad.

``grouped_mm(x, w, offsets, w_layout="ekn" | "enk")``: ``out[rows of group g] = x[rows] @ W[g]``
with group ends in ``offsets`` (int32, cumulative, on the device: no host read of the
boundaries). ``w_layout="ekn"`` stores ``W[g]`` as ``[K, N]``; ``"enk"`` as ``[N, K]`` (HF's
``gate_up_proj [E, 2I, H]``). ``grouped_mm_dgrad`` gives ``dout @ W[g].T`` and ``grouped_mm_wgrad``
gives ``x_g.T @ dout_g`` in the weight's own layout. ``grouped_mm`` is differentiable.

Backends (callers do not care which runs):

``triton``  the kernels in ``kernels/grouped_gemm.py`` (CUDA, or the CPU under TRITON_INTERPRET=1)
``torch``   ``torch._grouped_mm`` (bf16 on Hopper; 16-byte aligned strides on the CPU)
``loop``    one ``torch.mm`` per group: any device and dtype, the reference
``auto``    triton on a CUDA device, or under the Triton interpreter; loop otherwise

Choose with ``set_backend(name)``, ``with use_backend(name):`` or SHARDGRAPH_GROUPED_MM_BACKEND.
The same functions are registered as ``torch.ops.shardgraph.grouped_mm`` / ``grouped_mm_dgrad`` /
``grouped_mm_wgrad`` with fake kernels, which is what lowered graphs call.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .reference import check_layout, grouped_mm_dgrad_loop, grouped_mm_loop, grouped_mm_wgrad_loop

__all__ = [
    "grouped_mm",
    "grouped_mm_dgrad",
    "grouped_mm_wgrad",
    "set_backend",
    "use_backend",
    "current_backend",
    "BACKENDS",
    "GroupedMatmul",
]

BACKENDS = ("auto", "triton", "torch", "loop")
_backend = os.environ.get("SHARDGRAPH_GROUPED_MM_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"SHARDGRAPH_GROUPED_MM_BACKEND={_backend!r}; choose one of {', '.join(BACKENDS)}")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown grouped GEMM backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


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


def _triton_usable(tensor: torch.Tensor) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if tensor.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and tensor.device.type == "cpu"


def _resolve(tensor: torch.Tensor) -> str:
    if _backend != "auto":
        return _backend
    return "triton" if _triton_usable(tensor) else "loop"


def _check(x, w, offsets, w_layout):
    check_layout(w_layout)
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"grouped_mm needs x [M, K] and w [E, ., .], got {tuple(x.shape)} and {tuple(w.shape)}")
    k = w.shape[1] if w_layout == "ekn" else w.shape[2]
    if x.shape[1] != k:
        raise ValueError(f"grouped_mm: x has K={x.shape[1]} but w {tuple(w.shape)} in layout {w_layout!r} has K={k}")
    if offsets.dim() != 1 or offsets.shape[0] != w.shape[0] or offsets.dtype != torch.int32:
        raise ValueError(f"grouped_mm: offsets must be int32 [E={w.shape[0]}], got {offsets.dtype} {tuple(offsets.shape)}")


def _torch_forward(x, w, offsets, w_layout):
    weight = w if w_layout == "ekn" else w.transpose(1, 2)
    return torch._grouped_mm(x, weight, offs=offsets)


def _forward(x, w, offsets, w_layout):
    backend = _resolve(x)
    if backend == "triton":
        from .grouped_gemm import triton_grouped_mm

        return triton_grouped_mm(x, w, offsets, w_layout)
    if backend == "torch":
        return _torch_forward(x, w, offsets, w_layout)
    return grouped_mm_loop(x, w, offsets, w_layout)


def _dgrad(dout, w, offsets, w_layout):
    backend = _resolve(dout)
    if backend == "triton":
        from .grouped_gemm import triton_grouped_mm

        return triton_grouped_mm(dout, w, offsets, w_layout, transpose_weight=True)
    if backend == "torch":
        weight = w.transpose(1, 2) if w_layout == "ekn" else w
        return torch._grouped_mm(dout, weight, offs=offsets)
    return grouped_mm_dgrad_loop(dout, w, offsets, w_layout)


def _wgrad(x, dout, offsets, num_groups, w_layout):
    backend = _resolve(x)
    if backend == "triton":
        from .grouped_gemm import triton_grouped_mm_wgrad

        return triton_grouped_mm_wgrad(x, dout, offsets, num_groups, w_layout)
    if backend == "torch":
        product = torch._grouped_mm(x.t(), dout, offs=offsets)  # [E, K, N]
        return product if w_layout == "ekn" else product.transpose(1, 2).contiguous()
    return grouped_mm_wgrad_loop(x, dout, offsets, num_groups, w_layout)


@torch.library.custom_op("shardgraph::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, w_layout: str) -> torch.Tensor:
    return _forward(x, w, offsets, w_layout)


@_grouped_mm_op.register_fake
def _(x, w, offsets, w_layout):
    n = w.shape[2] if w_layout == "ekn" else w.shape[1]
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("shardgraph::grouped_mm_dgrad", mutates_args=())
def _grouped_mm_dgrad_op(dout: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, w_layout: str) -> torch.Tensor:
    return _dgrad(dout, w, offsets, w_layout)


@_grouped_mm_dgrad_op.register_fake
def _(dout, w, offsets, w_layout):
    k = w.shape[1] if w_layout == "ekn" else w.shape[2]
    return dout.new_empty((dout.shape[0], k))


@torch.library.custom_op("shardgraph::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad_op(x: torch.Tensor, dout: torch.Tensor, offsets: torch.Tensor, num_groups: int,
                         w_layout: str) -> torch.Tensor:
    return _wgrad(x, dout, offsets, num_groups, w_layout)


@_grouped_mm_wgrad_op.register_fake
def _(x, dout, offsets, num_groups, w_layout):
    shape = (num_groups, x.shape[1], dout.shape[1]) if w_layout == "ekn" else (num_groups, dout.shape[1], x.shape[1])
    return x.new_empty(shape)


def _setup(ctx, inputs, output):
    x, w, offsets, w_layout = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.w_layout = w_layout


def _backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad_x = torch.ops.shardgraph.grouped_mm_dgrad(grad, w, offsets, ctx.w_layout) if ctx.needs_input_grad[0] else None
    grad_w = (torch.ops.shardgraph.grouped_mm_wgrad(x, grad, offsets, w.shape[0], ctx.w_layout)
              if ctx.needs_input_grad[1] else None)
    return grad_x, grad_w, None, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup)


class GroupedMatmul(torch.autograd.Function):
    """``grouped_mm`` as an autograd Function (the custom op above carries the same backward)."""

    @staticmethod
    def forward(ctx, x, w, offsets, w_layout="ekn"):
        ctx.save_for_backward(x, w, offsets)
        ctx.w_layout = w_layout
        return _forward(x, w, offsets, w_layout)

    @staticmethod
    def backward(ctx, grad):
        x, w, offsets = ctx.saved_tensors
        return (_dgrad(grad, w, offsets, ctx.w_layout), _wgrad(x, grad, offsets, w.shape[0], ctx.w_layout), None, None)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, w_layout: str = "ekn") -> torch.Tensor:
    _check(x, w, offsets, w_layout)
    return torch.ops.shardgraph.grouped_mm(x, w, offsets, w_layout)


def grouped_mm_dgrad(dout: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, w_layout: str = "ekn") -> torch.Tensor:
    check_layout(w_layout)
    return torch.ops.shardgraph.grouped_mm_dgrad(dout, w, offsets, w_layout)


def grouped_mm_wgrad(x: torch.Tensor, dout: torch.Tensor, offsets: torch.Tensor, num_groups: int,
                     w_layout: str = "ekn") -> torch.Tensor:
    check_layout(w_layout)
    return torch.ops.shardgraph.grouped_mm_wgrad(x, dout, offsets, num_groups, w_layout)
