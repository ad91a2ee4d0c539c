"""Grouped matrix products for MoE experts: forward, dgrad and wgrad.

``grouped_mm(x, w, offsets, w_layout="ekn" | "enk")``: ``out[rows of group g] = x[rows] @ W[g]``,
with group ends in ``offsets`` (int32, cumulative, on the device: no host read of the
boundaries). The backend is chosen per call; callers do not care which runs.
"""

from .reference import grouped_mm_dgrad_loop, grouped_mm_loop, grouped_mm_wgrad_loop

__all__ = ["grouped_mm", "grouped_mm_dgrad", "grouped_mm_wgrad"]


def grouped_mm(x, w, offsets, w_layout: str = "ekn"):
    return grouped_mm_loop(x, w, offsets, w_layout)


def grouped_mm_dgrad(dout, w, offsets, w_layout: str = "ekn"):
    return grouped_mm_dgrad_loop(dout, w, offsets, w_layout)


def grouped_mm_wgrad(x, dout, offsets, num_groups: int, w_layout: str = "ekn"):
    return grouped_mm_wgrad_loop(x, dout, offsets, num_groups, w_layout)
