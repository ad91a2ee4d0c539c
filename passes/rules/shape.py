"""Views, permutations, slicing and joining: placements follow dims.

``view``/``reshape`` split the two shapes into groups of dims with equal products. A ``Shard``
survives a group only on its outermost dim, because only then is each rank's block of rows a
contiguous block of the merged (or split) dim; divisibility of the receiving dim by the axis
size is checked, otherwise the candidate is refused and the value must be gathered first.
Two interleaved cases are exact too: ``[k, m]`` sharded on ``m`` merges into
``InterleavedShard(k stripes)``, and an ``InterleavedShard(d, s)`` split into ``[s, d/s]`` is a
plain ``Shard`` of the second dim; where axes before this one split the outer dim ``p`` ways
(dp on the batch of attention's ``[batch * heads]``), the split is ``[s * p, d/(s * p)]``. With
``s * p = o * k`` stripes over ``[o, d/o]`` (k of them in every outer row) the second dim is
``InterleavedShard(k)``, and ``[o, m]`` interleaved ``k`` ways on ``m`` merges into ``o * k``
stripes (a flattened ``[E * 2I]`` gate/up bias read as ``[E, 2I]``). ``Partial`` passes through every view (they are linear).
"""

from __future__ import annotations

import torch

from shardgraph import meta
from shardgraph.placement import InterleavedShard, Replicate, Shard, interleaved

from . import AxisCandidate, register, value_of

aten = torch.ops.aten
R = Replicate()


def view_groups(in_shape, out_shape):
    """Pairs (input dims, output dims) whose sizes multiply to the same number, in order."""
    groups, i, j = [], 0, 0
    a, b = list(in_shape), list(out_shape)
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(a) or j >= len(b):
            raise ValueError(f"shapes {tuple(in_shape)} and {tuple(out_shape)} have different numbers of elements")
        in_dims, out_dims = [i], [j]
        product_in, product_out = a[i], b[j]
        i, j = i + 1, j + 1
        while product_in != product_out:
            if product_in < product_out:
                in_dims.append(i)
                product_in *= a[i]
                i += 1
            else:
                out_dims.append(j)
                product_out *= b[j]
                j += 1
        groups.append((in_dims, out_dims))
    return groups


def _prior_factor(ctx, axis, dim):
    """Product of the sizes of the axes before ``axis`` (view order) that shard input dim ``dim``."""
    factor = 1
    for other in ctx.axes:
        if other == axis:
            break
        placement = ctx.input_shardings[0].placement(other)
        if placement.is_shard(dim):
            factor *= ctx.mesh.size(other)
    return factor


def _prior_are_blocks(ctx, axis, dim):
    """Every axis before ``axis`` that splits input dim ``dim`` does so in plain blocks."""
    for other in ctx.axes:
        if other == axis:
            return True
        placement = ctx.input_shardings[0].placement(other)
        if placement.is_shard(dim) and not isinstance(placement, Shard):
            return False
    return True


