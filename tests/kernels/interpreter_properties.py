"""Property-based checks of the Triton grouped GEMM kernels under TRITON_INTERPRET=1.

Hypothesis draws the problem (group sizes with empty groups and sizes around the tile edges,
rows past the last offset, K and N, dtype, weight layout, the memory order of the weight, padded
or broadcast operand strides) and a kernel configuration, then runs forward, dgrad and wgrad on
the drawn path with NaN-poisoned outputs and compares each against a float64 reference.
Started as a subprocess by test_grouped_gemm_properties.py (the interpreter must be chosen
before Triton compiles anything); prints one JSON line per path with the number of examples run,
and exits non-zero with Hypothesis' shrunk counterexample when a property fails.

    python tests/kernels/interpreter_properties.py [--examples N] [--shrink]
"""

import argparse
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import triton  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernels import grouped_gemm  # noqa: E402
from kernels.grouped_gemm_configs import set_wgrad_blocks  # noqa: E402
from kernels.reference import grouped_mm_dgrad_loop, grouped_mm_loop, grouped_mm_wgrad_loop  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# Sizes that sit on either side of the 16- and 32-row tiles the interpreter configurations use,
# mixed with arbitrary ones: partial tiles, whole tiles and empty groups all occur.
GROUP_SIZE = st.one_of(st.sampled_from([0, 0, 1, 15, 16, 17, 31, 32, 33]), st.integers(0, 40))


