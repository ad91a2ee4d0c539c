"""Host-side launch helpers of the Triton grouped GEMM."""

import torch

from kernels import grouped_gemm


def test_fast_descriptor_equals_the_checked_constructor():
    # _descriptor skips TensorDescriptor's checks for speed; every field, defaults of this Triton
    # release included, must come out as the constructor makes it.
    base = torch.randn(32, 24, dtype=torch.bfloat16)[:, :16]
    fast = grouped_gemm._descriptor(base, [32, 16], [24, 1], [16, 16])
    assert fast == grouped_gemm.TensorDescriptor(base, [32, 16], [24, 1], [16, 16])
