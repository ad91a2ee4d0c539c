"""Add the communicator input: the one placeholder every emitted collective reads.

Reads
    a placed graph whose placeholders are parameters, buffers and batch inputs.
Writes
    one placeholder named ``comm`` before the first, with ``GraphInput(COMMUNICATOR, "comm")``
    and a ``PlacedValue`` of no sharding: the rank's communicator (the simulator's per-rank
    view, a torch.distributed communicator, or None on one device).
Assumes
    nothing has added one yet.

Why a pass of its own: lowering passes find the communicator through its record
(``meta.communicator_node``), and the program passes it first, so neither depends on another
pass having made it by a name or at a position.
"""

from __future__ import annotations

from torch.fx import GraphModule

from shardgraph import meta
from shardgraph.meta import GraphInput, InputKind, PlacedValue

__all__ = ["add_communicator"]


def add_communicator(gm: GraphModule) -> GraphModule:
    graph = gm.graph
    if meta.graph_inputs(graph, InputKind.COMMUNICATOR):
        raise ValueError("the graph already has a communicator input")
    with graph.inserting_before(next(iter(graph.nodes))):
        comm = graph.placeholder("comm")
    meta.set_graph_input(comm, GraphInput(InputKind.COMMUNICATOR, "comm"))
    meta.set_placed(comm, PlacedValue(None, None, (), "the rank's communicator"))
    gm.recompile()
    return gm
