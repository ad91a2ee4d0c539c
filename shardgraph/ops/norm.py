"""``shardgraph::rms_norm``: root-mean-square normalisation over the last dim, forward and backward.

Two roundings, as the two ways models write it (``upcast`` says which):

    upcast=True (HF transformers' ``RMSNorm``: Llama, Qwen, Mixtral, OLMoE, DeepSeek ...)
        rstd = rsqrt(mean(x.float()^2) + eps)                  float32, whatever x's dtype
        out  = weight * (x.float() * rstd).to(x.dtype)         normalised, rounded, then weighted
    upcast=False (a norm written in the input's own dtype)
        rstd = rsqrt(mean(x^2) + eps)                          in x's dtype
        out  = weight * (x * rstd)

Both are over the last dim; the output has the promoted dtype of input and weight. In float32
they are the same function. The frontend traces a module as this op only where the module's own
forward computes exactly one of them on probes (``shardgraph/frontend/norms.py``).

Written as aten ops, the forward is eight elementwise and reduction kernels (over float32 copies
of 16-bit input) and the backward about fifteen: after the matrix products, the largest share of
an unfused program's memory traffic (17 norms a step at 4 layers of Qwen3-30B-A3B, each over 8192
rows of 2048 or 32 x 128 features). As one op it is one kernel each way on a GPU
(``kernels/rms_norm.py``, for ``upcast`` or float32 input; the aten form under ``torch.compile``), keeps only ``rstd`` (one value per
row) for the backward, and has one placement rule (``passes/rules/norm.py``): rows are
independent, features are not.

The forward returns ``(out, rstd)``; ``rms_norm_backward(grad_out, x, weight, rstd, upcast)``
returns ``(grad_x, grad_weight)`` as autograd of the formula computes them (each rounding of the
forward has its cast back in the backward). Where the Triton kernels do not run (the CPU, float64,
16-bit input without ``upcast``, ``kernels.rms_norm.use_triton(False)``) aten ops run.
"""

from __future__ import annotations

import torch

from kernels import op_bodies
from kernels import rms_norm as rms_norm_kernels

__all__ = ["rms_norm", "rms_norm_backward", "statistics_dtype", "ATEN_FORMS"]


def _check(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.dim() < 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight {list(weight.shape)} must be 1-D with the input's last dim "
                         f"(input {list(x.shape)})")
    if not (x.dtype.is_floating_point and weight.dtype.is_floating_point):
        raise ValueError(f"{op}: input ({x.dtype}) and weight ({weight.dtype}) must be floating point")


def statistics_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    """The dtype of ``rstd`` (and of the sum of squares) for input of ``dtype``."""
    return torch.float32 if upcast or dtype == torch.float32 else dtype


def _native_forward(x, weight, eps, kernels: bool = True):
    # In float32 the two roundings are one function: the kernel takes it.
    if kernels and x.dtype == torch.float32 and rms_norm_kernels.runs(x, weight):
        return rms_norm_kernels.forward(x, weight, eps)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x * rstd), rstd.squeeze(-1)


def _native_backward(grad_out, x, weight, rstd, kernels: bool = True):
    if kernels and x.dtype == torch.float32 and rms_norm_kernels.runs(x, weight):
        return rms_norm_kernels.backward(grad_out, x, weight, rstd)
    # autograd of the forward above, op by op: d/dx (x * rstd) through rstd = rsqrt(mean(x^2) + eps).
    rstd = rstd.unsqueeze(-1)
    grad_normed = (grad_out * weight).to(x.dtype)
    grad_weight = (grad_out * (x * rstd)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    grad_rstd = (grad_normed * x).sum(-1, keepdim=True)
    grad_variance = -0.5 * grad_rstd * rstd.pow(3)
    grad_x = grad_normed * rstd + grad_variance / x.shape[-1] * 2 * x
    return grad_x.to(x.dtype), grad_weight


@op_bodies.custom_op("shardgraph::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check("shardgraph.rms_norm", x, weight)
    if not upcast:
        out, rstd = _native_forward(x, weight, eps)
    elif rms_norm_kernels.runs(x, weight):
        out, rstd = rms_norm_kernels.forward(x, weight, eps)
    else:
        out, rstd = rms_norm_kernels.reference_forward(x, weight, eps)
    # Contiguous whatever the input's strides (the aten form follows them): the layout the fake
    # kernel promised the trace, whose views were recorded against it.
    return out.contiguous(), rstd.contiguous()


@rms_norm.register_fake
def _(x, weight, eps, upcast):
    _check("shardgraph.rms_norm", x, weight)
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty(x.shape[:-1], dtype=statistics_dtype(x.dtype, upcast)))


@op_bodies.custom_op("shardgraph::rms_norm_backward", mutates_args=())
def rms_norm_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor, upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check("shardgraph.rms_norm_backward", x, weight)
    if not upcast:
        grad_x, grad_weight = _native_backward(grad_out, x, weight, rstd)
    elif rms_norm_kernels.runs(x, weight):
        grad_x, grad_weight = rms_norm_kernels.backward(grad_out, x, weight, rstd)
    else:
        grad_x, grad_weight = rms_norm_kernels.reference_backward(grad_out, x, weight, rstd)
    return grad_x.contiguous(), grad_weight.contiguous()


@rms_norm_backward.register_fake
def _(grad_out, x, weight, rstd, upcast):
    _check("shardgraph.rms_norm_backward", x, weight)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _eps, upcast = inputs
    _out, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)
    ctx.upcast = upcast


def _autograd_backward(ctx, grad_out, _grad_rstd):
    # rstd is marked non-differentiable: nothing downstream of the op reads it but the backward.
    grad_x, grad_weight = torch.ops.shardgraph.rms_norm_backward(grad_out, *ctx.saved_tensors, ctx.upcast)
    return grad_x, grad_weight, None, None


rms_norm.register_autograd(_autograd_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- under a compiler
def _aten_forward(x, weight, eps, upcast):
    if upcast:
        out, rstd = rms_norm_kernels.reference_forward(x, weight, eps)
    else:
        out, rstd = _native_forward(x, weight, eps, kernels=False)
    # Contiguous as the op's outputs: the trace recorded the views after it against that layout
    # (a transposed incoming gradient would otherwise give a gradient a later view cannot read).
    return out.contiguous(), rstd.contiguous()


def _aten_backward(grad_out, x, weight, rstd, upcast):
    if upcast:
        grad_x, grad_weight = rms_norm_kernels.reference_backward(grad_out, x, weight, rstd)
    else:
        grad_x, grad_weight = _native_backward(grad_out, x, weight, rstd, kernels=False)
    return grad_x.contiguous(), grad_weight.contiguous()


# The aten form of each node, for a graph run under torch.compile (``shardgraph.ops.as_aten_ops``).
ATEN_FORMS = {torch.ops.shardgraph.rms_norm.default: _aten_forward,
              torch.ops.shardgraph.rms_norm_backward.default: _aten_backward}
