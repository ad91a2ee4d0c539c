"""The link model prices a redistribution at the bytes of the steps lowering emits for it."""

import itertools

import pytest
import torch

from passes.cost import redistribution
from passes.lower_redistribute import _apply_placement, plan_redistribution, step_bytes
from shardgraph import meta
from shardgraph.mesh import MeshSpec
from shardgraph.placement import InterleavedShard, Partial, Replicate, Shard, Sharding

PLACEMENTS = [Replicate(), Shard(0), Shard(1), InterleavedShard(0, 2), InterleavedShard(1, 2), Partial("sum"),
              Partial("avg")]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("source, target", list(itertools.product(PLACEMENTS, PLACEMENTS)),
                         ids=lambda p: repr(p))
def test_the_price_of_a_change_on_one_axis_is_the_bytes_lowering_sends(n, source, target):
    mesh = MeshSpec(n, tp=n)
    value = torch.empty(8, 16)
    have, want = Sharding.of(tp=source), Sharding.of(tp=target)
    sent, current = 0.0, have
    for step in plan_redistribution(have, want, value.dim(), mesh):
        sent += step_bytes(step, meta.local_bytes(value, current, mesh), mesh)
        current = _apply_placement(current, step)
    priced = redistribution(source, target, meta.local_bytes(value, have, mesh), n).bytes
    assert priced == pytest.approx(sent)


# ---------------------------------------------------------------------------------- time
from passes.cost import (HARDWARE, INFINIBAND_NDR, NVLINK4, ComputeRates, Link, LinkModel, all_gather_seconds,  # noqa: E402
                         all_reduce_seconds, all_to_all_seconds, axis_crosses_nodes, collective_steps, fit_alpha_beta,
                         link_model, reduce_scatter_seconds)

LINK = Link("test", alpha=2e-6, peak_bandwidth=100e9, efficiency=0.5)  # 50 GB/s achieved


def test_collective_times_match_hand_computed_alpha_beta_values():
    buffer = 1e9  # bytes
    # Ring all-reduce on 4 ranks: 2 * 3/4 * 1e9 / 50e9 = 0.03 s, plus 2 * 3 steps of 2 us.
    assert all_reduce_seconds(buffer, 4, LINK) == pytest.approx(0.03 + 12e-6)
    # All-gather / reduce-scatter / all-to-all on 8 ranks: 7/8 * 1e9 / 50e9 = 0.0175 s + 7 * 2 us.
    for formula in (all_gather_seconds, reduce_scatter_seconds, all_to_all_seconds):
        assert formula(buffer, 8, LINK) == pytest.approx(0.0175 + 14e-6)
    assert all_reduce_seconds(buffer, 1, LINK) == 0.0


@pytest.mark.parametrize("kind, buffer_formula, sent", [
    ("all_reduce", all_reduce_seconds, lambda b, n: 2 * b * (n - 1) / n),
    ("reduce_scatter", reduce_scatter_seconds, lambda b, n: b * (n - 1) / n),
    ("all_gather", all_gather_seconds, lambda b, n: b / n * (n - 1)),  # a piece of b / n, gathered
    ("all_to_all", all_to_all_seconds, lambda b, n: b * (n - 1) / n),
])
def test_link_model_prices_a_collective_record_by_its_bytes_sent_as_the_buffer_formula_does(kind, buffer_formula,
                                                                                                sent):
    # Collective.bytes is what one rank sends (the byte formulas of lowering); pricing that by
    # kind gives the textbook time of the whole buffer.
    model = LinkModel(axis_bandwidth={"ep": LINK.bandwidth}, axis_latency={"ep": LINK.alpha})
    for n in (2, 4, 8):
        assert model.seconds("ep", sent(3e8, n), kind, n) == pytest.approx(buffer_formula(3e8, n, LINK))


def test_more_bytes_take_more_time_and_propagation_price_is_unchanged():
    model = LinkModel()
    assert model.seconds("tp", 2e6, "all_gather", 4) > model.seconds("tp", 1e6, "all_gather", 4)
    # Without a kind: one latency plus bytes over bandwidth (what propagation has always paid).
    assert model.seconds("tp", 450e3) == pytest.approx(5e-6 + 1e-6)
    assert collective_steps("all_reduce", 8) == 14 and collective_steps("local_slice", 8) == 0


