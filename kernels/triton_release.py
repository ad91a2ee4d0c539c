"""Everything in ``kernels/`` that leans on one Triton release's internals, each with its generic way.

Triton's public launch path costs a grouped GEMM of a small expert batch about as much host time
as its kernel takes on the GPU, so the host side cuts it short with three tricks, each written and
checked against one release (:data:`TRITON_RELEASE`) and used only there:

``tma_descriptor``        a host TMA descriptor built without ``TensorDescriptor``'s constructor
                          checks (the caller has checked the layout); generic way: the constructor.
``launcher``              a compiled kernel launched by calling its C launcher directly, with the
                          descriptors encoded from the metadata the compiler recorded, the device's
                          current stream and no hooks; generic way: ``compiled[grid](*args)``.
``GLUON``                 whether the ping-pong kernel (``kernels.grouped_gemm_pingpong``), written
                          in Gluon, Triton's experimental dialect whose API moves between releases,
                          can be defined; generic way: the pipelined kernel.

On any other release each falls back to its generic way; ``tests/kernels/test_triton_release.py``
checks that each trick and its generic way agree.
"""

from __future__ import annotations

import contextlib

import torch
import triton

__all__ = ["TRITON_RELEASE", "PINNED", "GLUON", "TensorDescriptor", "tma_descriptor", "unchecked_descriptor",
           "launcher", "generic_launch"]

TRITON_RELEASE = "3.6."
PINNED = triton.__version__.startswith(TRITON_RELEASE)

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: portable kernels only
    TensorDescriptor = None

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: no knobs, no direct launch
    _knobs = None


def _gluon_hopper_importable() -> bool:
    try:
        import triton.experimental.gluon.language.nvidia.hopper  # noqa: F401
        import triton.experimental.gluon.nvidia.hopper  # noqa: F401
    except ImportError:  # a build of the release without Gluon
        return False
    return True


GLUON = PINNED and _gluon_hopper_importable()


# ----------------------------------------------------------------------------------------------
# Host TMA descriptors
# ----------------------------------------------------------------------------------------------


def unchecked_descriptor(base: torch.Tensor, shape, strides, block_shape):
    """``TensorDescriptor(base, shape, strides, block_shape)`` without the constructor's checks,
    which cost about a microsecond a descriptor, three a product launch. Every caller has checked
    the layout rules (16-byte aligned base and row stride, unit last stride, non-empty shape),
    and every block shape comes from the kernels' configurations."""
    descriptor = object.__new__(TensorDescriptor)
    descriptor.base, descriptor.shape, descriptor.strides = base, shape, strides
    descriptor.block_shape, descriptor.padding = block_shape, "zero"
    return descriptor


# The host TMA descriptor the launches build: unchecked under the pinned release, where its
# fields are known to be the constructor's; the constructor itself elsewhere.
tma_descriptor = unchecked_descriptor if PINNED else TensorDescriptor


# ----------------------------------------------------------------------------------------------
# Direct launch of a compiled kernel
# ----------------------------------------------------------------------------------------------
#
# The generic launch, ``compiled[grid](*args)``, costs on every call more Python than the launch
# needs: a closure and a runner, torch asked for the current device and stream, a launch-metadata
# dictionary for profiling hooks built and two (empty) hook chains called from C, two scratch
# allocations looked at, and every argument walked to find and expand the tensor descriptors. A
# launch hook installed later (a profiler) sends every launch back to the generic way, so hooks
# still see each one; so does generic_launch().


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
    if _knobs is None or not PINNED or not hasattr(compiled, "packed_metadata"):
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
