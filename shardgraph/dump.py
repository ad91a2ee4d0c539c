"""Graph dumps: the program after each stage, as readable code and as a picture.

``dump_program(program, directory)`` writes

``traced.py``            the joint graph as traced (fx code)
``placed.py``            the same graph, each line followed by ``# <sharding>  <- <reason>``
``lowered.py``           the SPMD program every rank runs, collectives marked ``# COLLECTIVE``
``lowered_rank{r}.txt``  for each rank: its coordinates and the local shape of every value
``report.json``          the placement report (``shardgraph.report``)
``graph.html``           the lowered program, one box per layer and inside it one per block
                         (attention, router, experts, norm, gradient sync ...; ``report.node_groups``
                         says where each node belongs), a chip per node in execution order:
                         collectives red, expert steps blue, gradients green; hover a chip for its
                         local shape, bytes and placement. Over ``collapse_above`` nodes only the
                         first two layers and what lies outside the layers start open
``memory_communication.png``  memory and communication per rank and per layer, as bar charts

and returns the list of paths written.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections import defaultdict

from torch.fx import GraphModule

from . import meta
from .fx_graph import op_name
from .meta import InputKind
from .placement import local_shape
from .png import Canvas, Series, stacked_bars, unit_for
from .report import (
    BLOCKS,
    OUTSIDE_LAYERS,
    NodeGroup,
    _bytes,
    _phase,
    local_pieces,
    memory_walk,
    node_groups,
    sorted_layers,
)

__all__ = ["dump_program", "memory_communication_png", "PNG_NAME"]

PNG_NAME = "memory_communication.png"


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


def _kind(node, group: NodeGroup) -> str:
    record = meta.collective(node)
    if record is not None and record.communicates:
        return "collective"
    if meta.moe_step(node) is not None:
        return "moe"
    if node.op == "placeholder":
        return "input"
    return "gradient" if group.gradient else "op"


def _label(node) -> str:
    """A chip's short text: the collective and its axis, a parameter's last names, or the op."""
    record = meta.collective(node)
    if record is not None:
        return f"{record.kind.value}[{record.axis}]"
    if node.op == "placeholder":
        return ".".join(meta.display_name(node).split(".")[-2:])
    return op_name(node.target).removeprefix("shardgraph.").removesuffix(".default")


def _tooltip(node, pieces, allocated: int) -> str:
    shapes = ", ".join("x".join(map(str, p[0])) or "scalar" for p in pieces if p is not None)
    lines = [f"{meta.display_name(node)} ({op_name(node.target) if node.op == 'call_function' else node.op})"]
    if shapes:
        lines.append(f"local {shapes}; allocates {_bytes(allocated)} per rank")
    sharding = meta.sharding(node)
    if sharding is not None:
        lines.append(repr(sharding))
    record = meta.collective(node)
    if record is not None:
        lines.append(f"{record.kind.value} over {record.axis}, {_bytes(record.bytes)} sent per rank: "
                     f"{record.purpose.value}"
                     + (f" ({record.detail})" if record.detail else ""))
    return "\n".join(lines)


_STYLE = """
body{font:13px sans-serif;margin:14px;background:#fafafa;color:#222}
h2{margin:0 0 4px;font-size:18px} .muted{color:#666}
.top{display:flex;gap:20px;align-items:flex-start;flex-wrap:wrap}
.top img{border:1px solid #ccc;background:#fff;max-width:720px;width:48%}
.legend span.n{margin-right:2px}
details.layer{background:#fff;border:1px solid #bbb;border-radius:6px;margin:8px 0;padding:4px 8px}
details.layer>summary{cursor:pointer;padding:2px 0}
details.layer>summary b{font-size:14px}
.blocks{display:flex;flex-wrap:wrap;gap:6px;margin:4px 0 2px}
.block{border:1px solid #c8c8c8;border-radius:5px;padding:3px 5px;flex:1 1 200px;max-width:520px}
.block h4{margin:0 0 2px;font-size:12px} .block h4 small{font-weight:normal;color:#555}
.phase{font-size:10px;color:#777;margin:2px 0 0}
.n{display:inline-block;font:10px monospace;padding:0 3px;margin:1px;border-radius:3px;background:#e2e2e2;
  white-space:nowrap}
.n.collective{background:#d62728;color:#fff} .n.moe{background:#1f77b4;color:#fff}
.n.input{background:#7f7f7f;color:#fff} .n.gradient{background:#c7e9c0}
.b-norm{background:#f6f6f6} .b-attention{background:#eaf2fc} .b-router{background:#fff3df}
.b-experts{background:#e8f4fb} .b-dense{background:#f4effa} .b-embedding,.b-head{background:#fbeef1}
.b-gradient-sync{background:#fdeaea} .b-optimizer{background:#eaf8f6} .b-inputs{background:#f0f0f0}
"""

_LEGEND = ("<p class='legend'><span class='n collective'>collective</span> <span class='n moe'>expert step</span> "
           "<span class='n gradient'>gradient</span> <span class='n input'>input</span> <span class='n'>op</span> "
           "&nbsp; hover a chip for its local shape, bytes and placement; blocks run forward, then backward</p>")


def _section_summary(key: str, row: dict, nodes: int) -> str:
    return (f"<b>{html.escape(key)}</b> <span class='muted'>{nodes} nodes &middot; "
            f"parameters {_bytes(row.get('parameter_bytes', 0))} &middot; "
            f"gradients {_bytes(row.get('gradient_bytes', 0))} &middot; "
            f"activations {_bytes(row.get('activation_bytes', 0))} &middot; "
            f"sent {_bytes(row.get('communication_bytes', 0))} in {row.get('collectives', 0)} collectives</span>")


def _block_html(block: str, members: list, groups, pieces, allocated) -> str:
    sent = sum(meta.collective(n).bytes for n in members
               if meta.collective(n) is not None and meta.collective(n).communicates)
    count = sum(1 for n in members if _kind(n, groups[n]) == "collective")
    parts = [f"<div class='block b-{block.replace(' ', '-')}'><h4>{html.escape(block)} <small>{len(members)} nodes"
             + (f" &middot; {count} collectives, {_bytes(sent)} sent" if count else "")
             + f" &middot; {_bytes(sum(allocated[n] for n in members))} allocated</small></h4>"]
    for phase_name in ("input", "forward", "backward"):
        chips = [n for n in members if _phase(n) == phase_name]
        if not chips:
            continue
        parts.append(f"<div class='phase'>{phase_name}</div>")
        parts += [f"<span class='n {_kind(n, groups[n])}' "
                  f"title='{html.escape(_tooltip(n, pieces[n], allocated[n]), quote=True)}'>"
                  f"{html.escape(_label(n))}</span>" for n in chips]
    parts.append("</div>")
    return "".join(parts)


def _graph_html(program, report: dict, collapse_above: int) -> str:
    """The lowered program as one box per layer, one box per block inside it, one chip per node."""
    gm = program.graph_module
    groups = node_groups(gm)
    pieces = local_pieces(gm, program.mesh)
    allocated = memory_walk(gm, program.mesh, groups, pieces).node_bytes
    sections: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for node, group in groups.items():
        record = meta.graph_input(node)
        if record is not None and record.kind is InputKind.COMMUNICATOR:
            continue
        sections[group.layer or OUTSIDE_LAYERS][group.block].append(node)
    order = sorted_layers(k for k in sections if k != OUTSIDE_LAYERS) + [OUTSIDE_LAYERS]
    collapsed = len(groups) > collapse_above
    parts = []
    for position, key in enumerate(order):
        blocks = sections.get(key)
        if not blocks:
            continue
        row = report["totals"].get("outside_layers", {}) if key == OUTSIDE_LAYERS else report["layers"].get(key, {})
        opened = " open" if not collapsed or position < 2 or key == OUTSIDE_LAYERS else ""
        summary = _section_summary(key, row, sum(len(v) for v in blocks.values()))
        parts.append(f"<details class='layer'{opened}><summary>{summary}</summary><div class='blocks'>")
        parts += [_block_html(block, blocks[block], groups, pieces, allocated) for block in BLOCKS if block in blocks]
        parts.append("</div></details>")
    totals = report["totals"]
    headline = (f"per rank: parameters {_bytes(totals['parameter_bytes_per_rank'])}, gradients "
                f"{_bytes(totals['gradient_bytes_per_rank'])}, peak activations "
                f"{_bytes(totals['peak_activation_bytes_per_rank'])}, sent per step "
                f"{_bytes(totals['communication_bytes_per_rank'])}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>shardgraph: lowered program</title>"
            f"<style>{_STYLE}</style></head><body><div class='top'><div><h2>lowered program, mesh "
            f"{html.escape(str(program.mesh))}</h2><p>{html.escape(headline)}</p>{_LEGEND}</div>"
            f"<img src='{PNG_NAME}' alt='memory and communication per rank and per layer'></div>"
            + "\n".join(parts) + "</body></html>\n")


_COLOURS = {"parameters": (31, 119, 180), "gradients": (44, 160, 44), "optimizer state": (148, 103, 189),
            "activations": (255, 127, 14), "redistribute": (127, 127, 127), "moe": (23, 190, 207),
            "gradient sync": (214, 39, 40)}
_AXIS_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def memory_communication_png(report: dict, mesh) -> bytes:
    """Bar charts: memory and communication of every rank, then of every layer (per rank)."""
    totals = report["totals"]
    ranks = [str(r) for r in mesh.ranks]
    layer_rows = list(report["layers"].items()) + [("OUT", totals.get("outside_layers", {}))]
    layer_names = [k.replace("layers.", "") for k, _ in layer_rows]
    memory = {"parameters": totals["parameter_bytes_per_rank"], "gradients": totals["gradient_bytes_per_rank"],
              "optimizer state": totals.get("optimizer_state_bytes_per_rank", 0),
              "activations": totals["peak_activation_bytes_per_rank"]}
    by_axis = totals["communication_bytes_per_rank_by_axis"]
    canvas = Canvas(1400, 860)
    # Every rank's pieces have the same shape (placements refuse uneven splits), so the rank
    # charts show equal bars; they say so rather than leave it to be guessed.
    same = "EVERY RANK THE SAME: SHARDS ARE EVEN"
    stacked_bars(canvas, 20, 16, 660, 400, "MEMORY PER RANK", ranks,
                 [Series(name, _COLOURS[name], [value] * len(ranks)) for name, value in memory.items() if value],
                 unit_for(sum(memory.values())), note=same)
    stacked_bars(canvas, 720, 16, 660, 400, "SENT PER RANK PER STEP", ranks,
                 [Series(axis, _AXIS_COLOURS[i % len(_AXIS_COLOURS)], [value] * len(ranks))
                  for i, (axis, value) in enumerate(sorted(by_axis.items()))],
                 unit_for(sum(by_axis.values())), note=same)
    layer_memory = [Series(name, _COLOURS[name], [row.get(key, 0) for _, row in layer_rows])
                    for name, key in (("parameters", "parameter_bytes"), ("gradients", "gradient_bytes"),
                                      ("optimizer state", "optimizer_state_bytes"), ("activations", "activation_bytes"))
                    if any(row.get(key) for _, row in layer_rows)]
    families = sorted({f for _, row in layer_rows for f in row.get("communication_bytes_by_family", {})})
    layer_communication = [Series(f, _COLOURS.get(f, (127, 127, 127)),
                                  [row.get("communication_bytes_by_family", {}).get(f, 0.0) for _, row in layer_rows])
                           for f in families]
    note = "PER RANK; LAST BAR: OUTSIDE THE LAYERS"
    stacked_bars(canvas, 20, 446, 660, 400, "MEMORY PER LAYER", layer_names, layer_memory,
                 unit_for(max((sum(s.values[i] for s in layer_memory) for i in range(len(layer_rows))), default=0)),
                 note=note)
    stacked_bars(canvas, 720, 446, 660, 400, "SENT PER LAYER PER STEP", layer_names, layer_communication,
                 unit_for(max((row.get("communication_bytes", 0) for _, row in layer_rows), default=0)), note=note)
    return canvas.png()


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
    report = program.report(format="dict")
    write("report.json", json.dumps(report, indent=1))
    write("graph.html", _graph_html(program, report, collapse_above))
    path = os.path.join(directory, PNG_NAME)
    with open(path, "wb") as handle:
        handle.write(memory_communication_png(report, program.mesh))
    written.append(path)
    return written
