"""A multi-rank simulator: every rank of a mesh in one process, with exact collective semantics.

Two ways in:

* Collective level: ``Simulator.all_reduce({rank: tensor, ...}, axis="tp")`` takes the tensors of
  every participating rank at once and returns every rank's result. Each group of ``axis`` among
  the given ranks is reduced on its own.
* SPMD level: ``Simulator.run(fn, per_rank_args)`` calls ``fn(comm, *args)`` once per rank, each in
  its own thread, where ``comm`` is that rank's ``RankCommunicator`` (and the thread's
  ``torch.ops._c10d_functional`` ops, what a lowered program issues, go to it through
  ``c10d.SimulatedCollectives``); a collective blocks until
  every member of its group has arrived, then the result is computed once, from all members'
  tensors in group order. This is how per-rank programs run.

Results never depend on thread timing: reductions add the members' tensors in group order, so
the same inputs give the same bits. Every collective is recorded (kind, axis, group, bytes sent
and received per rank) for checking the communication volume a pass predicts.

Byte accounting (per rank, excluding what a rank keeps for itself; ``b`` = bytes of the rank's
input, ``n`` = group size), the volume of the bandwidth-optimal ring / pairwise algorithms:

=================  ==============================  ==============================
collective         sent                            received
=================  ==============================  ==============================
all_gather         b * (n - 1)                     b * (n - 1)   (equal pieces)
reduce_scatter     b * (n - 1) / n                 b * (n - 1) / n
all_reduce         2 * b * (n - 1) / n             2 * b * (n - 1) / n
all_to_all         rows sent to other members      rows received from other members
broadcast          b * (n - 1) at the source       b at every other member
=================  ==============================  ==============================
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..mesh import AxisName, MeshSpec
from .c10d import SimulatedCollectives

__all__ = [
    "CollectiveError",
    "CollectiveRecord",
    "Simulator",
    "RankCommunicator",
    "collective_bytes",
]

_REDUCE_OPS = ("sum", "avg", "max")


class CollectiveError(RuntimeError):
    """A collective called with inconsistent arguments, or a group that never completes."""


@dataclass(frozen=True)
class CollectiveRecord:
    kind: str
    axis: AxisName
    group: tuple[int, ...]
    dtype: torch.dtype
    bytes_sent: tuple[int, ...]
    bytes_received: tuple[int, ...]
    tag: str = ""
    # Bytes of each member's input buffer, the part it keeps included (all-to-all volume as
    # the algorithm sees it; ``bytes_sent`` counts only what leaves the rank).
    input_bytes: tuple[int, ...] = ()

    def sent_by(self, rank: int) -> int:
        return self.bytes_sent[self.group.index(rank)]

    def received_by(self, rank: int) -> int:
        return self.bytes_received[self.group.index(rank)]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def collective_bytes(kind: str, input_bytes: int, group_size: int) -> tuple[int, int]:
    """(sent, received) per rank for the symmetric collectives, as in the module docstring."""
    n = group_size
    if kind == "all_gather":
        return input_bytes * (n - 1), input_bytes * (n - 1)
    if kind == "reduce_scatter":
        return input_bytes * (n - 1) // n, input_bytes * (n - 1) // n
    if kind == "all_reduce":
        return 2 * input_bytes * (n - 1) // n, 2 * input_bytes * (n - 1) // n
    raise ValueError(f"collective_bytes has no closed form for {kind!r}; count all_to_all by its splits")


def _axis_label(axis: AxisName) -> str:
    return axis if isinstance(axis, str) else "*".join(axis)


# ---------------------------------------------------------------------------------- group kernels
# Pure functions over one group's tensors, listed in group order.
def _check_same(kind: str, axis: AxisName, group, tensors, *, check_shape: bool = True) -> None:
    first = tensors[0]
    for member, tensor in zip(group, tensors):
        if tensor.dtype != first.dtype:
            raise CollectiveError(
                f"{kind} over {_axis_label(axis)} group {group}: rank {member} passed {tensor.dtype}, "
                f"rank {group[0]} passed {first.dtype}"
            )
        if check_shape and tensor.shape != first.shape:
            raise CollectiveError(
                f"{kind} over {_axis_label(axis)} group {group}: rank {member} passed shape "
                f"{tuple(tensor.shape)}, rank {group[0]} passed {tuple(first.shape)}"
            )


def _reduce(tensors: Sequence[torch.Tensor], op: str) -> torch.Tensor:
    if op not in _REDUCE_OPS:
        raise CollectiveError(f"unknown reduce op {op!r}; known: {', '.join(_REDUCE_OPS)}")
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        if op == "max":
            total = torch.maximum(total, tensor)
        else:
            total = total + tensor
    if op == "avg":
        total = total / len(tensors)
    return total


def _group_all_reduce(axis, group, tensors, op):
    _check_same("all_reduce", axis, group, tensors)
    total = _reduce(tensors, op)
    sent, received = collective_bytes("all_reduce", _nbytes(tensors[0]), len(group))
    return [total.clone() for _ in group], [sent] * len(group), [received] * len(group)


def _group_all_gather(axis, group, tensors, dim):
    _check_same("all_gather", axis, group, tensors, check_shape=False)
    ndim = tensors[0].dim()
    for member, tensor in zip(group, tensors):
        other = [s for d, s in enumerate(tensor.shape) if d != dim % max(ndim, 1)]
        first = [s for d, s in enumerate(tensors[0].shape) if d != dim % max(ndim, 1)]
        if tensor.dim() != ndim or other != first:
            raise CollectiveError(
                f"all_gather over {_axis_label(axis)} group {group} along dim {dim}: rank {member} "
                f"passed shape {tuple(tensor.shape)}, incompatible with {tuple(tensors[0].shape)}"
            )
    gathered = torch.cat(list(tensors), dim=dim)
    sizes = [_nbytes(t) for t in tensors]
    total = sum(sizes)
    sent = [size * (len(group) - 1) for size in sizes]
    received = [total - size for size in sizes]
    return [gathered.clone() for _ in group], sent, received


def _group_reduce_scatter(axis, group, tensors, dim, op):
    _check_same("reduce_scatter", axis, group, tensors)
    n = len(group)
    size = tensors[0].shape[dim]
    if size % n != 0:
        raise CollectiveError(
            f"reduce_scatter over {_axis_label(axis)} group {group}: dim {dim} of size {size} is not "
            f"divisible by the group size {n}"
        )
    total = _reduce(tensors, op)
    pieces = [piece.clone() for piece in total.chunk(n, dim=dim)]
    sent, received = collective_bytes("reduce_scatter", _nbytes(tensors[0]), n)
    return pieces, [sent] * n, [received] * n


def _group_all_to_all(axis, group, tensors, input_splits, dim):
    _check_same("all_to_all", axis, group, tensors, check_shape=False)
    n = len(group)
    chunks = []
    for member, tensor, splits in zip(group, tensors, input_splits):
        splits = [int(s) for s in splits]
        if len(splits) != n:
            raise CollectiveError(
                f"all_to_all over {_axis_label(axis)} group {group}: rank {member} gave {len(splits)} "
                f"input splits, the group has {n} members"
            )
        if sum(splits) != tensor.shape[dim] or any(s < 0 for s in splits):
            raise CollectiveError(
                f"all_to_all over {_axis_label(axis)} group {group}: rank {member}'s input splits "
                f"{splits} do not partition dim {dim} of size {tensor.shape[dim]}"
            )
        chunks.append(list(torch.split(tensor, splits, dim=dim)))
    outputs, sent, received = [], [], []
    for i in range(n):
        outputs.append(torch.cat([chunks[j][i] for j in range(n)], dim=dim).clone())
        sent.append(sum(_nbytes(chunks[i][j]) for j in range(n) if j != i))
        received.append(sum(_nbytes(chunks[j][i]) for j in range(n) if j != i))
    return outputs, sent, received


def _group_broadcast(axis, group, tensors, source_index):
    n = len(group)
    if not 0 <= source_index < n:
        raise CollectiveError(
            f"broadcast over {_axis_label(axis)} group {group}: source index {source_index} is outside 0..{n - 1}"
        )
    source = tensors[source_index]
    for member, tensor in zip(group, tensors):
        if tensor.shape != source.shape or tensor.dtype != source.dtype:
            raise CollectiveError(
                f"broadcast over {_axis_label(axis)} group {group}: rank {member} passed "
                f"{tuple(tensor.shape)} {tensor.dtype}, the source passed {tuple(source.shape)} {source.dtype}"
            )
    b = _nbytes(source)
    sent = [b * (n - 1) if i == source_index else 0 for i in range(n)]
    received = [0 if i == source_index else b for i in range(n)]
    return [source.clone() for _ in group], sent, received


# ---------------------------------------------------------------------------------- simulator
class Simulator:
    """All ranks of ``mesh`` in one process. See the module docstring."""

    def __init__(self, mesh: MeshSpec, timeout: float = 120.0):
        self.mesh = mesh
        self.timeout = timeout
        self.records: list[CollectiveRecord] = []
        # Re-entrant: the member that completes a rendezvous records it while holding the lock.
        self._lock = threading.RLock()
        self._condition = threading.Condition(self._lock)
        self._pending: dict[tuple, dict] = {}
        self._call_counters: dict[int, dict] = {}
        self._failed: dict[int, BaseException] = {}

    # ---------------------------------------------------------------- collective level
    def all_reduce(self, tensors: Mapping[int, torch.Tensor], axis: AxisName, op: str = "sum", tag: str = ""):
        return self._collective("all_reduce", tensors, axis, tag, lambda g, ts, _: _group_all_reduce(axis, g, ts, op))

    def all_gather(self, tensors: Mapping[int, torch.Tensor], axis: AxisName, dim: int = 0, tag: str = ""):
        return self._collective("all_gather", tensors, axis, tag, lambda g, ts, _: _group_all_gather(axis, g, ts, dim))

    def reduce_scatter(
        self, tensors: Mapping[int, torch.Tensor], axis: AxisName, dim: int = 0, op: str = "sum", tag: str = ""
    ):
        if op not in ("sum", "avg"):
            raise CollectiveError(f"reduce_scatter supports op 'sum' or 'avg', got {op!r}")
        return self._collective(
            "reduce_scatter", tensors, axis, tag, lambda g, ts, _: _group_reduce_scatter(axis, g, ts, dim, op)
        )

    def all_to_all(
        self,
        tensors: Mapping[int, torch.Tensor],
        axis: AxisName,
        input_splits: Mapping[int, Sequence[int]] | None = None,
        dim: int = 0,
        tag: str = "",
    ):
        """Rank at group position ``j`` sends its ``i``-th split to position ``i``; outputs concatenate
        the received pieces in group order. Splits default to equal."""

        def kernel(group, group_tensors, members):
            if input_splits is None:
                n = len(group)
                splits = []
                for member, tensor in zip(members, group_tensors):
                    if tensor.shape[dim] % n:
                        raise CollectiveError(
                            f"all_to_all over {_axis_label(axis)}: rank {member}'s dim {dim} of size "
                            f"{tensor.shape[dim]} is not divisible by {n}; pass input_splits"
                        )
                    splits.append([tensor.shape[dim] // n] * n)
            else:
                splits = [input_splits[m] for m in members]
            return _group_all_to_all(axis, group, group_tensors, splits, dim)

        return self._collective("all_to_all", tensors, axis, tag, kernel)

    def broadcast(self, tensors: Mapping[int, torch.Tensor], axis: AxisName, source_index: int = 0, tag: str = ""):
        return self._collective(
            "broadcast", tensors, axis, tag, lambda g, ts, _: _group_broadcast(axis, g, ts, source_index)
        )

    def _collective(self, kind, tensors, axis, tag, kernel) -> dict[int, torch.Tensor]:
        tensors = dict(tensors)
        results: dict[int, torch.Tensor] = {}
        done: set[int] = set()
        for rank in sorted(tensors):
            if rank in done:
                continue
            group = self.mesh.group_of(axis, rank)
            absent = [member for member in group if member not in tensors]
            if absent:
                raise CollectiveError(
                    f"{kind} over {_axis_label(axis)} group {group}: no tensor for ranks {absent}"
                )
            outputs, sent, received = kernel(group, [tensors[m] for m in group], group)
            self._record(kind, axis, group, tensors[group[0]].dtype, sent, received, tag,
                         [tensors[m] for m in group])
            results.update(zip(group, outputs))
            done.update(group)
        return results

    def _record(self, kind, axis, group, dtype, sent, received, tag, inputs=()) -> None:
        with self._lock:
            self.records.append(
                CollectiveRecord(kind, axis, tuple(group), dtype, tuple(int(s) for s in sent),
                                 tuple(int(r) for r in received), tag, tuple(_nbytes(t) for t in inputs))
            )

    # ---------------------------------------------------------------- accounting
    def clear_records(self) -> None:
        with self._lock:
            self.records.clear()

    def bytes_sent_by_axis(self, rank: int | None = None) -> dict[str, int]:
        """Bytes sent per axis label, by ``rank`` or, if None, the maximum over ranks."""
        totals: dict[str, dict[int, int]] = {}
        for record in self.records:
            per_rank = totals.setdefault(_axis_label(record.axis), {})
            for member, sent in zip(record.group, record.bytes_sent):
                per_rank[member] = per_rank.get(member, 0) + sent
        if rank is not None:
            return {label: per_rank.get(rank, 0) for label, per_rank in totals.items()}
        return {label: max(per_rank.values()) for label, per_rank in totals.items()}

    # ---------------------------------------------------------------- SPMD level
    def communicator(self, rank: int) -> "RankCommunicator":
        self.mesh.coords(rank)  # validates the rank
        return RankCommunicator(self, rank)

    def run(
        self,
        fn: Callable[..., Any],
        per_rank_args: Mapping[int, Sequence[Any]] | Sequence[Sequence[Any]] | None = None,
        ranks: Sequence[int] | None = None,
    ) -> list[Any]:
        """Call ``fn(comm, *args)`` on every rank in its own thread; return results in rank order.

        The first exception raised on any rank is re-raised here, with the rank named.
        """
        ranks = list(ranks) if ranks is not None else list(self.mesh.ranks)
        if per_rank_args is None:
            args_of = {rank: () for rank in ranks}
        elif isinstance(per_rank_args, Mapping):
            args_of = {rank: tuple(per_rank_args[rank]) for rank in ranks}
        else:
            per_rank_args = list(per_rank_args)
            args_of = {rank: tuple(per_rank_args[i]) for i, rank in enumerate(ranks)}
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}

        def body(rank: int) -> None:
            try:
                comm = self.communicator(rank)
                # A lowered program's c10d ops go to this thread's rank (the mode is thread-local).
                with SimulatedCollectives(comm):
                    results[rank] = fn(comm, *args_of[rank])
            except BaseException as error:  # noqa: BLE001 - re-raised on the calling thread
                errors[rank] = error
                with self._condition:
                    self._condition.notify_all()

        threads = [threading.Thread(target=body, args=(rank,), name=f"rank{rank}") for rank in ranks]
        self._failed = errors
        self._call_counters = {}
        self._pending = {}
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            first = min(errors)
            error = errors[first]
            if isinstance(error, _PeerFailed) and any(not isinstance(e, _PeerFailed) for e in errors.values()):
                first = min(r for r, e in errors.items() if not isinstance(e, _PeerFailed))
                error = errors[first]
            raise type(error)(f"rank {first}: {error}") if isinstance(error, CollectiveError) else error
        return [results[rank] for rank in ranks]

    def _rendezvous(self, rank, kind, axis, tensor, extra, tag):
        """Deposit one member's part; the last member computes the collective for the group."""
        group = self.mesh.group_of(axis, rank)
        with self._condition:
            counters = self._call_counters.setdefault(rank, {})
            sequence = counters.get(group, 0)
            counters[group] = sequence + 1
            key = (group, sequence)
            slot = self._pending.setdefault(key, {"parts": {}, "results": None, "kind": kind, "error": None})
            if slot["kind"] != kind:
                raise CollectiveError(
                    f"rank {rank} called {kind} as collective #{sequence} of group {group}, "
                    f"another member called {slot['kind']}"
                )
            slot["parts"][rank] = (tensor, extra)
            if len(slot["parts"]) == len(group):
                try:
                    tensors = [slot["parts"][m][0] for m in group]
                    extras = [slot["parts"][m][1] for m in group]
                    slot["results"] = self._group_kernel(kind, axis, group, tensors, extras, tag)
                except CollectiveError as error:
                    slot["error"] = error
                self._condition.notify_all()
            else:
                finished = self._condition.wait_for(
                    lambda: slot["results"] is not None or slot["error"] is not None or self._failed,
                    timeout=self.timeout,
                )
                if not finished:
                    waiting = sorted(slot["parts"])
                    raise CollectiveError(
                        f"{kind} over {_axis_label(axis)} group {group} (call #{sequence}) timed out after "
                        f"{self.timeout}s: only ranks {waiting} arrived"
                    )
                if slot["results"] is None and slot["error"] is None:
                    raise _PeerFailed(f"{kind} over {_axis_label(axis)}: another rank failed")
            if slot["error"] is not None:
                raise slot["error"]
            return slot["results"][group.index(rank)]

    def _group_kernel(self, kind, axis, group, tensors, extras, tag):
        first = extras[0]
        for member, extra in zip(group, extras):
            mismatch = {k: v for k, v in extra.items() if k != "input_splits" and first.get(k) != v}
            if mismatch:
                raise CollectiveError(
                    f"{kind} over {_axis_label(axis)} group {group}: rank {member} passed "
                    f"{mismatch}, rank {group[0]} passed { {k: first.get(k) for k in mismatch} }"
                )
        if kind == "all_reduce":
            out = _group_all_reduce(axis, group, tensors, first["op"])
        elif kind == "all_gather":
            out = _group_all_gather(axis, group, tensors, first["dim"])
        elif kind == "reduce_scatter":
            out = _group_reduce_scatter(axis, group, tensors, first["dim"], first["op"])
        elif kind == "all_to_all":
            out = _group_all_to_all(axis, group, tensors, [e["input_splits"] for e in extras], first["dim"])
        elif kind == "broadcast":
            out = _group_broadcast(axis, group, tensors, first["source_index"])
        else:  # pragma: no cover - RankCommunicator only issues the kinds above
            raise CollectiveError(f"unknown collective {kind!r}")
        outputs, sent, received = out
        self._record(kind, axis, group, tensors[0].dtype, sent, received, tag, tensors)
        return outputs