def _view_candidate(ctx, axis, placement):
    in_shape = tuple(value_of(ctx.inputs[0]).shape)
    out_shape = ctx.output_shape
    n = ctx.mesh.size(axis)
    dim = placement.dim % len(in_shape)
    for in_dims, out_dims in view_groups(in_shape, out_shape):
        if dim not in in_dims or not out_dims:
            continue
        factor = n * _prior_factor(ctx, axis, dim)
        if isinstance(placement, Shard):
            if dim == in_dims[0] and out_shape[out_dims[0]] % factor == 0:
                return Shard(out_dims[0]), None
            if len(in_dims) == 2 and dim == in_dims[1] and len(out_dims) == 1:
                # Stripes count in the piece this axis receives: major axes may have cut the
                # outer dim already.
                outer = in_shape[in_dims[0]] // _prior_factor(ctx, axis, in_dims[0])
                return interleaved(out_dims[0], outer), None
            return None, f"view of dim {dim} (size {in_shape[dim]}) into {[out_shape[d] for d in out_dims]}: not a block split on {axis}={n}"
        if len(in_dims) == 1 and len(out_dims) == 1:
            return InterleavedShard(out_dims[0], placement.stripes), None
        # Stripes count in the piece this axis receives: major axes that cut the dim in blocks
        # (ep before etp on flattened experts) leave it out_shape[outer] / their sizes of them.
        # Each outer index of that piece holds stripes / outer of them, which split the inner dim
        # alike: one stripe a plain block (DBRX's [E * I, H] as [E, I, H]), several an interleaved
        # split (a flattened gate/up bias [E * 2I] as [E, 2I]: two per expert).
        prior = _prior_factor(ctx, axis, dim)
        if len(in_dims) == 1 and len(out_dims) == 2 and _prior_are_blocks(ctx, axis, dim):
            outer = out_shape[out_dims[0]] // prior
            inner_stripes = placement.stripes // outer if outer and placement.stripes % outer == 0 else 0
            if inner_stripes and out_shape[out_dims[0]] % prior == 0 and out_shape[out_dims[1]] % (inner_stripes * n) == 0:
                return interleaved(out_dims[1], inner_stripes), None
        # And back: [k, m] interleaved on m merges into stripes of every outer index.
        if (len(in_dims) == 2 and dim == in_dims[1] and len(out_dims) == 1 and _prior_factor(ctx, axis, dim) == 1
                and _prior_are_blocks(ctx, axis, in_dims[0])):
            outer = in_shape[in_dims[0]] // _prior_factor(ctx, axis, in_dims[0])
            return InterleavedShard(out_dims[0], outer * placement.stripes), None
        return None, f"interleaved dim {dim} cannot be viewed as {[out_shape[d] for d in out_dims]}"
    return None, f"dim {dim} has no counterpart in the output shape"


@register(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.view_copy.default, family="view")
def rule_view(ctx, axis, placements):
    placement = placements[0]
    if placement.is_replicate():
        return [AxisCandidate((R,), R)]
    if placement.is_partial():
        return [AxisCandidate((placement,), placement, "views are linear")]
    output, refusal = _view_candidate(ctx, axis, placement)
    if output is None:
        return [AxisCandidate((R,), R, f"refused: {refusal}")]
    return [AxisCandidate((placement,), output)]


def _permuted(ctx):
    """Input dim -> output dim for the pure permutation ops."""
    target = ctx.node.target
    ndim_in = len(value_of(ctx.inputs[0]).shape)
    ndim_out = len(ctx.output_shape)
    if target == aten.t.default:
        return {0: 1, 1: 0} if ndim_in == 2 else {0: 0}
    if target in (aten.transpose.int,):
        d0, d1 = (d % ndim_in for d in ctx.args[1:3])
        mapping = {d: d for d in range(ndim_in)}
        mapping[d0], mapping[d1] = d1, d0
        return mapping
    if target == aten.permute.default:
        return {source % ndim_in: position for position, source in enumerate(ctx.args[1])}
    if target == aten.unsqueeze.default:
        where = ctx.args[1] % ndim_out
        return {d: (d if d < where else d + 1) for d in range(ndim_in)}
    if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        in_shape = value_of(ctx.inputs[0]).shape
        if target == aten.squeeze.default:
            removed = {d for d in range(ndim_in) if in_shape[d] == 1}
        else:
            dims = ctx.args[1] if isinstance(ctx.args[1], (list, tuple)) else [ctx.args[1]]
            removed = {d % ndim_in for d in dims if in_shape[d % ndim_in] == 1}
        mapping, position = {}, 0
        for d in range(ndim_in):
            if d in removed:
                continue
            mapping[d] = position
            position += 1
        return mapping
    if target in (aten.expand.default,):
        offset = ndim_out - ndim_in
        in_shape = value_of(ctx.inputs[0]).shape
        return {d: d + offset for d in range(ndim_in) if not (in_shape[d] == 1 and ctx.output_shape[d + offset] != 1)}
    raise KeyError(target)


