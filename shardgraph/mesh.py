"""The folded device mesh: one set of ranks seen as a dense view and an expert view.

A pipeline stage holds ``stage = world / pp`` ranks. Dense ops (attention, norms, router,
shared experts) see the stage as ``dp x tp``; routed-expert ops see the same ranks as
``edp x ep x etp``. Both views are products that equal the stage, so ``dp`` and ``edp`` are
derived and can never be set inconsistently (the folding of Megatron-Core's MoE parallel
folding and DeepSpeed's AutoEP).

Ranks are ordered TP-lane-major, as Megatron-Core and DeepSpeed order them::

    rank = pp_index * stage + dp_index * tp + tp_index                  (dense view)
    rank = pp_index * stage + edp_index * (ep * etp) + ep_index * etp + etp_index   (expert view)

so consecutive ranks form a TP group, and an EP group of size ``ep > tp`` spans several TP lanes
and DP ranks ("cross-lane EP"): world=4 tp=2 ep=4 puts every rank in one EP group while the
dense view still has two TP pairs.

Axis names: ``pp``, ``dp``, ``tp`` (dense view), ``edp``, ``ep``, ``etp`` (expert view).
A group is named by one axis or by a tuple of axes of one view, major first (``("dp", "tp")`` is
the whole dense stage, ``("ep", "etp")`` the expert-parallel ranks of one EDP replica).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

__all__ = ["MeshError", "MeshSpec", "AxisName", "DENSE_AXES", "EXPERT_AXES", "AXES"]

AxisName = Union[str, Sequence[str]]

DENSE_AXES = ("dp", "tp")
EXPERT_AXES = ("edp", "ep", "etp")
AXES = ("pp",) + DENSE_AXES + EXPERT_AXES


class MeshError(ValueError):
    """An invalid mesh, or a question about an axis or rank the mesh does not have."""


@dataclass(frozen=True)
class MeshSpec:
    """A folded mesh. ``dp`` and ``edp`` are derived properties, never arguments.

    >>> m = MeshSpec(world=8, tp=2, ep=4)
    >>> (m.dp, m.edp)
    (4, 2)
    >>> m.group_of("ep", 5)
    (4, 5, 6, 7)
    """

    world: int
    tp: int = 1
    ep: int = 1
    etp: int = 1
    pp: int = 1
    _sizes: dict = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("world", "tp", "ep", "etp", "pp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise MeshError(f"mesh size {name}={value!r} must be an int")
            if value <= 0:
                raise MeshError(f"mesh size {name}={value} must be positive")
        if self.world % self.pp != 0:
            raise MeshError(
                f"world % pp != 0: world={self.world} is not divisible by pp={self.pp}, "
                f"so pipeline stages would differ in size"
            )
        stage = self.world // self.pp
        if stage % self.tp != 0:
            raise MeshError(
                f"stage % tp != 0: a stage of {stage} ranks (world={self.world} / pp={self.pp}) "
                f"cannot be split into TP groups of tp={self.tp}; the dense view needs dp x tp == stage"
            )
        if stage % (self.ep * self.etp) != 0:
            raise MeshError(
                f"stage % (ep*etp) != 0: a stage of {stage} ranks (world={self.world} / pp={self.pp}) "
                f"cannot hold ep={self.ep} x etp={self.etp} = {self.ep * self.etp} expert ranks; "
                f"the expert view needs edp x ep x etp == stage"
            )
        sizes = {
            "pp": self.pp,
            "dp": stage // self.tp,
            "tp": self.tp,
            "edp": stage // (self.ep * self.etp),
            "ep": self.ep,
            "etp": self.etp,
        }
        object.__setattr__(self, "_sizes", sizes)

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse(cls, text: str) -> "MeshSpec":
        """Build a mesh from ``"world=8,tp=2,ep=4"`` (the CLI's syntax)."""
        allowed = {"world", "tp", "ep", "etp", "pp"}
        values: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            match = re.fullmatch(r"([a-z]+)\s*=\s*(-?\d+)", item)
            if not match:
                raise MeshError(
                    f"cannot read mesh item {item!r} in {text!r}: expected name=integer, "
                    f"e.g. 'world=8,tp=2,ep=4'"
                )
            name, number = match.group(1), int(match.group(2))
            if name in ("dp", "edp"):
                raise MeshError(
                    f"{name} cannot be set in {text!r}: it is derived "
                    f"({'world / pp / tp' if name == 'dp' else 'world / pp / (ep * etp)'})"
                )
            if name not in allowed:
                raise MeshError(f"unknown mesh size {name!r} in {text!r}; known: world, tp, ep, etp, pp")
            if name in values:
                raise MeshError(f"mesh size {name!r} given twice in {text!r}")
            values[name] = number
        if "world" not in values:
            raise MeshError(f"mesh {text!r} does not give world=N")
        return cls(**values)

    # ------------------------------------------------------------------ sizes
    @property
    def stage(self) -> int:
        """Ranks per pipeline stage (``world / pp``)."""
        return self.world // self.pp

    @property
    def dp(self) -> int:
        """Data-parallel degree of the dense view, derived as ``stage / tp``."""
        return self._sizes["dp"]

    @property
    def edp(self) -> int:
        """Data-parallel degree of the expert view, derived as ``stage / (ep * etp)``."""
        return self._sizes["edp"]

    def size(self, axis: AxisName) -> int:
        """Number of ranks in one group of ``axis`` (a name or a tuple of names)."""
        # One axis name is the common case (placement rules ask once per candidate); it needs no
        # validation beyond being a known axis, which ``_sizes`` holds exactly.
        if isinstance(axis, str) and axis in self._sizes:
            return self._sizes[axis]
        axes = self._axes(axis)
        result = 1
        for name in axes:
            result *= self._sizes[name]
        return result

    @property
    def ranks(self) -> range:
        return range(self.world)

    # ------------------------------------------------------------------ coordinates
    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of ``rank`` on every axis of both views (and pp)."""
        self._check_rank(rank)
        pp_index, in_stage = divmod(rank, self.stage)
        dp_index, tp_index = divmod(in_stage, self.tp)
        edp_index, rest = divmod(in_stage, self.ep * self.etp)
        ep_index, etp_index = divmod(rest, self.etp)
        return {
            "pp": pp_index,
            "dp": dp_index,
            "tp": tp_index,
            "edp": edp_index,
            "ep": ep_index,
            "etp": etp_index,
        }

    def dense_coords(self, rank: int) -> tuple[int, int]:
        """``(dp_index, tp_index)`` of ``rank``."""
        c = self.coords(rank)
        return c["dp"], c["tp"]

    def expert_coords(self, rank: int) -> tuple[int, int, int]:
        """``(edp_index, ep_index, etp_index)`` of ``rank``."""
        c = self.coords(rank)
        return c["edp"], c["ep"], c["etp"]

    def index(self, axis: AxisName, rank: int) -> int:
        """Position of ``rank`` inside its group of ``axis`` (major axis first)."""
        axes = self._axes(axis)
        c = self.coords(rank)
        position = 0
        for name in axes:
            position = position * self._sizes[name] + c[name]
        return position

    def rank_of(self, **coordinates: int) -> int:
        """The rank at the given coordinates of ONE view (missing axes count as 0).

        ``mesh.rank_of(dp=1, tp=0)`` or ``mesh.rank_of(edp=0, ep=3, etp=1)``; ``pp`` may be given
        with either.
        """
        names = set(coordinates) - {"pp"}
        if names & set(DENSE_AXES) and names & set(EXPERT_AXES):
            raise MeshError(
                f"rank_of got coordinates of both views {sorted(names)}; give dense (dp, tp) "
                f"or expert (edp, ep, etp) coordinates"
            )
        for name, value in coordinates.items():
            if name not in AXES:
                raise MeshError(f"unknown mesh axis {name!r}; known: {', '.join(AXES)}")
            if not 0 <= value < self._sizes[name]:
                raise MeshError(f"coordinate {name}={value} is outside 0..{self._sizes[name] - 1}")
        pp_index = coordinates.get("pp", 0)
        if names & set(EXPERT_AXES):
            in_stage = (
                coordinates.get("edp", 0) * self.ep * self.etp
                + coordinates.get("ep", 0) * self.etp
                + coordinates.get("etp", 0)
            )
        else:
            in_stage = coordinates.get("dp", 0) * self.tp + coordinates.get("tp", 0)
        return pp_index * self.stage + in_stage

    # ------------------------------------------------------------------ groups
    def group_of(self, axis: AxisName, rank: int) -> tuple[int, ...]:
        """The ranks that share every coordinate of ``rank`` except those of ``axis``.

        Ordered by position in the group (``index``), major axis first.
        """
        axes = self._axes(axis)
        c = self.coords(rank)
        view_axes = self._view_of(axes)
        fixed = {name: c[name] for name in view_axes if name not in axes}
        fixed["pp"] = c["pp"] if "pp" not in axes else 0
        members = []
        for combo in itertools.product(*(range(self._sizes[name]) for name in axes)):
            coordinates = dict(fixed)
            coordinates.update(zip(axes, combo))
            members.append(self.rank_of(**coordinates))
        return tuple(members)

    def groups(self, axis: AxisName) -> list[tuple[int, ...]]:
        """Every group of ``axis``, each ordered by position, listed by their smallest rank."""
        seen: dict[tuple[int, ...], None] = {}
        for rank in self.ranks:
            seen.setdefault(self.group_of(axis, rank), None)
        return sorted(seen, key=lambda group: group[0])

    def group_table(self) -> dict[str, list[tuple[int, ...]]]:
        """Groups of every named axis and of the two products that collectives need."""
        table: dict[str, list[tuple[int, ...]]] = {}
        for name in ("tp", "dp", "ep", "etp", "edp", "pp"):
            table[name] = self.groups(name)
        table["dp*tp"] = self.groups(("dp", "tp"))
        table["ep*etp"] = self.groups(("ep", "etp"))
        return table

    # ------------------------------------------------------------------ presentation
    def __str__(self) -> str:
        return (
            f"MeshSpec(world={self.world}, pp={self.pp}, tp={self.tp}, dp={self.dp}, "
            f"ep={self.ep}, etp={self.etp}, edp={self.edp})"
        )

    def describe(self) -> str:
        """Rank tables of both views and the group of every axis, as aligned text."""
        lines = [str(self)]
        lines.append(f"dense view  dp x tp = {self.dp} x {self.tp} = {self.stage} ranks per stage")
        lines.append(
            f"expert view edp x ep x etp = {self.edp} x {self.ep} x {self.etp} = {self.stage} ranks per stage"
        )
        header = f"{'rank':>4}  {'pp':>2}  {'dp':>3}  {'tp':>3}  {'edp':>3}  {'ep':>3}  {'etp':>3}"
        lines.append("")
        lines.append(header)
        for rank in self.ranks:
            c = self.coords(rank)
            lines.append(
                f"{rank:>4}  {c['pp']:>2}  {c['dp']:>3}  {c['tp']:>3}  {c['edp']:>3}  {c['ep']:>3}  {c['etp']:>3}"
            )
        lines.append("")
        for name, groups in self.group_table().items():
            rendered = " ".join("{" + ",".join(str(r) for r in g) + "}" for g in groups)
            lines.append(f"{name + ' groups':<14} {rendered}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ helpers
    def _axes(self, axis: AxisName) -> tuple[str, ...]:
        axes = (axis,) if isinstance(axis, str) else tuple(axis)
        if not axes:
            raise MeshError("an axis tuple must name at least one axis")
        for name in axes:
            if name not in AXES:
                raise MeshError(f"unknown mesh axis {name!r}; known: {', '.join(AXES)}")
        if len(set(axes)) != len(axes):
            raise MeshError(f"axis tuple {axes} names an axis twice")
        self._view_of(axes)
        return axes

    @staticmethod
    def _view_of(axes: Iterable[str]) -> tuple[str, ...]:
        names = set(axes) - {"pp"}
        if names & set(DENSE_AXES) and names & set(EXPERT_AXES):
            raise MeshError(
                f"axes {tuple(axes)} mix the dense view (dp, tp) and the expert view (edp, ep, etp); "
                f"a group lives on one view"
            )
        return EXPERT_AXES if names & set(EXPERT_AXES) else DENSE_AXES

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world:
            raise MeshError(f"rank {rank!r} is outside the mesh's ranks 0..{self.world - 1}")
