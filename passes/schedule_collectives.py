"""Issue every collective as early as its inputs allow and wait for it as late as its readers allow.

Reads
    a graph after ``lower_collectives``: each ``_c10d_functional`` op (carrying a
    ``meta.Collective``) is read by one ``wait_tensor``; the local steps of its expansion carry a
    ``meta.CollectivePart`` (``before`` the op, or ``after`` the wait).
Writes
    the same nodes in another order, nothing else:

    * each wait, and the local steps after it, moved to just before the first node that reads
      them, so the compute in between runs while the collective is in flight (not the waits of
      program outputs, whose reader is the end of the step: sunk there, every output gathered
      by the update would be held to the end together);
    * each op, with the local steps before it, moved to just after the last node it reads (past
      the placeholders at the top when it reads only inputs), as long as the bytes of the
      collectives in flight over the range it moves across, plus its own, stay within
      ``prefetch_bytes``; otherwise it moves only as far as the first point where they do
      (just after the wait of a collective that then finishes). A parameter's gather (zero=3) is
      issued no earlier than the previous parameter gather's wait: one gather ahead, as FSDP
      prefetches.
Assumes
    every rank runs this graph, so every rank issues the collectives in one order (what NCCL and
    gloo need of collectives on one group) and the simulator's rendezvous, which completes a
    collective when its op is issued, meets the same sequence on every rank; a node moved
    earlier still follows all its inputs and a node moved later still precedes all its users,
    so the program computes the same values.

Why: lowering puts every collective right before its first reader and waits at once, so nothing
overlaps. Moved apart, the next layer's gathers (a parameter's all-gather reads only the
parameter) are issued at the start, a gradient's reduction as soon as the backward produced it,
and the MoE return's wait sits after compute that does not need it. ``prefetch_bytes`` is
the memory bound: how much issued-but-unfinished communication (buffers held alive early) the
schedule may add.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from shardgraph import meta
from shardgraph.meta import Purpose
from shardgraph.runtime import c10d

__all__ = ["schedule_collectives", "DEFAULT_PREFETCH_BYTES", "collectives_in_flight"]

DEFAULT_PREFETCH_BYTES = 128 * 2**20


def _part(node: Node, role: str) -> bool:
    found = meta.collective_part(node)
    return found is not None and found.role == role


def _sink(graph, position: dict) -> None:
    """Waits and the steps after them, latest first, to just before their first reader; a
    program output's (a new parameter gathered by the update) where lowering put it."""
    for node in reversed(list(graph.nodes)):
        if not (c10d.is_wait(node) or _part(node, "after")):
            continue
        if not node.users:
            continue
        # An output's first reader is the end of the step: waited for there, every gathered new
        # parameter (and the slice it was gathered from) would be held to the end together.
        record = meta.collective_or_part(node)
        if record is not None and record.purpose is Purpose.OUTPUT:
            continue
        first = min(node.users, key=position.__getitem__)
        if first.prev is node:
            continue
        first.prepend(node)
        _place_between(position, graph, node, node.prev, first)


def _intervals(graph, position: dict) -> dict[Node, tuple[float, float, float]]:
    """Every c10d op's (issue position, wait position, bytes)."""
    found = {}
    for node in graph.nodes:
        if c10d.is_issue(node):
            wait = next(iter(node.users))
            found[node] = (position[node], position[wait], float(meta.collective(node).bytes))
    return found


