"""Reference grouped matrix products: one ``torch.mm`` per group, any device, any dtype.

``offsets`` holds each group's END row (int32, cumulative), as ``torch._grouped_mm`` takes it.
Weight layouts: ``"ekn"`` stores ``w[g]`` as ``[K, N]`` (``out = x @ w[g]``); ``"enk"`` stores it as
``[N, K]`` (``out = x @ w[g].T``, HF's ``gate_up_proj [E, 2I, H]``).
"""

from __future__ import annotations

import torch

from .validation import GroupedGemmError, check_layout

__all__ = ["grouped_mm_loop", "grouped_mm_dgrad_loop", "grouped_mm_wgrad_loop", "sgd_step_"]


def sgd_step_(param: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """``param -= grad * lr`` in place and ``sum(float32(grad) ** 2)``, as the unfused training
    graph computes them (each op's result in ``param``'s dtype): what the fused SGD steps run
    where their kernels do not, and the definition the kernels round as."""
    param.copy_(param - grad * lr)
    return torch.sum(torch.pow(grad.float(), 2))


def _bounds(offsets: torch.Tensor, rows: int):
    """(start, end) of each group; this path reads offsets on the host anyway, so it checks them."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    if any(end < start for start, end in zip(starts, ends)) or (ends and ends[-1] > rows):
        raise GroupedGemmError(f"offsets must be non-decreasing group end rows from 0 to at most {rows}, got {ends}")
    return zip(starts, ends)


def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, w_layout: str = "ekn") -> torch.Tensor:
    check_layout(w_layout)
    n = w.shape[2] if w_layout == "ekn" else w.shape[1]
    out = x.new_zeros(x.shape[0], n)
    for g, (start, end) in enumerate(_bounds(offsets, x.shape[0])):
        if end > start:
            weight = w[g] if w_layout == "ekn" else w[g].T
            out[start:end] = x[start:end] @ weight
    return out


def grouped_mm_dgrad_loop(dout: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, w_layout: str = "ekn") -> torch.Tensor:
    check_layout(w_layout)
    k = w.shape[1] if w_layout == "ekn" else w.shape[2]
    dx = dout.new_zeros(dout.shape[0], k)
    for g, (start, end) in enumerate(_bounds(offsets, dout.shape[0])):
        if end > start:
            weight = w[g].T if w_layout == "ekn" else w[g]
            dx[start:end] = dout[start:end] @ weight
    return dx


def grouped_mm_wgrad_loop(x: torch.Tensor, dout: torch.Tensor, offsets: torch.Tensor, num_groups: int,
                          w_layout: str = "ekn") -> torch.Tensor:
    check_layout(w_layout)
    k, n = x.shape[1], dout.shape[1]
    shape = (num_groups, k, n) if w_layout == "ekn" else (num_groups, n, k)
    dw = x.new_zeros(shape)
    for g, (start, end) in enumerate(_bounds(offsets, x.shape[0])):
        if end > start:
            product = x[start:end].T @ dout[start:end]
            dw[g] = product if w_layout == "ekn" else product.T
    return dw
