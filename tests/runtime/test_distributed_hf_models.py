"""HF transformers MoE models under real torch.distributed (gloo processes) match the unsharded model.

Four processes at world=4,tp=2,ep=2 each compile the tiny Qwen3-MoE, Mixtral and DeepSeek-V3 of
``benchmarks/model_coverage.py`` and call ``program.run`` with their pieces of the parameters and
the batch only: the models' buffers (the rotary tables ``inv_freq``, DeepSeek-V3's router
``e_score_correction_bias``) come from the compiled program, not from the caller.
"""

import pytest
import torch

import shardgraph as sg
from benchmarks.model_coverage import VOCAB, build, lm_loss

pytestmark = pytest.mark.distributed

FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3")
MESH = "world=4,tp=2,ep=2"


def _batch():
    return torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(3))


def gloo_steps(rank):
    """Every family's step on this rank; rank 0 also rebuilds the full gradients from all ranks'."""
    from shardgraph.runtime.distributed import DistributedCommunicator, gather_objects

    torch.set_num_threads(1)
    mesh = sg.MeshSpec.parse(MESH)
    communicator = DistributedCommunicator(mesh)
    results = {}
    for family in FAMILIES:
        model = build(family)
        batch = (_batch(),)
        program = sg.compile(model, mesh, batch, lm_loss)
        parameters = {name: p.detach() for name, p in model.named_parameters()}
        loss, gradients = program.run(program.local_parameters(rank, parameters), program.local_batch(rank, batch),
                                      communicator=communicator)
        pieces = gather_objects(gradients, f"{family} gradients")
        full = None
        if rank == 0:
            full = {name: sg.unshard([piece[name] for piece in pieces], program.parameter_sharding(name), mesh,
                                     check_replicas=True, name=name)
                    for name in gradients}
        results[family] = (loss, full, list(program.buffer_names))
    return results


def _relative(value, reference):
    return ((value - reference).norm() / reference.norm()).item()


def test_gloo_processes_run_hf_models_with_their_own_buffers_and_match_the_unsharded_model():
    from shardgraph.runtime.distributed import spawn_gloo

    results = spawn_gloo(gloo_steps, sg.MeshSpec.parse(MESH).world)
    for family in FAMILIES:
        model = build(family)
        batch = _batch()
        reference_loss = lm_loss(model(batch), batch)
        names = [name for name, _ in model.named_parameters()]
        reference_gradients = dict(zip(names, torch.autograd.grad(reference_loss, list(model.parameters()))))
        # The program read buffers that the caller never passed (rotary tables at least).
        buffer_names = results[0][family][2]
        assert any(name.endswith("inv_freq") for name in buffer_names), (family, buffer_names)
        for rank_results in results:
            loss = rank_results[family][0]
            assert _relative(loss, reference_loss.detach()) < 1e-5, (family, loss.item(), reference_loss.item())
        gradients = results[0][family][1]
        assert sorted(gradients) == sorted(names), family
        for name in names:
            assert _relative(gradients[name], reference_gradients[name]) < 1e-5, (family, name)
