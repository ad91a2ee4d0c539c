"""The row kernels' rounding helper, one Triton function shared by ``moe_rows``, ``rms_norm`` and ``rotary``.

``round_to(value, dtype, EMULATE_RTNE)`` is ``value.to(dtype)``: the rounding an aten op applies to its
result. The interpreter truncates float32 -> bfloat16 where a GPU (and torch) rounds to nearest even;
with ``EMULATE_RTNE`` (set under ``TRITON_INTERPRET=1``) the float32 bits are rounded first, which makes
the truncation exact, so interpreted runs round as compiled ones. (NaN payloads may come out as
infinities: the tests have none.) Built on first use, so importing this module needs no Triton; a
kernel module stores it in a module global, where Triton looks up the functions a kernel calls.
"""

from __future__ import annotations

__all__ = ["round_to"]

_round_to = None


def round_to():
    """The ``@triton.jit`` rounding function."""
    # ``tl`` a module global too: a jit function reads triton.language through its module's globals.
    global _round_to, tl
    if _round_to is None:
        import triton
        import triton.language as tl

        @triton.jit
        def round_to(value, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
            if EMULATE_RTNE and dtype == tl.bfloat16:
                bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                value = bits.to(tl.float32, bitcast=True)
            return value.to(dtype)

        _round_to = round_to
    return _round_to
