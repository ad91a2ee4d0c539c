"""Matrix products: the Megatron patterns fall out of three cases per axis.

For ``out = a @ b`` contracting ``a``'s last dim with ``b``'s first (batch dims aside):
``a`` sharded on a row dim shards the output rows; ``b`` sharded on a column dim shards the
output columns; both sharded on the contracted dim give ``Partial("sum")`` (each rank holds a
partial product). A partial operand times a replicated one stays partial (the product is linear
in each operand). A split is offered only where it divides the operand evenly, counting what the
other axes already split of it, so an odd column count falls back to another candidate instead of
failing at lowering.
"""

from __future__ import annotations

import torch

from shardgraph.placement import InterleavedShard, Partial, Replicate, Shard, Sharding, ShardingError, local_shape

from . import AxisCandidate, register, value_of

aten = torch.ops.aten
R = Replicate()


def _product_candidates(rank: int, placements, has_bias: bool):
    """Candidates for a product of two rank-``rank`` operands (2: mm, 3: bmm)."""
    batch = list(range(rank - 2))
    row_a, contract_a = rank - 2, rank - 1
    contract_b, col_b = rank - 2, rank - 1
    out_row, out_col = rank - 2, rank - 1
    candidates = []

    def add(a, b, out, bias=None, note=""):
        inputs = ((bias if bias is not None else R),) if has_bias else ()
        candidates.append(AxisCandidate(inputs + (a, b), out, note))

    add(R, R, R)
    for d in batch:
        add(Shard(d), Shard(d), Shard(d), bias=R, note="batch-parallel")
        for placement in placements:
            if isinstance(placement, InterleavedShard) and placement.dim == d:
                add(placement, placement, placement, bias=R, note="batch-parallel, interleaved")
    add(Shard(row_a), R, Shard(out_row), bias=R, note="row-parallel rows")
    add(R, Shard(col_b), Shard(out_col), bias=Shard(0), note="column-parallel")
    for placement in placements:
        if isinstance(placement, InterleavedShard):
            add(R, InterleavedShard(col_b, placement.stripes), InterleavedShard(out_col, placement.stripes),
                bias=InterleavedShard(0, placement.stripes), note="column-parallel, interleaved")
            add(InterleavedShard(row_a, placement.stripes), R, InterleavedShard(out_row, placement.stripes), bias=R)
    add(Shard(contract_a), Shard(contract_b), Partial("sum"), bias=Partial("sum"), note="contracted dim sharded")
    for op in ("sum", "avg"):
        if any(isinstance(p, Partial) and p.op == op for p in placements):
            add(Partial(op), R, Partial(op), bias=Partial(op))
            add(R, Partial(op), Partial(op), bias=Partial(op))
    return candidates


def _divides(ctx, axis: str, index: int, placement) -> bool:
    """Whether input ``index`` splits evenly under ``placement`` on ``axis`` and its current
    splits on the other axes (which nest with it when they cut the same dim)."""
    if placement is None or not placement.is_shard():
        return True
    split = {other: p for other, p in ctx.input_shardings[index].items() if other != axis and p.is_shard()}
    split[axis] = placement
    try:
        local_shape(tuple(value_of(ctx.inputs[index]).shape), Sharding(tuple(split), tuple(split.values())), ctx.mesh)
    except ShardingError:
        return False
    return True


def _even(ctx, axis: str, candidates):
    return [c for c in candidates if all(_divides(ctx, axis, i, p) for i, p in enumerate(c.inputs))]


@register(aten.mm.default, family="mm")
def rule_mm(ctx, axis, placements):
    return _even(ctx, axis, _product_candidates(2, placements, has_bias=False))


@register(aten.bmm.default, family="bmm")
def rule_bmm(ctx, axis, placements):
    return _even(ctx, axis, _product_candidates(3, placements, has_bias=False))


@register(aten.addmm.default, family="addmm")
def rule_addmm(ctx, axis, placements):
    bias_rank = len(ctx.input_shapes[0])
    candidates = _product_candidates(2, placements, has_bias=True)
    if bias_rank == 2:  # a full [M, N] addend shards like the output
        fixed = []
        for c in candidates:
            bias = c.output if c.output.is_shard() or c.output.is_partial() else R
            fixed.append(AxisCandidate((bias,) + c.inputs[1:], c.output, c.note))
        return _even(ctx, axis, fixed)
    # A [N] bias is sharded with the output columns, joins a partial product as a partial held
    # by one rank, and is otherwise replicated: the candidates above already say so.
    return _even(ctx, axis, candidates)