@register(
    aten.t.default, aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.expand.default,
    family="permute",
)
def rule_permute(ctx, axis, placements):
    placement = placements[0]
    if not placement.is_shard():
        return [AxisCandidate((placement,), placement)]
    mapping = _permuted(ctx)
    dim = placement.dim % len(value_of(ctx.inputs[0]).shape)
    candidates = [AxisCandidate((R,), R)]
    if dim in mapping:
        moved = Shard(mapping[dim]) if isinstance(placement, Shard) else InterleavedShard(mapping[dim], placement.stripes)
        candidates.insert(0, AxisCandidate((placement,), moved))
    return candidates


@register(aten.slice.Tensor, family="slice")
def rule_slice(ctx, axis, placements):
    placement = placements[0]
    shape = tuple(value_of(ctx.inputs[0]).shape)
    dim = ctx.arg(1, "dim", 0) % len(shape)
    start = ctx.arg(2, "start", None) or 0
    end = ctx.arg(3, "end", None)
    step = ctx.arg(4, "step", 1)
    end = shape[dim] if end is None else min(end, shape[dim])
    start = start + shape[dim] if start < 0 else start
    end = end + shape[dim] if end < 0 else end
    whole = start == 0 and end == shape[dim] and step == 1
    if not placement.is_shard() or placement.dim % len(shape) != dim or whole:
        return [AxisCandidate((placement,), placement)]
    if isinstance(placement, InterleavedShard) and step == 1:
        stripe = shape[dim] // placement.stripes
        if start % stripe == 0 and end % stripe == 0 and end > start:
            count = (end - start) // stripe
            result = Shard(dim) if count == 1 else InterleavedShard(dim, count)
            return [AxisCandidate((placement,), result, "whole stripes of an interleaved dim")]
    return [AxisCandidate((R,), R, "slicing a sharded dim needs the whole dim")]


@register(aten.select.int, family="select")
def rule_select(ctx, axis, placements):
    placement = placements[0]
    shape = tuple(value_of(ctx.inputs[0]).shape)
    dim = ctx.args[1] % len(shape)
    if placement.is_shard():
        if placement.dim % len(shape) == dim:
            return [AxisCandidate((R,), R, "selecting from a sharded dim needs the whole dim")]
        moved = placement.dim % len(shape)
        moved = moved - 1 if moved > dim else moved
        out = Shard(moved) if isinstance(placement, Shard) else InterleavedShard(moved, placement.stripes)
        return [AxisCandidate((placement,), out), AxisCandidate((R,), R)]
    return [AxisCandidate((placement,), placement)]


@register(aten.slice_backward.default, aten.select_backward.default, family="slice_backward")
def rule_slice_backward(ctx, axis, placements):
    placement = placements[0]
    input_sizes = list(ctx.args[1])
    dim = ctx.args[2] % len(input_sizes)
    if not placement.is_shard():
        return [AxisCandidate((placement,), placement, "zero-padding is linear")]
    grad_ndim = len(value_of(ctx.inputs[0]).shape)
    source_dim = placement.dim % grad_ndim
    if ctx.node.target == aten.select_backward.default:
        out_dim = source_dim + (1 if source_dim >= dim else 0)
    else:
        out_dim = source_dim
    if out_dim == dim:
        return [AxisCandidate((R,), R, "padding a sharded dim needs the whole dim")]
    out = Shard(out_dim) if isinstance(placement, Shard) else InterleavedShard(out_dim, placement.stripes)
    return [AxisCandidate((placement,), out), AxisCandidate((R,), R)]


@register(aten.unfold.default, family="unfold")
def rule_unfold(ctx, axis, placements):
    """``x.unfold(dim, size, step)``: windows along ``dim`` (which keeps its place, now counting
    windows) in a new last dim. A window reads neighbouring elements of ``dim``, so a split of it
    needs the whole dim; a split of any other dim stays where it is. Linear: a partial stays
    partial (a causal convolution's windows, Inkling 2's)."""
    placement = placements[0]
    ndim = len(value_of(ctx.inputs[0]).shape)
    dim = ctx.args[1] % ndim
    if placement.is_shard() and placement.dim % ndim == dim:
        return [AxisCandidate((R,), R, "windows along a sharded dim need the whole dim")]
    note = "windowing is linear" if placement.is_partial() else ""
    return [AxisCandidate((placement,), placement, note), AxisCandidate((R,), R)]