def test_an_axis_whose_groups_span_nodes_runs_on_infiniband():
    mesh = MeshSpec(16, tp=2, ep=8)  # dp = 8, edp = 2
    model = link_model(mesh, "h100", gpus_per_node=8)
    # tp pairs (0,1) and ep groups 0-7 / 8-15 stay in a node; dp groups (0,2,...,14) and edp
    # groups (0,8) span both nodes.
    assert model.axis_link["tp"] == model.axis_link["ep"] == "nvlink4"
    assert model.axis_link["dp"] == model.axis_link["edp"] == model.axis_link["dp*tp"] == "infiniband-ndr-400"
    assert model.bandwidth("tp") == NVLINK4.bandwidth and model.bandwidth("dp") == INFINIBAND_NDR.bandwidth
    assert model.alpha("edp") == INFINIBAND_NDR.alpha
    assert not axis_crosses_nodes(mesh, "ep", 8) and axis_crosses_nodes(mesh, "ep", 4)
    # Eight ranks fit one node: every axis on NVLink.
    assert set(link_model(MeshSpec(8, tp=2, ep=4), "h200").axis_link.values()) == {"nvlink4"}


def test_compute_rates_take_the_larger_of_flop_time_and_memory_time():
    h100, h200 = HARDWARE["h100"].compute, HARDWARE["h200"].compute
    # A bf16 GEMM of 2 TFLOP: 2e12 / (989e12 * 0.62) s; its bytes are negligible. A grouped GEMM
    # of the same FLOPs runs at its own measured fraction.
    assert h100.seconds(2e12, 1e6, torch.bfloat16, matmul=True) == pytest.approx(2e12 / (989e12 * 0.62))
    assert h100.seconds(2e12, 1e6, torch.bfloat16, True, "grouped_mm") == pytest.approx(2e12 / (989e12 * 0.54))
    # A copy of 1 GB (read + write): memory bound, faster on H200's HBM3e; moved by index, slower.
    assert h100.seconds(1e6, 2e9) == pytest.approx(2e9 / (3.35e12 * 0.87))
    assert h100.seconds(1e6, 2e9, kind="indexing") == pytest.approx(2e9 / (3.35e12 * 0.58))
    assert h200.seconds(1e6, 2e9) < h100.seconds(1e6, 2e9)
    rates = ComputeRates("test", {torch.float32: 1e12}, 1.0, 1e11, 1e11, 1.0)
    assert rates.seconds(1e12, 0.0, torch.bfloat16, matmul=True) == pytest.approx(1.0)  # falls back to float32


def test_fit_alpha_beta_recovers_the_line_it_was_given():
    steps, alpha, bandwidth = 6, 3e-6, 20e9
    sent = [1e4, 1e5, 1e6, 1e7]
    seconds = [steps * alpha + s / bandwidth for s in sent]
    fitted_alpha, fitted_bandwidth = fit_alpha_beta(sent, seconds, steps)
    assert fitted_alpha == pytest.approx(alpha) and fitted_bandwidth == pytest.approx(bandwidth)
    with pytest.raises(ValueError, match="two different sizes"):
        fit_alpha_beta([1e4, 1e4], [1.0, 2.0], steps)


def _calibrate_rank(rank):
    from passes.cost import calibrate_link_model
    from shardgraph.runtime.distributed import DistributedCommunicator

    mesh = MeshSpec(2, tp=2)
    DistributedCommunicator(mesh)
    model = calibrate_link_model(mesh, axes=("tp",), sizes=(2**12, 2**16, 2**20), repeats=3, warmup=1)
    return model.bandwidth("tp"), model.alpha("tp")


def test_calibration_fits_the_same_positive_link_on_every_gloo_rank():
    from shardgraph.runtime.distributed import spawn_gloo

    results = spawn_gloo(_calibrate_rank, 2, timeout=60)
    assert results[0] == results[1]  # every rank fits the maxima all ranks agreed on
    bandwidth, alpha = results[0]
    assert bandwidth > 1e6 and 0.0 <= alpha < 0.1
