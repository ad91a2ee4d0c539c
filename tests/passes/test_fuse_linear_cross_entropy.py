"""The fused output projection + cross-entropy: same loss and gradients as the unfused program and
the unsharded model, used where the traced loss matches exactly, left out everywhere else."""

import pytest
import torch
import torch.nn.functional as F

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from passes.fuse_linear_cross_entropy import FUSED_OP
from passes.fuse_wgrad_sgd import OUTPUT_PROJECTION_OP
from shardgraph.report import build_report

aten = torch.ops.aten
IGNORE = -100


class DenseLM(torch.nn.Module):
    """Embedding, one nonlinearity, a vocabulary projection: the loss's share of memory dominates."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width, bias=False)
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.mix(self.embed(ids))))


def masked_next_token_loss(logits, ids):
    """Next-token loss with every target whose id is a multiple of 3 ignored (as padding is)."""
    vocab = logits.shape[-1]
    targets = ids[:, 1:].reshape(-1)
    targets = torch.where(targets % 3 == 0, torch.full_like(targets, IGNORE), targets)
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), targets, ignore_index=IGNORE)


def summed_loss_ignoring_zero(logits, ids):
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1), ignore_index=0,
                           reduction="sum")


def smoothed_loss(logits, ids):
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1), label_smoothing=0.1)


def z_loss(logits, ids):
    vocab = logits.shape[-1]
    flat = logits[:, :-1].reshape(-1, vocab)
    return F.cross_entropy(flat, ids[:, 1:].reshape(-1)) + 1e-2 * torch.logsumexp(flat, -1).pow(2).mean()


def fused_ops(program) -> int:
    """The fused loss ops, including the one that also takes a plain SGD step on the weight
    (passes/fuse_wgrad_sgd.py)."""
    return sum(1 for node in program.graph_module.graph.nodes if node.target in (FUSED_OP, OUTPUT_PROJECTION_OP))


def relative(value, reference) -> float:
    return ((value - reference).norm() / reference.norm().clamp_min(1e-300)).item()


def reference(model, inputs, loss_fn):
    parameters = dict(model.named_parameters())
    loss = loss_fn(model(*inputs), *inputs)
    return loss.detach(), dict(zip(parameters, torch.autograd.grad(loss, list(parameters.values()))))


def worst_errors(result, loss, gradients) -> tuple[float, float]:
    return (relative(result.loss, loss),
            max(relative(result.gradients[name], gradient) for name, gradient in gradients.items()))


def dense_case(dtype, vocab=96, width=16, batch=4, seq=8):
    torch.manual_seed(0)
    model = DenseLM(vocab, width).to(dtype)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    return model, (ids,)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("loss_fn", [masked_next_token_loss, summed_loss_ignoring_zero])
def test_fused_loss_matches_unfused_program_and_model_on_one_rank(dtype, tolerance, loss_fn):
    model, inputs = dense_case(dtype)
    mesh = sg.MeshSpec(world=1)
    fused = sg.compile(model, mesh, inputs, loss_fn)
    unfused = sg.compile(model, mesh, inputs, loss_fn, fused_loss=False)
    assert fused_ops(fused) == 1 and fused_ops(unfused) == 0
    assert not any(n.target == aten._log_softmax.default for n in fused.graph_module.graph.nodes)
    parameters = {name: p.detach() for name, p in model.named_parameters()}
    fused_result = fused.run_simulated(parameters, inputs)
    unfused_result = unfused.run_simulated(parameters, inputs)
    loss, gradients = reference(model, inputs, loss_fn)
    assert max(worst_errors(fused_result, loss, gradients)) < tolerance
    assert max(worst_errors(fused_result, unfused_result.loss, unfused_result.gradients)) < tolerance


@pytest.mark.parametrize("mesh_text,fused_count", [
    ("world=2,ep=2", 1),  # dp=2: each rank's rows fused, loss sum and count reduced over dp
    ("world=4,tp=2,ep=2", 0),  # the loss rows are gathered over tp between log-softmax and loss
])
def test_fused_loss_parity_on_sharded_meshes(mesh_text, fused_count):
    model, inputs, _ = shardgraph_entry("tiny_shared", batch_size=8, seq_len=8)
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, masked_next_token_loss)
    assert fused_ops(program) == fused_count
    parameters = {name: p.detach() for name, p in model.named_parameters()}
    loss, gradients = reference(model, inputs, masked_next_token_loss)
    loss_error, gradient_error = worst_errors(program.run_simulated(parameters, inputs), loss, gradients)
    assert loss_error < 1e-5 and gradient_error < 1e-5, (loss_error, gradient_error)


@pytest.mark.parametrize("loss_fn", [smoothed_loss, z_loss])
def test_losses_reading_more_than_the_target_log_probability_stay_unfused_and_exact(loss_fn):
    model, inputs = dense_case(torch.float32)
    program = sg.compile(model, sg.MeshSpec(world=1), inputs, loss_fn)
    assert fused_ops(program) == 0
    loss, gradients = reference(model, inputs, loss_fn)
    errors = worst_errors(program.run_simulated({n: p.detach() for n, p in model.named_parameters()}, inputs),
                          loss, gradients)
    assert max(errors) < 1e-5, errors


def test_fused_loss_lowers_the_planned_peak_by_about_the_logits_bytes():
    vocab, width, batch, seq = 4096, 16, 4, 32
    model, inputs = dense_case(torch.float32, vocab, width, batch, seq)
    mesh = sg.MeshSpec(world=1)
    logits_bytes = batch * seq * vocab * 4
    peaks = {}
    for fused in (True, False):
        program = sg.compile(model, mesh, inputs, masked_next_token_loss, fused_loss=fused)
        peaks[fused] = build_report(program)["totals"]["peak_activation_bytes_per_rank"]
    # Unfused, the logits (and their log-softmax and gradient, each logits-sized) are live at once.
    assert peaks[False] - peaks[True] >= logits_bytes, peaks
    assert peaks[True] < logits_bytes / 4, peaks


def test_training_step_with_fused_loss_matches_the_unfused_one():
    model, inputs = dense_case(torch.float32)
    mesh = sg.MeshSpec(world=1)
    steps = {}
    for fused in (True, False):
        program = sg.compile(model, mesh, inputs, masked_next_token_loss, optimizer=sg.optim.SGD(lr=0.1),
                             fused_loss=fused)
        assert fused_ops(program) == int(fused)
        state = program.init_state(model, 0)
        loss, state, _ = program.train_step(state, inputs)
        steps[fused] = (loss, {name: value.clone() for name, value in state.parameters.items()})
    assert relative(steps[True][0], steps[False][0]) < 1e-6
    for name, value in steps[False][1].items():
        assert relative(steps[True][1][name], value) < 1e-6, name


def test_loss_chunk_bytes_sets_the_fused_ops_chunk_and_keeps_the_result():
    model, inputs = dense_case(torch.float32)
    mesh = sg.MeshSpec(world=1)
    rows = inputs[0].shape[0] * (inputs[0].shape[1] - 1)
    # float32 on the CPU: a logit costs 16 bytes while its chunk is worked on (the torch-op path).
    budget = 96 * 16 * 10
    results = {}
    for chunk_bytes in (None, budget):
        program = sg.compile(model, mesh, inputs, masked_next_token_loss, loss_chunk_bytes=chunk_bytes)
        (fused,) = [n for n in program.graph_module.graph.nodes if n.target == FUSED_OP]
        parameters = {name: p.detach() for name, p in model.named_parameters()}
        results[chunk_bytes] = (fused.args[5], program.run_simulated(parameters, inputs))
    assert results[None][0] == rows and results[budget][0] == 10
    assert relative(results[budget][1].loss, results[None][1].loss) < 1e-6
    for name, gradient in results[None][1].gradients.items():
        assert relative(results[budget][1].gradients[name], gradient) < 1e-5, name


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2GiB"])
def test_a_loss_chunk_budget_that_is_not_a_positive_byte_count_is_refused_by_name_before_tracing(bad, monkeypatch):
    import shardgraph.compiler

    def no_trace(*args, **kwargs):
        raise AssertionError("traced before the options were checked")

    monkeypatch.setattr(shardgraph.compiler, "trace", no_trace)
    model, inputs = dense_case(torch.float32)
    with pytest.raises(ValueError, match="loss_chunk_bytes must be a positive number of bytes"):
        sg.compile(model, sg.MeshSpec(world=1), inputs, masked_next_token_loss, loss_chunk_bytes=bad)
