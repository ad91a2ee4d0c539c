"""Run the MoE row kernels under TRITON_INTERPRET=1 and print one JSON line per case.

Started as a subprocess by test_moe_rows.py (the interpreter must be chosen before Triton compiles
anything, and the rest of the suite must not run interpreted kernels). ``--device cuda`` runs the
op, runtime and glu groups compiled on a GPU instead (``benchmarks/one_gpu_runs.sh`` does). Four groups:

* ``op``: each kernel against the float64 definition of what it computes, over dtypes, row widths
  (narrower than a tile, not a power of two, wider than one tile), top_k and token counts (none);
* ``runtime``: the runtime's MoE steps with the kernels against the same steps as aten ops;
* ``glu``: the SwiGLU kernels (both layouts) against the aten form they replace
  (``GatedActivation.parse("silu")`` and its ``backward``), in units of the last place, and against
  float64; the runtime's ``glu`` / ``glu_backward`` with their launches counted, for plain SwiGLU
  and for the activations that keep the aten form;
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
from shardgraph.ops.moe import GatedActivation  # noqa: E402
from shardgraph.runtime import moe as moe_steps  # noqa: E402
from tests.kernels import write_rows_where_asked  # noqa: E402

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


def ulps(value, reference):
    """The largest distance between ``value`` and ``reference`` (one dtype) in units of the last place:
    their bit patterns as sign-magnitude integers (+0 and -0 the same), subtracted."""
    if value.numel() == 0:
        return 0
    bits, magnitude = (torch.int32, 0x7FFFFFFF) if value.dtype == torch.float32 else (torch.int16, 0x7FFF)

    def ordered(tensor):
        signed = tensor.contiguous().view(bits).long()
        return torch.where(signed < 0, -(signed & magnitude), signed)

    return int((ordered(value) - ordered(reference)).abs().max())


def glu_case(rows, width, dtype, layout, seed, padded=False):
    """``swiglu`` / ``swiglu_backward`` on ``[rows, 2 * width]`` against the aten form and float64.
    ``padded``: the product a column slice of wider rows (a row stride past its width)."""
    act = GatedActivation.parse("silu" if layout == "concatenated" else f"silu(layout={layout})")
    generator = torch.Generator().manual_seed(seed)
    # Gates over [-9, 9] or so: the sigmoid's saturated tails and its middle.
    wide = torch.randn(rows, 2 * width + (6 if padded else 0), generator=generator) * 3
    gate_up = (wide[:, 3:3 + 2 * width] if padded else wide).to(DEVICE, dtype)
    grad = torch.randn(rows, width, generator=generator).to(DEVICE, dtype)
    got = {"out": OPS.swiglu(gate_up, act.interleaved), "grad": OPS.swiglu_backward(grad, gate_up, act.interleaved)}
    aten = {"out": act(gate_up), "grad": act.backward(grad, gate_up)}
    # The definition in float64 from the same (rounded) operands.
    gate, up = act.split(gate_up.double())
    sigmoid = torch.sigmoid(gate)
    grad64 = grad.double()
    want = {"out": gate * sigmoid * up,
            "grad": act.join(grad64 * up * sigmoid * (1 + gate * (1 - sigmoid)), grad64 * gate * sigmoid)}
    emit(group="glu", device=DEVICE, rows=rows, width=width, dtype=str(dtype), layout=layout, padded=padded,
         ulps={name: ulps(got[name], aten[name]) for name in got},
         differing={name: int((got[name] != aten[name]).sum()) for name in got},
         elements={name: got[name].numel() for name in got},
         aten={name: relative(got[name], aten[name].double()) for name in got},
         errors={name: relative(got[name], want[name]) for name in got},
         aten_errors={name: relative(aten[name], want[name]) for name in got},
         shapes_ok=all(tuple(got[name].shape) == tuple(aten[name].shape) for name in got),
         dtypes=[str(got[name].dtype) for name in got])


GLU_SPECS = ("silu", "silu(layout=interleaved)", "gelu", "silu(limit=7.0)", "clamped_swiglu(alpha=1.702,limit=7.0)",
             "softcapped_swiglu(gate_softcap=20.0,up_softcap=20.0)", "relu2(layout=ungated)")


def glu_runtime_case(spec, dtype, seed):
    """The runtime's ``glu`` / ``glu_backward`` against the aten form, with the kernels' launches
    counted: plain SwiGLU launches them, every other activation keeps the aten form (bit for bit)."""
    act = GatedActivation.parse(spec)
    generator = torch.Generator().manual_seed(seed)
    width = 40
    gate_up = (torch.randn(9, width * act.rows_per_unit, generator=generator) * 3).to(DEVICE, dtype)
    grad = torch.randn(9, width, generator=generator).to(DEVICE, dtype)
    launches = {"swiglu": 0, "swiglu_backward": 0}
    originals = (moe_rows._launch_swiglu, moe_rows._launch_swiglu_backward)

    def counted(name, launch):
        def run(*args):
            launches[name] += 1
            return launch(*args)
        return run

    moe_rows._launch_swiglu, moe_rows._launch_swiglu_backward = (
        counted(name, launch) for name, launch in zip(launches, originals))
    try:
        got = {"out": moe_steps.glu(gate_up, spec), "grad": moe_steps.glu_backward(grad, gate_up, spec)}
    finally:
        moe_rows._launch_swiglu, moe_rows._launch_swiglu_backward = originals
    aten = {"out": act(gate_up), "grad": act.backward(grad, gate_up)}
    emit(group="glu_runtime", device=DEVICE, spec=spec, dtype=str(dtype), launches=launches,
         ulps={name: ulps(got[name], aten[name]) for name in got})


def program_case(mesh_text):
    import shardgraph as sg
    from examples.moe_model import shardgraph_entry
    from shardgraph.check import parity_errors

    launches = {"rows": 0, "sum": 0, "backward": 0, "swiglu": 0, "swiglu_backward": 0}
    names = ("_launch_gather_rows", "_launch_gather_sum", "_launch_combine_backward", "_launch_swiglu",
             "_launch_swiglu_backward")
    originals = tuple(getattr(moe_rows, name) for name in names)

    def counted(name, launch):
        def run(*args):
            launches[name] += 1
            return launch(*args)
        return run

    for name, key, launch in zip(names, launches, originals):
        setattr(moe_rows, name, counted(key, launch))
    try:
        model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=4, seq_len=4, num_layers=1)
        program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn)
        errors, _ = parity_errors(program, model, inputs, loss_fn, 0.1)
    finally:
        for name, launch in zip(names, originals):
            setattr(moe_rows, name, launch)
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
    # Rows not a multiple of a tile, widths not a power of two (24 and 130 in one tile, 300 in two).
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for layout in ("concatenated", "interleaved"):
            glu_case(37, 24, dtype, layout, 9)
            glu_case(5, 130, dtype, layout, 10)
    for layout in ("concatenated", "interleaved"):
        glu_case(3, 300, torch.bfloat16, layout, 16)  # wider than one 256-wide tile
    glu_case(21, 40, torch.bfloat16, "concatenated", 11, padded=True)
    glu_case(0, 16, torch.bfloat16, "concatenated", 12)  # no rows: empty results, no launch
    for spec in GLU_SPECS:
        glu_runtime_case(spec, torch.bfloat16, 13)
    if DEVICE != "cpu":
        # The layer's sizes on a GPU: Qwen3-30B-A3B's top-8 of 2048-wide rows, and its experts'
        # 768-wide intermediate over 8192 tokens x top-8.
        op_case(4096, 8, 2048, torch.bfloat16, 7)
        runtime_case(1024, 8, 2048, 8)
        for dtype in (torch.bfloat16, torch.float32):
            glu_case(65536, 768, dtype, "concatenated", 14)
        glu_case(65536, 768, torch.bfloat16, "interleaved", 15)
        return
    for mesh_text in ("world=1", "world=4,ep=2,tp=2"):
        program_case(mesh_text)


if __name__ == "__main__":
    main()
    write_rows_where_asked(ROWS, DEVICE)
