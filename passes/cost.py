"""The link model: what a redistribution between two placements costs, in bytes and seconds.

Costs are per rank and per step, for the bandwidth-optimal collective that realises the change on
one axis of ``n`` ranks, where ``b`` is the byte size of the rank's piece *before* the change:

==============================  ======================  ===================
from -> to                      collective              bytes sent per rank
==============================  ======================  ===================
equal                           none                    0
Replicate -> Shard              local slice             0
Replicate -> Partial            keep on one rank        0
Partial(sum) <-> Partial(avg)   local scale             0
Shard -> Replicate              all_gather              b * (n - 1)
Shard(i) -> Shard(j)            all_to_all              b * (n - 1) / n
Partial -> Replicate            all_reduce              2 * b * (n - 1) / n
Partial -> Shard                reduce_scatter          b * (n - 1) / n
Partial -> InterleavedShard     all_reduce + slice      2 * b * (n - 1) / n
Shard -> Partial("sum")         local zero-pad          0 (the piece grows n-fold)
other Shard -> Partial          all_gather              b * (n - 1)
InterleavedShard <-> Shard      all_gather + slice      b * (n - 1)
==============================  ======================  ===================

These are the bytes of the steps ``lower_redistribute.plan_redistribution`` emits for the same
change on one axis (``tests/passes/test_cost.py`` checks every pair), so propagation chooses by
what will run. Seconds divide bytes by the axis's bandwidth, plus a latency per collective. The default puts tp and etp on NVLink-class links
and dp, ep and edp on the same (one node); ``LinkModel(axis_bandwidth=...)`` overrides per axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardgraph.placement import InterleavedShard, Partial, Placement, Replicate, Shard

__all__ = ["LinkModel", "redistribution", "Redistribution"]


@dataclass(frozen=True)
class LinkModel:
    """Per-axis bandwidth in bytes per second (uni-directional, per rank)."""

    axis_bandwidth: dict = field(
        default_factory=lambda: {"tp": 450e9, "etp": 450e9, "dp": 450e9, "ep": 450e9, "edp": 450e9}
    )
    latency: float = 5e-6

    def seconds(self, axis: str, nbytes: float) -> float:
        if nbytes == 0:
            return 0.0
        return self.latency + nbytes / self.axis_bandwidth.get(axis, 50e9)


@dataclass(frozen=True)
class Redistribution:
    kind: str  # none | slice | zero | scale | pad | all_gather | all_to_all | all_reduce | reduce_scatter
    bytes: float


def redistribution(source: Placement, target: Placement, piece_bytes: float, group_size: int) -> Redistribution:
    """The collective that turns ``source`` into ``target`` on one axis, and its bytes per rank."""
    n = group_size
    if source == target or n == 1:
        return Redistribution("none", 0.0)
    if isinstance(source, Replicate):
        if isinstance(target, (Shard, InterleavedShard)):
            return Redistribution("slice", 0.0)
        return Redistribution("zero", 0.0)  # Replicate -> Partial
    if isinstance(source, Partial):
        if isinstance(target, Partial):
            return Redistribution("scale", 0.0)
        if type(target) is Shard:
            return Redistribution("reduce_scatter", piece_bytes * (n - 1) / n)
        # Replicate, or an interleaved shard: reduce whole (then cut locally).
        return Redistribution("all_reduce", 2 * piece_bytes * (n - 1) / n)
    # source is a Shard or InterleavedShard
    if type(source) is Shard and target == Partial("sum"):
        return Redistribution("pad", 0.0)
    if type(source) is Shard and type(target) is Shard:
        # Another dim of a plain shard: one all-to-all (each rank keeps 1/n of its piece).
        return Redistribution("all_to_all", piece_bytes * (n - 1) / n)
    # Any other change (interleaved <-> blocked, a shard to a partial) is what lowering emits:
    # gather whole, then cut locally.
    return Redistribution("all_gather", piece_bytes * (n - 1))
