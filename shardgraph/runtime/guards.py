"""Runtime guards: the checks that turn a silent wrong result or a hang into a named error.

* **Same program on every rank.** ``program_fingerprint`` hashes the lowered graph's code, the
  mesh and every input's sharding; at start-up under torch.distributed the ranks gather their
  fingerprints and ``fingerprint_mismatch`` names the ranks that differ and in what (mesh, graph,
  shardings). Without it a rank compiled for another mesh creates other process groups and
  issues other collectives, and the job hangs.
* **Replicas agree.** ``check_replicas`` compares a bit checksum of every replicated parameter
  and buffer across each group of the axes it is replicated over: one all-gather of a small
  integer tensor per axis, run on the first step. Ranks that built their model with different
  seeds otherwise train on diverging weights and report different losses.
* **Named collective failures.** ``collective_failure`` turns a backend error (gloo says only
  "Timed out waiting 3000ms for recv operation to complete") into one that names the
  collective, its axis and group, and which members never reached it: each failing rank posts
  what it was doing to the rendezvous store, and the members that post nothing within a grace
  period are reported as missing.
* **Non-finite values.** ``nonfinite_inputs`` names a parameter, buffer or batch tensor holding
  NaN or inf before a step; ``NonFiniteLocator`` runs the lowered graph node by node and records
  the first node whose output is not finite, so ``describe_first_nonfinite`` can name the rank,
  node, op and the model's source line where the first NaN or inf appeared. That costs a check
  per node, so it runs only with the debug flag (``debug=True`` or ``SHARDGRAPH_DEBUG=1``).

``docs/runtime.md`` describes when each runs and what it costs.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

from .. import meta
from ..mesh import MeshSpec
from ..placement import Sharding

__all__ = [
    "CollectiveFailure",
    "FirstNonFinite",
    "NonFiniteError",
    "NonFiniteLocator",
    "ProgramMismatchError",
    "ReplicaMismatchError",
    "bit_checksum",
    "check_replicas",
    "collective_failure",
    "debug_enabled",
    "describe_first_nonfinite",
    "fingerprint_mismatch",
    "nonfinite_inputs",
    "program_fingerprint",
    "same_bits",
]

DEBUG_ENVIRONMENT = "SHARDGRAPH_DEBUG"
# Checked in this order on every rank, so the per-axis all-gathers line up.
_REPLICA_AXES = ("dp", "tp", "edp", "ep", "etp")
_STORE_PREFIX = "shardgraph/failure/"


class ProgramMismatchError(RuntimeError):
    """Ranks that run different programs (mesh, lowered graph or shardings differ)."""


class ReplicaMismatchError(RuntimeError):
    """A replicated parameter or buffer whose copies differ between the ranks of a group."""


class CollectiveFailure(RuntimeError):
    """A collective that failed or timed out, named with its group and the ranks missing."""


class NonFiniteError(FloatingPointError):
    """A NaN or inf in the loss, a gradient, or an input of the step."""


def debug_enabled(flag: bool | None = None) -> bool:
    """``flag`` when given; otherwise whether ``SHARDGRAPH_DEBUG`` is set to a true value."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(DEBUG_ENVIRONMENT, "").strip().lower() not in ("", "0", "false", "no", "off")


# ----------------------------------------------------------------------------- same program
def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def program_fingerprint(program) -> dict[str, str]:
    """What must agree between ranks, part by part, so a mismatch can say which part differs."""
    shardings = [f"parameter {name}: {program.parameter_sharding(name)!r}" for name in program.parameter_names]
    shardings += [f"buffer {name}: {program.buffer_sharding(name)!r}" for name in program.buffer_names]
    shardings += [f"input {name}: {program.input_sharding(name)!r}" for name in program.input_names]
    return {
        "mesh": str(program.mesh),
        "graph": _digest(program.graph_module.code),
        "shardings": _digest("\n".join(shardings)),
    }


