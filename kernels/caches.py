"""What the grouped GEMM host side remembers between calls, in one object that :meth:`clear` empties.

A grouped GEMM of a small expert batch runs for tens of microseconds, so the host work of a call
must be a few dictionary look-ups: everything that can be worked out once is kept here, keyed by
what it depends on. Each entry is valid for as long as the process runs, so nothing here needs
clearing for correctness; :meth:`GroupedGemmCaches.clear` is for tests and benchmarks that want a
first call again, and for freeing what a process no longer needs. Triton's own caches (its JIT's
compiled kernels, its autotuners' choices) are Triton's and are not cleared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

import torch

__all__ = ["GroupedGemmCaches", "CACHES", "LAUNCH_LOCK", "interpreter_guard", "interpreting", "triton_takes_rows",
           "switched"]

# The floating-point dtypes the row kernels (kernels/moe_rows.py, kernels/embedding_sgd.py) take.
ROW_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Held while a kernel is first compiled or tuned, and around every launch under the interpreter:
# the interpreter patches triton.language's module state while a kernel runs, so the simulator's
# rank threads (one per rank) interpret one kernel at a time, whichever module launches it.
LAUNCH_LOCK = threading.Lock()


def interpreter_guard(interpreted: bool):
    """``LAUNCH_LOCK`` around a launch under the interpreter; nothing on a GPU, where launches
    from several threads are safe once compiled."""
    return LAUNCH_LOCK if interpreted else contextlib.nullcontext()


@contextlib.contextmanager
def switched(module, name: str, value):
    """``module.name`` set to ``value`` inside the block and restored after it: the kernel
    modules' on/off switches (a compiler traces a step on its first call, so a program compiled
    inside the block keeps the choice)."""
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


def interpreting() -> bool:
    """Whether Triton kernels run under its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_takes_rows(*tensors: torch.Tensor) -> bool:
    """Whether a Triton row kernel can run on these tensors: each 2-D with a unit last stride in
    a 16/32-bit float dtype, on a CUDA device (or the CPU under the interpreter), Triton importable."""
    for tensor in tensors:
        if tensor.dim() != 2 or tensor.dtype not in ROW_DTYPES or (tensor.shape[1] > 1 and tensor.stride(1) != 1):
            return False
    device = tensors[0].device.type
    if device != "cuda" and not (device == "cpu" and interpreting()):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass(eq=False)
class GroupedGemmCaches:
    # Launch plans by operand layout (strides, widths, groups, dtype, device, alignment): see
    # kernels.grouped_gemm._Plan.
    plans: dict = dataclasses.field(default_factory=dict)
    # (kernel, problem key) -> the triton.Config its autotuner chose for that problem.
    tuned: dict = dataclasses.field(default_factory=dict)
    # (kernel, problem key, specialization) -> (config, launch, trailing constexprs): the compiled
    # kernel of that configuration, ready to launch (kernels.triton_release.launcher).
    compiled: dict = dataclasses.field(default_factory=dict)
    # TMA product problem key -> the schedule ("pipelined" or "pingpong") that "auto" timed faster.
    schedules: dict = dataclasses.field(default_factory=dict)
    # Ping-pong problem key -> the compiled ping-pong kernel's launch.
    pingpong: dict = dataclasses.field(default_factory=dict)

    # Plans are bounded by the distinct layer shapes of a model; a caller that somehow produces
    # more starts over rather than growing without bound.
    MAX_PLANS = 4096

    def remember_plan(self, key, plan):
        if len(self.plans) >= self.MAX_PLANS:
            self.plans.clear()
        self.plans[key] = plan
        return plan

    def clear(self) -> None:
        """Forget everything: the next call of each problem takes the first call's way again (a
        new plan, the autotuner and the JIT asked, which answer from Triton's own caches where
        they can, and under "auto" the TMA product's schedules timed). Each cache is emptied in
        place, so references held elsewhere stay valid."""
        for field in dataclasses.fields(self):
            getattr(self, field.name).clear()


CACHES = GroupedGemmCaches()


_MULTIPROCESSORS: dict[int, int] = {}


def multiprocessors(device: torch.device | int) -> int:
    """The streaming multiprocessors of a CUDA device (a ``torch.device``, its index, or the current
    one for an index-less device), asked once: kernels size their persistent grids by it on every
    launch, and torch's query costs host time each call."""
    index = device if isinstance(device, int) else device.index
    if index is None:
        index = torch.cuda.current_device()
    count = _MULTIPROCESSORS.get(index)
    if count is None:
        count = _MULTIPROCESSORS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count
