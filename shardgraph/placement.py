"""Placements: where the pieces of one logical tensor live on the ranks of a mesh view.

A placement says what one mesh axis does to a tensor:

``Replicate()``
    every rank of the axis holds the whole (local) tensor.
``Shard(dim)``
    ``dim`` is cut into ``n`` equal contiguous blocks; the rank at position ``i`` holds block ``i``.
``InterleavedShard(dim, stripes=S)``
    ``dim`` is first cut into ``S`` equal stripes and every stripe is split evenly across the axis;
    the rank at position ``i`` holds part ``i`` of every stripe, concatenated. With a fused
    gate/up expert weight ``[2 * I, H]`` and ``S = 2`` each rank holds the same fraction of the
    gate rows and of the up rows, so ``chunk(2)`` of the local piece still yields (gate, up).
    A plain ``Shard`` would hand one rank all of gate and the other all of up.
``Partial("sum" | "avg")``
    every rank holds a tensor of the full (local) shape and the logical value is their sum
    (or mean) over the axis.

A ``Sharding`` is one placement per mesh axis of one view. Axes it does not name are
``Replicate()``. When several axes shard the same dim they nest major-first in the view's order
(``dp`` before ``tp``; ``edp`` before ``ep`` before ``etp``): the major axis cuts the dim first and
each minor axis cuts the piece it was given. With TP-lane-major rank order this makes
``Shard(0)`` on both ``dp`` and ``tp`` the contiguous block of the rank's position in the stage.
``InterleavedShard``'s stripe count is therefore counted in the piece it receives: after
``Shard(0)`` over ``ep`` a fused ``[E * 2I, H]`` weight is ``InterleavedShard(0, stripes=2 * E/ep)``
over ``etp`` (two stripes per local expert).

Sizes may be sympy expressions; divisibility is then proved symbolically or refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence, Union

import sympy
import torch

from .mesh import AXES, DENSE_AXES, EXPERT_AXES, MeshSpec

__all__ = [
    "Placement",
    "Replicate",
    "Shard",
    "InterleavedShard",
    "Partial",
    "Padding",
    "Sharding",
    "ShardingError",
    "Run",
    "interleaved",
    "padded_size",
    "local_shape",
    "run_plan",
    "shard",
    "unshard",
    "to_dtensor_placements",
]

Size = Union[int, sympy.Expr]


class ShardingError(ValueError):
    """A placement that cannot apply to a tensor (divisibility, dims, unrepresentable form)."""


# ---------------------------------------------------------------------------------- placements
class Placement:
    """Base of the four placement kinds. Instances are frozen, hashable and printable."""

    __slots__ = ()

    def is_replicate(self) -> bool:
        return isinstance(self, Replicate)

    def is_shard(self, dim: int | None = None) -> bool:
        """True for ``Shard`` and ``InterleavedShard`` (on ``dim`` if given)."""
        return isinstance(self, (Shard, InterleavedShard)) and (dim is None or self.dim == dim)

    def is_partial(self) -> bool:
        return isinstance(self, Partial)


@dataclass(frozen=True)
class Replicate(Placement):
    def __repr__(self) -> str:
        return "Replicate()"


@dataclass(frozen=True)
class Shard(Placement):
    dim: int

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise ShardingError(f"Shard dim must be an int, got {self.dim!r}")

    def __repr__(self) -> str:
        return f"Shard({self.dim})"


@dataclass(frozen=True)
class InterleavedShard(Placement):
    dim: int
    stripes: int

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise ShardingError(f"InterleavedShard dim must be an int, got {self.dim!r}")
        if isinstance(self.stripes, bool) or not isinstance(self.stripes, int) or self.stripes <= 0:
            raise ShardingError(f"InterleavedShard stripes must be a positive int, got {self.stripes!r}")

    def __repr__(self) -> str:
        return f"InterleavedShard({self.dim}, stripes={self.stripes})"


@dataclass(frozen=True)
class Partial(Placement):
    op: str = "sum"

    def __post_init__(self) -> None:
        if self.op not in ("sum", "avg"):
            raise ShardingError(f"Partial op must be 'sum' or 'avg', got {self.op!r}")

    def __repr__(self) -> str:
        return f"Partial({self.op!r})"


# ---------------------------------------------------------------------------------- sharding
def _view_order(axis: str) -> int:
    return AXES.index(axis)


@dataclass(frozen=True)
class Sharding:
    """One placement per named mesh axis of one view; unnamed axes are ``Replicate()``.

    ``Sharding.of(dp=Shard(0), tp=Replicate())`` or ``Sharding.of(ep=Shard(0), etp=Shard(1))``.
    Axes are kept in the view's major-to-minor order, which is also the nesting order.
    """

    axes: tuple[str, ...]
    placements: tuple[Placement, ...]

    def __post_init__(self) -> None:
        if len(self.axes) != len(self.placements):
            raise ShardingError(f"Sharding has {len(self.axes)} axes but {len(self.placements)} placements")
        for axis, placement in zip(self.axes, self.placements):
            if axis not in AXES or axis == "pp":
                raise ShardingError(
                    f"Sharding axis {axis!r} is not a mesh axis of a view; known: "
                    f"{', '.join(DENSE_AXES + EXPERT_AXES)}"
                )
            if not isinstance(placement, Placement):
                raise ShardingError(f"placement for axis {axis!r} must be a Placement, got {placement!r}")
        names = set(self.axes)
        if len(names) != len(self.axes):
            raise ShardingError(f"Sharding names an axis twice: {self.axes}")
        if names & set(DENSE_AXES) and names & set(EXPERT_AXES):
            raise ShardingError(
                f"Sharding mixes the dense view (dp, tp) and the expert view (edp, ep, etp): {self.axes}"
            )
        order = sorted(range(len(self.axes)), key=lambda i: _view_order(self.axes[i]))
        object.__setattr__(self, "axes", tuple(self.axes[i] for i in order))
        object.__setattr__(self, "placements", tuple(self.placements[i] for i in order))

    @classmethod
    def of(cls, **placements: Placement) -> "Sharding":
        return cls(tuple(placements), tuple(placements.values()))

    @classmethod
    def replicate(cls) -> "Sharding":
        return cls((), ())

    def placement(self, axis: str) -> Placement:
        for name, placement in zip(self.axes, self.placements):
            if name == axis:
                return placement
        return Replicate()

    def items(self) -> tuple[tuple[str, Placement], ...]:
        return tuple(zip(self.axes, self.placements))

    @property
    def view(self) -> tuple[str, ...]:
        """The axes of the view this sharding lives on (dense when it names no axis)."""
        return EXPERT_AXES if set(self.axes) & set(EXPERT_AXES) else DENSE_AXES

    def is_replicated(self) -> bool:
        return all(p.is_replicate() for p in self.placements)

    def __repr__(self) -> str:
        shown = [f"{axis}={placement!r}" for axis, placement in self.items() if not placement.is_replicate()]
        return "Sharding(" + ", ".join(shown) + ")" if shown else "Sharding(replicated)"


def interleaved(dim: int, stripes: int) -> Placement:
    """``InterleavedShard(dim, stripes)``, or plain ``Shard(dim)`` when there is one stripe (the same layout)."""
    return Shard(dim) if stripes == 1 else InterleavedShard(dim, stripes)


class Run(NamedTuple):
    """``length`` consecutive elements at ``global_start`` of the dim are at ``local_start`` locally."""

    global_start: int
    local_start: int
    length: int


# ---------------------------------------------------------------------------------- shapes
def _divides(size: Size, parts: int) -> bool:
    if isinstance(size, int):
        return size % parts == 0
    remainder = sympy.Mod(sympy.sympify(size), parts)
    return remainder == 0


def _check_dim(placement: Placement, rank_count: int, name: str, axis: str) -> int:
    dim = placement.dim
    if not -rank_count <= dim < rank_count:
        raise ShardingError(
            f"{name}: {placement!r} on axis {axis!r} names dim {dim}, but the tensor has {rank_count} dims"
        )
    return dim % rank_count


def local_shape(
    global_shape: Sequence[Size], sharding: Sharding, mesh: MeshSpec, name: str = "tensor"
) -> tuple[Size, ...]:
    """Shape of every rank's piece. Uneven splits are refused, naming tensor, dim, size and axis."""
    shape = [s if isinstance(s, int) else sympy.sympify(s) for s in global_shape]
    for axis, placement in sharding.items():
        count = mesh.size(axis)
        if placement.is_replicate() or placement.is_partial() or count == 1:
            if placement.is_shard():
                _check_dim(placement, len(shape), name, axis)
            continue
        dim = _check_dim(placement, len(shape), name, axis)
        parts = count * (placement.stripes if isinstance(placement, InterleavedShard) else 1)
        if not _divides(shape[dim], parts):
            what = (
                f"{placement.stripes} stripes x {axis}={count}"
                if isinstance(placement, InterleavedShard)
                else f"{axis}={count}"
            )
            raise ShardingError(
                f"{name}: dim {dim} of size {shape[dim]} is not divisible by {what} for {placement!r} "
                f"(global shape {tuple(global_shape)}, sharding {sharding!r})"
            )
        shape[dim] = shape[dim] // count if isinstance(shape[dim], int) else sympy.simplify(shape[dim] / count)
    return tuple(int(s) if isinstance(s, sympy.Integer) else s for s in shape)


