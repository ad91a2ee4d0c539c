"""Argument checks shared by every grouped GEMM entry point (eager calls, custom ops, fake kernels).

They read shapes, dtypes and devices only, never tensor values, so they cost no device sync and
run unchanged on fake and meta tensors while graphs are traced. What they cannot check without
reading ``offsets`` (non-decreasing, last entry at most M) is the caller's contract; the kernels
clamp what they read so a violation cannot write outside the output.
"""

from __future__ import annotations

import torch

__all__ = ["GroupedGemmError", "LAYOUTS", "DTYPES", "check_layout", "check_forward", "check_dgrad", "check_wgrad"]

LAYOUTS = ("ekn", "enk")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class GroupedGemmError(ValueError):
    """A grouped GEMM was called with arguments that break its contract."""


def check_layout(w_layout) -> None:
    if w_layout not in LAYOUTS:
        raise GroupedGemmError(f"w_layout must be 'ekn' (w stored [E, K, N]) or 'enk' (w stored [E, N, K]), "
                               f"got {w_layout!r}")


def _tensor(name: str, value, dims: int, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise GroupedGemmError(f"{name} must be a torch.Tensor {what}, got {type(value).__name__}")
    if value.dim() != dims:
        raise GroupedGemmError(f"{name} must be {dims}-D {what}, got shape {tuple(value.shape)}")


def _floating(name: str, value: torch.Tensor) -> None:
    if value.dtype not in DTYPES:
        raise GroupedGemmError(f"{name} has dtype {value.dtype}; grouped GEMMs take float16, bfloat16, float32 "
                               f"or float64")


def _same(name: str, value: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    if value.dtype != reference.dtype:
        raise GroupedGemmError(f"{name} has dtype {value.dtype} but {reference_name} has {reference.dtype}; "
                               f"they must match")
    if value.device != reference.device:
        raise GroupedGemmError(f"{name} is on {value.device} but {reference_name} is on {reference.device}")


def _weight(w: torch.Tensor, w_layout: str):
    """(E, K, N) of a weight in ``w_layout``."""
    if w_layout == "ekn":
        return w.shape[0], w.shape[1], w.shape[2]
    return w.shape[0], w.shape[2], w.shape[1]


def _offsets(offsets, groups: int, like: torch.Tensor, groups_from: str) -> None:
    _tensor("offsets", offsets, 1, "of int32 group end rows")
    if offsets.dtype != torch.int32:
        raise GroupedGemmError(f"offsets must be int32 (cumulative end row of each group), got {offsets.dtype}")
    if offsets.shape[0] != groups:
        raise GroupedGemmError(f"offsets has {offsets.shape[0]} entries but {groups_from} has {groups} groups")
    if offsets.device != like.device:
        raise GroupedGemmError(f"offsets is on {offsets.device} but the operands are on {like.device}")


def _check_product(name: str, rows, w, offsets, w_layout, width: str) -> None:
    """``rows [M, width]`` times each group's weight: ``width`` is the weight's K (forward) or N
    (dgrad), the dimension the product reduces over."""
    check_layout(w_layout)
    _tensor(name, rows, 2, f"[M, {width}]")
    _tensor("w", w, 3, "[E, K, N] or [E, N, K]")
    _floating(name, rows)
    _same("w", w, name, rows)
    experts, k, n = _weight(w, w_layout)
    expected = k if width == "K" else n
    if rows.shape[1] != expected:
        raise GroupedGemmError(f"{name} has {width}={rows.shape[1]} columns but w {tuple(w.shape)} in layout "
                               f"{w_layout!r} has {width}={expected}")
    _offsets(offsets, experts, rows, f"w {tuple(w.shape)}")


def check_forward(x, w, offsets, w_layout) -> None:
    """``out = x[rows of g] @ W[g]``: x [M, K], w [E, K, N] ("ekn") or [E, N, K] ("enk")."""
    _check_product("x", x, w, offsets, w_layout, "K")


def check_dgrad(dout, w, offsets, w_layout) -> None:
    """``dx = dout[rows of g] @ W[g].T``: dout [M, N]."""
    _check_product("dout", dout, w, offsets, w_layout, "N")


def check_wgrad(x, dout, offsets, num_groups, w_layout) -> None:
    """``dW[g] = x[rows of g].T @ dout[rows of g]``: x [M, K], dout [M, N], num_groups E."""
    check_layout(w_layout)
    _tensor("x", x, 2, "[M, K]")
    _tensor("dout", dout, 2, "[M, N]")
    _floating("x", x)
    _same("dout", dout, "x", x)
    if dout.shape[0] != x.shape[0]:
        raise GroupedGemmError(f"x has {x.shape[0]} rows but dout has {dout.shape[0]}; both hold the same tokens")
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, torch.SymInt)) or num_groups < 0:
        raise GroupedGemmError(f"num_groups must be a non-negative int, got {num_groups!r}")
    _offsets(offsets, num_groups, x, "num_groups")
