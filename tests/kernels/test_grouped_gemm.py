"""The Triton grouped GEMM kernels under the CPU interpreter, against a float64 reference.

Outputs are poisoned with NaN before each run (an unwritten tile fails), inputs are random, and
the cases cover both kernel families (the portable kernels and the Hopper TMA kernels, which the
interpreter runs too), empty groups, groups smaller than a tile, M not a multiple of the block, K and N
not multiples of 16 and rows past the last offset. Tolerances: fp32 < 1e-5, bf16 < 1e-2.
"""

import pytest

from tests.kernels import interpreted_rows


@pytest.fixture(scope="module")
def results():
    return interpreted_rows("interpreter_checks.py")


def test_every_case_ran(results):
    assert len(results) == 2 * 2 * 4 + 2 * 2 * 2 * 2 + 2 * 2 + 2 * 2 * 2 + 2 + 1


@pytest.mark.parametrize("index", range(16 + 16 + 4))
def test_forward_dgrad_wgrad_match_float64(results, index):
    row = results[index]
    tolerance = 1e-5 if row["dtype"] == "torch.float32" else 1e-2
    assert row["unwritten"] == 0, row
    assert row["trailing_rows_zero"], row
    assert row["same_without_out"], row
    if row["name"].endswith("(torch schedule)"):
        expected_paths = ["product_tma", "product_tma_torch", "wgrad_tma", "wgrad_tma_torch"]
    elif row["name"].startswith("TMA"):
        expected_paths = ["product_tma", "wgrad_tma"]
    else:
        expected_paths = ["product_portable", "wgrad_portable"]
    assert row["paths"] == expected_paths, row
    for kind in ("forward", "dgrad", "wgrad"):
        assert row[kind] < tolerance, (kind, row)


def test_the_sgd_epilogue_updates_the_weight_and_sums_the_squares_of_the_gradient(results):
    rows = [row for row in results if row["name"].startswith("sgd: ")]
    assert len(rows) == 10
    for row in rows:
        tolerance = 1e-5 if row["dtype"] == "torch.float32" else 1e-2
        # bf16: the squares of the rounded gradient (the interpreter's bf16 rounding is biased,
        # so the sum's error does not average out).
        assert row["weight"] < tolerance and row["squares"] < 2 * tolerance, row
        assert row["empty_groups_unchanged"] and row["squares_dtype"] == "torch.float32", row
        # The first call tunes the plain wgrad (its configuration is the fused kernel's), then
        # the fused kernel runs on the same path.
        path = "tma" if row["name"].startswith("sgd: TMA") else "portable"
        assert f"wgrad_sgd_{path}" in row["paths"], row


def test_autograd_through_the_custom_op_uses_the_interpreted_kernel(results):
    row = results[-1]
    assert row["interpreted"] and row["kernel_is_interpreted"] != "JITFunction" and row["backend"] == "auto"
    # forward + dgrad through the forward kernel, wgrad through its own kernel
    assert row["triton_calls"] == {"forward": 2, "wgrad": 1}
    assert row["forward"] < 1e-5 and row["dgrad"] < 1e-5 and row["wgrad"] < 1e-5
