"""The predicted step time: work of single ops against hand-computed FLOPs and bytes, the critical
path over one compute and one communication stream, and the report's totals."""

from dataclasses import replace

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
# H100 rates without the host's launch time, so that a step is the device's time alone.
DEVICE_ONLY = replace(HARDWARE["h100"], compute=replace(HARDWARE["h100"].compute, launch_seconds=0.0))


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
    # The backward reads the forward's output and log-sum-exp and runs 2.5 forwards' worth (scores
    # again, then dV, dP, dQ, dK), no forward of its own; not causal, it is twice that.
    saved = [q, (2, 32, 4096)]  # out, logsumexp
    backward = ops.attention_backward.default
    assert _single_op(backward, (True, 0.1, True), [q, q, kv, kv, *saved]).flops == 2.5 * forward
    assert _single_op(backward, (False, 0.1, True), [q, q, kv, kv, *saved]).flops == 2 * 2.5 * forward


def test_independent_compute_between_a_collective_and_its_wait_hides_it():
    compute = HARDWARE["h100"].compute
    mm_seconds = compute.seconds(2 * 4096**3, 3 * 4096 * 4096 * 2, BF16, matmul=True)
    add_seconds = compute.seconds(4096 * 4096, 3 * 4096 * 4096 * 2)
    sent = 0.5 * mm_seconds * 10e9  # the all-reduce takes half the product's time
    gm, pieces = overlap_graph(sent)
    hidden = predict_step(gm, MESH, DEVICE_ONLY, link=LINK, pieces=pieces)
    assert hidden.communication_seconds == pytest.approx(sent / 10e9)
    assert hidden.step_seconds == pytest.approx(mm_seconds + add_seconds)  # all of it under the product
    assert hidden.communication_hidden_fraction == pytest.approx(1.0)
    assert hidden.step_seconds_without_overlap == pytest.approx(mm_seconds + add_seconds + sent / 10e9)
    # The product reads the reduced value: nothing to overlap.
    gm, pieces = overlap_graph(sent, independent=False)
    serial = predict_step(gm, MESH, DEVICE_ONLY, link=LINK, pieces=pieces)
    assert serial.step_seconds == pytest.approx(serial.step_seconds_without_overlap)
    assert serial.communication_hidden_fraction == pytest.approx(0.0)


def test_more_bytes_take_longer_and_overlap_never_slows_the_step():
    steps = []
    for sent in (1e6, 1e8, 1e10):
        gm, pieces = overlap_graph(sent)
        prediction = predict_step(gm, MESH, DEVICE_ONLY, link=LINK, pieces=pieces)
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
    eager = predict_step(gm, MESH, DEVICE_ONLY, link=LINK, pieces=pieces)
    fused = predict_step(gm, MESH, DEVICE_ONLY, link=LINK, pieces=pieces, fused=True)
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
    # Without overlap every collective is waited for at once: the step is at least compute plus
    # communication, and at most that plus the host's time to launch it all (a tiny model's
    # kernels are shorter than their launches).
    found = totals["prediction"]
    serial = found["compute_seconds"] + found["communication_seconds"]
    assert serial * (1 - 1e-9) <= found["step_seconds_without_overlap"] <= serial + found["launch_seconds"] + 1e-12
    assert totals["predicted_step_seconds_fused"] < totals["predicted_step_seconds"]
    text = tiny_report.report(format="summary", hardware="cpu")
    assert "predicted step on cpu (a model, not a measurement)" in text and "hidden" in text
    # Slower links (gloo) give a longer step than NVLink on the same program.
    slow = tiny_report.report(format="dict", hardware="h200", link=LinkModel(axis_bandwidth={}, latency=1e-3))
    assert slow["totals"]["predicted_step_seconds"] > totals["predicted_step_seconds"]


