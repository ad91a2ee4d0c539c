"""Run the embedding SGD kernel under TRITON_INTERPRET=1 against the float64 dense step and print
one JSON line per case.

Started as a subprocess by test_embedding_sgd.py (the interpreter must be chosen before Triton
compiles anything). ``--device cuda`` runs the same cases compiled on a GPU, where a 16-bit step
must also equal the aten form's values (the interpreter's float32 -> 16-bit casts do not round as
a GPU's do).
"""

import json
import os
import sys

DEVICE = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from kernels import embedding_sgd  # noqa: E402

STEP = torch.ops.shardgraph.embedding_sgd_


def relative(value, reference):
    return ((value.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30)).item()


def case(dtype, rows, width, tokens, distinct, padding_idx, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, width, generator=generator).to(dtype).to(DEVICE)
    indices = torch.randint(0, distinct, (tokens,), generator=generator).to(DEVICE)
    grad_output = torch.randn(tokens, width, generator=generator).to(dtype).to(DEVICE)
    lr = torch.tensor(0.25, dtype=dtype).to(DEVICE)
    grad64 = torch.ops.aten.embedding_dense_backward(grad_output.double(), indices, rows, padding_idx, False)
    step64 = grad64 * lr.double()
    kernel_weight, aten_weight = weight.clone(), weight.clone()
    with embedding_sgd.use_triton(True):
        squares = STEP(kernel_weight, grad_output, indices, lr, padding_idx, [])
    with embedding_sgd.use_triton(False):
        aten_squares = STEP(aten_weight, grad_output, indices, lr, padding_idx, [])
    looked_up = torch.zeros(rows, dtype=torch.bool, device=DEVICE)
    looked_up[indices] = True
    if padding_idx >= 0:
        looked_up[padding_idx] = False
    print(json.dumps({
        "dtype": str(dtype), "width": width, "tokens": tokens, "padding_idx": padding_idx,
        # Error of the new weight against the float64 step, relative to the step's size.
        "step_error": ((kernel_weight.double() - (weight.double() - step64)).norm() / step64.norm()).item(),
        "aten_step_error": ((aten_weight.double() - (weight.double() - step64)).norm() / step64.norm()).item(),
        "equal_to_aten": bool(torch.equal(kernel_weight, aten_weight)),
        "squares": abs(squares.item() - aten_squares.item()) / aten_squares.item(),
        "untouched_equal": bool(torch.equal(kernel_weight[~looked_up], weight[~looked_up])),
    }), flush=True)


for dtype in (torch.float32, torch.bfloat16):
    # Widths below one block, not a power of two, and over one block; few distinct indices (long
    # runs) and many (mostly single rows); the padding row among the indices.
    case(dtype, 50, 24, 64, 6, -1, 0)
    case(dtype, 50, 1100, 40, 30, 2, 1)
    case(dtype, 300, 130, 200, 300, 5, 2)
