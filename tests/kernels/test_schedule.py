"""Choosing the Hopper grouped product's schedule (pipelined, ping-pong or torch's kernel).

The kernels themselves need an sm_90 GPU; these tests cover what decides between them, which
runs on the host: the "auto" choice times both once per problem and keeps the faster, forcing a
schedule or a configuration is honoured, and a forced ping-pong that cannot run is refused with
the rule it breaks before anything is launched.
"""

import pytest
import torch
import triton.testing

from kernels import grouped_gemm, grouped_gemm_pingpong


def _plan(pingpong: bool, vendor: bool = False) -> grouped_gemm._Plan:
    return grouped_gemm._Plan("tma", grouped_gemm._grouped_product_tma_kernel, {}, (), (), None, 0, pingpong, vendor)


class _Runner:
    """A schedule's launch that takes ``milliseconds`` under the (patched) benchmark timer."""

    def __init__(self, milliseconds):
        self.milliseconds, self.calls = milliseconds, 0

    def __call__(self):
        self.calls += 1


@pytest.fixture
def timer(monkeypatch):
    monkeypatch.setattr(grouped_gemm.CACHES, "schedules", {})
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: fn.milliseconds)


@pytest.mark.parametrize("pipelined_ms, pingpong_ms, expected", [(2.0, 1.0, "pingpong"), (1.0, 2.0, "pipelined")])
def test_auto_keeps_the_faster_schedule_and_remembers_it(timer, pipelined_ms, pingpong_ms, expected):
    pipelined, pingpong = _Runner(pipelined_ms), _Runner(pingpong_ms)
    key = ("problem",)
    assert grouped_gemm._product_schedule(_plan(True), key, 4096, pipelined, pingpong) == expected
    # The pipelined kernel ran once before timing, so its configuration was tuned first.
    assert pipelined.calls == 1
    # Later launches of the problem reuse the choice without timing again.
    other_pipelined, other_pingpong = _Runner(pingpong_ms), _Runner(pipelined_ms)
    assert grouped_gemm._product_schedule(_plan(True), key, 4096, other_pipelined, other_pingpong) == expected
    assert other_pipelined.calls == 0 and grouped_gemm.CACHES.schedules[key] == expected


def test_auto_is_pipelined_where_pingpong_cannot_run(timer):
    pipelined = _Runner(5.0)
    assert grouped_gemm._product_schedule(_plan(False), ("problem",), 4096, pipelined, _Runner(1.0)) == "pipelined"
    assert pipelined.calls == 0 and grouped_gemm.CACHES.schedules == {}


def test_a_forced_configuration_is_the_pipelined_kernels(timer):
    kernel = grouped_gemm._grouped_product_tma_kernel
    with grouped_gemm.use_config(kernel, kernel.configs[0]):
        assert grouped_gemm._product_schedule(_plan(True), ("problem",), 4096, _Runner(5.0), _Runner(1.0)) == "pipelined"


def test_use_schedule_forces_either_schedule(timer):
    for schedule in ("pipelined", "pingpong"):
        with grouped_gemm.use_schedule(schedule):
            assert grouped_gemm._product_schedule(_plan(True), ("problem",), 4096, _Runner(1.0), _Runner(1.0)) == schedule
    assert grouped_gemm.CACHES.schedules == {}


def test_unknown_schedule_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown grouped product schedule 'fastest'.*auto, pipelined, pingpong, torch, triton"):
        with grouped_gemm.use_schedule("fastest"):
            pass


def test_forced_pingpong_that_cannot_run_is_refused_before_launch():
    # CPU tensors: the ping-pong kernel is unavailable, so the forced schedule must raise, naming
    # what it needs, before any kernel is compiled or launched.
    sizes = [3, 0, 5]
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    w = torch.randn(3, 64, 32, dtype=torch.bfloat16)
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    before = dict(grouped_gemm.launch_counts)
    with grouped_gemm.use_schedule("pingpong"):
        with pytest.raises(ValueError, match=f"ping-pong schedule cannot run here.*Triton {grouped_gemm_pingpong.TRITON_RELEASE}x.*sm_90"):
            grouped_gemm.triton_grouped_mm(x, w, offsets, "ekn", path="tma")
    assert grouped_gemm.launch_counts.get("product_tma_pingpong", 0) == before.get("product_tma_pingpong", 0)



@pytest.mark.parametrize("milliseconds, expected", [((3.0, 2.0, 1.0), "torch"), ((1.0, 2.0, 3.0), "pipelined"),
                                                    ((3.0, 1.0, 2.0), "pingpong")])
def test_auto_keeps_the_fastest_of_the_triton_kernels_and_torchs(timer, milliseconds, expected):
    runners = [_Runner(ms) for ms in milliseconds]
    assert grouped_gemm._product_schedule(_plan(True, vendor=True), ("problem",), 4096, *runners, on_gpu=True) == expected
    assert grouped_gemm.CACHES.schedules[("problem",)] == expected


def test_torchs_kernel_is_timed_against_the_pipelined_one_where_pingpong_cannot_run(timer):
    pipelined, torch_kernel = _Runner(2.0), _Runner(1.0)
    assert grouped_gemm._product_schedule(_plan(False, vendor=True), ("problem",), 4096, pipelined, _Runner(0.1),
                                          torch_kernel, on_gpu=True) == "torch"


def test_auto_times_nothing_off_a_gpu(timer):
    # The interpreter runs the pipelined kernel unless a schedule is forced: do_bench needs a GPU.
    assert grouped_gemm._product_schedule(_plan(False, vendor=True), ("problem",), 4096, _Runner(2.0), _Runner(1.0),
                                          _Runner(1.0), on_gpu=False) == "pipelined"
    assert grouped_gemm.CACHES.schedules == {}


