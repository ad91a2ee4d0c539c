"""Placement reports: where every value lives, what every collective moves, what each rank holds.

``build_report(program)`` returns a plain dict with a stable schema (``SCHEMA_VERSION``; see
docs/report.md):

``mesh``          sizes of every axis
``values``        one row per value of the placed joint graph: name, op, layer, phase
                  (forward / backward), global shape, dtype, view, placement per axis, local
                  shape, bytes per rank, reason
``collectives``   one row per collective of the lowered program: kind, axis, group size, bytes
                  sent per rank per step, the value it moves, what for (an op's input, the MoE
                  dispatch, or gradient synchronisation)
``totals``        bytes per rank per step by axis; parameter, gradient and peak activation memory
                  per rank (activation peak from a liveness walk of the lowered program in its
                  execution order, counting local sizes)
``layers``        the same totals per layer, for big models

``format_report`` renders the text tables; ``ShardedProgram.report()`` uses both.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from typing import Any

import torch
from torch.fx import Node

from . import meta
from .fx_graph import op_name
from .meta import View
from .placement import local_shape

__all__ = ["SCHEMA_VERSION", "build_report", "format_report", "format_summary"]

SCHEMA_VERSION = 1


def _op(node: Node) -> str:
    if node.op == "placeholder":
        record = meta.graph_input(node)
        return record.kind.value if record is not None else "placeholder"
    return op_name(node.target).removesuffix(".default")


def _phase(node: Node) -> str:
    if node.op == "placeholder":
        return "input"
    found = meta.phase(node)
    return found.value if found is not None else "forward"


def _placements(sharding, axes) -> dict[str, str]:
    if sharding is None:
        return {}
    return {axis: repr(sharding.placement(axis)) for axis in axes}


def _local(found: Any, sharding, mesh, name: str):
    if not isinstance(found, torch.Tensor) or sharding is None:
        return None, 0
    shape = tuple(int(s) for s in local_shape(tuple(found.shape), sharding, mesh, name=name)) if found.dim() else ()
    return list(shape), meta.local_bytes(found, sharding, mesh, name)


def _value_rows(program) -> list[dict]:
    mesh = program.mesh
    nodes = [n for n in program.placed.graph_module.graph.nodes if n.op != "output"]
    rows = []
    for node in nodes:
        record = meta.placed(node)
        view = (record.view if record is not None else None) or View.DENSE
        found = meta.value(node) if meta.has_value(node) else None
        values = found if isinstance(found, (tuple, list)) else (found,)
        shardings = record.sharding if isinstance(record.sharding, tuple) else (record.sharding,)
        for k, (item, item_sharding) in enumerate(zip(values, shardings)):
            if not isinstance(item, torch.Tensor):
                continue
            name = meta.display_name(node) + (f"[{k}]" if len(values) > 1 else "")
            local, nbytes = _local(item, item_sharding, mesh, name)
            rows.append({
                "name": name,
                "op": _op(node),
                "layer": meta.layer(node),
                "phase": _phase(node),
                "global_shape": list(item.shape),
                "dtype": str(item.dtype).removeprefix("torch."),
                "view": view.value,
                "placement": _placements(item_sharding, view.axes),
                "local_shape": local,
                "bytes_per_rank": nbytes,
                "reason": record.reason,
            })
    return rows


def _collective_rows(program) -> list[dict]:
    rows = []
    for node in program.graph_module.graph.nodes:
        record = meta.collective(node)
        if record is None or not record.communicates:
            continue
        rows.append({
            "name": node.name,
            "kind": record.kind.value,
            "axis": record.axis if isinstance(record.axis, str) else "*".join(record.axis),
            "group_size": record.group_size,
            "bytes_per_rank": float(record.bytes),
            "of": record.of,
            # a gradient bucket reduces several values at once: their names
            "members": list(record.members or (record.of,)),
            "purpose": record.purpose.value + (f": {record.detail}" if record.detail else ""),
            "family": record.purpose.family,
            "layer": meta.layer(node),
            "data_dependent": record.data_dependent,
        })
    return rows


def _peak_activation_bytes(program) -> int:
    """Peak bytes of live non-parameter values on a rank, walking the lowered program in order."""
    mesh = program.mesh
    graph = program.placed.graph_module.graph
    nodes = [n for n in graph.nodes]
    last_use: dict[Node, int] = {}
    for index, node in enumerate(nodes):
        for source in node.all_input_nodes:
            last_use[source] = index
    live = 0
    peak = 0
    sizes: dict[Node, int] = {}
    for index, node in enumerate(nodes):
        if node.op == "call_function":
            total = meta.node_local_bytes(node, mesh)
            sizes[node] = total
            live += total
            peak = max(peak, live)
        for source in node.all_input_nodes:
            if last_use.get(source) == index and source in sizes:
                live -= sizes.pop(source)
    return peak


def build_report(program, name_pattern: str | None = None, op: str | None = None, layer: str | None = None) -> dict:
    mesh = program.mesh
    values = _value_rows(program)
    collectives = _collective_rows(program)
    parameter_bytes = sum(r["bytes_per_rank"] for r in values if r["op"] == "parameter")
    by_axis: dict[str, float] = defaultdict(float)
    by_family: dict[str, float] = defaultdict(float)
    for row in collectives:
        by_axis[row["axis"]] += row["bytes_per_rank"]
        by_family[row["family"]] += row["bytes_per_rank"]
    layers: dict[str, dict] = defaultdict(lambda: {"parameter_bytes": 0, "communication_bytes": 0.0, "collectives": 0})
    for row in values:
        if row["op"] == "parameter" and row["layer"]:
            layers[row["layer"]]["parameter_bytes"] += row["bytes_per_rank"]
    for row in collectives:
        if row["layer"]:
            layers[row["layer"]]["communication_bytes"] += row["bytes_per_rank"]
            layers[row["layer"]]["collectives"] += 1

    def keep(row):
        return ((name_pattern is None or fnmatch.fnmatchcase(row["name"], name_pattern))
                and (op is None or row["op"] == op) and (layer is None or row["layer"] == layer))

    return {
        "schema_version": SCHEMA_VERSION,
        "mesh": {"world": mesh.world, "pp": mesh.pp, "dp": mesh.dp, "tp": mesh.tp, "edp": mesh.edp, "ep": mesh.ep,
                 "etp": mesh.etp},
        "values": [r for r in values if keep(r)],
        "collectives": collectives,
        "totals": {
            "communication_bytes_per_rank_by_axis": dict(by_axis),
            "communication_bytes_per_rank_by_family": dict(by_family),
            "communication_bytes_per_rank": float(sum(by_axis.values())),
            "parameter_bytes_per_rank": int(parameter_bytes),
            "gradient_bytes_per_rank": int(parameter_bytes),
            "peak_activation_bytes_per_rank": int(_peak_activation_bytes(program)),
            "partial_values": sum(1 for r in values if any("Partial" in p for p in r["placement"].values())),
            "values": len(values),
        },
        "layers": {k: layers[k] for k in sorted(layers, key=lambda s: int(s.split(".")[1]))},
    }


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _table(headers, rows) -> list[str]:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return lines


def format_summary(report: dict) -> str:
    mesh = report["mesh"]
    totals = report["totals"]
    lines = [
        f"mesh: world={mesh['world']} dp={mesh['dp']} tp={mesh['tp']} | edp={mesh['edp']} ep={mesh['ep']} etp={mesh['etp']}",
        f"values placed: {totals['values']} ({totals['partial_values']} partial before reduction)",
        f"per rank: parameters {_bytes(totals['parameter_bytes_per_rank'])}, gradients "
        f"{_bytes(totals['gradient_bytes_per_rank'])}, peak activations {_bytes(totals['peak_activation_bytes_per_rank'])}",
        f"communication per rank per step: {_bytes(totals['communication_bytes_per_rank'])}",
    ]
    axis_rows = [(axis, _bytes(b)) for axis, b in sorted(totals["communication_bytes_per_rank_by_axis"].items())]
    family_rows = [(family, _bytes(b)) for family, b in sorted(totals["communication_bytes_per_rank_by_family"].items())]
    lines += [""] + _table(["axis", "bytes/rank/step"], axis_rows)
    lines += [""] + _table(["family", "bytes/rank/step"], family_rows)
    return "\n".join(lines)


def format_report(report: dict, max_values: int | None = 60) -> str:
    lines = [format_summary(report), ""]
    collective_rows = [
        (c["name"], c["kind"], c["axis"], c["group_size"], _bytes(c["bytes_per_rank"]) + ("*" if c["data_dependent"] else ""),
         c["family"], (c["purpose"] or "")[:40])
        for c in report["collectives"]
    ]
    lines += ["collectives (* = estimate for uniform routing; the simulator records real bytes)"]
    lines += _table(["node", "kind", "axis", "group", "bytes/rank", "family", "for"], collective_rows)
    values = report["values"] if max_values is None else report["values"][:max_values]
    value_rows = [
        (v["name"][:40], v["op"][:24], v["phase"], "x".join(map(str, v["global_shape"])) or "scalar",
         " ".join(f"{a}={p}" for a, p in v["placement"].items() if p != "Replicate()") or "replicated",
         "x".join(map(str, v["local_shape"] or [])) or "scalar", _bytes(v["bytes_per_rank"]))
        for v in values
    ]
    lines += ["", "values" + (f" (first {max_values} of {len(report['values'])})" if max_values and len(report["values"]) > max_values else "")]
    lines += _table(["value", "op", "phase", "global", "placement", "local", "bytes/rank"], value_rows)
    if report["layers"]:
        lines += ["", "per layer"]
        lines += _table(["layer", "parameters/rank", "communication/rank", "collectives"],
                        [(k, _bytes(v["parameter_bytes"]), _bytes(v["communication_bytes"]), v["collectives"])
                         for k, v in report["layers"].items()])
    return "\n".join(lines)
