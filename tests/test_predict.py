"""The predicted step time: work of single ops against hand-computed FLOPs and bytes, the critical
path over one compute and one communication stream, and the report's totals."""

import pytest
import torch
from torch.fx import Graph, GraphModule

import shardgraph as sg
from passes.cost import HARDWARE, LinkModel
from shardgraph import meta
from shardgraph.mesh import MeshSpec
from shardgraph.meta import Collective, CollectiveKind, Purpose
from shardgraph.predict import node_work, predict_step
from shardgraph.runtime import c10d

BF16 = torch.bfloat16
MESH = MeshSpec(2, tp=2)
# 10 GB/s and no latency: a collective's time is its bytes / 1e10.
LINK = LinkModel(axis_bandwidth={"tp": 10e9}, latency=0.0)


def overlap_graph(sent_bytes: float, independent: bool = True):
    """``all_reduce(x)`` issued, then ``y @ z`` (independent of it unless ``independent`` is
    False, when it reads the reduced value), then the wait; pieces of 4096 x 4096 bf16."""
    graph = Graph()
    x, y, z = graph.placeholder("x"), graph.placeholder("y"), graph.placeholder("z")
    issue = graph.call_function(c10d.ALL_REDUCE, (x, "sum", c10d.group_name(MESH, "tp")))
    meta.set_collective(issue, Collective(CollectiveKind.ALL_REDUCE, "tp", 2, sent_bytes, Purpose.GRADIENT_SYNC))
    if independent:
        product = graph.call_function(torch.ops.aten.mm.default, (y, z))
        wait = graph.call_function(c10d.WAIT, (issue,))
    else:
        wait = graph.call_function(c10d.WAIT, (issue,))
        product = graph.call_function(torch.ops.aten.mm.default, (wait, y))
    total = graph.call_function(torch.ops.aten.add.Tensor, (wait, product))
    graph.output(total)
    gm = GraphModule(torch.nn.Module(), graph)
    piece = [((4096, 4096), BF16)]
    pieces = {node: piece for node in gm.graph.nodes if node.op != "output"}
    return gm, pieces


def test_a_matrix_product_counts_two_flops_per_multiply_add_and_its_operands_bytes():
    gm, pieces = overlap_graph(1e6)
    product = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default)
    work = node_work(product, pieces)
    assert work.flops == 2 * 4096**3 and work.nbytes == 3 * 4096 * 4096 * 2 and work.matmul
    add = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor)
    assert node_work(add, pieces).nbytes == 3 * 4096 * 4096 * 2 and not node_work(add, pieces).matmul


def _single_op(target, args, shapes):
    graph = Graph()
    inputs = [graph.placeholder(f"a{i}") for i in range(len(shapes))]
    node = graph.call_function(target, tuple(inputs) + tuple(args))
    graph.output(node)
    pieces = {n: [(shape, BF16)] for n, shape in zip(inputs, shapes)}
    pieces[node] = [None]
    return node_work(node, pieces)


def test_grouped_gemm_and_attention_flops_match_hand_computed_values():
    import kernels  # noqa: F401 - registers the grouped GEMM ops

    rows, k, n, experts = 1000, 2048, 1536, 8
    ops = torch.ops.shardgraph
    # 1000 rows, each times its expert's [k, n] matrix, in either weight layout.
    assert _single_op(ops.grouped_mm.default, ("enk",), [(rows, k), (experts, n, k), (experts,)]).flops == 2 * rows * k * n
    assert _single_op(ops.grouped_mm_dgrad.default, ("enk",),
                      [(rows, n), (experts, n, k), (experts,)]).flops == 2 * rows * k * n
    assert _single_op(ops.grouped_mm_wgrad.default, (experts, "enk"),
                      [(rows, k), (rows, n), (experts,)]).flops == 2 * rows * k * n
    # Causal attention, batch 2, 32 heads (4 KV heads), 4096 tokens, head_dim 128: scores and
    # weighted sum, 2 * 2 * 32 * 4096^2 * (128 + 128) FLOPs, halved by the mask.
    q, kv = (2, 32, 4096, 128), (2, 4, 4096, 128)
    forward = 2 * 2 * 32 * 4096 * 4096 * 256 * 0.5
    assert _single_op(ops.attention.default, (True, 0.1, True), [q, kv, kv]).flops == forward
    # The backward runs the forward again (log-sum-exp) and then 2.5 forwards' worth.
    assert _single_op(ops.attention_backward.default, (True, 0.1, True), [q, q, kv, kv]).flops == 3.5 * forward