def _ranks_by_value(values: Sequence[Any]) -> list[tuple[Any, list[int]]]:
    """Distinct values with the ranks holding each, the most common first (ties: lowest rank)."""
    groups: dict[Any, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(value, []).append(rank)
    return sorted(groups.items(), key=lambda item: (-len(item[1]), item[1][0]))


def fingerprint_mismatch(fingerprints: Sequence[Mapping[str, str]]) -> str | None:
    """None when every rank's fingerprint is the same; else which ranks differ, and in what."""
    parts = []
    for part in fingerprints[0]:
        groups = _ranks_by_value([f.get(part) for f in fingerprints])
        if len(groups) > 1:
            parts.append(f"{part}: " + "; ".join(f"ranks {ranks} have {value}" for value, ranks in groups))
    if not parts:
        return None
    whole = _ranks_by_value([tuple(sorted(f.items())) for f in fingerprints])
    majority = whole[0][1]
    others = sorted(r for _, ranks in whole[1:] for r in ranks)
    return (f"ranks {others} run a different program from ranks {majority} (compiled for another mesh, model, "
            f"plan or batch shape); every rank must run the same program:\n  " + "\n  ".join(parts))


# ----------------------------------------------------------------------------- replicas
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22  # elements per step: the int64 copies stay small next to the tensor itself


def bit_checksum(tensor: torch.Tensor) -> torch.Tensor:
    """``[sum, position-weighted sum]`` of the tensor's bit patterns as int64 (wrapping).

    Integer sums are exact and independent of summation order, so equal bits give equal
    checksums on any rank, NaNs included; the weighted sum also catches swapped elements.
    """
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    bits = flat.view(_BITS[flat.element_size()])
    total = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), _CHUNK):
        chunk = bits[start:start + _CHUNK].to(torch.int64)
        positions = torch.arange(start + 1, start + 1 + chunk.numel(), dtype=torch.int64, device=flat.device)
        total += torch.stack([chunk.sum(), (chunk * positions).sum()])
    return total


def replicated_axes(sharding: Sharding, mesh: MeshSpec) -> list[str]:
    """The axes of the sharding's view over which every member holds the same piece."""
    return [axis for axis in sharding.view if sharding.placement(axis).is_replicate() and mesh.size(axis) > 1]


def check_replicas(comm, pieces: Sequence[tuple[str, torch.Tensor, Sharding]]) -> None:
    """Raise ``ReplicaMismatchError`` if a replicated piece differs within its group.

    ``pieces`` is ``(label, this rank's piece, sharding)`` in the same order on every rank (the
    program's order). One all-gather per axis of a ``[members, pieces, 2]`` int64 tensor.
    """
    by_axis: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for label, piece, sharding in pieces:
        if sharding is None:
            continue
        axes = replicated_axes(sharding, comm.mesh)
        if axes:
            checksum = bit_checksum(piece)
            for axis in axes:
                by_axis.setdefault(axis, []).append((label, checksum))
    problems = []
    for axis in _REPLICA_AXES:
        entries = by_axis.get(axis)
        if not entries:
            continue
        local = torch.stack([checksum for _, checksum in entries]).unsqueeze(0)
        gathered = comm.all_gather(local, axis, dim=0).cpu()
        members = comm.group(axis)
        for index, (label, _) in enumerate(entries):
            rows = [tuple(gathered[m, index].tolist()) for m in range(len(members))]
            groups = _ranks_by_value(rows)
            if len(groups) > 1:
                holders = " | ".join(str([members[i] for i in ranks]) for _, ranks in groups)
                problems.append(f"{label} is replicated over {axis} (group {members}) but its copies differ: "
                                f"ranks {holders} hold different values")
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ReplicaMismatchError(
            f"rank {comm.rank}: replicated values differ between ranks before the first step (a model built with "
            f"another seed, or weights loaded differently, on some ranks); give every rank the same values:\n  "
            + "\n  ".join(shown))


# ----------------------------------------------------------------------------- named failures
def _store():
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def _missing_members(rank: int, members: Sequence[int], what: str, grace: float) -> str:
    """Post this rank's failure to the store; report which members posted nothing within ``grace``.

    Members stuck in the same collective fail about when this rank does and post theirs; a rank
    that stopped, hangs elsewhere or died posts nothing.
    """
    try:
        store = _store()
        store.set(f"{_STORE_PREFIX}{rank}", what)
        pending, reported = [m for m in members if m != rank], {}
        deadline = time.monotonic() + grace
        while pending:
            for member in list(pending):
                if store.check([f"{_STORE_PREFIX}{member}"]):
                    reported[member] = store.get(f"{_STORE_PREFIX}{member}").decode("utf-8", "replace")
                    pending.remove(member)
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    except Exception as error:  # noqa: BLE001 - the store may be gone with the rank that hosted it
        return f"the other ranks could not be asked ({type(error).__name__}: {str(error)[:200]})"
    lines = []
    if pending:
        lines.append(f"ranks missing: {pending} (reported nothing within {grace:.1f}s: stopped, hung elsewhere, "
                     f"or dead)")
    for member, text in sorted(reported.items()):
        lines.append(f"rank {member} failed too, in {'the same collective' if text == what else text}")
    return "; ".join(lines) or "every other member failed in the same collective"