def relative(value, reference):
    return ((value.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def operand(rows, cols, dtype, stride_kind, generator):
    """A random ``[rows, cols]`` operand: contiguous, inside a wider buffer (row stride padded by
    16 bytes' worth of elements), or one random row broadcast to every row (row stride 0, as
    autograd hands the gradient of a sum)."""
    if stride_kind == "broadcast":
        return torch.randn(1, cols, generator=generator).to(dtype).expand(rows, cols)
    if stride_kind == "padded":
        pad = 16 // torch.empty((), dtype=dtype).element_size()
        return torch.randn(rows, cols + pad, generator=generator).to(dtype)[:, :cols]
    return torch.randn(rows, cols, generator=generator).to(dtype)


def weight(experts, k, n, layout, flipped, dtype, generator):
    """``[E, K, N]`` ("ekn") or ``[E, N, K]`` ("enk"); ``flipped`` stores each group's matrix in
    the other memory order (a transposed view of contiguous storage)."""
    shape = (experts, k, n) if layout == "ekn" else (experts, n, k)
    if flipped:
        return torch.randn(experts, shape[2], shape[1], generator=generator).to(dtype).transpose(1, 2)
    return torch.randn(shape, generator=generator).to(dtype)


def check(path, dtype, layout, sizes, trailing, k, n, flipped, stride_kinds, product_config, wgrad_config, seed):
    generator = torch.Generator().manual_seed(seed)
    experts, m = len(sizes), sum(sizes) + trailing
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    x = operand(m, k, dtype, stride_kinds[0], generator)
    dout = operand(m, n, dtype, stride_kinds[1], generator)
    w = weight(experts, k, n, layout, flipped, dtype, generator)
    product_kernel = grouped_gemm._grouped_product_tma_kernel if path == "tma" else grouped_gemm._grouped_product_kernel
    wgrad_kernel = grouped_gemm._grouped_wgrad_tma_kernel if path == "tma" else grouped_gemm._grouped_wgrad_kernel
    with grouped_gemm.use_config(product_kernel, product_config), grouped_gemm.use_config(wgrad_kernel, wgrad_config):
        before = dict(grouped_gemm.launch_counts)
        out = grouped_gemm.triton_grouped_mm(x, w, offsets, layout, out=torch.full((m, n), float("nan"), dtype=dtype),
                                             path=path)
        dx = grouped_gemm.triton_grouped_mm(dout, w, offsets, layout, transpose_weight=True,
                                            out=torch.full((m, k), float("nan"), dtype=dtype), path=path)
        dw = grouped_gemm.triton_grouped_mm_wgrad(x, dout, offsets, experts, layout,
                                                  out=torch.full(tuple(w.shape), float("nan"), dtype=dtype), path=path)
    ran = sorted(key for key, count in grouped_gemm.launch_counts.items() if count > before.get(key, 0))
    problem = (f"path={path} dtype={dtype} layout={layout} flipped={flipped} strides={stride_kinds} sizes={sizes} "
               f"trailing={trailing} K={k} N={n} product={product_config} wgrad={wgrad_config}")
    if m > 0 and experts > 0:
        assert ran == [f"product_{path}", f"wgrad_{path}"], f"{problem}: ran {ran}"
    for name, value in (("forward", out), ("dgrad", dx), ("wgrad", dw)):
        assert not torch.isnan(value).any(), f"{problem}: {name} left elements unwritten"
    assert (out[sum(sizes):] == 0).all() and (dx[sum(sizes):] == 0).all(), f"{problem}: rows past the last group not zero"
    for name, value, reference in (
        ("forward", out, grouped_mm_loop(x.double(), w.double(), offsets, layout)),
        ("dgrad", dx, grouped_mm_dgrad_loop(dout.double(), w.double(), offsets, layout)),
        ("wgrad", dw, grouped_mm_wgrad_loop(x.double(), dout.double(), offsets, experts, layout)),
    ):
        error = relative(value, reference)
        assert error < TOLERANCE[dtype], f"{problem}: {name} relative error {error:.3g}"


def portable_configs():
    blocks = st.sampled_from([16, 32])
    product = st.builds(lambda m, p, r: triton.Config({"BLOCK_M": m, "BLOCK_P": p, "BLOCK_R": r},
                                                      num_warps=4, num_stages=1), blocks, blocks, blocks)
    return product, wgrad_configs()


def wgrad_configs(**extra):
    blocks = st.sampled_from([16, 32])
    return st.builds(lambda p1, p2, m: triton.Config({"BLOCK_P1": p1, "BLOCK_P2": p2, "BLOCK_M": m},
                                                     num_warps=4, num_stages=1, **extra),
                     blocks, blocks, blocks)


def tma_configs():
    # BLOCK_R stays 16: an untransposed weight's reduction length must be a multiple of it, and
    # the drawn K and N are multiples of 16.
    product = st.builds(
        lambda m, p, split, store, per_sm, specialized: grouped_gemm.product_tma_config(m, p, 16, 4, 1, per_sm, store,
                                                                                        split, specialized),
        st.sampled_from([16, 32]), st.sampled_from([16, 32]), st.sampled_from([1, 2]), st.booleans(),
        st.sampled_from([1, 2]), st.booleans())
    return product, wgrad_configs(pre_hook=set_wgrad_blocks)


def problems(path):
    if path == "tma":
        # TMA needs 16-byte rows and, for an untransposed weight, R a multiple of BLOCK_R.
        dims = st.sampled_from([16, 32, 48, 64, 80])
        dtypes = st.sampled_from([torch.bfloat16, torch.float16])
        strides = st.sampled_from(["contiguous", "padded"])
    else:
        dims = st.integers(1, 72)
        dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
        strides = st.sampled_from(["contiguous", "padded", "broadcast"])
    product, wgrad = tma_configs() if path == "tma" else portable_configs()
    return dict(dtype=dtypes, layout=st.sampled_from(["ekn", "enk"]), sizes=st.lists(GROUP_SIZE, min_size=1, max_size=6),
                trailing=st.sampled_from([0, 0, 1, 5, 17]), k=dims, n=dims, flipped=st.booleans(),
                stride_kinds=st.tuples(strides, strides), product_config=product, wgrad_config=wgrad,
                seed=st.integers(0, 2**31 - 1))


def run(path, examples, shrink):
    counted = [0]
    # Without shrinking a failure is reported at once with the whole drawn problem in its message;
    # shrinking it (--shrink) runs many more interpreted kernels.
    phases = list(Phase) if shrink else [Phase.explicit, Phase.generate]

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, phases=phases,
              suppress_health_check=list(HealthCheck))
    @given(**problems(path))
    def holds(**problem):
        counted[0] += 1
        check(path, **problem)

    holds()
    return counted[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=40, help="examples per kernel path")
    parser.add_argument("--shrink", action="store_true", help="shrink a failing example to a minimal one")
    args = parser.parse_args()
    for path in ("portable", "tma"):
        print(json.dumps({"path": path, "examples": run(path, args.examples, args.shrink)}), flush=True)


if __name__ == "__main__":
    main()
