"""Direct launch of a compiled Triton kernel: the host work of a call cut to what the kernel needs.

Launching a compiled kernel the generic way (``compiled[grid](*args)``) costs, on every call,
more Python than the launch needs: a closure and a runner, torch asked for the current device and
stream, a launch-metadata dictionary for profiling hooks built and two (empty) hook chains called
from C, two scratch allocations looked at, and every argument walked to find and expand the
tensor descriptors. For a grouped GEMM of a small expert batch, whose kernel runs for tens of
microseconds, that is the difference between keeping the GPU fed and not.

:func:`launcher` returns a callable that does only what the kernel needs: it encodes the
leading tensor descriptors with the metadata the compiler recorded and calls the compiled C
launcher with the bound function, the tensors' device's current stream and no hooks. It exists
for the Triton release whose launcher it was written against (:data:`TRITON_RELEASE`), where the
kernel needs no scratch memory; anywhere else the callable launches the generic way. A launch
hook installed later (a profiler) sends every launch back to the generic way, so hooks still see
each one; so does :func:`generic_launch`.
"""

from __future__ import annotations

import contextlib

import torch
import triton

TRITON_RELEASE = "3.6."

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: no knobs, no direct launch
    _knobs = None


def _closure(function) -> dict:
    cells = getattr(function, "__closure__", None) or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells))) if cells else {}


def _hooked() -> bool:
    runtime = _knobs.runtime
    return bool(runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls)


def _descriptor_encoder(metadata, fill_tma_descriptor, element_types):
    """How one host tensor descriptor argument reaches the C launcher, as the compiler lowered it:
    an encoded CUtensorMap followed by shape and strides, or (where the kernel takes no tensormap)
    base, shape, strides, NaN padding, shape and strides."""
    if metadata is None:
        return lambda d: (d.base, *d.shape, *d.strides, d.padding == "nan", *d.shape, *d.strides)
    swizzle, element_size, block = metadata["swizzle"], metadata["elem_size"], metadata["block_size"]
    element_type = element_types[metadata["elem_type"]]
    return lambda d: (fill_tma_descriptor(d.base.data_ptr(), swizzle, element_size, element_type, block, d.shape,
                                          d.strides, 1 if d.padding == "nan" else 0), *d.shape, *d.strides)


@contextlib.contextmanager
def generic_launch():
    """Launch every kernel the generic way inside the block (benchmarks time the two ways)."""
    global _generic
    previous, _generic = _generic, True
    try:
        yield
    finally:
        _generic = previous


_generic = False


def launcher(compiled, descriptor_count: int, device_index: int):
    """``launch(grid, args)`` for ``compiled`` (a kernel from ``JITFunction.run``), whose first
    ``descriptor_count`` arguments are host tensor descriptors and ``grid`` three integers: direct
    where it can be (``launch.direct`` says which), else the generic way."""
    def generic(grid, args):
        compiled[grid](*args)

    generic.direct = False
    c_launch, encoders = _direct_entry(compiled, descriptor_count)
    if c_launch is None:
        return generic
    function, packed_metadata = compiled.function, compiled.packed_metadata
    cooperative, pdl = compiled.run.launch_cooperative_grid, compiled.run.launch_pdl
    current_stream = torch._C._cuda_getCurrentRawStream

    def launch(grid, args):
        if _generic or _hooked():
            generic(grid, args)
            return
        expanded = []
        for encode, descriptor in zip(encoders, args):
            expanded.extend(encode(descriptor))
        c_launch(*grid, current_stream(device_index), function, cooperative, pdl, None, None, packed_metadata,
                 None, None, None, *expanded, *args[descriptor_count:])

    launch.direct = True
    return launch


def _direct_entry(compiled, descriptor_count: int):
    """The compiled C launcher of ``compiled`` and an encoder per descriptor argument, or
    ``(None, None)`` where the launch cannot be made directly (another Triton release, the
    interpreter, scratch memory, a launcher of another shape)."""
    if _knobs is None or not triton.__version__.startswith(TRITON_RELEASE) or not hasattr(compiled, "packed_metadata"):
        return None, None
    launcher_object = compiled.run  # loads the binary on first access
    if launcher_object.global_scratch_size or launcher_object.profile_scratch_size:
        return None, None
    cells = _closure(launcher_object.launch)
    if not descriptor_count:
        # Without descriptor arguments the launcher is the C entry point itself.
        return (None, None) if cells else (launcher_object.launch, [])
    # Otherwise it wraps the C entry point in a function that expands descriptors.
    if "launcher" not in cells or set(cells.get("tensordesc_indices", ())) != set(range(descriptor_count)):
        return None, None
    metadata = cells["tensordesc_meta"]
    if any(entry is not None and entry.get("fp4_padded") for entry in metadata):
        return None, None
    from triton.backends.nvidia import driver as nvidia_driver

    fill = triton.runtime.driver.active.utils.fill_tma_descriptor
    return cells["launcher"], [_descriptor_encoder(entry, fill, nvidia_driver.TMA_DTYPE_DEVICE_TO_HOST)
                               for entry in metadata]
