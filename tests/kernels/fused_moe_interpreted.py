"""Run the fused MoE kernels under TRITON_INTERPRET=1 and print one JSON line per case.

Started as a subprocess by test_fused_moe.py: the interpreter must be chosen before Triton
compiles anything, and the rest of the suite must not run interpreted kernels. Three groups:

* ``op``: each fused op against float64 products of the same operands, over dtypes, weight
  layouts, activations and gate/up layouts, with an empty expert, uneven groups, groups smaller
  than a tile and rows past the last offset;
* ``block``: one MoE layer's forward and backward as the lowering emits the fused steps (ep = 1),
  against the float64 definition (``moe_experts_reference``) under autograd: the output and the
  gradients of the hidden states, both weights and the router weights;
* ``program``: the example model compiled with the fused path on, on meshes with and without
  dispatch, against the unsharded model (``shardgraph.check.parity_errors``).
"""

import json
import os
import sys
import warnings

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from kernels import fused_moe  # noqa: E402
from kernels.grouped_gemm import launch_counts  # noqa: E402

# The interpreter evaluates sigmoid(x) as 1 / (1 + exp(-x)) in numpy, whose exp overflows to inf
# (and warns) for very negative x; the result, 0, is the right one.
warnings.filterwarnings("ignore", message="overflow encountered in exp")


