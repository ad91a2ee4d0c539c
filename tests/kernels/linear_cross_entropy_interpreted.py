"""Run the Triton softmax / cross-entropy gradient kernel and the output projection's SGD step under
TRITON_INTERPRET=1 against the torch path and print one JSON line of relative errors.

Started as a subprocess by test_linear_cross_entropy.py: the interpreter must be chosen before
Triton compiles anything. ``--device cuda`` runs the same cases compiled on a GPU, where a 16-bit
step must equal the unfused ops' values.
"""

import json
import os
import sys

DEVICE = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from kernels.cross_entropy_triton import sgd_from_accumulator_, softmax_cross_entropy_grad_  # noqa: E402
from kernels.linear_cross_entropy import _chunk_torch  # noqa: E402

torch.manual_seed(0)
rows, vocab = 6, 300  # vocab not a power of two: the last block is masked
logits = (torch.randn(rows, vocab) * 4).to(DEVICE)
target = torch.randint(0, vocab, (rows,)).to(DEVICE)
valid = torch.tensor([True, False, True, True, True, False]).to(DEVICE)
coefficient = valid.float() * 0.25
expected_loss, expected_grad = _chunk_torch(logits.clone(), target, valid, coefficient)
work = logits.clone()
loss = softmax_cross_entropy_grad_(work, target, coefficient)
# A row over one block (8192 columns): three blocks, the last masked, the gradient pass walking
# them backwards.
wide = (torch.randn(3, 20000) * 4).to(DEVICE)
wide_target = torch.tensor([5, 19999, 12000]).to(DEVICE)
wide_valid = torch.tensor([True, False, True]).to(DEVICE)
wide_coefficient = wide_valid.float() * 0.25
wide_loss_expected, wide_grad_expected = _chunk_torch(wide.clone(), wide_target, wide_valid, wide_coefficient)
wide_loss = softmax_cross_entropy_grad_(wide, wide_target, wide_coefficient)


def relative(value, reference):
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


# The output projection's SGD step from its float32 gradient accumulator, against the unfused
# graph's ops (cast, ``param - grad * lr``, float32 squares). 5000 elements: two blocks, the
# second masked. The interpreter's float32 -> bfloat16 casts do not round as a GPU's do, so a
# 16-bit step is compared by its relative error (the GPU run checks the values themselves).
sgd = {}
for dtype in (torch.bfloat16, torch.float32):
    accumulator = torch.randn(50, 100).to(DEVICE)
    param = torch.randn(50, 100).to(dtype).to(DEVICE)
    lr = torch.tensor(0.3, dtype=dtype).to(DEVICE)
    grad = accumulator.to(dtype)
    expected_param = param - grad * lr
    expected_squares = torch.sum(torch.pow(grad.float(), 2))
    squares = sgd_from_accumulator_(param, accumulator, lr)
    sgd[str(dtype)] = {"param_equal": bool(torch.equal(param, expected_param)),
                       "param": relative(param.double(), expected_param.double()),
                       "squares": relative(squares, expected_squares)}

print(json.dumps({"loss": relative(loss, expected_loss), "grad": relative(work, expected_grad),
                  "wide_loss": relative(wide_loss, wide_loss_expected), "wide_grad": relative(wide, wide_grad_expected),
                  "ignored_rows_zero": bool(work[~valid].abs().max() == 0 and loss[~valid].abs().max() == 0),
                  "sgd": sgd}))
