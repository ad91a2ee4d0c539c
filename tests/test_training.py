"""The training step in the program: optimizer, gradient norm and clipping as graph nodes, checked
against torch.optim and clip_grad_norm_ on the unsharded model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from shardgraph import meta
from shardgraph.optim import OptimizerError
from shardgraph.training import StateError

from tests.test_parity import MESHES  # noqa: E402  (every mesh of the parity suite)

# SGD's arithmetic is checked on a subset that keeps each kind of mesh (tp only, ep only,
# cross-lane ep, etp): AdamW runs on every mesh.
SGD_MESHES = ["world=1", "world=2,tp=2", "world=2,ep=2", "world=4,tp=2,ep=4", "world=8,tp=2,ep=4",
              "world=8,tp=2,ep=2,etp=2"]
NO_DECAY = ("*norm*",)


def relative(value, reference):
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def _setup(mesh_text, optimizer, dtype=torch.float32, clip=1.0):
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    model = model.to(dtype)
    reference = copy.deepcopy(model)
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn, optimizer=optimizer,
                         clip_grad_norm=clip)
    return model, reference, inputs, loss_fn, program


def _torch_step(reference, optimizer, inputs, loss_fn, clip):
    loss = loss_fn(reference(*inputs), *inputs)
    optimizer.zero_grad()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
    optimizer.step()
    return loss.detach(), norm


def _step_alongside(program, states, reference, torch_optimizer, inputs, loss_fn, steps, *, loss_tolerance,
                    norm_tolerance, state_tolerance, clip=1.0):
    """``steps`` steps of the program and of torch.optim on the unsharded model, compared per
    step (loss, gradient norm) and at the end (weights, every optimizer state slot)."""
    for _ in range(steps):
        loss_reference, norm_reference = _torch_step(reference, torch_optimizer, inputs, loss_fn, clip)
        loss, states, metrics = program.simulate_train_step(states, inputs)
        assert relative(loss, loss_reference) < loss_tolerance
        assert relative(metrics["grad_norm"], norm_reference) < norm_tolerance
    weights, moments = _worst_state_error(program, states, reference, torch_optimizer)
    assert weights < state_tolerance and moments < state_tolerance, (weights, moments)


def _worst_state_error(program, states, reference, torch_optimizer):
    full = program.gather_state(states)
    weights = max(relative(full.parameters[n], p.detach()) for n, p in reference.named_parameters())
    moments = max(relative(value, torch_optimizer.state[p][slot]) for n, p in reference.named_parameters()
                  for slot, value in full.optimizer[n].items())
    return weights, moments


def _torch_adamw(reference, lr):
    decayed = [p for n, p in reference.named_parameters() if "norm" not in n]
    undecayed = [p for n, p in reference.named_parameters() if "norm" in n]
    return torch.optim.AdamW([{"params": decayed}, {"params": undecayed, "weight_decay": 0.0}], lr=lr,
                             weight_decay=0.1)


@pytest.mark.parametrize("mesh_text", MESHES)
def test_five_adamw_steps_with_clipping_and_decay_equal_torch_optim(mesh_text):
    # float64: Adam divides each gradient element by its own magnitude, so an element that is
    # zero up to float32 rounding (a few 1e-9 against eps = 1e-8) takes a step of any size either
    # way; in float64 that rounding is 1e-16 and what is left to compare is the optimizer itself.
    optimizer = sg.optim.AdamW(lr=1e-2, weight_decay=0.1, no_decay=NO_DECAY)
    model, reference, inputs, loss_fn, program = _setup(mesh_text, optimizer, torch.float64)
    torch_optimizer = _torch_adamw(reference, 1e-2)
    _step_alongside(program, program.init_states(model), reference, torch_optimizer, inputs, loss_fn, 5,
                    loss_tolerance=1e-9, norm_tolerance=1e-9, state_tolerance=1e-9)


@pytest.mark.parametrize("mesh_text", SGD_MESHES)
def test_five_sgd_momentum_steps_in_float32_equal_torch_optim(mesh_text):
    optimizer = sg.optim.SGD(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    model, reference, inputs, loss_fn, program = _setup(mesh_text, optimizer)
    torch_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    _step_alongside(program, program.init_states(model), reference, torch_optimizer, inputs, loss_fn, 5,
                    loss_tolerance=1e-5, norm_tolerance=1e-6, state_tolerance=1e-5)


def test_float32_adamw_reports_clip_grad_norms_value_every_step():
    optimizer = sg.optim.AdamW(lr=1e-3)
    model, reference, inputs, loss_fn, program = _setup("world=8,tp=2,ep=4", optimizer, clip=0.5)
    torch_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    states = program.init_states(model)
    for _ in range(3):
        loss_reference, norm_reference = _torch_step(reference, torch_optimizer, inputs, loss_fn, 0.5)
        loss, states, metrics = program.simulate_train_step(states, inputs)
        assert relative(loss, loss_reference) < 1e-5
        assert relative(metrics["grad_norm"], norm_reference) < 1e-6


def test_nesterov_sgd_without_clipping_equals_torch_optim():
    optimizer = sg.optim.SGD(lr=0.05, momentum=0.8, nesterov=True)
    model, reference, inputs, loss_fn, program = _setup("world=4,tp=2,ep=2", optimizer, clip=None)
    torch_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.8, nesterov=True)
    states = program.init_states(model)
    for _ in range(3):
        loss = loss_fn(reference(*inputs), *inputs)
        torch_optimizer.zero_grad()
        loss.backward()
        torch_optimizer.step()
        _, states, _ = program.simulate_train_step(states, inputs)
    weights, moments = _worst_state_error(program, states, reference, torch_optimizer)
    assert weights < 1e-5 and moments < 1e-5


@pytest.mark.parametrize("dtype, optimizer", [
    (torch.float64, sg.optim.AdamW(lr=1e-2, weight_decay=0.1)),
    (torch.float32, sg.optim.SGD(lr=0.1, momentum=0.9)),
], ids=["adamw-float64", "sgd-float32"])
def test_ten_steps_straight_equal_five_then_resumed_on_another_mesh(dtype, optimizer):
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    model = model.to(dtype)
    first = sg.compile(model, sg.MeshSpec.parse("world=8,tp=2,ep=4"), inputs, loss_fn, optimizer=optimizer,
                       clip_grad_norm=1.0)
    second = sg.compile(model, sg.MeshSpec.parse("world=4,tp=2,ep=2"), inputs, loss_fn, optimizer=optimizer,
                        clip_grad_norm=1.0)
    straight = first.init_states(model)
    straight_losses = []
    for _ in range(10):
        loss, straight, _ = first.simulate_train_step(straight, inputs)
        straight_losses.append(loss)
    states = first.init_states(model)
    losses = []
    for _ in range(5):
        loss, states, _ = first.simulate_train_step(states, inputs)
        losses.append(loss)
    saved = first.gather_state(states).state_dict()
    states = second.init_states(saved)  # what a fresh process on the other mesh loads
    assert states[0].step == 5
    for _ in range(5):
        loss, states, _ = second.simulate_train_step(states, inputs)
        losses.append(loss)
    tolerance = 1e-9 if dtype == torch.float64 else 1e-6
    assert max(relative(a, b) for a, b in zip(losses, straight_losses)) < tolerance
    resumed, reference = second.gather_state(states), first.gather_state(straight)
    assert max(relative(resumed.parameters[n], reference.parameters[n]) for n in reference.parameters) < tolerance


@pytest.mark.parametrize("optimizer", [sg.optim.SGD(lr=0.1, momentum=0.9), sg.optim.AdamW(lr=1e-3)],
                         ids=["sgd", "adamw"])
def test_the_update_moves_no_optimizer_state_between_ranks(optimizer):
    # State is placed like its parameter, so the step communicates what the gradient program
    # does (the model's own redistributions, the gradients' synchronisation) plus scalars of the
    # norm; moving any state slot would add about the parameters' bytes again.
    model, _, inputs, loss_fn, program = _setup("world=8,tp=2,ep=4", optimizer)
    for node, record in meta.graph_inputs(program.graph_module.graph, meta.InputKind.OPTIMIZER_STATE):
        assert meta.sharding(node) == program.parameter_sharding(record.parameter), record.name
    gradients = sg.compile(model, sg.MeshSpec.parse("world=8,tp=2,ep=4"), inputs, loss_fn)
    step_bytes = program.report(format="dict")["totals"]["communication_bytes_per_rank"]
    gradient_bytes = gradients.report(format="dict")["totals"]["communication_bytes_per_rank"]
    parameter_bytes = program.report(format="dict")["totals"]["parameter_bytes_per_rank"]
    assert step_bytes <= gradient_bytes * 1.05 and step_bytes - gradient_bytes < 0.05 * parameter_bytes


@pytest.mark.parametrize("make, words", [
    (lambda: sg.optim.AdamW(lr=-1.0), "invalid learning rate"),
    (lambda: sg.optim.AdamW(betas=(0.9, 1.0)), "beta parameter at index 1"),
    (lambda: sg.optim.AdamW(eps=-1e-8), "epsilon"),
    (lambda: sg.optim.SGD(lr=0.1, nesterov=True), "nesterov momentum requires a momentum"),
    (lambda: sg.optim.SGD(lr=0.1, weight_decay=-0.1), "weight_decay"),
    (lambda: sg.optim.AdamW(no_decay="*norm*"), "list of name patterns"),
])
def test_an_option_torch_would_refuse_is_refused_by_name(make, words):
    with pytest.raises(OptimizerError, match=words):
        make()


def test_a_state_from_another_mesh_or_model_is_refused_before_any_work():
    optimizer = sg.optim.AdamW(lr=1e-3)
    model, _, inputs, loss_fn, program = _setup("world=4,tp=2,ep=2", optimizer)
    other = sg.compile(model, sg.MeshSpec.parse("world=8,tp=2,ep=4"), inputs, loss_fn, optimizer=optimizer)
    with pytest.raises(StateError, match="another mesh"):
        program.simulate_train_step(other.init_states(model)[:4], inputs)
    stranger, _, _ = shardgraph_entry("tiny_shared", batch_size=8, seq_len=8)
    with pytest.raises(StateError, match="another model"):
        program.init_states({n: p.detach() for n, p in stranger.named_parameters() if "embed" not in n})
    states = program.init_states(model)
    before = [s.parameters["lm_head.weight"].clone() for s in states]
    with pytest.raises(ValueError, match="input_ids"):
        program.simulate_train_step(states, [inputs[0][:, :4]])
    assert all(torch.equal(s.parameters["lm_head.weight"], b) for s, b in zip(states, before))


@pytest.mark.parametrize("mesh_text", ["world=1", "world=4,tp=2,ep=2", "world=8,tp=2,ep=4"])
def test_bf16_compute_gradients_are_no_further_from_fp32_than_eager_bf16(mesh_text):
    # Mixed precision: fp32 master weights, forward and backward on bf16 copies. The sharded
    # program's gradients (which arrive in fp32, through the casts' backward) may differ from
    # fp32 by bf16 rounding, but no more than the eager bf16 model's do.
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    parameters = dict(model.named_parameters())
    loss = loss_fn(model(*inputs), *inputs)
    exact = dict(zip(parameters, torch.autograd.grad(loss, list(parameters.values()))))
    eager = copy.deepcopy(model).to(torch.bfloat16)
    eager_parameters = dict(eager.named_parameters())
    eager_loss = loss_fn(eager(*inputs), *inputs)
    eager_gradients = dict(zip(eager_parameters, torch.autograd.grad(eager_loss, list(eager_parameters.values()))))
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn, compute_dtype=torch.bfloat16)
    result = program.run_simulated({n: p.detach() for n, p in parameters.items()}, inputs)
    assert all(g.dtype == torch.float32 for g in result.gradients.values())
    ours = max(relative(result.gradients[n], exact[n]) for n in exact)
    baseline = max(relative(eager_gradients[n].float(), exact[n]) for n in exact)
    assert ours <= 1.5 * baseline, (ours, baseline)


def test_a_bf16_training_step_keeps_fp32_master_weights_and_state():
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    program = sg.compile(model, sg.MeshSpec.parse("world=4,tp=2,ep=2"), inputs, loss_fn,
                         optimizer=sg.optim.AdamW(lr=1e-2), clip_grad_norm=1.0, compute_dtype=torch.bfloat16)
    states = program.init_states(model)
    losses = []
    for _ in range(4):
        loss, states, metrics = program.simulate_train_step(states, inputs)
        losses.append(loss.float().item())
        assert torch.isfinite(metrics["grad_norm"])
    full = program.gather_state(states)
    assert all(p.dtype == torch.float32 for p in full.parameters.values())
    assert all(v.dtype == torch.float32 for slots in full.optimizer.values() for v in slots.values())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------- compile="cuda_graph"
# The replay itself needs a CUDA device; these check what is refused, and that a refusal comes
# before any work: the state keeps its values, is not consumed, and steps as before.


def _cuda_graph_program(mesh_text="world=1", donate_state=True):
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn, optimizer=sg.optim.SGD(lr=0.1),
                         donate_state=donate_state)
    return model, inputs, program


def _refused_before_any_work(program, state, inputs, words, **options):
    before = {**{n: p.clone() for n, p in state.parameters.items()},
              **{f"{n}:{s}": v.clone() for n, slots in state.optimizer.items() for s, v in slots.items()}}
    with pytest.raises(ValueError, match=words):
        program.train_step(state, inputs, compile="cuda_graph", **options)
    after = {**state.parameters, **{f"{n}:{s}": v for n, slots in state.optimizer.items() for s, v in slots.items()}}
    assert not state.donated and state.step == 0
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert program._cuda_graph_replay is None


def test_cuda_graph_refuses_a_state_that_is_not_on_a_cuda_device():
    model, inputs, program = _cuda_graph_program()
    state = program.init_state(model, 0)
    _refused_before_any_work(program, state, inputs, r"the state is on cpu; a CUDA graph replays work on a CUDA device")
    loss, state, _ = program.train_step(state, inputs)  # the state still steps
    assert torch.isfinite(loss) and state.step == 1


def test_cuda_graph_refuses_a_program_for_more_than_one_device():
    # Refused before train_step makes its communicator, which would need torch.distributed.
    model, inputs, program = _cuda_graph_program("world=2,tp=2")
    state = program.init_state(model, 0)
    _refused_before_any_work(program, state, program.local_batch(0, inputs),
                             r"cuda_graph replays one device's step, and this program is for .*world=2")


def test_cuda_graph_refuses_a_program_that_does_not_donate_its_state():
    model, inputs, program = _cuda_graph_program(donate_state=False)
    _refused_before_any_work(program, program.init_state(model, 0), inputs,
                             r"does not donate its state.*donate_state=True")


class _NoisyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.head = nn.Linear(16, 64, bias=False)

    def forward(self, ids):
        hidden = self.embed(ids)
        return self.head(hidden * torch.rand_like(hidden))


def test_cuda_graph_refuses_a_model_that_draws_random_numbers():
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    model = _NoisyHead()
    program = sg.compile(model, sg.MeshSpec(world=1), (ids,),
                         lambda out, ids: F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten()),
                         optimizer=sg.optim.SGD(lr=0.1))
    assert program.takes_seed
    _refused_before_any_work(program, program.init_state(model, 0), (ids,), r"draws random numbers.*repeat",
                             seed=1)


def test_an_unknown_compile_mode_is_refused_naming_the_modes():
    model, inputs, program = _cuda_graph_program()
    with pytest.raises(ValueError, match=r"None, 'inductor' or 'cuda_graph', got 'cudagraph'"):
        program.train_step(program.init_state(model, 0), inputs, compile="cudagraph")


def test_the_replay_names_every_argument_and_refuses_a_new_state_not_written_in_place():
    # What the replay checks on a CUDA device, run here on the CPU graph's own outputs: a
    # donating step returns the tensors it was given; one that does not, tensors of its own,
    # which under replay would be the graph's memory.
    model, inputs, program = _cuda_graph_program()
    state = program.init_state(model, 0)
    arguments = program._arguments(state, inputs, program._rank_buffers(0, None), program._scalars(state, 0.1, True))
    labels = program._argument_labels()
    assert len(labels) == len(arguments)
    assert [labels[i] for i in program._batch_positions()] == ["batch input 'input_ids'"]
    assert labels[0] == f"parameter {program.parameter_names[0]!r}" and labels[-1] == "the step number"
    program._check_written_in_place(state, program.graph_module(None, *arguments))
    _, _, keeping = _cuda_graph_program(donate_state=False)
    kept = keeping.init_state(model, 0)
    outputs = keeping.graph_module(None, *keeping._arguments(kept, inputs, {}, keeping._scalars(kept, 0.1, True)))
    with pytest.raises(RuntimeError, match=r"returns parameter 'embed_tokens.weight' in a tensor of the graph's own"):
        keeping._check_written_in_place(kept, outputs)