def test_a_runtime_function_is_priced_as_the_aten_ops_it_runs():
    from shardgraph.runtime import moe

    tokens, top_k, hidden = 64, 4, 256
    graph = Graph()
    returned, order, weights = graph.placeholder("returned"), graph.placeholder("order"), graph.placeholder("weights")
    combined = graph.call_function(moe.combine, (returned, order, weights))
    graph.output(combined)
    copies = ((tokens * top_k, hidden), torch.float32)
    pieces = {returned: [copies], order: [((tokens * top_k,), torch.int64)], weights: [((tokens, top_k), torch.float32)],
              combined: [((tokens, hidden), torch.float32)]}
    work = node_work(combined, pieces)
    # index_copy_ (read the copies, write them in token order), the weighting (read, write) and
    # the sum over slots (read them, write one row per token): at least five passes over the
    # copies, where its operands and result alone are little more than one.
    block = tokens * top_k * hidden * 4
    assert work.kind == "indexing" and work.kernels >= 3
    assert work.nbytes >= 5 * block


def test_a_copy_into_a_destination_and_a_factory_read_no_operand():
    graph = Graph()
    state, value = graph.placeholder("state"), graph.placeholder("value")
    copied = graph.call_function(torch.ops.aten.copy_.default, (state, value))
    filled = graph.call_function(torch.ops.aten.new_full.default, (value, [1024, 1024], 1.0))
    graph.output((copied, filled))
    piece = [((1024, 1024), torch.float32)]
    pieces = {n: piece for n in graph.nodes if n.op != "output"}
    one = 1024 * 1024 * 4
    assert node_work(copied, pieces).nbytes == 2 * one  # reads the value, writes the state
    assert node_work(filled, pieces).nbytes == one  # writes its result only


def test_kernels_shorter_than_their_launches_take_the_hosts_time():
    graph = Graph()
    value = graph.placeholder("x")
    for _ in range(10):
        value = graph.call_function(torch.ops.aten.add.Tensor, (value, 1.0))
    graph.output(value)
    gm = GraphModule(torch.nn.Module(), graph)
    pieces = {n: [((4,), torch.float32)] for n in gm.graph.nodes if n.op != "output"}
    base = HARDWARE["h100"]
    host_bound = replace(base, compute=replace(base.compute, launch_seconds=1e-5))
    device_only = replace(base, compute=replace(base.compute, launch_seconds=0.0))
    slow = predict_step(gm, MESH, host_bound, link=LINK, pieces=pieces)
    fast = predict_step(gm, MESH, device_only, link=LINK, pieces=pieces)
    assert fast.step_seconds == pytest.approx(fast.compute_seconds)  # 10 kernels of 32 bytes
    assert slow.kernels == 10 and slow.launch_seconds == pytest.approx(1e-4)
    # The last kernel starts once the host has issued all ten, and then runs.
    assert slow.step_seconds == pytest.approx(1e-4 + fast.compute_seconds / 10)


def test_calibrate_kernels_times_every_product_grouped_gemm_attention_and_loss_of_a_program():
    from examples.moe_model import shardgraph_entry
    from shardgraph.predict import _TIMED_KINDS, calibrate_kernels, measured_efficiency
    from shardgraph.report import local_pieces

    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=2, seq_len=16)
    program = sg.compile(model, MeshSpec(1), inputs, loss_fn)
    gm = program.graph_module
    pieces = local_pieces(gm, program.mesh)
    measured = calibrate_kernels(gm, program.mesh, "cpu", pieces=pieces, repeats=1, warmup=0)
    timed = [n for n in gm.graph.nodes if n.op == "call_function" and (w := node_work(n, pieces)) is not None
             and w.kind in _TIMED_KINDS]
    kinds = {node_work(n, pieces).kind for n in timed}
    assert kinds == set(_TIMED_KINDS) and set(measured) == set(timed)
    assert all(seconds > 0 for seconds in measured.values())
    prediction = predict_step(gm, program.mesh, "cpu", pieces=pieces, measured=measured)
    assert prediction.measured_nodes == len(timed)
    for kind in _TIMED_KINDS:
        assert prediction.compute_seconds_by_kind[kind] == pytest.approx(
            sum(s for n, s in measured.items() if node_work(n, pieces).kind == kind))
    efficiency = measured_efficiency(gm, measured, HARDWARE["cpu"].compute.matmul_flops, pieces)
    assert set(efficiency) == set(_TIMED_KINDS) and all(f > 0 for f in efficiency.values())