def test_independent_compute_between_a_collective_and_its_wait_hides_it():
    compute = HARDWARE["h100"].compute
    mm_seconds = compute.seconds(2 * 4096**3, 3 * 4096 * 4096 * 2, BF16, matmul=True)
    add_seconds = compute.seconds(4096 * 4096, 3 * 4096 * 4096 * 2)
    sent = 0.5 * mm_seconds * 10e9  # the all-reduce takes half the product's time
    gm, pieces = overlap_graph(sent)
    hidden = predict_step(gm, MESH, "h100", link=LINK, pieces=pieces)
    assert hidden.communication_seconds == pytest.approx(sent / 10e9)
    assert hidden.step_seconds == pytest.approx(mm_seconds + add_seconds)  # all of it under the product
    assert hidden.communication_hidden_fraction == pytest.approx(1.0)
    assert hidden.step_seconds_without_overlap == pytest.approx(mm_seconds + add_seconds + sent / 10e9)
    # The product reads the reduced value: nothing to overlap.
    gm, pieces = overlap_graph(sent, independent=False)
    serial = predict_step(gm, MESH, "h100", link=LINK, pieces=pieces)
    assert serial.step_seconds == pytest.approx(serial.step_seconds_without_overlap)
    assert serial.communication_hidden_fraction == pytest.approx(0.0)


def test_more_bytes_take_longer_and_overlap_never_slows_the_step():
    steps = []
    for sent in (1e6, 1e8, 1e10):
        gm, pieces = overlap_graph(sent)
        prediction = predict_step(gm, MESH, "h100", link=LINK, pieces=pieces)
        assert prediction.step_seconds <= prediction.step_seconds_without_overlap
        steps.append(prediction.step_seconds)
    assert steps[0] <= steps[1] < steps[2]


def test_fused_elementwise_chains_move_only_what_crosses_them():
    graph = Graph()
    x = graph.placeholder("x")
    a = graph.call_function(torch.ops.aten.mul.Tensor, (x, x))
    b = graph.call_function(torch.ops.aten.add.Tensor, (a, x))
    graph.output(b)
    gm = GraphModule(torch.nn.Module(), graph)
    piece = [((1024, 1024), torch.float32)]
    pieces = {n: piece for n in gm.graph.nodes if n.op != "output"}
    one = 1024 * 1024 * 4
    eager = predict_step(gm, MESH, "h100", link=LINK, pieces=pieces)
    fused = predict_step(gm, MESH, "h100", link=LINK, pieces=pieces, fused=True)
    memory = HARDWARE["h100"].compute.memory_bandwidth * HARDWARE["h100"].compute.memory_efficiency
    # Op by op: mul reads x (once, though it names it twice) and writes a, add reads a and x and
    # writes b. Fused: a stays in registers; each op reads x, b is written once.
    assert eager.compute_seconds == pytest.approx(5 * one / memory)
    assert fused.compute_seconds == pytest.approx(3 * one / memory)


@pytest.fixture(scope="module")
def tiny_report():
    from examples.moe_model import shardgraph_entry

    model, inputs, loss_fn = shardgraph_entry("tiny", device="meta", batch_size=4, seq_len=16)
    program = sg.compile(model, MeshSpec(4, tp=2, ep=2), inputs, loss_fn, optimizer=sg.optim.AdamW())
    return program


def test_the_report_prints_the_predicted_step_with_and_without_overlap(tiny_report):
    report = tiny_report.report(format="dict", hardware="h200")
    totals = report["totals"]
    assert 0 < totals["predicted_step_seconds"] <= totals["predicted_step_seconds_without_overlap"]
    assert 0.0 <= totals["communication_hidden_fraction"] <= 1.0
    assert totals["prediction"]["hardware"] == "h200" and totals["prediction"]["collectives"] > 0
    assert set(totals["prediction"]["links"].values()) == {"nvlink4"}
    # Compute plus every collective waited at once is the step without overlap.
    found = totals["prediction"]
    assert found["step_seconds_without_overlap"] == pytest.approx(found["compute_seconds"] + found["communication_seconds"])
    assert totals["predicted_step_seconds_fused"] < totals["predicted_step_seconds"]
    text = tiny_report.report(format="summary", hardware="cpu")
    assert "predicted step on cpu (a model, not a measurement)" in text and "hidden" in text
    # Slower links (gloo) give a longer step than NVLink on the same program.
    slow = tiny_report.report(format="dict", hardware="h200", link=LinkModel(axis_bandwidth={}, latency=1e-3))
    assert slow["totals"]["predicted_step_seconds"] > totals["predicted_step_seconds"]
