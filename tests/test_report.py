"""Reports and dumps: numbers against hand-computed bytes, the JSON schema, the files written,
where each node belongs, the activation peak's growth with tokens, graph.html in a browser."""

import json
import operator
import os
import shutil
import struct
import subprocess
import tempfile
import zlib

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import shardgraph as sg
from shardgraph import meta
from shardgraph.compiler import compile_traced
from shardgraph.mesh import MeshSpec
from shardgraph.meta import GraphInput, InputKind
from shardgraph.png import Canvas
from shardgraph.report import OUTSIDE_LAYERS, memory_walk, node_groups

from .passes.graphs import TracedJoint, joint_graph


@pytest.fixture(scope="module")
def tiny_program():
    """The tiny MoE model at world=8 tp=2 ep=4 (dp=4, edp=2), with its weights and batch."""
    from examples.moe_model import shardgraph_entry

    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    return sg.compile(model, MeshSpec(8, tp=2, ep=4), inputs, loss_fn), model, inputs


def column_parallel_case():
    """loss = sum((x @ w.T) ** 2) with w colwise over tp and x's rows over dp."""
    generator = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(8, 4, generator=generator)}
    inputs = {"x": torch.randn(6, 4, generator=generator)}

    def loss_of(p, batch):
        return (batch["x"] @ p["w"].t()).pow(2).sum()

    return params, inputs, loss_of


def test_report_bytes_match_hand_computed_values():
    params, inputs, loss_of = column_parallel_case()
    mesh = MeshSpec(4, tp=2)  # dp = 2
    program = compile_traced(TracedJoint(joint_graph(loss_of, params, inputs), params, inputs), mesh, {"w": "colwise"})
    report = program.report(format="dict")
    rows = {r["name"]: r for r in report["values"]}
    # w [8, 4] float32 split over tp=2: 4 x 4 x 4 bytes = 64 per rank; x [6, 4] over dp=2: 3 x 4 x 4 = 48.
    assert rows["w"]["local_shape"] == [4, 4] and rows["w"]["bytes_per_rank"] == 64
    assert rows["x"]["local_shape"] == [3, 4] and rows["x"]["bytes_per_rank"] == 48
    assert report["totals"]["parameter_bytes_per_rank"] == 64
    # The loss is a partial sum over dp and tp (a scalar: 4 bytes); making it whole is one
    # all-reduce over the product group of 4 ranks: 2 * 4 * (4 - 1) / 4 = 6 bytes. The gradient
    # of w is partial over dp only: an all-reduce of its 64-byte piece sends 2 * 64 * 1 / 2 = 64.
    by_axis = report["totals"]["communication_bytes_per_rank_by_axis"]
    assert by_axis == {"dp": 64, "dp*tp": 6}
    grad_sync = [c for c in report["collectives"] if c["family"] == "gradient sync"]
    assert [(c["kind"], c["axis"], c["bytes_per_rank"]) for c in grad_sync if c["bytes_per_rank"] == 64] == [("all_reduce", "dp", 64.0)]


def test_report_json_schema_is_stable():
    params, inputs, loss_of = column_parallel_case()
    program = compile_traced(TracedJoint(joint_graph(loss_of, params, inputs), params, inputs), MeshSpec(2, tp=2), {"w": "colwise"})
    report = json.loads(json.dumps(program.report(format="dict")))
    assert set(report) == {"schema_version", "mesh", "values", "collectives", "totals", "layers"}
    assert report["schema_version"] == 1
    assert set(report["values"][0]) == {"name", "op", "layer", "block", "phase", "global_shape", "dtype", "view",
                                        "placement", "local_shape", "bytes_per_rank", "reason"}
    assert set(report["collectives"][0]) == {"name", "kind", "axis", "group_size", "bytes_per_rank", "of", "members",
                                             "purpose", "family", "layer", "block", "data_dependent"}
    assert {"communication_bytes_per_rank_by_axis", "parameter_bytes_per_rank", "gradient_bytes_per_rank",
            "peak_activation_bytes_per_rank", "peak_memory_bytes_per_rank", "optimizer_state_bytes_per_rank",
            "batch_bytes_per_rank", "outside_layers"} <= set(report["totals"])
    assert set(report["totals"]["outside_layers"]) == {
        "parameter_bytes", "gradient_bytes", "optimizer_state_bytes", "activation_bytes", "activation_bytes_at_peak",
        "communication_bytes", "communication_bytes_by_family", "collectives"}
    text = program.report()
    assert "collectives" in text and "bytes/rank" in text


