"""Convolutions (the causal depthwise ``conv1d`` of Mamba, LFM2 and gated-delta layers) and
triangular solves (chunked linear attention).

A convolution mixes positions and, per group, channels; its batch dim is independent, so a batch
split shards the output the same way and the weight stays whole. The backward then leaves the
weight and bias gradients as partial sums over the batch pieces. Channel splits would need the
``groups`` argument rewritten to local sizes, so they are not offered. A partial input passes
through only without a bias (the bias would be added once per rank).

``linalg_solve_triangular(A, B)`` solves ``A X = B`` (or ``X A = B``) per batch entry: batch dims
split alike on A, B and X; the columns of X follow the columns of B when A is on the left, the
rows when on the right; and X is linear in B, so a partial B with A whole gives a partial X.
"""

from __future__ import annotations

import torch

from shardgraph.placement import Partial, Replicate, Shard

from . import AxisCandidate, register

aten = torch.ops.aten
R = Replicate()


@register(aten.convolution.default, family="convolution")
def rule_convolution(ctx, axis, placements):
    count = len(placements)  # input, weight and, where given, bias
    candidates = [AxisCandidate((R,) * count, R)]
    candidates.append(AxisCandidate((Shard(0),) + (R,) * (count - 1), Shard(0), "batch-parallel"))
    for op in ("sum", "avg"):
        if count == 2 and Partial(op) in placements:
            candidates.append(AxisCandidate((Partial(op), R), Partial(op), "linear in the input (no bias)"))
    return candidates


@register(aten.convolution_backward.default, family="convolution_backward")
def rule_convolution_backward(ctx, axis, placements):
    """(grad_output, input, weight) -> (grad_input, grad_weight, grad_bias); outputs the mask
    leaves out are None."""
    mask = list(ctx.arg(10, "output_mask", [True, True, True]))

    def out(*placed):
        return tuple(p if wanted else None for p, wanted in zip(placed, mask))

    candidates = [AxisCandidate((R, R, R), out(R, R, R))]
    # Each batch piece contributes its own term to the weight and bias gradients.
    candidates.append(AxisCandidate((Shard(0), Shard(0), R), out(Shard(0), Partial("sum"), Partial("sum")),
                                    "batch-parallel: weight and bias gradients are partial sums"))
    for op in ("sum", "avg"):
        if placements[0] == Partial(op):
            # Every output is linear in the incoming gradient.
            candidates.append(AxisCandidate((Partial(op), R, R), out(Partial(op), Partial(op), Partial(op)),
                                            "linear in the incoming gradient"))
    return candidates


@register(aten.linalg_solve_triangular.default, family="solve_triangular")
def rule_solve_triangular(ctx, axis, placements):
    a_shape, b_shape = ctx.input_shapes
    ndim = len(ctx.output_shape)
    left = ctx.arg(3, "left", True)
    candidates = [AxisCandidate((R, R), R)]
    if len(a_shape) == len(b_shape) == ndim:
        for d in range(ndim - 2):
            if a_shape[d] == b_shape[d] == ctx.output_shape[d]:
                candidates.append(AxisCandidate((Shard(d), Shard(d)), Shard(d), "batch-parallel"))
    free = ndim - 1 if left else ndim - 2  # the dim of B that A does not touch
    candidates.append(AxisCandidate((R, Shard(free)), Shard(free), "independent right-hand sides"))
    for op in ("sum", "avg"):
        if placements[1] == Partial(op):
            candidates.append(AxisCandidate((R, Partial(op)), Partial(op), "linear in B"))
    return candidates
