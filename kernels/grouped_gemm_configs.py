"""The autotuning space of the grouped GEMM kernels: their ``triton.Config`` lists, the prune
functions that drop configurations a problem cannot use, and the pre-hooks that size host TMA
descriptors to the configuration being tried.

Kept apart from the kernels (:mod:`kernels.grouped_gemm_kernels`) because the lists change with
measurements (``benchmarks/grouped_gemm_configs.py`` sweeps them) while the device code does not.
Under the CPU interpreter (``TRITON_INTERPRET=1``) each list is one small configuration: the
interpreter runs a kernel in Python, so tuning there would only multiply the test time.
"""

from __future__ import annotations

import os

import triton

__all__ = [
    "INTERPRETED",
    "MIN_TMA_BLOCK_R",
    "product_tma_config",
    "product_tma_configs",
    "product_portable_configs",
    "wgrad_tma_configs",
    "wgrad_portable_configs",
    "prune_product_tma",
    "prune_wgrad",
    "set_wgrad_blocks",
    "glu_product_configs",
    "glu_dgrad_configs",
    "gathered_wgrad_configs",
    "prune_glu",
]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _set_product_blocks(nargs):
    """Give the host TMA descriptors the block shapes of the configuration being launched."""
    block_m, block_p, block_r = nargs["BLOCK_M"], nargs["BLOCK_P"], nargs["BLOCK_R"]
    nargs["a_desc"].block_shape = [block_m, block_r]
    nargs["b_desc"].block_shape = [block_p, block_r] if nargs["B_TRANSPOSED"] else [block_r, block_p]
    nargs["out_desc"].block_shape = [block_m, block_p // nargs["EPILOGUE_SPLIT"]]


def set_wgrad_blocks(nargs):
    """The wgrad kernel's counterpart of the product's pre-hook (tests build configurations with it)."""
    nargs["left_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_P1"]]
    nargs["right_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_P2"]]