def test_dump_writes_code_with_placements_and_a_picture(tmp_path):
    params, inputs, loss_of = column_parallel_case()
    program = compile_traced(TracedJoint(joint_graph(loss_of, params, inputs), params, inputs), MeshSpec(4, tp=2), {"w": "colwise"})
    written = program.dump(str(tmp_path))
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(["traced.py", "placed.py", "lowered.py", "report.json", "graph.html",
                            "memory_communication.png"] + [f"lowered_rank{r}.txt" for r in range(4)])
    placed = (tmp_path / "placed.py").read_text()
    assert "(w): Sharding(tp=Shard(0))  <- seed: parameter 'w' matched plan pattern 'w' -> colwise" in placed
    lowered = (tmp_path / "lowered.py").read_text()
    assert "# COLLECTIVE all_reduce over dp" in lowered
    assert "#d62728" in (tmp_path / "graph.html").read_text()
    assert "rank 3: pp=0 dp=1 tp=1" in (tmp_path / "lowered_rank3.txt").read_text()


def test_predicted_collective_bytes_match_what_the_simulator_moved(tiny_program):
    """Every dense collective's predicted bytes equal the simulator's record, rank by rank."""
    program, model, inputs = tiny_program
    result = program.run_simulated({n: p.detach() for n, p in model.named_parameters()}, inputs)
    # An interleaved gather is an all-gather on the wire followed by a local reorder.
    predicted = sorted(
        (c["kind"].removeprefix("interleaved_"), c["axis"], c["bytes_per_rank"])
        for c in program.report(format="dict")["collectives"] if c["kind"] != "all_to_all"
    )
    recorded = []
    for record in result.simulator.records:
        if record.kind in ("all_to_all",) or record.group != program.mesh.group_of(record.axis, 0):
            continue  # one group per collective, the one holding rank 0; MoE all-to-alls are data-dependent
        recorded.append((record.kind, record.axis if isinstance(record.axis, str) else "*".join(record.axis),
                         float(record.sent_by(0))))
    moe_counts = [c for c in program.report(format="dict")["collectives"] if c["kind"] == "all_to_all"]
    assert moe_counts  # the MoE dispatch is there, accounted separately
    assert len(predicted) == len(recorded)
    assert sorted(recorded) == sorted(predicted)


# ------------------------------------------------------------------ where nodes belong, per layer
def test_nodes_are_grouped_by_layer_and_block(tiny_program):
    program = tiny_program[0]
    groups = node_groups(program.graph_module)
    computed = [n for n in groups if n.op == "call_function"]
    outside = [n for n in computed if groups[n].layer is None]
    # The embedding, the final norm, the head, the loss and the buckets that mix layers: few.
    assert len(outside) < 0.2 * len(computed)
    for layer in ("layers.0", "layers.1"):
        blocks = {g.block for g in groups.values() if g.layer == layer}
        assert {"norm", "attention", "router", "experts", "gradient sync"} <= blocks
    by_name = {n.name: n for n in groups}
    # The backward of a layer's attention is in that layer's attention block, like its forward.
    for forward, backward in (("attention", "attention_backward_1"), ("attention_1", "attention_backward")):
        assert groups[by_name[forward]] == groups[by_name[backward]]
        assert groups[by_name[forward]].block == "attention"
        # So are its two outputs: the attention output and the log-sum-exp its backward reads.
        items = [user for user in by_name[forward].users if user.target is operator.getitem]
        assert len(items) == 2 and all(groups[item] == groups[by_name[forward]] for item in items), items
    assert groups[by_name["attention"]].layer == "layers.0" and groups[by_name["attention_1"]].layer == "layers.1"
    for node, group in groups.items():
        record = meta.collective(node)
        if meta.moe_step(node) is not None:
            assert group.block == "experts" and group.layer is not None, node.name
        if record is not None and record.purpose is meta.Purpose.GRADIENT_SYNC:
            assert group.block == "gradient sync" and group.gradient, node.name
    # A gradient sits with its parameter: the embedding's outside the layers.
    assert groups[by_name["embedding_dense_backward"]].layer is None