def relative(value, reference):
    return ((value.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def emit(**row):
    print(json.dumps(row), flush=True)


def stored(w, layout):
    """``w`` given as ``[E, N, K]``, stored in ``layout`` (``ekn``: the transposed storage, read in place)."""
    return w if layout == "enk" else w.transpose(1, 2).contiguous()


def op_case(name, sizes, trailing, tokens, hidden, inner, dtype, layout, activation, interleaved, seed):
    generator = torch.Generator().manual_seed(seed)
    experts, rows = len(sizes), sum(sizes) + trailing
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    index = torch.randint(0, tokens, (rows,), generator=generator)
    w_gate_up = torch.randn(experts, 2 * inner, hidden, generator=generator).to(dtype)
    w_down = torch.randn(experts, hidden, inner, generator=generator).to(dtype)
    dout = torch.randn(rows, hidden, generator=generator).to(dtype)
    w1, w2 = stored(w_gate_up, layout), stored(w_down, layout)
    before = dict(launch_counts)
    h, gate_up = fused_moe.gather_glu_grouped_mm(x, index, w1, offsets, activation, interleaved, layout)
    want_h, want_gate_up = fused_moe.composed_gather_glu(x.double(), index, w_gate_up.double(), offsets, activation,
                                                         interleaved, "enk")
    d_gate_up = fused_moe.glu_grouped_mm_dgrad(dout, w2, offsets, gate_up, activation, interleaved, layout)
    want_d_gate_up = fused_moe.composed_glu_dgrad(dout.double(), w_down.double(), offsets, gate_up.double(),
                                                  activation, interleaved, "enk")
    dw = fused_moe.gather_grouped_mm_wgrad(x, index, d_gate_up, offsets, experts, layout)
    want_dw = fused_moe.composed_gather_wgrad(x.double(), index, d_gate_up.double(), offsets, experts, "enk")
    dw_in_enk = dw if layout == "enk" else dw.transpose(1, 2)
    used = int(offsets[-1])
    empty = [g for g, size in enumerate(sizes) if size == 0]
    emit(group="op", name=name, dtype=str(dtype), layout=layout, activation=activation, interleaved=interleaved,
         forward_h=relative(h, want_h), forward_gate_up=relative(gate_up, want_gate_up),
         dgrad=relative(d_gate_up, want_d_gate_up), wgrad=relative(dw_in_enk, want_dw),
         trailing_rows_zero=bool((h[used:] == 0).all() and (gate_up[used:] == 0).all()
                                 and (d_gate_up[used:] == 0).all()),
         empty_groups_zero=bool(all((dw[g] == 0).all() for g in empty)), empty_groups=len(empty),
         finite=bool(h.isfinite().all() and d_gate_up.isfinite().all() and dw.isfinite().all()),
         launches={k: v - before.get(k, 0) for k, v in launch_counts.items() if v != before.get(k, 0)})


def block_case(name, tokens, experts, top_k, hidden, inner, seed, empty_expert):
    """One layer, fused steps in the lowering's order, against the float64 definition."""
    from shardgraph.ops.moe import moe_experts_reference
    from shardgraph.runtime import moe as steps

    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=generator)
    if empty_expert is not None:
        scores[:, empty_expert] = -1.0  # never chosen
    scores[: tokens // 2, 0] += 2.0  # uneven: expert 0 takes half the tokens on top of its share
    topk_ids = scores.topk(top_k, dim=-1).indices
    topk_weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1)
    x = torch.randn(tokens, hidden, generator=generator)
    w1 = torch.randn(experts, 2 * inner, hidden, generator=generator) * hidden ** -0.5
    w2 = torch.randn(experts, hidden, inner, generator=generator) * inner ** -0.5
    grad_out = torch.randn(tokens, hidden, generator=generator)

    # Forward, as passes/lower_moe.py emits it with every expert on the rank.
    order, tokens_per_expert = steps.sort_by_expert(topk_ids, experts)
    offsets = steps.expert_offsets(tokens_per_expert)
    index = steps.token_of_copies(order, top_k)
    h, gate_up = torch.ops.shardgraph.gather_glu_grouped_mm(x, index, w1, offsets, "silu", False, "enk")
    down = torch.ops.shardgraph.grouped_mm(h, w2, offsets, "enk")
    out = steps.combine(down, order, topk_weights)
    # Backward.
    grad_copies, grad_topk_weights = steps.combine_backward(grad_out, down, order, topk_weights)
    grad_gate_up = torch.ops.shardgraph.glu_grouped_mm_dgrad(grad_copies, w2, offsets, gate_up, "silu", False, "enk")
    grad_w2 = torch.ops.shardgraph.grouped_mm_wgrad(h, grad_copies, offsets, experts, "enk")
    grad_w1 = torch.ops.shardgraph.gather_grouped_mm_wgrad(x, index, grad_gate_up, offsets, experts, "enk")
    grad_rows = torch.ops.shardgraph.grouped_mm_dgrad(grad_gate_up, w1, offsets, "enk")
    grad_x = steps.scatter_copies(grad_rows, order, top_k, tokens)

    leaves = [t.double().requires_grad_() for t in (x, topk_weights, w1, w2)]
    want = moe_experts_reference(leaves[0], topk_ids, leaves[1], leaves[2], leaves[3], "silu")
    wants = torch.autograd.grad(want, leaves, grad_out.double())
    errors = {"output": relative(out, want.detach())}
    for label, got, reference in zip(("hidden", "topk_weights", "w_gate_up", "w_down"),
                                     (grad_x, grad_topk_weights, grad_w1, grad_w2), wants):
        errors[f"grad {label}"] = relative(got, reference)
    emit(group="block", name=name, errors=errors, counts=tokens_per_expert.tolist())


def program_case(mesh_text):
    import shardgraph as sg
    from examples.moe_model import shardgraph_entry
    from shardgraph.check import parity_errors

    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=4, seq_len=4, num_layers=1)
    with fused_moe.use_fused_moe("on"):
        program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn)
    targets = [n.target for n in program.graph_module.graph.nodes if n.op == "call_function"]
    ops = torch.ops.shardgraph
    from shardgraph.predict import node_work
    from shardgraph.report import local_pieces

    def estimates(program):
        """Grouped-product FLOPs the cost model counts, and the report's pieces of the fused product."""
        pieces = local_pieces(program.graph_module, sg.MeshSpec.parse(mesh_text))
        flops = sum(work.flops for node in pieces if (work := node_work(node, pieces)) and work.kind == "grouped_mm")
        glu = [pieces[n] for n in pieces if n.target is torch.ops.shardgraph.gather_glu_grouped_mm.default]
        return flops, [[list(p[0]) for p in found] for found in glu]

    with fused_moe.use_fused_moe("off"):
        unfused_flops, _ = estimates(sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn))
    fused_flops, glu_pieces = estimates(program)
    before = dict(launch_counts)
    errors, _ = parity_errors(program, model, inputs, loss_fn, 0.1)
    emit(group="program", mesh=mesh_text, loss=errors.loss, gradients=errors.gradients, weights=errors.weights,
         fused_nodes=[targets.count(op) for op in (ops.gather_glu_grouped_mm.default, ops.glu_grouped_mm_dgrad.default,
                                                   ops.gather_grouped_mm_wgrad.default)],
         unfused_nodes=sum(t in (ops.grouped_mm_wgrad.default,) for t in targets),
         grouped_flops=[fused_flops, unfused_flops], glu_pieces=glu_pieces,
         launches={k: v - before.get(k, 0) for k, v in launch_counts.items() if v != before.get(k, 0)})


def main():
    sizes = [5, 0, 17, 1, 9]  # an empty expert, groups smaller than a tile and across tiles
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("enk", "ekn"):
            op_case("uneven groups, an empty group, trailing rows", sizes, 3, 11, 40, 24, dtype, layout, "silu",
                    False, 1)
    for activation in fused_moe.FUSED_ACTIVATIONS:
        for interleaved in (False, True):
            op_case("activations and gate/up layouts", [4, 0, 13], 0, 9, 24, 20, torch.float32, "enk", activation,
                    interleaved, 2)
    op_case("K and I not multiples of the block", [3, 19], 0, 7, 19, 9, torch.float32, "enk", "silu", False, 3)
    block_case("uneven counts and an empty expert", 24, 6, 2, 32, 16, 4, empty_expert=3)
    block_case("top-3, every expert used", 17, 4, 3, 24, 12, 5, empty_expert=None)
    for mesh_text in ("world=1", "world=8,tp=2,ep=2,etp=2"):
        program_case(mesh_text)


if __name__ == "__main__":
    main()
