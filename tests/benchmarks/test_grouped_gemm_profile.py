"""benchmarks/grouped_gemm_profile.py on the CPU: reading Nsight Compute's CSV, and its row syntax.

The report below has the layout ``ncu --csv --page details`` writes (a header, one line per
metric, the tool's own messages before it), with two kernels, as torch's grouped GEMM launches:
a short set-up kernel, then the product. The profile keeps the longer one and converts units.
"""

import pytest

from . import load_benchmark

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value","Rule Name","Rule Type",'
          '"Rule Description","Estimated Speedup Type","Estimated Speedup"')


def line(kernel_id, kernel, section, metric, unit, value):
    return (f'"{kernel_id}","1189","python3.12","127.0.0.1","{kernel}","1","7","(128, 1, 1)","(264, 1, 1)","0","9.0",'
            f'"{section}","{metric}","{unit}","{value}",')


REPORT = "\n".join([
    "==WARNING== Note: Running with unmodified GPU clocks.",
    "==PROF== Connected to process 1189 (/usr/bin/python3.12)",
    HEADER,
    line(0, "prepare_grouped_gemm_data", "GPU Speed Of Light Throughput", "Duration", "ns", "2,496"),
    line(0, "prepare_grouped_gemm_data", "GPU Speed Of Light Throughput", "SM Frequency", "hz", "1,955,378,605.77"),
    line(1, "cutlass_grouped_gemm", "GPU Speed Of Light Throughput", "SM Frequency", "hz", "1,516,051,279.75"),
    line(1, "cutlass_grouped_gemm", "GPU Speed Of Light Throughput", "Duration", "us", "301.15"),
    line(1, "cutlass_grouped_gemm", "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "83.50"),
    line(1, "cutlass_grouped_gemm", "Memory Workload Analysis", "L2 Hit Rate", "%", "65.66"),
    line(1, "cutlass_grouped_gemm", "Command line profiler metrics", "dram__bytes_read.sum", "Mbyte", "612.50"),
    line(1, "cutlass_grouped_gemm", "Launch Statistics", "Registers Per Thread", "register/thread", "189"),
    line(1, "cutlass_grouped_gemm", "Launch Statistics", "Waves Per SM", "", "1"),
    "==PROF== Disconnected from process 1189",
])


@pytest.fixture(scope="module")
def script():
    return load_benchmark("grouped_gemm_profile.py", "grouped_gemm_profile")


def test_the_longest_kernel_is_kept_with_units_converted(script):
    entry = script.parse_ncu_csv(REPORT)
    assert entry["kernel"] == "cutlass_grouped_gemm"
    assert entry["duration_us"] == pytest.approx(301.15)
    assert entry["sm_clock_ghz"] == pytest.approx(1.51605127975)
    assert entry["sm_pct"] == pytest.approx(83.5)
    assert entry["l2_hit_pct"] == pytest.approx(65.66)
    assert entry["dram_read_bytes"] == pytest.approx(612.5e6)
    assert entry["registers"] == 189
    assert "Waves Per SM" not in entry and len(entry) == 7


def test_a_report_without_metrics_is_an_error(script):
    with pytest.raises(RuntimeError, match="no kernel metrics"):
        script.parse_ncu_csv("==PROF== Connected to process 1\n==ERROR== LibraryNotLoaded\n")


def test_rows_name_a_product_kind_a_shape_and_a_distribution(script):
    assert script.parse_row("dgrad:2048x192:8x2048") == ("dgrad", 2048, 192, "8x2048")
    with pytest.raises(SystemExit, match="kind must be forward or dgrad"):
        script.parse_row("wgrad:2048x192:8x2048")


def test_least_bytes_count_every_expert_weight_once(script):
    flops, grouped, dense = script.problem_size(1536, 2048, "64x512")
    m = 64 * 512
    assert flops == 2.0 * m * 1536 * 2048
    assert grouped - dense == 2 * 63 * 2048 * 1536