class _PeerFailed(CollectiveError):
    """Raised on ranks whose collective cannot finish because another rank already failed."""


@dataclass
class RankCommunicator:
    """One rank's view of the simulator: collectives take this rank's tensor only."""

    simulator: Simulator
    rank: int
    mesh: MeshSpec = field(init=False)

    def __post_init__(self) -> None:
        self.mesh = self.simulator.mesh

    def all_reduce(self, tensor: torch.Tensor, axis: AxisName, op: str = "sum", tag: str = "") -> torch.Tensor:
        return self.simulator._rendezvous(self.rank, "all_reduce", axis, tensor, {"op": op}, tag)

    def all_gather(self, tensor: torch.Tensor, axis: AxisName, dim: int = 0, sizes: Sequence[int] | None = None,
                   tag: str = "") -> torch.Tensor:
        """``sizes``: every member's length along ``dim`` where they differ (a real communicator
        needs them to size its buffers); without them the pieces must all be this rank's length."""
        out = self.simulator._rendezvous(self.rank, "all_gather", axis, tensor, {"dim": dim}, tag)
        dim_ = dim % max(tensor.dim(), 1)
        expected = sum(int(s) for s in sizes) if sizes is not None else tensor.shape[dim_] * self.mesh.size(axis)
        if out.shape[dim_] != expected:
            raise CollectiveError(
                f"all_gather over {axis} on rank {self.rank}: the pieces are {out.shape[dim_]} long in all, not "
                f"{expected}; " + ("the sizes passed are wrong" if sizes is not None else
                                   "pieces of different lengths need sizes=[...]"))
        return out

    def reduce_scatter(
        self, tensor: torch.Tensor, axis: AxisName, dim: int = 0, op: str = "sum", tag: str = ""
    ) -> torch.Tensor:
        if op not in ("sum", "avg"):
            raise CollectiveError(f"reduce_scatter supports op 'sum' or 'avg', got {op!r}")
        return self.simulator._rendezvous(self.rank, "reduce_scatter", axis, tensor, {"dim": dim, "op": op}, tag)

    def all_to_all(
        self, tensor: torch.Tensor, axis: AxisName, input_splits: Sequence[int], dim: int = 0,
        output_splits: Sequence[int] | None = None, tag: str = ""
    ) -> torch.Tensor:
        """``output_splits``: rows to receive from each member, where the caller knows them (a real
        communicator otherwise exchanges them first)."""
        splits = [int(s) for s in input_splits]
        out = self.simulator._rendezvous(
            self.rank, "all_to_all", axis, tensor, {"dim": dim, "input_splits": splits}, tag
        )
        if output_splits is not None and out.shape[dim] != sum(int(s) for s in output_splits):
            raise CollectiveError(
                f"all_to_all over {axis} on rank {self.rank}: received {out.shape[dim]} rows, but output_splits "
                f"{[int(s) for s in output_splits]} say {sum(int(s) for s in output_splits)}")
        return out

    def broadcast(self, tensor: torch.Tensor, axis: AxisName, source_index: int = 0, tag: str = "") -> torch.Tensor:
        return self.simulator._rendezvous(
            self.rank, "broadcast", axis, tensor, {"source_index": source_index}, tag
        )

    def group(self, axis: AxisName) -> tuple[int, ...]:
        return self.mesh.group_of(axis, self.rank)

    def index(self, axis: AxisName) -> int:
        return self.mesh.index(axis, self.rank)