@register(aten.unfold_backward.default, family="unfold_backward")
def rule_unfold_backward(ctx, axis, placements):
    """``unfold_backward(grad, input_sizes, dim, size, step)``: each window's gradient summed back
    onto the elements it read. A split of a dim other than ``dim`` and the window dim stays; a
    partial stays partial (the sum is linear)."""
    placement = placements[0]
    ndim = len(ctx.args[1])
    dim = ctx.args[2] % ndim
    if placement.is_shard() and placement.dim % (ndim + 1) in (dim, ndim):
        return [AxisCandidate((R,), R, "summing windows along a sharded dim needs the whole dim")]
    note = "summing windows is linear" if placement.is_partial() else ""
    return [AxisCandidate((placement,), placement, note), AxisCandidate((R,), R)]


@register(aten.cat.default, family="cat")
def rule_cat(ctx, axis, placements):
    shapes = ctx.input_shapes
    ndim = len(ctx.output_shape)
    dim = (ctx.arg(1, "dim", 0)) % ndim
    n = len(placements)
    candidates = [AxisCandidate(tuple(R for _ in range(n)), R)]
    first = placements[0]
    if first.is_partial() and all(p == first for p in placements):
        candidates.append(AxisCandidate(tuple(placements), first, "concatenation is linear"))
    if first.is_shard() and all(p == first for p in placements):
        if first.dim % ndim != dim:
            candidates.append(AxisCandidate(tuple(placements), first))
        elif len({s[dim] for s in shapes}) == 1:
            # Each input's block lands at the same offset of every piece: the result is striped.
            stripes = n * (first.stripes if isinstance(first, InterleavedShard) else 1)
            candidates.append(AxisCandidate(tuple(placements), interleaved(dim, stripes),
                                            "equal sharded pieces concatenated: interleaved"))
    return candidates


@register(aten.stack.default, family="stack")
def rule_stack(ctx, axis, placements):
    ndim = len(ctx.output_shape)
    dim = ctx.arg(1, "dim", 0) % ndim
    n = len(placements)
    candidates = [AxisCandidate(tuple(R for _ in range(n)), R)]
    first = placements[0]
    if all(p == first for p in placements):
        if first.is_partial():
            candidates.append(AxisCandidate(tuple(placements), first))
        elif first.is_shard():
            moved = first.dim + (1 if first.dim >= dim else 0)
            out = Shard(moved) if isinstance(first, Shard) else InterleavedShard(moved, first.stripes)
            candidates.append(AxisCandidate(tuple(placements), out))
    return candidates


@register(aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, family="split")
def rule_split(ctx, axis, placements):
    placement = placements[0]
    shape = tuple(value_of(ctx.inputs[0]).shape)
    outputs = ctx.output_value
    count = len(outputs)
    if ctx.node.target == aten.unbind.int:
        dim = ctx.arg(1, "dim", 0) % len(shape)
    else:
        dim = ctx.arg(2, "dim", 0) % len(shape)
    replicated = AxisCandidate((R,), tuple(R for _ in range(count)))
    if not placement.is_shard():
        return [AxisCandidate((placement,), tuple(placement for _ in range(count)))]
    sharded_dim = placement.dim % len(shape)
    if sharded_dim != dim:
        moved = sharded_dim
        if ctx.node.target == aten.unbind.int and sharded_dim > dim:
            moved -= 1
        out = Shard(moved) if isinstance(placement, Shard) else InterleavedShard(moved, placement.stripes)
        return [AxisCandidate((placement,), tuple(out for _ in range(count))), replicated]
    sizes = [o.shape[dim] for o in outputs]
    if (isinstance(placement, InterleavedShard) and ctx.node.target != aten.unbind.int
            and placement.stripes % count == 0 and len(set(sizes)) == 1):
        per = placement.stripes // count
        out = Shard(dim) if per == 1 else InterleavedShard(dim, per)
        return [AxisCandidate((placement,), tuple(out for _ in range(count)),
                              "splitting an interleaved dim at stripe boundaries"), replicated]
    return [replicated]


