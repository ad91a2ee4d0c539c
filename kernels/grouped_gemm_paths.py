"""Which family of grouped GEMM kernels can run a call: the Hopper (TMA) kernels or the portable ones.

The TMA kernels read their operands through host-built TMA descriptors, which can address only
row-major matrices with 16-byte aligned rows, and run on sm_90 and later in bf16 or fp16. The
portable kernels take any dtype and any strides. :func:`select_path` applies those rules to a
call's tensors; it runs once per operand layout (the host side keeps its answer in the layout's
launch plan), so nothing here is on the per-call path.
"""

from __future__ import annotations

import torch

from .grouped_gemm_configs import MIN_TMA_BLOCK_R
from .triton_release import TensorDescriptor

__all__ = ["PATHS", "select_path", "has_tma", "weight_rows", "device_index"]

PATHS = ("auto", "tma", "portable")
_TMA_DTYPES = (torch.bfloat16, torch.float16)


def device_index(tensor: torch.Tensor) -> int:
    return tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()


def has_tma(device: int) -> bool:
    """Whether CUDA device ``device`` and this Triton can run the TMA kernels."""
    return TensorDescriptor is not None and torch.cuda.get_device_capability(device)[0] >= 9


def _aligned(tensor: torch.Tensor) -> bool:
    return tensor.data_ptr() % 16 == 0


def _row_major(tensor: torch.Tensor) -> bool:
    """2-D with unit column stride and a 16-byte row stride: what a TMA descriptor can address."""
    row_stride, column_stride = tensor.stride()
    return column_stride == 1 and (row_stride * tensor.element_size()) % 16 == 0 and _aligned(tensor)


def weight_rows(w: torch.Tensor, r: int, p: int, stride_r: int, stride_p: int):
    """The weight as one 2-D row-major matrix a TMA descriptor can walk: ``(shape, strides,
    transposed)`` where each group's ``B_g`` [R, P] is stored transposed (``[P, R]``, rows
    ``g*P + p``) or not (rows ``g*R + r``); ``None`` where the storage is not such a matrix."""
    element, stride_g = w.element_size(), w.stride(0)
    if stride_r == 1 and stride_p * element % 16 == 0 and stride_g == p * stride_p and stride_p >= r:
        return [w.shape[0] * p, r], [stride_p, 1], True
    if stride_p == 1 and stride_r * element % 16 == 0 and stride_g == r * stride_r and stride_r >= p:
        return [w.shape[0] * r, p], [stride_r, 1], False
    return None


def select_path(kind: str, tensors, requested: str = "auto") -> str:
    """``"tma"`` where the Hopper kernels can run on these tensors, else ``"portable"``.

    ``kind`` is ``"product"`` with ``tensors = (a, w, out, R, P, stride_r, stride_p)`` or
    ``"wgrad"`` with ``tensors = (left, right, dw)``. ``requested="tma"`` is honoured on any
    device where descriptors can be built (the CPU interpreter included) so tests can run the
    Hopper kernels' code; it raises when the layout rules out TMA.
    """
    if requested not in PATHS:
        raise ValueError(f"unknown grouped GEMM kernel path {requested!r}; choose one of {', '.join(PATHS)}")
    if requested == "portable":
        return "portable"
    if requested == "auto":
        device = tensors[0].device
        if device.type != "cuda" or not has_tma(device_index(tensors[0])):
            return "portable"
    reason = _tma_refusal(kind, tensors)
    if reason is None:
        return "tma"
    if requested == "tma":
        raise ValueError(f"grouped GEMM {kind}: the TMA path cannot run here: {reason}")
    return "portable"


def _tma_refusal(kind, tensors):
    """Why the TMA kernels cannot take these tensors, or ``None`` where they can."""
    if TensorDescriptor is None:
        return "this Triton has no host tensor descriptors"
    if tensors[0].dtype not in _TMA_DTYPES:
        return f"dtype {tensors[0].dtype} (TMA kernels take bfloat16 or float16)"
    if kind == "product":
        a, w, out, r, p, stride_r, stride_p = tensors
        if not _row_major(a):
            return "the activations are not row-major with 16-byte aligned rows"
        if not (_row_major(out) and out.stride(0) == p):
            return f"the output is not a contiguous, 16-byte aligned [M, {p}] matrix"
        rows = weight_rows(w, r, p, stride_r, stride_p)
        if rows is None or not _aligned(w):
            return "the weight is not stored as contiguous 16-byte aligned rows"
        if not rows[2] and r % MIN_TMA_BLOCK_R:
            return f"the reduction length {r} of an untransposed weight is not a multiple of {MIN_TMA_BLOCK_R}"
        return None
    left, right, dw = tensors
    for name, tensor in (("left", left), ("right", right)):
        if not _row_major(tensor):
            return f"the {name} operand is not row-major with 16-byte aligned rows"
    if dw.stride(2) != 1:
        return "the weight gradient has no unit column stride"
    return None
