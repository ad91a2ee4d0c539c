"""The hand-written multi-GPU baseline (benchmarks/titan_baseline.py) is right before it is timed:
its gradients, after its own sync, equal the unsharded model's (4 gloo processes)."""

import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


def baseline_gradient_error(rank, mesh_text):
    sys.path.insert(0, BENCHMARKS)
    import shardgraph as sg
    from multigpu import baseline_parity

    return baseline_parity(sg.MeshSpec.parse(mesh_text), rank, torch.device("cpu"))


@pytest.mark.parametrize("mesh_text", ["world=4,tp=2,ep=4", "world=4,tp=2,ep=2"])
def test_duplicated_dispatch_baseline_matches_the_unsharded_gradients(mesh_text):
    from shardgraph.runtime.distributed import spawn_gloo

    results = spawn_gloo(baseline_gradient_error, 4, mesh_text)
    assert all(r["grad_rel_err"] < 1e-5 for r in results), results