def _follow(placement, dim):
    return Shard(dim) if isinstance(placement, Shard) else InterleavedShard(dim, placement.stripes)


@register(aten.constant_pad_nd.default, family="pad")
def rule_pad(ctx, axis, placements):
    """Padding touches the last ``len(pad) // 2`` dims: a split of any other dim is kept. Padding
    with zeros is linear (partial pieces padded with zeros sum to the padded value)."""
    placement = placements[0]
    ndim = len(ctx.output_shape)
    pad = list(ctx.arg(1, "pad", []))
    padded = {ndim - 1 - i for i in range(len(pad) // 2) if pad[2 * i] != 0 or pad[2 * i + 1] != 0}
    if meta.padding(ctx.node) is not None and ctx.input_shardings[0].placement(axis).is_partial():
        # A gradient padded as its parameter is held (pad_parameters): it is reduce-scattered
        # padded, never all-reduced first (twice the bytes, and the whole gradient on every rank).
        actual = ctx.input_shardings[0].placement(axis)
        return [AxisCandidate((actual,), actual, "a gradient is padded partial, then reduce-scattered")]
    candidates = [AxisCandidate((R,), R)]
    if placement.is_shard() and placement.dim % ndim not in padded:
        candidates.insert(0, AxisCandidate((placement,), placement))
    if placement.is_partial() and ctx.arg(2, "value", 0) == 0:
        candidates.append(AxisCandidate((placement,), placement, "zero padding is linear"))
    return candidates


@register(aten.flip.default, family="flip")
def rule_flip(ctx, axis, placements):
    """Reversing a split dim would also reverse the order of the pieces: it must be whole."""
    placement = placements[0]
    ndim = len(ctx.output_shape)
    flipped = {d % ndim for d in ctx.arg(1, "dims", [])}
    if placement.is_shard() and placement.dim % ndim in flipped:
        return [AxisCandidate((R,), R, "flipping a sharded dim needs the whole dim")]
    return [AxisCandidate((placement,), placement), AxisCandidate((R,), R)]


@register(torch.ops.prims.broadcast_in_dim.default, family="broadcast_in_dim")
def rule_broadcast_in_dim(ctx, axis, placements):
    """``broadcast_in_dim(x, shape, dims)``: input dim i becomes output dim ``dims[i]``. Linear,
    so a partial stays partial. A split of a dim that keeps its size follows it to ``dims[i]``
    (lowering rewrites the ``shape`` argument to the local sizes), so LayerNorm's statistics
    and affine parameters keep the dp/tp splits of the tokens they are broadcast against; a dim
    of size 1 broadcast to a larger one is never split."""
    from passes.lower_localize import _SHAPE_ARGUMENT

    placement = placements[0]
    candidates = [AxisCandidate((R,), R)]
    if placement.is_partial():
        candidates.append(AxisCandidate((placement,), placement, "broadcasting is linear"))
    if placement.is_shard() and ctx.node.target in _SHAPE_ARGUMENT:
        in_shape = value_of(ctx.inputs[0]).shape
        dim = placement.dim % len(in_shape)
        out_dim = list(ctx.arg(2, "broadcast_dimensions", []))[dim]
        if in_shape[dim] == ctx.output_shape[out_dim]:
            candidates.insert(0, AxisCandidate((placement,), _follow(placement, out_dim)))
    return candidates


@register(aten.view_as_complex.default, aten.view_as_real.default, family="complex_view")
def rule_complex_view(ctx, axis, placements):
    """``view_as_complex`` folds the trailing pair of reals into one complex element,
    ``view_as_real`` unfolds it: every other dim keeps its split; the pair dim stays whole.
    Partial values are reduced first: reductions of complex values are not offered."""
    placement = placements[0]
    in_ndim = len(value_of(ctx.inputs[0]).shape)
    candidates = [AxisCandidate((R,), R)]
    pair_dim = in_ndim - 1 if ctx.node.target == aten.view_as_complex.default else None
    if placement.is_shard() and placement.dim % in_ndim != pair_dim:
        candidates.insert(0, AxisCandidate((placement,), placement))
    return candidates