def run_plan(
    global_shape: Sequence[int], sharding: Sharding, mesh: MeshSpec, rank: int, dim: int, name: str = "tensor"
) -> list[Run]:
    """The runs that map ``rank``'s local rows of ``dim`` to global rows, in local order.

    Nested placements on the same dim compose major-first: each one picks rows of the piece the
    previous ones left, and the picked local rows are traced back to global rows.
    """
    local_shape(global_shape, sharding, mesh, name)  # divisibility first, with the clear message
    runs = [Run(0, 0, int(global_shape[dim]))]
    for axis, placement in sharding.items():
        if not placement.is_shard() or placement.dim % len(global_shape) != dim % len(global_shape):
            continue
        count, position = mesh.size(axis), mesh.index(axis, rank)
        current = sum(run.length for run in runs)
        if isinstance(placement, InterleavedShard):
            stripe = current // placement.stripes
            part = stripe // count
            picks = [(s * stripe + position * part, part) for s in range(placement.stripes)]
        else:
            part = current // count
            picks = [(position * part, part)]
        runs = _compose(runs, picks)
    return runs


def _compose(runs: list[Run], picks: list[tuple[int, int]]) -> list[Run]:
    """Select local ranges ``picks`` (start, length) of the piece described by ``runs``."""
    result: list[Run] = []
    local_cursor = 0
    for pick_start, pick_length in picks:
        pick_end = pick_start + pick_length
        for run in runs:
            lo = max(pick_start, run.local_start)
            hi = min(pick_end, run.local_start + run.length)
            if lo >= hi:
                continue
            global_start = run.global_start + (lo - run.local_start)
            if result and result[-1].global_start + result[-1].length == global_start and (
                result[-1].local_start + result[-1].length == local_cursor
            ):
                last = result[-1]
                result[-1] = Run(last.global_start, last.local_start, last.length + hi - lo)
            else:
                result.append(Run(global_start, local_cursor, hi - lo))
            local_cursor += hi - lo
    return result