def _hoist(graph, position: dict, prefetch_bytes: float) -> None:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    top = placeholders[-1] if placeholders else None
    intervals = _intervals(graph, position)
    previous_gather_wait = None
    for issue in [n for n in graph.nodes if c10d.is_issue(n)]:
        unit = _before_chain(issue, position) + [issue]
        members = set(unit)
        inputs = [i for n in unit for i in n.all_input_nodes if i not in members and i.op != "placeholder"]
        anchor = max(inputs, key=position.__getitem__) if inputs else top
        if meta.collective(issue).purpose is Purpose.OUTPUT:
            continue  # see _sink: issued early, each would be held to the end of the step
        if meta.collective(issue).purpose is Purpose.PARAMETER_GATHER:
            # A held parameter's gather could be issued at the very start (it reads only the
            # parameter), which would keep every gathered weight alive from there and undo
            # resharding: it is prefetched one gather ahead, after the previous one has arrived.
            if previous_gather_wait is not None and (anchor is None
                                                     or position[previous_gather_wait] > position[anchor]):
                anchor = previous_gather_wait
            previous_gather_wait = next(iter(issue.users))
        if anchor is None or anchor.next is unit[0]:
            continue
        start, wait_at, nbytes = intervals.pop(issue)
        if position[anchor] >= position[unit[0]]:
            intervals[issue] = (start, wait_at, nbytes)
            continue
        # The collectives issued before this one and still in flight after the anchor, by the
        # position of their waits: moved to just after a point, the issue adds its bytes to those
        # whose waits come later. The anchor, or the wait of one in flight across the range
        # (after it, that one has finished): the earliest that keeps the bytes within the bound wins.
        from_anchor = position[anchor]
        in_flight = sorted(((w, b, other) for other, (s, w, b) in intervals.items() if s < start and w > from_anchor),
                           key=lambda item: item[0])
        load = sum(b for _, b, _ in in_flight)
        chosen = anchor if load + nbytes <= prefetch_bytes else None
        if chosen is None:
            for w, b, other in in_flight:
                if w >= start:
                    break
                load -= b
                if load + nbytes <= prefetch_bytes:
                    chosen = next(iter(other.users))
                    break
        if chosen is None or chosen.next is unit[0]:
            intervals[issue] = (start, wait_at, nbytes)
            continue
        after, renumbered = chosen, False
        for node in unit:
            after.append(node)
            renumbered |= _place_between(position, graph, node, after, node.next)
            after = node
        if renumbered:
            intervals = _intervals(graph, position)
        else:
            intervals[issue] = (position[issue], position[next(iter(issue.users))], nbytes)


def _place_between(position: dict, graph, node: Node, before: Node, after: Node) -> bool:
    """A position for ``node`` between its neighbours; all positions are renumbered in graph order
    when the gap has become too narrow to halve (many nodes moved into one place). Returns
    whether they were."""
    low, high = position[before], position[after]
    if high - low > 1e-6 * max(1.0, abs(high)):
        position[node] = (low + high) / 2
        return False
    for index, each in enumerate(graph.nodes):
        position[each] = float(index)
    return True


def _before_chain(issue: Node, position: dict) -> list[Node]:
    """The local steps before ``issue`` that feed it (its layout), earliest first."""
    chain, frontier = [], [issue]
    while frontier:
        node = frontier.pop()
        for source in node.all_input_nodes:
            part = meta.collective_part(source)
            if part is not None and part.role == "before" and part.issue == issue.name and source not in chain:
                chain.append(source)
                frontier.append(source)
    return sorted(chain, key=position.__getitem__)


def collectives_in_flight(gm: GraphModule) -> list[tuple[Node, list[Node]]]:
    """Each c10d op with the nodes that run between it and its wait (what can overlap it)."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    found = []
    for node in nodes:
        if c10d.is_issue(node):
            wait = next(iter(node.users))
            found.append((node, nodes[index[node] + 1: index[wait]]))
    return found


def schedule_collectives(gm: GraphModule, prefetch_bytes: float | None = None) -> GraphModule:
    graph = gm.graph
    bound = DEFAULT_PREFETCH_BYTES if prefetch_bytes is None else prefetch_bytes
    # Positions in graph order; a moved node takes a place between its neighbours, so the order
    # stays exact without renumbering.
    position = {node: float(index) for index, node in enumerate(graph.nodes)}
    _sink(graph, position)
    _hoist(graph, position, bound)
    gm.recompile()
    return gm