def test_a_forced_torch_schedule_that_cannot_run_is_refused_with_what_it_needs():
    # float64 is not a dtype torch's grouped GEMM takes: the TMA plan records that it cannot run.
    with grouped_gemm.use_schedule("torch"):
        with pytest.raises(ValueError, match="grouped product: the torch schedule cannot run here.*bfloat16"):
            grouped_gemm._product_schedule(_plan(False, vendor=False), ("problem",), 4096, _Runner(1.0), _Runner(1.0),
                                           _Runner(1.0), on_gpu=True)


def test_the_triton_schedule_times_only_the_triton_kernels_and_remembers_that_apart(timer):
    with grouped_gemm.use_schedule("triton"):
        chosen = grouped_gemm._product_schedule(_plan(True, vendor=True), ("problem",), 4096, _Runner(2.0),
                                                _Runner(3.0), _Runner(1.0), on_gpu=True)
    assert chosen == "pipelined"
    assert grouped_gemm._product_schedule(_plan(True, vendor=True), ("problem",), 4096, _Runner(2.0), _Runner(3.0),
                                          _Runner(1.0), on_gpu=True) == "torch"
    assert grouped_gemm.CACHES.schedules == {("triton", ("problem",)): "pipelined", ("problem",): "torch"}


class _Returning(_Runner):
    """A launch that returns ``result`` (or raises ``error``) and takes ``milliseconds``."""

    def __init__(self, milliseconds, result=None, error=None):
        super().__init__(milliseconds)
        self.result, self.error = result, error

    def __call__(self):
        super().__call__()
        if self.error is not None:
            raise self.error
        return self.result


def test_a_schedule_that_disagrees_with_the_pipelined_kernel_on_the_first_call_is_left_out(timer):
    reference = torch.arange(12.0).reshape(3, 4)
    wrong = reference.clone()
    wrong[0] = 100.0  # as if a group's rows were never written
    pipelined, torch_kernel = _Returning(2.0, reference), _Returning(1.0, wrong)
    with pytest.warns(RuntimeWarning, match="the torch schedule's result is .* from the pipelined kernel's"):
        chosen = grouped_gemm._product_schedule(_plan(False, vendor=True), ("problem",), 4096, pipelined,
                                                _Returning(0.5), torch_kernel, on_gpu=True)
    assert chosen == "pipelined" and grouped_gemm.CACHES.schedules[("problem",)] == "pipelined"


def test_a_schedule_that_raises_on_the_first_call_is_left_out_and_one_that_agrees_is_kept(timer):
    reference = torch.arange(12.0).reshape(3, 4)
    failing = _Returning(0.5, error=RuntimeError("unsupported layout"))
    with pytest.warns(RuntimeWarning, match="the torch schedule failed \\(RuntimeError: unsupported layout\\)"):
        chosen = grouped_gemm._product_schedule(_plan(True, vendor=True), ("a",), 4096, _Returning(2.0, reference),
                                                _Returning(1.0, reference + 1e-4), failing, on_gpu=True)
    assert chosen == "pingpong"


class _Result(_Runner):
    """A stand-in launch that also returns a result, for the agreement check before timing."""

    def __init__(self, milliseconds, value):
        super().__init__(milliseconds)
        self.value = value

    def __call__(self):
        super().__call__()
        return self.value


@pytest.mark.parametrize("gathered_ms, gather_first_ms, expected", [(2.0, 1.0, "gather_first"),
                                                                    (1.0, 2.0, "gathered")])
def test_the_gathered_wgrad_keeps_the_faster_of_its_kernel_and_a_gather_first(timer, gathered_ms, gather_first_ms,
                                                                              expected):
    from kernels import fused_moe

    key = ("gather_wgrad", "problem")
    gathered, gather_first = _Runner(gathered_ms), _Runner(gather_first_ms)
    assert fused_moe.gather_wgrad_schedule(key, gathered, gather_first, timeable=True) == expected
    assert grouped_gemm.CACHES.schedules[key] == ("pipelined" if expected == "gathered" else expected)
    # Remembered: a later call of the problem times nothing.
    again = _Runner(0.0)
    assert fused_moe.gather_wgrad_schedule(key, again, _Runner(9.0), timeable=True) == expected and again.calls == 0


def test_the_gathered_wgrad_is_the_kernel_where_nothing_can_be_timed_or_a_schedule_is_forced(timer):
    from kernels import fused_moe

    slow_kernel, fast_gather = _Runner(5.0), _Runner(1.0)
    assert fused_moe.gather_wgrad_schedule(("a",), slow_kernel, fast_gather, timeable=False) == "gathered"
    with grouped_gemm.use_schedule("torch"):
        assert fused_moe.gather_wgrad_schedule(("b",), slow_kernel, fast_gather, timeable=True) == "gathered"
    assert slow_kernel.calls == fast_gather.calls == 0 and grouped_gemm.CACHES.schedules == {}


def test_a_gather_first_that_disagrees_with_the_kernel_is_left_out_with_a_warning(timer):
    from kernels import fused_moe

    kernel, wrong = _Result(5.0, torch.ones(4, 4)), _Result(1.0, torch.zeros(4, 4))
    with pytest.warns(RuntimeWarning, match="gather_first schedule's result"):
        assert fused_moe.gather_wgrad_schedule(("c",), kernel, wrong, timeable=True) == "gathered"
