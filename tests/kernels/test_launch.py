"""Host-side launch helpers of the Triton grouped GEMM."""

import torch

from kernels import grouped_gemm


def test_fast_descriptor_equals_the_checked_constructor():
    # _descriptor skips TensorDescriptor's checks for speed; every field, defaults of this Triton
    # release included, must come out as the constructor makes it.
    base = torch.randn(32, 24, dtype=torch.bfloat16)[:, :16]
    fast = grouped_gemm._descriptor(base, [32, 16], [24, 1], [16, 16])
    assert fast == grouped_gemm.TensorDescriptor(base, [32, 16], [24, 1], [16, 16])


# ----------------------------------------------------------------------------------------------
# kernels.launch: the direct launch of a compiled kernel
# ----------------------------------------------------------------------------------------------

import pytest  # noqa: E402
import triton  # noqa: E402

from kernels import launch  # noqa: E402

_RELEASE = pytest.mark.skipif(not triton.__version__.startswith(launch.TRITON_RELEASE),
                              reason=f"the direct launch is written against Triton {launch.TRITON_RELEASE}x")


class _GenericOnly:
    """A compiled kernel as a stand-in records it: no C launcher to call directly."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args: self.calls.append((grid, args))


def test_a_kernel_without_a_known_launcher_is_launched_the_generic_way():
    compiled = _GenericOnly()
    launch_fn = launch.launcher(compiled, 0, 0)
    launch_fn((3, 1, 1), (1, 2))
    assert launch_fn.direct is False
    assert compiled.calls == [((3, 1, 1), (1, 2))]


class _CLauncher(list):
    """Stands in for a compiled C launcher (a builtin, no closure): records each call's arguments."""

    def __call__(self, *args):
        self.append(args)


class _FakeUtils:
    @staticmethod
    def fill_tma_descriptor(*args):
        return ("tensormap", *map(lambda a: tuple(a) if isinstance(a, list) else a, args))


class _FakeDriver:
    """Triton's active driver, as far as a launch reads it, without a GPU."""

    utils = _FakeUtils()

    @staticmethod
    def get_current_device():
        return 0

    @staticmethod
    def get_current_stream(device):
        return 1234


def _compiled_kernel(signature, tensordesc_meta, record):
    """A compiled kernel of this Triton release whose C launcher is ``record``: Triton's own
    launcher and runner classes around it, so the generic launch runs exactly as on a GPU."""
    from triton.backends.nvidia.driver import CudaLauncher, wrap_handle_tensordesc
    from triton.compiler.compiler import CompiledKernel

    run = object.__new__(CudaLauncher)
    run.launch = wrap_handle_tensordesc(record, signature, tensordesc_meta)
    run.num_ctas, run.launch_cooperative_grid, run.launch_pdl = 1, False, False
    run.global_scratch_size = run.profile_scratch_size = 0
    run.global_scratch_align = run.profile_scratch_align = 1
    compiled = object.__new__(CompiledKernel)
    compiled._run, compiled.module, compiled.function, compiled.name = run, object(), 77, "kernel"
    compiled.packed_metadata, compiled.src = (4, 1, 1024), None
    return compiled


@pytest.fixture
def fake_driver(monkeypatch):
    monkeypatch.setattr(triton.runtime.driver, "_active", _FakeDriver())
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)


_BASE_ARGS = 13  # grid, stream, function, cooperative, pdl, two scratch buffers, metadata, hooks


@_RELEASE
@pytest.mark.parametrize("tensormap", [True, False], ids=["tensormap", "decomposed"])
def test_direct_launch_passes_the_c_launcher_what_the_generic_launch_does(fake_driver, tensormap):
    signature = {0: "tensordesc<bf16[64, 32]>", 1: "tensordesc<bf16[32, 16]>", 2: "*bf16", 3: "i32", 4: "constexpr"}
    meta = [{"swizzle": 3, "elem_size": 2, "elem_type": 9, "block_size": [64, 32], "fp4_padded": False},
            {"swizzle": 2, "elem_size": 2, "elem_type": 10, "block_size": [32, 16], "fp4_padded": False}]
    records = _CLauncher()
    compiled = _compiled_kernel(signature, meta if tensormap else None, records)
    x, w, out = torch.randn(128, 64), torch.randn(64, 48), torch.empty(128, 48)
    args = (grouped_gemm._descriptor(x, [128, 64], [64, 1], [64, 32]),
            grouped_gemm._descriptor(w, [64, 48], [48, 1], [32, 16]), out, 128, 8)
    compiled[(5, 1, 1)](*args)
    direct = launch.launcher(compiled, 2, 0)
    direct((5, 1, 1), args)
    assert direct.direct is True
    generic, ours = records
    assert ours[:10] == generic[:10]
    assert ours[10:_BASE_ARGS] == (None, None, None)  # no launch metadata, no hooks to call
    assert ours[_BASE_ARGS:] == generic[_BASE_ARGS:]
    if tensormap:
        assert ours[_BASE_ARGS][0] == "tensormap"


@_RELEASE
def test_a_launch_hook_sends_the_direct_launch_back_to_the_generic_way(fake_driver):
    records, seen = _CLauncher(), []
    compiled = _compiled_kernel({0: "*fp32", 1: "i32"}, None, records)
    direct = launch.launcher(compiled, 0, 0)
    assert direct.direct is True
    triton.knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        direct((1, 1, 1), (torch.empty(4), 4))
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(seen.append)
    # The generic launch hands the C launcher the hook chain, which calls the hook.
    assert records[0][11] is triton.knobs.runtime.launch_enter_hook
    with launch.generic_launch():
        direct((1, 1, 1), (torch.empty(4), 4))
    assert records[1][11] is triton.knobs.runtime.launch_enter_hook
    direct((1, 1, 1), (torch.empty(4), 4))
    assert records[2][11] is None


@_RELEASE
def test_scratch_memory_keeps_the_generic_launch(fake_driver):
    compiled = _compiled_kernel({0: "*fp32"}, None, _CLauncher())
    compiled._run.global_scratch_size = 64
    assert launch.launcher(compiled, 0, 0).direct is False
