"""Each Triton-release-specific trick of ``kernels.triton_release`` against its generic way.

* the unchecked host TMA descriptor against ``TensorDescriptor``'s constructor (any release, CPU);
* the direct launch of a compiled kernel against the generic ``compiled[grid](*args)``: on the
  CPU through Triton's own launcher classes around a recording C launcher (the pinned release),
  and on a GPU through the grouped GEMM's real launches (the pinned release and a CUDA device);
* the Gluon ping-pong kernel against the pipelined kernel it stands in for (an sm_90 GPU and the
  pinned release), and its release guard (any other release, CPU).

Tests that need the pinned release skip elsewhere; on another release the generic ways run, and
the tests of that run here.
"""

import pytest
import torch
import triton

from kernels import grouped_gemm, grouped_gemm_paths, grouped_gemm_pingpong, triton_release

_PINNED = pytest.mark.skipif(not triton_release.PINNED,
                             reason=f"written against Triton {triton_release.TRITON_RELEASE}x")
_OTHER_RELEASE = pytest.mark.skipif(triton_release.PINNED,
                                    reason=f"this is the pinned release ({triton.__version__})")
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ----------------------------------------------------------------------------------------------
# Host TMA descriptors
# ----------------------------------------------------------------------------------------------


def test_unchecked_descriptor_equals_the_checked_constructor():
    # Every field, defaults of the installed release included, must come out as the constructor
    # makes it.
    base = torch.randn(32, 24, dtype=torch.bfloat16)[:, :16]
    unchecked = triton_release.unchecked_descriptor(base, [32, 16], [24, 1], [16, 16])
    assert unchecked == triton_release.TensorDescriptor(base, [32, 16], [24, 1], [16, 16])


def test_descriptors_skip_the_checks_only_under_the_pinned_release():
    expected = triton_release.unchecked_descriptor if triton_release.PINNED else triton_release.TensorDescriptor
    assert triton_release.tma_descriptor is expected


# ----------------------------------------------------------------------------------------------
# Direct launch of a compiled kernel
# ----------------------------------------------------------------------------------------------


class _GenericOnly:
    """A compiled kernel as a stand-in records it: no C launcher to call directly."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args: self.calls.append((grid, args))


def test_a_kernel_without_a_known_launcher_is_launched_the_generic_way():
    compiled = _GenericOnly()
    launch_fn = triton_release.launcher(compiled, 0, 0)
    launch_fn((3, 1, 1), (1, 2))
    assert launch_fn.direct is False
    assert compiled.calls == [((3, 1, 1), (1, 2))]


@_OTHER_RELEASE
def test_on_another_release_a_compiled_kernel_is_launched_the_generic_way():
    compiled = _GenericOnly()
    compiled.packed_metadata = (4, 1, 1024)  # what a compiled kernel of the pinned release has
    launch_fn = triton_release.launcher(compiled, 0, 0)
    launch_fn((3, 1, 1), (1, 2))
    assert launch_fn.direct is False
    assert compiled.calls == [((3, 1, 1), (1, 2))]


class _CLauncher(list):
    """Stands in for a compiled C launcher (a builtin, no closure): records each call's arguments."""

    def __call__(self, *args):
        self.append(args)


class _StandInUtils:
    @staticmethod
    def fill_tma_descriptor(*args):
        return ("tensormap", *map(lambda a: tuple(a) if isinstance(a, list) else a, args))


class _StandInDriver:
    """Triton's active driver, as far as a launch reads it, without a GPU."""

    utils = _StandInUtils()

    @staticmethod
    def get_current_device():
        return 0

    @staticmethod
    def get_current_stream(device):
        return 1234


def _compiled_kernel(signature, tensordesc_meta, record):
    """A compiled kernel of the pinned release whose C launcher is ``record``: Triton's own
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
def stand_in_driver(monkeypatch):
    monkeypatch.setattr(triton.runtime.driver, "_active", _StandInDriver())
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)


_BASE_ARGS = 13  # grid, stream, function, cooperative, pdl, two scratch buffers, metadata, hooks


@_PINNED
@pytest.mark.parametrize("tensormap", [True, False], ids=["tensormap", "decomposed"])
def test_direct_launch_passes_the_c_launcher_what_the_generic_launch_does(stand_in_driver, tensormap):
    signature = {0: "tensordesc<bf16[64, 32]>", 1: "tensordesc<bf16[32, 16]>", 2: "*bf16", 3: "i32", 4: "constexpr"}
    meta = [{"swizzle": 3, "elem_size": 2, "elem_type": 9, "block_size": [64, 32], "fp4_padded": False},
            {"swizzle": 2, "elem_size": 2, "elem_type": 10, "block_size": [32, 16], "fp4_padded": False}]
    records = _CLauncher()
    compiled = _compiled_kernel(signature, meta if tensormap else None, records)
    x, w, out = torch.randn(128, 64), torch.randn(64, 48), torch.empty(128, 48)
    args = (triton_release.tma_descriptor(x, [128, 64], [64, 1], [64, 32]),
            triton_release.tma_descriptor(w, [64, 48], [48, 1], [32, 16]), out, 128, 8)
    compiled[(5, 1, 1)](*args)
    direct = triton_release.launcher(compiled, 2, 0)
    direct((5, 1, 1), args)
    assert direct.direct is True
    generic, ours = records
    assert ours[:10] == generic[:10]
    assert ours[10:_BASE_ARGS] == (None, None, None)  # no launch metadata, no hooks to call
    assert ours[_BASE_ARGS:] == generic[_BASE_ARGS:]
    if tensormap:
        assert ours[_BASE_ARGS][0] == "tensormap"


@_PINNED
def test_a_launch_hook_sends_the_direct_launch_back_to_the_generic_way(stand_in_driver):
    records, seen = _CLauncher(), []
    compiled = _compiled_kernel({0: "*fp32", 1: "i32"}, None, records)
    direct = triton_release.launcher(compiled, 0, 0)
    assert direct.direct is True
    triton.knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        direct((1, 1, 1), (torch.empty(4), 4))
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(seen.append)
    # The generic launch hands the C launcher the hook chain, which calls the hook.
    assert records[0][11] is triton.knobs.runtime.launch_enter_hook
    with triton_release.generic_launch():
        direct((1, 1, 1), (torch.empty(4), 4))
    assert records[1][11] is triton.knobs.runtime.launch_enter_hook
    direct((1, 1, 1), (torch.empty(4), 4))
    assert records[2][11] is None


@_PINNED
def test_scratch_memory_keeps_the_generic_launch(stand_in_driver):
    compiled = _compiled_kernel({0: "*fp32"}, None, _CLauncher())
    compiled._run.global_scratch_size = 64
    assert triton_release.launcher(compiled, 0, 0).direct is False


def _gpu_operands(dtype=torch.bfloat16, layout="enk"):
    """Uneven groups (an empty one, partial tiles) and rows past the last offset, on the GPU."""
    generator = torch.Generator(device="cuda").manual_seed(5)
    sizes, trailing, k, n = [300, 0, 17, 1, 129, 640], 7, 256, 384
    m, experts = sum(sizes) + trailing, len(sizes)
    offsets = torch.tensor(sizes, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(m, k, device="cuda", generator=generator).to(dtype)
    shape = (experts, k, n) if layout == "ekn" else (experts, n, k)
    w = torch.randn(shape, device="cuda", generator=generator).to(dtype)
    dout = torch.randn(m, n, device="cuda", generator=generator).to(dtype)
    return x, w, dout, offsets


def _poisoned(shape, like):
    return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)


@_CUDA
@_PINNED
def test_direct_and_generic_launches_compute_the_same_on_the_gpu():
    x, w, dout, offsets = _gpu_operands()
    experts, (m, k), n = w.shape[0], x.shape, dout.shape[1]
    calls = [
        ("tma", grouped_gemm._grouped_product_tma_kernel,
         lambda: grouped_gemm.triton_grouped_mm(x, w, offsets, "enk", out=_poisoned((m, n), x), path="tma")),
        ("tma", grouped_gemm._grouped_product_tma_kernel,
         lambda: grouped_gemm.triton_grouped_mm(dout, w, offsets, "enk", transpose_weight=True,
                                                out=_poisoned((m, k), x), path="tma")),
        ("tma", grouped_gemm._grouped_wgrad_tma_kernel,
         lambda: grouped_gemm.triton_grouped_mm_wgrad(x, dout, offsets, experts, "enk", out=_poisoned(w.shape, x),
                                                      path="tma")),
        ("portable", grouped_gemm._grouped_product_kernel,
         lambda: grouped_gemm.triton_grouped_mm(x, w, offsets, "enk", out=_poisoned((m, n), x), path="portable")),
        ("portable", grouped_gemm._grouped_wgrad_kernel,
         lambda: grouped_gemm.triton_grouped_mm_wgrad(x, dout, offsets, experts, "enk", out=_poisoned(w.shape, x),
                                                      path="portable")),
    ]
    for path, kernel, call in calls:
        if path == "tma" and not grouped_gemm_paths.has_tma(torch.cuda.current_device()):
            continue
        with grouped_gemm.use_config(kernel, kernel.configs[0]):
            call()  # compiles, and caches the compiled kernel's launch
            launches = [entry[1] for key, entry in grouped_gemm.CACHES.compiled.items() if key[0] is kernel]
            assert launches and all(launch.direct for launch in launches), (path, kernel)
            direct = call()
            with triton_release.generic_launch():
                generic = call()
        assert not direct.isnan().any(), (path, kernel)
        assert torch.equal(direct, generic), (path, kernel)


# ----------------------------------------------------------------------------------------------
# The Gluon ping-pong kernel
# ----------------------------------------------------------------------------------------------


@_OTHER_RELEASE
def test_pingpong_is_used_only_with_the_triton_release_it_was_written_for():
    assert not triton_release.GLUON
    assert not grouped_gemm_pingpong.available(0)


def _pingpong_runs() -> bool:
    return torch.cuda.is_available() and grouped_gemm_pingpong.available(torch.cuda.current_device())


@pytest.mark.skipif(not _pingpong_runs(), reason=f"needs an sm_90 GPU and Triton {triton_release.TRITON_RELEASE}x")
@pytest.mark.parametrize("layout", ["ekn", "enk"])
@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "dgrad"])
def test_pingpong_and_pipelined_schedules_agree_on_the_gpu(layout, transpose):
    x, w, dout, offsets = _gpu_operands(layout=layout)
    source = dout if transpose else x
    width = x.shape[1] if transpose else dout.shape[1]
    results = {}
    for schedule in ("pipelined", "pingpong"):
        with grouped_gemm.use_schedule(schedule):
            grouped_gemm.triton_grouped_mm(source, w, offsets, layout, transpose, path="tma")  # compiles
            results[schedule] = grouped_gemm.triton_grouped_mm(source, w, offsets, layout, transpose, path="tma",
                                                               out=_poisoned((x.shape[0], width), x))
            if schedule == "pingpong":
                with triton_release.generic_launch():
                    generic = grouped_gemm.triton_grouped_mm(source, w, offsets, layout, transpose, path="tma",
                                                             out=_poisoned((x.shape[0], width), x))
                assert torch.equal(results[schedule], generic)
    pipelined, pingpong = results["pipelined"].double(), results["pingpong"].double()
    assert not pingpong.isnan().any()
    assert ((pingpong - pipelined).norm() / pipelined.norm()).item() < 1e-3
