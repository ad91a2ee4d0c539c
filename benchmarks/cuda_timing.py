"""One timing helper for the GPU scripts: CUDA events around ``repeats`` calls after ``warmup``."""

from __future__ import annotations

import torch


def milliseconds(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Mean milliseconds of one ``fn()`` on the current CUDA device (launch queue kept full, so
    host time between calls is hidden unless it exceeds the kernels')."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats
