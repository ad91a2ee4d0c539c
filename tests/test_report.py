"""Reports and dumps: numbers against hand-computed bytes, the JSON schema, the files written."""

import json
import os

import torch

from shardgraph.compiler import compile_traced
from shardgraph.mesh import MeshSpec

from .passes.graphs import TracedJoint, joint_graph


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
    # all-reduce per axis of 2 * 4 * (2 - 1) / 2 = 4 bytes. The gradient of w is partial over dp
    # only: an all-reduce of its 64-byte piece sends 2 * 64 * 1 / 2 = 64 bytes.
    by_axis = report["totals"]["communication_bytes_per_rank_by_axis"]
    assert by_axis == {"dp": 4 + 64, "tp": 4}
    grad_sync = [c for c in report["collectives"] if c["family"] == "gradient sync"]
    assert [(c["kind"], c["axis"], c["bytes_per_rank"]) for c in grad_sync if c["bytes_per_rank"] == 64] == [("all_reduce", "dp", 64.0)]


def test_report_json_schema_is_stable():
    params, inputs, loss_of = column_parallel_case()
    program = compile_traced(TracedJoint(joint_graph(loss_of, params, inputs), params, inputs), MeshSpec(2, tp=2), {"w": "colwise"})
    report = json.loads(json.dumps(program.report(format="dict")))
    assert set(report) == {"schema_version", "mesh", "values", "collectives", "totals", "layers"}
    assert report["schema_version"] == 1
    assert set(report["values"][0]) == {"name", "op", "layer", "phase", "global_shape", "dtype", "view", "placement",
                                        "local_shape", "bytes_per_rank", "reason"}
    assert set(report["collectives"][0]) == {"name", "kind", "axis", "group_size", "bytes_per_rank", "of", "members",
                                             "purpose", "family", "layer", "data_dependent"}
    assert {"communication_bytes_per_rank_by_axis", "parameter_bytes_per_rank", "gradient_bytes_per_rank",
            "peak_activation_bytes_per_rank"} <= set(report["totals"])
    text = program.report()
    assert "collectives" in text and "bytes/rank" in text


def test_dump_writes_code_with_placements_and_a_picture(tmp_path):
    params, inputs, loss_of = column_parallel_case()
    program = compile_traced(TracedJoint(joint_graph(loss_of, params, inputs), params, inputs), MeshSpec(4, tp=2), {"w": "colwise"})
    written = program.dump(str(tmp_path))
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(["traced.py", "placed.py", "lowered.py", "report.json", "graph.html"]
                           + [f"lowered_rank{r}.txt" for r in range(4)])
    placed = (tmp_path / "placed.py").read_text()
    assert "(w): Sharding(tp=Shard(0))  <- seed: parameter 'w' matched plan pattern 'w' -> colwise" in placed
    lowered = (tmp_path / "lowered.py").read_text()
    assert "# COLLECTIVE all_reduce over dp" in lowered
    assert "#d62728" in (tmp_path / "graph.html").read_text()
    assert "rank 3: pp=0 dp=1 tp=1" in (tmp_path / "lowered_rank3.txt").read_text()


def test_predicted_collective_bytes_match_what_the_simulator_moved():
    """Every dense collective's predicted bytes equal the simulator's record, rank by rank."""
    import shardgraph as sg
    from examples.moe_model import shardgraph_entry

    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    program = sg.compile(model, MeshSpec(8, tp=2, ep=4), inputs, loss_fn)
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
