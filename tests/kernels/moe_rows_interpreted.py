"""Run the MoE row kernels under TRITON_INTERPRET=1 and print one JSON line per case.

Started as a subprocess by test_moe_rows.py (the interpreter must be chosen before Triton compiles
anything, and the rest of the suite must not run interpreted kernels). ``--device cuda`` runs the
op and runtime groups compiled on a GPU instead (``benchmarks/one_gpu_runs.sh`` does). Three groups:

* ``op``: each kernel against the float64 definition of what it computes, over dtypes, row widths
  (narrower than a tile, not a power of two, wider than one tile), top_k and token counts (none);
* ``runtime``: the runtime's MoE steps with the kernels against the same steps as aten ops;
* ``program``: the example model compiled on meshes with and without dispatch, run with the kernels,
  against the unsharded model (``shardgraph.check.parity_errors``), with the kernels' launches counted.
"""

import json
import os
import sys

DEVICE = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from kernels import moe_rows  # noqa: E402
from shardgraph.runtime import moe as moe_steps  # noqa: E402

OPS = torch.ops.shardgraph


ROWS = []


def emit(**row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def relative(value, reference):
    if reference.numel() == 0:
        return 0.0 if value.numel() == 0 else float("inf")
    return ((value.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def routing(tokens, top_k, experts, generator):
    ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)]) if tokens \
        else torch.zeros(0, top_k, dtype=torch.long)
    order, _ = moe_steps.sort_by_expert(ids, experts)
    return order.to(DEVICE)


def op_case(tokens, top_k, width, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    order = routing(tokens, top_k, top_k + 3, generator)
    inverse = moe_steps.inverse_permutation(order)
    hidden = torch.randn(tokens, width, generator=generator).to(DEVICE, dtype)
    returned = torch.randn(tokens * top_k, width, generator=generator).to(DEVICE, dtype)
    grad_out = torch.randn(tokens, width, generator=generator).to(DEVICE, dtype)
    weights = torch.rand(tokens, top_k, generator=generator).to(DEVICE)
    flat = weights.reshape(-1)
    h64, r64, g64 = hidden.double(), returned.double(), grad_out.double()
    # The definitions, in float64 from the same (rounded) operands.
    want = {
        "gather_rows": h64[order // top_k],
        "gather_rows_scaled": g64[order // top_k] * flat[order].double()[:, None],
        "gather_sum": (r64[inverse].reshape(tokens, top_k, width) * weights.double()[..., None]).sum(1),
        "gather_sum_unweighted": r64[inverse].reshape(tokens, top_k, width).sum(1),
        "grad_copies": g64[order // top_k] * flat[order].double()[:, None],
        "grad_weights": (r64[inverse].reshape(tokens, top_k, width) * g64[:, None, :]).sum(-1),
    }
    grad_copies, grad_weights = OPS.combine_backward(grad_out, returned, order, weights)
    got = {
        "gather_rows": OPS.gather_rows(hidden, order, top_k),
        "gather_rows_scaled": OPS.gather_rows(grad_out, order, top_k, flat),
        "gather_sum": OPS.gather_sum(returned, inverse, top_k, weights),
        "gather_sum_unweighted": OPS.gather_sum(returned, inverse, top_k),
        "grad_copies": grad_copies,
        "grad_weights": grad_weights,
    }
    emit(group="op", device=DEVICE, tokens=tokens, top_k=top_k, width=width, dtype=str(dtype),
         errors={name: relative(got[name], want[name]) for name in want},
         shapes_ok=all(tuple(got[name].shape) == tuple(want[name].shape) for name in want),
         dtypes=[str(got[name].dtype) for name in want])


def runtime_case(tokens, top_k, width, seed):
    """Each runtime step with the kernels against itself as aten ops (float32: equal up to the
    order of a sum)."""
    generator = torch.Generator().manual_seed(seed)
    order = routing(tokens, top_k, top_k + 2, generator)
    hidden = torch.randn(tokens, width, generator=generator).to(DEVICE)
    returned = torch.randn(tokens * top_k, width, generator=generator).to(DEVICE)
    grad_out = torch.randn(tokens, width, generator=generator).to(DEVICE)
    weights = torch.rand(tokens, top_k, generator=generator).to(DEVICE)
    permutation = torch.randperm(tokens * top_k, generator=generator).to(DEVICE)

    def steps():
        return {
            "gather_copies": moe_steps.gather_copies(hidden, order, top_k),
            "ungroup": moe_steps.ungroup(returned, permutation),
            "combine": moe_steps.combine(returned, order, weights),
            "combine_backward": moe_steps.combine_backward(grad_out, returned, order, weights),
            "scatter_copies": moe_steps.scatter_copies(returned, order, top_k, tokens),
        }

    with_kernels = steps()
    moe_rows.TRITON_ENABLED = False
    try:
        aten = steps()
    finally:
        moe_rows.TRITON_ENABLED = True
    errors = {}
    for name, value in with_kernels.items():
        values, references = (value, aten[name]) if isinstance(value, tuple) else ((value,), (aten[name],))
        errors[name] = max(relative(v, r.double()) for v, r in zip(values, references))
    emit(group="runtime", device=DEVICE, tokens=tokens, top_k=top_k, width=width, errors=errors)


def program_case(mesh_text):
    import shardgraph as sg
    from examples.moe_model import shardgraph_entry
    from shardgraph.check import parity_errors

    launches = {"rows": 0, "sum": 0, "backward": 0}
    originals = (moe_rows._launch_gather_rows, moe_rows._launch_gather_sum, moe_rows._launch_combine_backward)

    def counted(name, launch):
        def run(*args):
            launches[name] += 1
            return launch(*args)
        return run

    moe_rows._launch_gather_rows, moe_rows._launch_gather_sum, moe_rows._launch_combine_backward = (
        counted(name, launch) for name, launch in zip(launches, originals))
    try:
        model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=4, seq_len=4, num_layers=1)
        program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn)
        errors, _ = parity_errors(program, model, inputs, loss_fn, 0.1)
    finally:
        moe_rows._launch_gather_rows, moe_rows._launch_gather_sum, moe_rows._launch_combine_backward = originals
    emit(group="program", mesh=mesh_text, loss=errors.loss, gradients=errors.gradients, weights=errors.weights,
         launches=launches)


def main():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        op_case(13, 3, 1100, dtype, 1)  # wider than one tile, not a power of two
    op_case(9, 1, 5, torch.float32, 2)  # top-1, a width narrower than a vector
    op_case(24, 8, 64, torch.float32, 3)
    op_case(0, 2, 16, torch.float32, 4)  # no tokens: empty results, no launch
    runtime_case(11, 2, 40, 5)
    runtime_case(6, 4, 2048, 6)
    if DEVICE != "cpu":
        # The layer's sizes on a GPU: Qwen3-30B-A3B's top-8 of 2048-wide rows.
        op_case(4096, 8, 2048, torch.bfloat16, 7)
        runtime_case(1024, 8, 2048, 8)
        return
    for mesh_text in ("world=1", "world=4,ep=2,tp=2"):
        program_case(mesh_text)


if __name__ == "__main__":
    main()
    if "--out" in sys.argv:
        with open(sys.argv[sys.argv.index("--out") + 1], "w") as handle:
            json.dump({"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__,
                       "rows": ROWS}, handle, indent=1)