def test_per_layer_rows_carry_bytes_and_sum_to_the_totals(tiny_program):
    report = tiny_program[0].report(format="dict")
    totals, layers = report["totals"], report["layers"]
    assert list(layers) == ["layers.0", "layers.1"]
    for row in layers.values():
        for field in ("parameter_bytes", "gradient_bytes", "activation_bytes", "communication_bytes", "collectives"):
            assert row[field] > 0, field
        assert {"moe", "gradient sync"} <= set(row["communication_bytes_by_family"])
    # The two layers have the same shapes and parameter placements. Their activations may differ:
    # the first layer's whole forward feeds the second layer's router, so none of its ops reads
    # a partial value (exact routing), while the last layer's experts feed no router.
    assert layers["layers.0"]["parameter_bytes"] == layers["layers.1"]["parameter_bytes"]
    rows = [*layers.values(), totals["outside_layers"]]
    assert sum(r["parameter_bytes"] for r in rows) == totals["parameter_bytes_per_rank"]
    assert sum(r["gradient_bytes"] for r in rows) == totals["gradient_bytes_per_rank"]
    # A bucket's bytes are shared among its layers, so the communication adds up exactly too.
    assert sum(r["communication_bytes"] for r in rows) == pytest.approx(totals["communication_bytes_per_rank"])
    for family, sent in totals["communication_bytes_per_rank_by_family"].items():
        assert sum(r["communication_bytes_by_family"].get(family, 0) for r in rows) == pytest.approx(sent)
    assert sum(r["activation_bytes_at_peak"] for r in rows) == totals["peak_activation_bytes_per_rank"]
    held = totals["parameter_bytes_per_rank"] + totals["peak_activation_bytes_per_rank"]
    assert totals["peak_memory_bytes_per_rank"] > held
    text = tiny_program[0].report()
    assert "per layer" in text and OUTSIDE_LAYERS in text


# ------------------------------------------------------------------ activation peak
def _traced(function, *example):
    gm = make_fx(function)(*example)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            meta.set_graph_input(node, GraphInput(InputKind.INPUT, node.name))
    return gm


def test_activation_peak_by_hand_views_share_their_base():
    def step(x):
        a = x * 2  # 1 KiB
        v = a.view(16, 16)  # a view: no bytes of its own; it keeps a alive
        b = x.exp()  # 1 KiB
        c = b * 3  # 1 KiB: a, b and c live at once, the peak
        return v.sum() + c.sum()  # b died at c; a and c die at their sums

    gm = _traced(step, torch.randn(256))
    walk = memory_walk(gm, MeshSpec(1))
    by_name = {n.name: n for n in gm.graph.nodes}
    assert walk.peak_activation_bytes == 3 * 1024
    assert walk.node_bytes[by_name["view"]] == 0 and walk.node_bytes[by_name["mul"]] == 1024
    assert walk.output_bytes == 4  # the scalar the step returns lives to the end; not an activation
    assert walk.input_bytes == {"input": 1024}
    # Without the view's hold on its base, a would die at the view and the peak would be 2 KiB.
    assert walk.activation_bytes_at_peak == {None: 3 * 1024}


def _peak_at(batch_size: int, seq_len: int) -> dict:
    from examples.moe_model import shardgraph_entry

    model, inputs, loss_fn = shardgraph_entry("tiny", device="meta", batch_size=batch_size, seq_len=seq_len)
    return sg.compile(model, MeshSpec(8, tp=2, ep=4), inputs, loss_fn).report(format="dict")