def collective_failure(what: str, rank: int, members: Sequence[int], error: BaseException,
                       timeout_seconds: float | None) -> CollectiveFailure:
    """A ``CollectiveFailure`` for ``what`` (e.g. "all_reduce over tp group (0, 1), call #3")."""
    grace = min(timeout_seconds, 10.0) if timeout_seconds else 10.0
    missing = _missing_members(rank, members, what, grace)
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    limit = f"{timeout_seconds:g}s" if timeout_seconds else "the backend's default"
    return CollectiveFailure(
        f"rank {rank}: {what} failed: {first_line}\n  {missing}\n  (process-group timeout {limit}; set it with "
        f"init_from_environment(timeout=...) or spawn_gloo(..., timeout=...))")


# ----------------------------------------------------------------------------- non-finite values
def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN in the same places counting as equal (``torch.equal`` says NaN != NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan_a, nan_b = a.isnan(), b.isnan()
    return torch.equal(nan_a, nan_b) and torch.equal(a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0))


def _nonfinite_counts(value: torch.Tensor) -> tuple[int, int]:
    if not (value.is_floating_point() or value.is_complex()) or value.numel() == 0:
        return 0, 0
    return int(value.isnan().sum()), int(value.isinf().sum())


def _describe_counts(nans: int, infs: int) -> str:
    return " and ".join(f"{count} {word}" for count, word in ((nans, "NaN"), (infs, "inf")) if count)


def nonfinite_inputs(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """``"parameter 'x' holds 3 NaN"`` for every tensor that is not finite, in the given order."""
    problems = []
    for label, value in named:
        nans, infs = _nonfinite_counts(value)
        if nans or infs:
            problems.append(f"{label} holds {_describe_counts(nans, infs)} of {value.numel()} values")
    return problems


@dataclass(frozen=True)
class FirstNonFinite:
    """The earliest node (in graph order) whose output held NaN or inf on one rank."""

    index: int
    node: str
    op: str
    source: str
    what: str  # "2 NaN and 1 inf"

    def describe(self, ranks: Sequence[int]) -> str:
        where = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {list(ranks)}"
        return (f"the first non-finite value appeared on {where} at node {self.node} ({self.op}), "
                f"{self.what}; model source: {self.source}")


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


class NonFiniteLocator(Interpreter):
    """Runs the lowered graph node by node, recording the first node whose output is not finite.

    Every rank runs the same graph in the same order, so comparing the recorded indices across
    ranks finds where a NaN or inf first appeared: a value poisoned by a collective always sits
    after the collective, which sits after the value that poisoned it.
    """

    def __init__(self, graph_module: GraphModule):
        super().__init__(graph_module)
        self.first: FirstNonFinite | None = None
        self._position = {node: i for i, node in enumerate(graph_module.graph.nodes)}

    def run_node(self, node: Node) -> Any:
        result = super().run_node(node)
        if self.first is None and node.op in ("placeholder", "call_function", "call_method"):
            nans = infs = 0
            for tensor in _tensors(result):
                n, i = _nonfinite_counts(tensor)
                nans, infs = nans + n, infs + i
            if nans or infs:
                record = meta.graph_input(node) if node.op == "placeholder" else None
                op = f"{record.kind.value} {record.name!r}" if record is not None else str(node.target)
                self.first = FirstNonFinite(self._position[node], node.name, op, meta.source_line(node),
                                            _describe_counts(nans, infs))
        return result


def describe_first_nonfinite(findings: Mapping[int, FirstNonFinite | None]) -> str:
    """The earliest finding over ranks (every rank that found it at that node is named)."""
    found = {rank: f for rank, f in findings.items() if f is not None}
    if not found:
        return "no node produced a non-finite value (the loss and gradients were checked after the step)"
    earliest = min(f.index for f in found.values())
    ranks = sorted(rank for rank, f in found.items() if f.index == earliest)
    return found[ranks[0]].describe(ranks)
