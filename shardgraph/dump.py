"""Graph dumps: the program after each stage, as readable code and as a picture.

``dump_program(program, directory)`` writes

``traced.py``            the joint graph as traced (fx code)
``placed.py``            the same graph, each line followed by ``# <sharding>  <- <reason>``
``lowered.py``           the SPMD program every rank runs, collectives marked ``# COLLECTIVE``
``lowered_rank{r}.txt``  for each rank: its coordinates and the local shape of every value
``report.json``          the placement report (``shardgraph.report``)
``graph.html``           an SVG drawing of the lowered program; collectives in red, MoE steps in
                         blue; graphs over ``collapse_above`` nodes are drawn one box per layer

and returns the list of paths written.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections import defaultdict

import networkx as nx
from torch.fx import GraphModule

from . import meta
from .placement import local_shape

__all__ = ["dump_program"]


def _code_with_comments(gm: GraphModule, comment) -> str:
    """fx's generated code, with a comment after the line that defines each node."""
    code = gm.code
    by_name = {node.name: node for node in gm.graph.nodes}
    lines = ["# inputs:"]
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            text = comment(node)
            label = meta.display_name(node)
            lines.append(f"#   {node.name} ({label}): {text}" if text else f"#   {node.name} ({label})")
    for line in code.splitlines():
        lines.append(line)
        match = re.match(r"\s*(\w+)\s*=", line)
        if match and match.group(1) in by_name:
            text = comment(by_name[match.group(1)])
            if text:
                indent = line[: len(line) - len(line.lstrip())]
                lines.append(f"{indent}# {text}")
    return "\n".join(lines) + "\n"


def _placed_comment(node) -> str:
    record = meta.placed(node)
    if record is None or record.sharding is None:
        return ""
    return f"{record.sharding!r}  <- {record.reason}"


def _lowered_comment(node) -> str:
    record = meta.collective(node)
    if record is not None:
        return (f"COLLECTIVE {record.kind.value} over {record.axis} (group {record.group_size}), "
                f"{record.bytes:.0f} bytes/rank: {record.purpose.value}" + (f" ({record.detail})" if record.detail else ""))
    step = meta.moe_step(node)
    if step is not None:
        return f"moe step of {step.layer}"
    sharding = meta.sharding(node)
    return "" if sharding is None else repr(sharding)


def _rank_table(program, rank: int) -> str:
    mesh = program.mesh
    coordinates = mesh.coords(rank)
    lines = [f"rank {rank}: " + " ".join(f"{k}={v}" for k, v in coordinates.items()), ""]
    for node in program.placed.graph_module.graph.nodes:
        value, sharding = meta.tensor_value(node), meta.sharding(node)
        if value is None or sharding is None or isinstance(sharding, tuple):
            continue
        local = local_shape(tuple(value.shape), sharding, mesh, name=node.name) if value.dim() else ()
        name = meta.display_name(node)
        lines.append(f"{name:<48} {str(list(value.shape)):<22} -> {str([int(s) for s in local]):<22} {sharding!r}")
    return "\n".join(lines) + "\n"


def _kind(node) -> str:
    record = meta.collective(node)
    if record is not None and record.communicates:
        return "collective"
    if meta.moe_step(node) is not None:
        return "moe"
    if node.op == "placeholder":
        return "input"
    return "op"


_COLOURS = {"collective": "#d62728", "moe": "#1f77b4", "input": "#7f7f7f", "op": "#dddddd"}


def _layer_key(node) -> str:
    return meta.layer(node) or "other"


def _svg(gm: GraphModule, collapse_above: int) -> str:
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    graph = nx.DiGraph()
    collapsed = len(nodes) > collapse_above
    if collapsed:
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for node in nodes:
            counts[_layer_key(node)][_kind(node)] += 1
        previous = None
        for key in sorted(counts, key=lambda k: (k == "other", int(k.split(".")[1]) if k != "other" else 0)):
            graph.add_node(key, label=key + ": " + ", ".join(f"{v} {k}" for k, v in sorted(counts[key].items())),
                           kind="collective" if counts[key].get("collective") else "op")
            if previous is not None:
                graph.add_edge(previous, key)
            previous = key
    else:
        for node in nodes:
            record = meta.collective(node)
            label = node.name if record is None else f"{record.kind.value}[{record.axis}] {node.name}"
            graph.add_node(node.name, label=label, kind=_kind(node))
        for node in nodes:
            for source in node.all_input_nodes:
                if source.op != "output" and source.name in graph:
                    graph.add_edge(source.name, node.name)
    generations = list(nx.topological_generations(graph))
    position = {}
    for column, generation in enumerate(generations):
        for row, name in enumerate(sorted(generation)):
            position[name] = (40 + column * 190, 30 + row * 34)
    width = 80 + 190 * max(len(generations), 1)
    height = 60 + 34 * max((len(g) for g in generations), default=1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="10">']
    for source, target in graph.edges:
        (x1, y1), (x2, y2) = position[source], position[target]
        parts.append(f'<line x1="{x1 + 170}" y1="{y1 + 10}" x2="{x2}" y2="{y2 + 10}" stroke="#999" stroke-width="0.6"/>')
    for name, data in graph.nodes(data=True):
        x, y = position[name]
        colour = _COLOURS[data["kind"]]
        text_colour = "#fff" if data["kind"] in ("collective", "moe") else "#000"
        label = html.escape(data["label"][:30])
        parts.append(f'<g><title>{html.escape(data["label"])}</title><rect x="{x}" y="{y}" width="170" height="20" rx="3" '
                     f'fill="{colour}"/><text x="{x + 4}" y="{y + 14}" fill="{text_colour}">{label}</text></g>')
    parts.append("</svg>")
    return "\n".join(parts)


def dump_program(program, directory: str, collapse_above: int = 400) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    written = []

    def write(name: str, text: str) -> None:
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        written.append(path)

    write("traced.py", program.traced.graph_module.code)
    write("placed.py", _code_with_comments(program.placed.graph_module, _placed_comment))
    write("lowered.py", _code_with_comments(program.graph_module, _lowered_comment))
    for rank in program.mesh.ranks:
        write(f"lowered_rank{rank}.txt", _rank_table(program, rank))
    write("report.json", json.dumps(program.report(format="dict"), indent=1))
    svg = _svg(program.graph_module, collapse_above)
    legend = ("<p><span style='color:#d62728'>&#9632;</span> collective &nbsp; <span style='color:#1f77b4'>&#9632;</span> "
              "MoE dispatch step &nbsp; <span style='color:#7f7f7f'>&#9632;</span> input &nbsp; hover a box for its full name</p>")
    write("graph.html", f"<!doctype html><html><head><meta charset='utf-8'><title>shardgraph: lowered program</title></head>"
                        f"<body><h3>lowered program, mesh {html.escape(str(program.mesh))}</h3>{legend}{svg}</body></html>\n")
    return written
