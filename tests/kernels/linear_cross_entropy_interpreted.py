"""Run the Triton softmax / cross-entropy gradient kernel under TRITON_INTERPRET=1 against the
torch path and print one JSON line of relative errors.

Started as a subprocess by test_linear_cross_entropy.py: the interpreter must be chosen before
Triton compiles anything.
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from kernels.cross_entropy_triton import softmax_cross_entropy_grad_  # noqa: E402
from kernels.linear_cross_entropy import _chunk_torch  # noqa: E402

torch.manual_seed(0)
rows, vocab = 6, 300  # vocab not a power of two: the last block is masked
logits = torch.randn(rows, vocab) * 4
target = torch.randint(0, vocab, (rows,))
valid = torch.tensor([True, False, True, True, True, False])
coefficient = valid.float() * 0.25
expected_loss, expected_grad = _chunk_torch(logits.clone(), target, valid, coefficient)
work = logits.clone()
loss = softmax_cross_entropy_grad_(work, target, coefficient)


def relative(value, reference):
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


print(json.dumps({"loss": relative(loss, expected_loss), "grad": relative(work, expected_grad),
                  "ignored_rows_zero": bool(work[~valid].abs().max() == 0 and loss[~valid].abs().max() == 0)}))