def product_tma_config(block_m, block_p, block_r, warps, stages, programs_per_sm=1, tma_store=True,
                       epilogue_split=1, warp_specialize=False) -> triton.Config:
    """One configuration of the Hopper grouped product (tests and the tuning sweep build their
    own through this). ``warp_specialize`` gives the loads and the products warps of their own;
    Triton does that on Hopper for loops it does not flatten, so the tile loop is left unflattened
    there."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_P": block_p, "BLOCK_R": block_r, "PROGRAMS_PER_SM": programs_per_sm,
         "TMA_STORE": tma_store, "EPILOGUE_SPLIT": epilogue_split, "WARP_SPECIALIZE": warp_specialize,
         "FLATTEN": not warp_specialize},
        num_warps=warps, num_stages=stages, pre_hook=_set_product_blocks)


def product_tma_configs():
    if INTERPRETED:
        return [product_tma_config(16, 32, 16, 4, 1, tma_store=True, epilogue_split=2)]
    # (BLOCK_M, BLOCK_P, BLOCK_R, warps, stages, programs per SM, epilogue split). Each row of the
    # tuning sweep (benchmarks/grouped_gemm_configs.py) found its best candidate in this list. Two
    # programs per SM (each under half of the 228 KB of shared memory) let one's epilogue overlap
    # the other's main loop, which pays where the reduction is short (K = 192) and the output
    # stores dominate; 128 x 256 tiles with a four-deep pipeline win where it is long.
    return [product_tma_config(block_m, block_p, block_r, warps, stages, per_sm, epilogue_split=split)
            for block_m, block_p, block_r, warps, stages, per_sm, split in [
                (128, 128, 64, 4, 3, 2, 2),
                (128, 256, 64, 8, 4, 1, 2),
                (256, 128, 64, 8, 4, 1, 2),
                (128, 256, 64, 8, 3, 1, 2),
                (128, 128, 64, 8, 5, 1, 2),
                (128, 64, 64, 4, 4, 2, 1),
                (128, 64, 64, 4, 4, 2, 2),
                (64, 128, 64, 4, 4, 2, 1),
                (64, 256, 64, 4, 3, 1, 2),
            ]]


# An untransposed weight's reduction length must be a multiple of some configuration's BLOCK_R
# for the TMA product to read it (see prune_product_tma).
MIN_TMA_BLOCK_R = min(config.kwargs["BLOCK_R"] for config in product_tma_configs())


def prune_product_tma(configs, named_args, **kwargs):
    """Keep tiles that fit the problem: an untransposed B needs R to be a multiple of BLOCK_R
    (its row blocks would otherwise reach into the next group's weights), and tiles far wider
    than P only waste work."""
    p, r = named_args["P"], named_args["R"]
    transposed = kwargs.get("B_TRANSPOSED", named_args.get("B_TRANSPOSED"))
    kept = [c for c in configs if transposed or r % c.kwargs["BLOCK_R"] == 0]
    narrow = [c for c in kept if c.kwargs["BLOCK_P"] <= max(64, triton.next_power_of_2(p))]
    return narrow or kept


def _configs(names, rows, **extra):
    """One ``triton.Config`` per row: the row's leading values are the blocks named in ``names``,
    its last two the warps and the pipeline stages."""
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1], **extra) for row in rows]


_WGRAD_BLOCKS = ("BLOCK_P1", "BLOCK_P2", "BLOCK_M")
_PRODUCT_BLOCKS = ("BLOCK_M", "BLOCK_P", "BLOCK_R")


def wgrad_tma_configs():
    if INTERPRETED:
        return _configs(_WGRAD_BLOCKS, [(16, 16, 16, 4, 1)], pre_hook=set_wgrad_blocks)
    # The last three fit two programs per SM, so one's epilogue overlaps the other's loads.
    return _configs(_WGRAD_BLOCKS, [
        (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
        (128, 128, 128, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 2), (128, 128, 32, 4, 4),
    ], pre_hook=set_wgrad_blocks)


def prune_wgrad(configs, named_args, **kwargs):
    p1, p2 = named_args["P1"], named_args["P2"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_P1"] <= max(64, triton.next_power_of_2(p1))
            and c.kwargs["BLOCK_P2"] <= max(64, triton.next_power_of_2(p2))]
    return kept or configs


def product_portable_configs():
    if INTERPRETED:
        return _configs(_PRODUCT_BLOCKS, [(16, 32, 16, 4, 1)])
    return _configs(_PRODUCT_BLOCKS, [
        (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 32, 4, 4),
    ])


def wgrad_portable_configs():
    if INTERPRETED:
        return _configs(_WGRAD_BLOCKS, [(16, 32, 16, 4, 1)])
    return _configs(_WGRAD_BLOCKS, [
        (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
    ])


# ----------------------------------------------------------------------------------------------
# The fused MoE kernels (kernels/fused_moe_kernels.py): masked pointer loads, as the portable
# product, since gathered rows cannot be read through a TMA box on Hopper.
# ----------------------------------------------------------------------------------------------


def glu_product_configs():
    """The gathered gate/up product with the activation in its epilogue. Each program holds two
    accumulators (gate and up of the same columns), so a BLOCK_P of 64 does the work, and holds
    the registers, of a 128-wide tile of the plain product."""
    if INTERPRETED:
        return _configs(_PRODUCT_BLOCKS, [(16, 16, 16, 4, 1)])
    return _configs(_PRODUCT_BLOCKS, [
        (128, 64, 64, 8, 4), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4),
        (128, 64, 32, 4, 4), (64, 128, 64, 4, 3),
    ])


def glu_dgrad_configs():
    """The down product's dgrad with the activation's derivative in its epilogue: one accumulator,
    then two tiles of the saved gate/up read and two of its gradient written."""
    if INTERPRETED:
        return _configs(_PRODUCT_BLOCKS, [(16, 16, 16, 4, 1)])
    return _configs(_PRODUCT_BLOCKS, [
        (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
        (128, 256, 64, 8, 3), (64, 64, 64, 4, 4),
    ])


def prune_glu(configs, named_args, **kwargs):
    """Drop tiles far wider than the output (I columns)."""
    i = named_args["I"]
    narrow = [c for c in configs if c.kwargs["BLOCK_P"] <= max(32, triton.next_power_of_2(i))]
    return narrow or configs


def gathered_wgrad_configs():
    """The gate/up weight gradient with gathered token rows: (BLOCK_N, BLOCK_K, BLOCK_M)."""
    if INTERPRETED:
        return _configs(("BLOCK_N", "BLOCK_K", "BLOCK_M"), [(16, 16, 16, 4, 1)])
    return _configs(("BLOCK_N", "BLOCK_K", "BLOCK_M"), [
        (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
    ])