def _global_indices(runs: list[Run], device: torch.device) -> torch.Tensor:
    pieces = [torch.arange(run.global_start, run.global_start + run.length, device=device) for run in runs]
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long, device=device)


def _sharded_dims(sharding: Sharding, ndim: int) -> list[int]:
    return sorted({p.dim % ndim for p in sharding.placements if p.is_shard()}) if ndim else []


# ---------------------------------------------------------------------------------- padding
@dataclass(frozen=True)
class Padding:
    """A tensor held with ``dim`` padded with zeros from ``size`` to ``padded`` elements, so that
    an axis that does not divide ``size`` splits it evenly (a vocabulary of 151936 rows over
    dp=3 is held as 151938). The padding is at the end of the dim; every rank's piece has the
    same shape, and the last pieces hold the zeros (``passes/pad_parameters.py``)."""

    dim: int
    size: int
    padded: int

    def __post_init__(self) -> None:
        if not 0 <= self.size < self.padded:
            raise ValueError(f"Padding: {self.size} -> {self.padded} elements on dim {self.dim} does not pad")

    def __repr__(self) -> str:
        return f"Padding(dim {self.dim}: {self.size} -> {self.padded})"

    def held_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """``shape`` (the logical one) as held."""
        return tuple(self.padded if d == self.dim else int(s) for d, s in enumerate(shape))

    def logical_shape(self, held: Sequence[int]) -> tuple[int, ...]:
        """``held`` (the padded shape) without the padding."""
        return tuple(self.size if d == self.dim else int(s) for d, s in enumerate(held))

    def pad_argument(self, ndim: int) -> list[int]:
        """``constant_pad_nd``'s ``pad``: (before, after) pairs from the last dim backwards."""
        return [0, 0] * (ndim - 1 - self.dim) + [0, self.padded - self.size]

    def pad(self, tensor: torch.Tensor) -> torch.Tensor:
        """The logical ``tensor`` as held: zeros appended on ``dim``."""
        if tensor.shape[self.dim] != self.size:
            raise ShardingError(f"{self!r}: the tensor has {tensor.shape[self.dim]} elements on dim {self.dim}")
        return torch.constant_pad_nd(tensor, self.pad_argument(tensor.dim()), 0)

    def unpad(self, tensor: torch.Tensor) -> torch.Tensor:
        """The held ``tensor`` without its padding."""
        if tensor.shape[self.dim] != self.padded:
            raise ShardingError(f"{self!r}: the tensor has {tensor.shape[self.dim]} elements on dim {self.dim}")
        return tensor.narrow(self.dim, 0, self.size)