def test_activation_peak_grows_with_tokens():
    """8x the tokens: about 8x the activations; the parameters stay."""
    small, large = _peak_at(4, 16), _peak_at(8, 64)  # 64 and 512 tokens
    assert small["totals"]["parameter_bytes_per_rank"] == large["totals"]["parameter_bytes_per_rank"]
    ratio = large["totals"]["peak_activation_bytes_per_rank"] / small["totals"]["peak_activation_bytes_per_rank"]
    assert 6 < ratio <= 8.5
    for layer in ("layers.0", "layers.1"):
        assert 6 < large["layers"][layer]["activation_bytes"] / small["layers"][layer]["activation_bytes"] <= 8.5


# ------------------------------------------------------------------ graph.html and the PNG
def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_png_writer_writes_the_pixels_it_drew():
    canvas = Canvas(4, 3)
    canvas.rect(1, 1, 2, 1, (255, 0, 0))
    data = canvas.png()
    assert _png_size(data) == (4, 3)
    length = struct.unpack(">I", data[33:37])[0]
    assert data[37:41] == b"IDAT"
    rows = zlib.decompress(data[41:41 + length])
    row = rows[1 * (1 + 3 * 4):2 * (1 + 3 * 4)]
    assert row[0] == 0 and row[1:4] == b"\xff\xff\xff" and row[4:7] == b"\xff\x00\x00" and row[7:10] == b"\xff\x00\x00"


def test_graph_html_groups_nodes_by_layer_and_block(tiny_program, tmp_path):
    program = tiny_program[0]
    program.dump(str(tmp_path))
    page = (tmp_path / "graph.html").read_text()
    for key in ("layers.0", "layers.1", OUTSIDE_LAYERS):
        assert f"<b>{key}</b>" in page
    for block in ("b-norm", "b-attention", "b-router", "b-experts", "b-gradient-sync", "b-head"):
        assert block in page
    assert "#d62728" in page and "memory_communication.png" in page
    assert _png_size((tmp_path / "memory_communication.png").read_bytes()) == (1400, 860)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (Debian package chromium)")
def test_graph_html_renders_in_a_headless_browser(tiny_program, tmp_path):
    program = tiny_program[0]
    program.dump(str(tmp_path))
    shot = tmp_path / "graph_html.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1600,1000",
                        (tmp_path / "graph.html").as_uri()], capture_output=True, timeout=120, check=True)
    print(f"screenshot of graph.html: {shot}")
    assert _png_size(shot.read_bytes()) == (1600, 1000)
    # A page with its boxes, chips and the embedded chart; a blank page compresses to a few KiB.
    assert shot.stat().st_size > 60_000


def test_the_summary_names_the_parameters_no_plan_entry_splits_largest_first():
    import shardgraph as sg
    from examples.moe_model import shardgraph_entry
    from shardgraph.report import format_summary

    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    plan = {"*self_attn.q_proj.weight": "colwise", "*self_attn.o_proj.weight": "rowwise"}
    program = sg.compile(model, MeshSpec(4, tp=2, ep=2), inputs, loss_fn, plan=plan)
    report = program.report(format="dict")
    unsplit = report["totals"]["unsplit_parameters"]
    whole = [v for v in report["values"] if v["op"] == "parameter"
             and all(p == "Replicate()" for p in v["placement"].values())]
    assert unsplit["count"] == len(whole) > 0
    assert unsplit["bytes_per_rank"] == sum(v["bytes_per_rank"] for v in whole)
    sizes = [nbytes for _, nbytes in unsplit["largest"]]
    assert sizes == sorted(sizes, reverse=True) and unsplit["largest"][0][1] == max(v["bytes_per_rank"] for v in whole)
    assert all(not name.endswith("q_proj.weight") for name, _ in unsplit["largest"])
    assert f"no plan entry splits them): {unsplit['count']} parameters" in format_summary(report)
    single = sg.compile(model, MeshSpec(1), inputs, loss_fn).report(format="dict")
    assert single["totals"]["unsplit_parameters"]["count"] == 0
    assert "no plan entry splits them" not in format_summary(single)
