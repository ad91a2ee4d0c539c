"""The metadata protocol between passes: typed records, read and written through one module."""

import os
import re
import subprocess
import sys

import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from shardgraph import meta
from shardgraph.meta import CollectiveKind, Phase, Purpose, View

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("shardgraph", "passes", "kernels")
# Reading or writing node.meta / gm.meta by key, anywhere but shardgraph/meta.py.
RAW_ACCESS = re.compile(r"\.meta\s*\[|\.meta\.(get|update|pop|setdefault|items|keys)\b|\.meta\s*=")


def _library_files():
    for package in LIBRARY:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.join(folder, name)


def test_no_library_file_but_the_metadata_module_touches_meta_by_key():
    offenders = []
    for path in _library_files():
        if path.endswith(os.path.join("shardgraph", "meta.py")):
            continue
        for number, line in enumerate(open(path, encoding="utf-8"), 1):
            if RAW_ACCESS.search(line):
                offenders.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_no_purpose_string_is_parsed():
    offenders = [path for path in _library_files() if '"(grad)"' in open(path, encoding="utf-8").read()]
    assert not offenders


def test_importing_passes_loads_no_driver_module():
    code = ("import sys, passes.pipeline; "
            "print(sorted(m for m in sys.modules if m in {'shardgraph.compiler', 'shardgraph.program', "
            "'shardgraph.report', 'shardgraph.dump', 'shardgraph.cli', 'shardgraph.check', 'shardgraph.checkpoint'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _program(mesh="world=4,tp=2,ep=2"):
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=4, seq_len=4)
    return sg.compile(model, sg.MeshSpec.parse(mesh), inputs, loss_fn)


def test_every_value_of_the_placed_graph_carries_a_typed_placement():
    program = _program()
    for node in program.placed.graph_module.graph.nodes:
        record = meta.placed(node)
        assert isinstance(record, meta.PlacedValue), node.name
        assert node.op == "output" or isinstance(record.view, View), node.name


def test_phases_follow_the_graph_structure_forward_feeds_the_loss():
    program = _program()
    graph = program.traced.graph_module.graph
    loss = [n for n in graph.nodes if n.op == "output"][0].args[0][0]
    phases = {meta.phase(n) for n in graph.nodes if n.op == "call_function"}
    assert phases == {Phase.FORWARD, Phase.BACKWARD}
    # The loss itself and everything it reads are forward; a gradient output is backward.
    assert meta.phase(loss) is Phase.FORWARD
    gradient = [n for n in graph.nodes if n.op == "output"][0].args[0][1]
    assert meta.phase(gradient) is Phase.BACKWARD
    forward_mm = [n for n in graph.nodes if n.target == torch.ops.aten.mm.default and meta.phase(n) is Phase.FORWARD]
    backward_mm = [n for n in graph.nodes if n.target == torch.ops.aten.mm.default and meta.phase(n) is Phase.BACKWARD]
    assert forward_mm and len(backward_mm) >= len(forward_mm)


def test_collectives_are_typed_records_with_an_enum_purpose():
    program = _program("world=8,tp=2,ep=4")
    records = [meta.collective(n) for n in program.graph_module.graph.nodes if meta.collective(n) is not None]
    assert records and all(isinstance(r.kind, CollectiveKind) and isinstance(r.purpose, Purpose) for r in records)
    purposes = {r.purpose for r in records}
    assert {Purpose.GRADIENT_SYNC, Purpose.MOE_DISPATCH, Purpose.MOE_RETURN, Purpose.MOE_COUNTS} <= purposes
    dispatch = [r for r in records if r.purpose is Purpose.MOE_DISPATCH]
    assert all(r.kind is CollectiveKind.ALL_TO_ALL and r.axis == "ep" and r.data_dependent for r in dispatch)


def test_the_communicator_is_found_by_its_record_not_its_position():
    program = _program()
    comm = meta.communicator_node(program.graph_module.graph)
    assert meta.graph_input(comm).kind is meta.InputKind.COMMUNICATOR


def test_view_of_a_sharding_names_its_axes_view():
    assert View.of_sharding(sg.Sharding.of(ep=sg.Shard(0))) is View.EXPERT
    assert View.of_sharding(sg.Sharding.of(tp=sg.Shard(0))) is View.DENSE
    assert View.of_sharding(sg.Sharding.replicate()) is None
    assert View.EXPERT.axes == ("edp", "ep", "etp")