def padded_size(size: int, parts: int) -> int:
    """The least multiple of ``parts`` that is at least ``size``."""
    return -(-size // parts) * parts


# ---------------------------------------------------------------------------------- shard / unshard
def _stage_ranks(mesh: MeshSpec, stage_index: int) -> range:
    return range(stage_index * mesh.stage, (stage_index + 1) * mesh.stage)


def shard(tensor: torch.Tensor, sharding: Sharding, mesh: MeshSpec, rank: int, name: str = "tensor") -> torch.Tensor:
    """The piece of the logical ``tensor`` that ``rank`` holds under ``sharding``.

    ``Partial("sum")`` gives the whole value to position 0 of the axis and zeros elsewhere, so that
    the sum is bit-exact; ``Partial("avg")`` gives every position the whole value.
    """
    if tensor.dim() == 0 and any(p.is_shard() for p in sharding.placements):
        raise ShardingError(f"{name}: a 0-dim tensor cannot be sharded ({sharding!r})")
    shape = tuple(tensor.shape)
    local_shape(shape, sharding, mesh, name)
    piece = tensor
    for dim in _sharded_dims(sharding, tensor.dim()):
        indices = _global_indices(run_plan(shape, sharding, mesh, rank, dim, name), tensor.device)
        piece = piece.index_select(dim, indices)
    for axis, placement in sharding.items():
        if isinstance(placement, Partial) and placement.op == "sum" and mesh.index(axis, rank) != 0:
            piece = torch.zeros_like(piece)
    return piece.contiguous() if piece is tensor else piece


def unshard(
    pieces: Union[Sequence[torch.Tensor], Mapping[int, torch.Tensor]],
    sharding: Sharding,
    mesh: MeshSpec,
    global_shape: Sequence[int] | None = None,
    name: str = "tensor",
    stage_index: int = 0,
    check_replicas: bool = False,
) -> torch.Tensor:
    """Rebuild the logical tensor from the pieces of every rank of one pipeline stage.

    ``pieces`` is indexed by global rank (a sequence over the world or the stage, or a mapping).
    Partial axes are reduced in group order (deterministic); with ``check_replicas`` the pieces
    that ``Replicate`` axes say are equal are checked to be bit-identical.
    """
    ranks = _stage_ranks(mesh, stage_index)
    by_rank = _pieces_by_rank(pieces, ranks, mesh, name)
    sample = by_rank[ranks.start]
    ndim = sample.dim()
    sharded_dims = _sharded_dims(sharding, ndim)
    global_shape = _checked_global_shape(by_rank, ranks, sharding, mesh, global_shape, name)
    partial_axes = [(axis, p) for axis, p in sharding.items() if p.is_partial()]
    replicate_axes = [axis for axis in sharding.view if sharding.placement(axis).is_replicate()]

    result = torch.empty(global_shape, dtype=sample.dtype, device=sample.device)
    written = torch.zeros(global_shape, dtype=torch.bool, device=sample.device) if sharded_dims else None
    for rank in ranks:
        coordinates = mesh.coords(rank)
        if any(coordinates[axis] != 0 for axis in replicate_axes):
            if check_replicas:
                _check_replica(by_rank, rank, replicate_axes, sharding, mesh, stage_index, name)
            continue
        if any(coordinates[axis] != 0 for axis, _ in partial_axes):
            continue
        value = _reduce_partial(rank, partial_axes, by_rank, mesh) if partial_axes else by_rank[rank]
        if not sharded_dims:
            result.copy_(value)
            continue
        index = [
            _global_indices(run_plan(global_shape, sharding, mesh, rank, d, name), sample.device)
            if d in sharded_dims
            else torch.arange(global_shape[d], device=sample.device)
            for d in range(ndim)
        ]
        grid = torch.meshgrid(*index, indexing="ij")
        result[grid] = value
        written[grid] = True
    if written is not None and not bool(written.all()):
        raise ShardingError(f"{name}: the pieces do not cover the global tensor under {sharding!r}")
    return result


def _pieces_by_rank(pieces, ranks: range, mesh: MeshSpec, name: str) -> dict[int, torch.Tensor]:
    """``pieces`` (over the world, over the stage, or a mapping) indexed by global rank."""
    if isinstance(pieces, Mapping):
        by_rank = dict(pieces)
    else:
        pieces = list(pieces)
        if len(pieces) == mesh.world:
            by_rank = {r: pieces[r] for r in ranks}
        elif len(pieces) == mesh.stage:
            by_rank = {r: pieces[r - ranks.start] for r in ranks}
        else:
            raise ShardingError(
                f"{name}: unshard got {len(pieces)} pieces; expected one per rank of the world "
                f"({mesh.world}) or of a stage ({mesh.stage})"
            )
    missing = [r for r in ranks if r not in by_rank]
    if missing:
        raise ShardingError(f"{name}: unshard is missing the pieces of ranks {missing}")
    return by_rank


def _checked_global_shape(by_rank, ranks: range, sharding: Sharding, mesh: MeshSpec, global_shape, name: str):
    """The global shape (given, or inferred from one piece), with every piece's shape checked."""
    sample = by_rank[ranks.start]
    if global_shape is None:
        global_shape = list(sample.shape)
        for axis, placement in sharding.items():
            if placement.is_shard():
                global_shape[placement.dim % sample.dim()] *= mesh.size(axis)
    global_shape = tuple(int(s) for s in global_shape)
    expected_local = local_shape(global_shape, sharding, mesh, name)
    for rank in ranks:
        if tuple(by_rank[rank].shape) != tuple(expected_local):
            raise ShardingError(
                f"{name}: rank {rank}'s piece has shape {tuple(by_rank[rank].shape)}, expected "
                f"{tuple(expected_local)} for global shape {global_shape} under {sharding!r}"
            )
    return global_shape


def _check_replica(by_rank, rank: int, replicate_axes, sharding: Sharding, mesh: MeshSpec, stage_index: int,
                   name: str) -> None:
    coordinates = mesh.coords(rank)
    origin = mesh.rank_of(pp=stage_index, **{a: (0 if a in replicate_axes else coordinates[a]) for a in sharding.view})
    # NaN compares unequal to itself: replicas are compared as bits, so identical NaNs agree.
    if not torch.equal(by_rank[rank], by_rank[origin]) and not (
            by_rank[rank].dtype.is_floating_point and torch.equal(by_rank[rank].isnan(), by_rank[origin].isnan())
            and torch.equal(by_rank[rank].nan_to_num(), by_rank[origin].nan_to_num())):
        raise ShardingError(
            f"{name}: ranks {origin} and {rank} should hold identical replicas under {sharding!r} but differ"
        )


def _reduce_partial(rank, partial_axes, by_rank, mesh):
    """The logical value of the pieces that differ from ``rank`` only on the partial axes.

    Sum and mean are both linear, so several partial axes reduce as one sum over their combined
    group followed by one division per ``avg`` axis. Members are added in group order, so the
    result is the same bits on every call.
    """
    axes = tuple(axis for axis, _ in partial_axes)
    total = None
    for member in mesh.group_of(axes, rank):
        total = by_rank[member].clone() if total is None else total + by_rank[member]
    for axis, placement in partial_axes:
        if placement.op == "avg":
            total = total / mesh.size(axis)
    return total


# ---------------------------------------------------------------------------------- DTensor
def to_dtensor_placements(sharding: Sharding, mesh_axes: Sequence[str] | None = None) -> tuple:
    """DTensor placements for ``sharding`` on a DeviceMesh whose dims are ``mesh_axes``.

    ``mesh_axes`` defaults to the sharding's view (``("dp", "tp")`` or ``("edp", "ep", "etp")``),
    which is also the DeviceMesh dim order that reproduces our rank order. DTensor nests several
    ``Shard`` of one dim in mesh-dim order, as we do. ``InterleavedShard`` has no DTensor form.
    """
    from torch.distributed.tensor import Partial as DPartial
    from torch.distributed.tensor import Replicate as DReplicate
    from torch.distributed.tensor import Shard as DShard

    axes = tuple(mesh_axes) if mesh_axes is not None else sharding.view
    unknown = [a for a in sharding.axes if a not in axes]
    if unknown:
        raise ShardingError(f"{sharding!r} uses axes {unknown} that are not dims of the DeviceMesh {axes}")
    result = []
    for axis in axes:
        placement = sharding.placement(axis)
        if isinstance(placement, InterleavedShard):
            raise ShardingError(
                f"{placement!r} on axis {axis!r} cannot be expressed as a DTensor placement: DTensor "
                f"shards a dim into contiguous blocks only; use the safetensors path for this tensor"
            )
        if isinstance(placement, Shard):
            result.append(DShard(placement.dim))
        elif isinstance(placement, Partial):
            result.append(DPartial(placement.op))
        else:
            result.append(DReplicate())
    return tuple(result)
