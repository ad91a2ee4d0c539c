"""benchmarks/grouped_gemm.py's timing on the CPU: interleaved rounds, and one row end to end.

The device timers (do_bench, CUDA graphs, host timing with synchronisation) are replaced by
counting stand-ins, and "ours" by the per-group reference, so what is proved here is the
benchmark's own logic: the order columns are timed in, the medians it reports, and that every
timed variant is checked against the fp32 reference before its figure is kept.
"""

import pytest
import torch

from . import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("grouped_gemm.py", "grouped_gemm_benchmark")


def test_rounds_alternate_the_order_and_report_each_columns_median(script):
    order = []
    times = {"a": iter([5.0, 1.0, 3.0]), "b": iter([2.0, 9.0, 4.0]), "c": iter([7.0, 7.0, 6.0])}

    def measure(fn):
        name = fn()
        order.append(name)
        return next(times[name])

    fns = {name: (lambda name=name: name) for name in "abc"}
    medians, samples = script.interleaved_ms(fns, rounds=3, measure=measure)
    assert order == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert medians == {"a": 3.0, "b": 4.0, "c": 7.0}
    assert samples == {"a": [5.0, 1.0, 3.0], "b": [2.0, 9.0, 4.0], "c": [7.0, 7.0, 6.0]}


class Replay:
    def __init__(self, fn):
        self.replay = fn


def cpu_timers(script, monkeypatch, ours_forward, ours_wgrad):
    """Every timed call is counted, run, and reported as 2 ms."""
    measured = []
    monkeypatch.setattr(script, "triton_grouped_mm", ours_forward)
    monkeypatch.setattr(script, "triton_grouped_mm_wgrad", ours_wgrad)
    monkeypatch.setattr(script, "median_ms", lambda fn: (measured.append(fn), fn(), 2.0)[-1])
    monkeypatch.setattr(script, "host_us", lambda fn: (fn(), 10.0)[-1])
    monkeypatch.setattr(script, "captured", Replay)
    monkeypatch.setattr(script, "FAILURES", [])
    return measured


def reference_forward(x, w, offsets, layout, transpose_weight=False):
    from kernels.reference import grouped_mm_dgrad_loop, grouped_mm_loop

    return (grouped_mm_dgrad_loop if transpose_weight else grouped_mm_loop)(x, w, offsets, layout)


def reference_wgrad(x, dout, offsets, experts, layout):
    from kernels.reference import grouped_mm_wgrad_loop

    return grouped_mm_wgrad_loop(x, dout, offsets, experts, layout)


def test_one_row_is_checked_then_timed_on_the_cpu(script, monkeypatch):
    measured = cpu_timers(script, monkeypatch, reference_forward, reference_wgrad)
    sizes = [5, 0, 11, 16]
    rows = script.bench_case(24, 40, sizes, torch.float32, rounds=3, device="cpu")
    assert [row["kind"] for row in rows] == ["forward", "dgrad", "wgrad"]
    flops = 2.0 * sum(sizes) * 24 * 40
    for row in rows:
        for name in ("ours", "triton", "torch", "loop"):
            assert row[f"{name}_rel_err"] < 1e-5, (row["kind"], name, row[f"{name}_rel_err"])
        assert row["ours_rel_err_cached_launch"] < 1e-5
        # 2 ms per round in every column: the rate the row reports follows from the FLOPs alone.
        assert row["ours_tflops"] == pytest.approx(flops / 2e-3 / 1e12)
        assert row["ours_graph_tflops"] == row["ours_tflops"]
        assert all(values == [2.0, 2.0, 2.0] for values in row["round_ms"].values())
    assert "torch_kn_tflops" not in rows[2] and rows[2]["torch_rel_err"] < 1e-5
    # Three rounds of every column (5 in forward and dgrad, 6 in wgrad) plus three of each graph pair.
    assert len(measured) == 3 * (5 + 5 + 6) + 3 * 2 * 3
    assert script.FAILURES == []


def test_a_wrong_result_is_reported_as_a_failure(script, monkeypatch):
    def off_by_one_group(x, w, offsets, layout, transpose_weight=False):
        out = reference_forward(x, w, offsets, layout, transpose_weight)
        out[: offsets[0]] = 0  # the first group's rows never written
        return out

    cpu_timers(script, monkeypatch, off_by_one_group, reference_wgrad)
    script.bench_case(24, 40, [5, 0, 11, 16], torch.float32, rounds=1, device="cpu")
    failed = [failure.split(" n=")[0] for failure in script.FAILURES]
    assert failed == ["forward ours", "forward triton", "forward ours (cached launch)", "dgrad ours", "dgrad triton",
                      "dgrad ours (cached launch)"]


def test_host_cost_benchmark_takes_the_cached_launch_on_every_path(tmp_path):
    module = load_benchmark("grouped_gemm_host.py", "grouped_gemm_host_benchmark")
    # main() exits if a repeated call did not go through the cached compiled kernel (the
    # stand-in launcher counts the launches).
    result = module.main(["--calls", "20", "--repeats", "2", "--out", str(tmp_path / "host.json")])
    wrappers = {(row["kind"], row["path"]) for row in result["rows"] if row["layer"] == "wrapper"}
    assert wrappers == {("forward", "tma"), ("dgrad", "tma"), ("wgrad", "tma"), ("forward", "portable"),
                        ("wgrad", "portable")}
    assert all(row["us"] > 0 for row in result["rows"] if row["layer"] != "op")
    # The stand-in launchers are gone from the compiled-kernel cache afterwards.
    cached = module.grouped_gemm.CACHES.compiled.values()
    assert not any(isinstance(entry[1], module.RecordingLauncher) for entry in cached)


def test_schedule_comparison_refuses_a_machine_without_the_pingpong_kernel(monkeypatch):
    import sys

    from . import BENCHMARKS

    monkeypatch.syspath_prepend(BENCHMARKS)  # the script imports benchmarks/grouped_gemm.py beside it
    monkeypatch.setattr(sys, "argv", ["grouped_gemm_pingpong.py", "--check-only"])
    module = load_benchmark("grouped_gemm_pingpong.py", "grouped_gemm_pingpong_benchmark")
    monkeypatch.setattr(module.grouped_gemm_pingpong, "available", lambda device_index: False)
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(module.torch.cuda, "current_device", lambda: 0)
    with pytest.raises(SystemExit, match="needs an sm_90 GPU and Triton 3.6.x"):
        module.main()
