"""Where a parameter's optimizer state (and, with ZeRO-3, the parameter itself) lives: like the
parameter, or also split over the data-parallel axis of its view.

With ``zero=0`` the state is placed exactly like its parameter, so the update is local.

With ``zero=1`` the state is additionally ``Shard(dim)`` over ``dp`` (dense parameters) or
``edp`` (routed experts), on the first dim that no other axis splits and whose local size the
axis divides (where none divides, the first such dim held padded: see below). Propagation then
places the update on those pieces: the gradient arrives reduce-scattered over the
data-parallel axis instead of all-reduced, each rank updates its slice of the parameter, and
the new slices are all-gathered back into the parameter's own sharding. The bytes on the wire are those of the all-reduce they replace (a reduce-scatter plus
an all-gather), while each rank holds 1/dp of the state.

With ``zero=3`` the parameter itself is held in that sharding too (``passes/gather_parameters.py``
gathers it for its readers): the update then writes the rank's slice in place and no all-gather
of the new parameter follows; the forward and the backward each all-gather it instead.

There is no stage 2 of its own: the training step reduce-scatters each gradient as the backward
produces it (``schedule_gradient_sync``), so stage 1 already never holds a whole gradient past
its reduction.

Why a dim no other axis splits: a view's axes nest major to minor (dp outside tp), so a dp
split on the dim tp already splits would cut the dim into dp blocks first, and a rank's state
rows would not lie inside its own tp piece of the parameter; the update would need an
all-to-all. A parameter with no such dim (a tp-split bias, a 0-d scalar) keeps its state whole
over the axis, and the reason says so.

Uneven sizes are padded, not refused: where the axis divides none of the free dims (a
vocabulary of 151936 rows over dp=3), the first free dim is held padded with zeros to a multiple
of the axis size and split like the others; the third element of the result is that
``placement.Padding`` (None where nothing is padded), and the sharding is one of the padded
shape. ``passes/pad_parameters.py`` puts the padding into the graph (padded state placeholders,
with zero=3 the padded parameter, a ``constant_pad_nd`` of the gradient, a ``slice`` back to the
logical shape where a reader needs it) before propagation seeds these shardings; zeros stay
zeros through every update, so the step is exactly the unpadded one.
"""

from __future__ import annotations

from typing import Sequence

from shardgraph.mesh import MeshSpec
from shardgraph.meta import View
from shardgraph.placement import Padding, Shard, Sharding, ShardingError, local_shape, padded_size

__all__ = ["ZERO_STAGES", "check_zero_stage", "optimizer_state_sharding"]

ZERO_STAGES = (0, 1, 3)


def check_zero_stage(zero, where: str = "zero") -> None:
    if zero not in ZERO_STAGES:
        hint = (" (stage 1 already reduce-scatters each gradient as the backward produces it, which is "
                "stage 2's memory)") if zero == 2 else ""
        raise ValueError(f"{where} must be one of {ZERO_STAGES} (0: optimizer state placed like its parameter, 1: "
                         f"also split over the data-parallel axes, 3: the parameters too, gathered where they are "
                         f"read), got {zero!r}{hint}")


def optimizer_state_sharding(name: str, shape: Sequence[int], sharding: Sharding, view: View, mesh: MeshSpec,
                             zero: int) -> tuple[Sharding, str, Padding | None]:
    """``(the state's sharding, why, its padding)`` for the parameter ``name`` of ``shape`` placed
    ``sharding``. The sharding is of the held shape: ``shape`` with the padding, where there is one."""
    check_zero_stage(zero)
    if zero == 0:
        return sharding, "placed like its parameter", None
    axis = "edp" if view is View.EXPERT else "dp"
    size = mesh.size(axis)
    if size == 1:
        return sharding, f"placed like its parameter ({axis}=1)", None
    local = local_shape(tuple(shape), sharding, mesh, name=name)
    taken = {placement.dim % len(shape) for _, placement in sharding.items() if placement.is_shard()}
    free = [dim for dim in range(len(shape)) if dim not in taken]
    for dim in free:
        extent = local[dim]
        if not isinstance(extent, int) or extent % size:
            continue
        split = Sharding(sharding.axes + (axis,), sharding.placements + (Shard(dim),))
        try:
            local_shape(tuple(shape), split, mesh, name=name)
        except ShardingError:
            continue
        return split, f"split over {axis} on dim {dim} (zero={zero})", None
    # No free dim divides: the first one is held padded with zeros to a multiple of the axis.
    for dim in free:
        if not isinstance(shape[dim], int) or shape[dim] == 0:
            continue
        padding = Padding(dim, shape[dim], padded_size(shape[dim], size))
        split = Sharding(sharding.axes + (axis,), sharding.placements + (Shard(dim),))
        try:
            local_shape(padding.held_shape(shape), split, mesh, name=name)
        except ShardingError:
            continue
        return split, (f"split over {axis} on dim {dim}, padded from {padding.size} to {padding.padded} "
                       f"(zero={zero})"), padding
    return sharding, (f"placed like its parameter: local shape {tuple(local)} has no dim that no other axis splits "
                      f"for {axis}={size} to split, padded or not"), None
