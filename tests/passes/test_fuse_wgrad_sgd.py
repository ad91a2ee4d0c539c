"""passes/fuse_wgrad_sgd.py: a donated plain SGD step on an expert weight taken in its grouped
wgrad's epilogue, checked against torch.optim on the unsharded model, and left unfused wherever
the gradient is reduced, clipped, decayed or given momentum."""

import copy
import logging
import math

import pytest
import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from passes.fuse_wgrad_sgd import EMBEDDING_OP as EMBEDDING
from passes.fuse_wgrad_sgd import FUSED_OP as FUSED
from passes.fuse_wgrad_sgd import OUTPUT_PROJECTION_OP as PROJECTION
from shardgraph import meta
from shardgraph.meta import InputKind
from shardgraph.predict import node_work
from shardgraph.report import local_pieces

WGRAD = torch.ops.shardgraph.grouped_mm_wgrad.default


def relative(value, reference):
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def setup(mesh_text, optimizer, clip=None, **options):
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn, optimizer=optimizer,
                         clip_grad_norm=clip, **options)
    return model, inputs, loss_fn, program


def fused_nodes(program):
    return [node for node in program.graph_module.graph.nodes if node.target == FUSED]


def embedding_nodes(program):
    return [node for node in program.graph_module.graph.nodes if node.target == EMBEDDING]


def projection_nodes(program):
    return [node for node in program.graph_module.graph.nodes if node.target == PROJECTION]


def expert_weights(model):
    return [name for name, _ in model.named_parameters() if ".experts." in name]


@pytest.mark.parametrize("mesh_text", ["world=1", "world=2,ep=2", "world=4,tp=2,ep=4"])
def test_plain_sgd_steps_with_the_fused_update_equal_torch_optim(mesh_text):
    # Every expert weight whose gradient no rank shares (edp = 1) takes its step in the wgrad.
    model, inputs, loss_fn, program = setup(mesh_text, sg.optim.SGD(lr=0.1))
    assert len(fused_nodes(program)) == len(expert_weights(model)) > 0
    reference = copy.deepcopy(model)
    torch_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    states = program.init_states(model)
    for _ in range(3):
        loss_reference = loss_fn(reference(*inputs), *inputs)
        torch_optimizer.zero_grad()
        loss_reference.backward()
        norm_reference = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
        torch_optimizer.step()
        loss, states, metrics = program.simulate_train_step(states, inputs)
        assert relative(loss, loss_reference.detach()) < 1e-5
        assert relative(metrics["grad_norm"], norm_reference) < 1e-5
    full = program.gather_state(states)
    for name, parameter in reference.named_parameters():
        assert relative(full.parameters[name], parameter.detach()) < 1e-5, name


def test_the_fused_and_the_unfused_step_give_the_same_state():
    model, inputs, loss_fn, fused = setup("world=1", sg.optim.SGD(lr=0.1))
    *_, unfused = setup("world=1", sg.optim.SGD(lr=0.1), fused_update=False)
    assert fused_nodes(fused) and not fused_nodes(unfused)
    loss_a, state_a, metrics_a = fused.train_step(fused.init_state(model, 0), inputs)
    loss_b, state_b, metrics_b = unfused.train_step(unfused.init_state(model, 0), inputs)
    assert torch.equal(loss_a, loss_b)
    assert relative(metrics_a["grad_norm"], metrics_b["grad_norm"]) < 1e-6
    for name in state_b.parameters:
        assert relative(state_a.parameters[name], state_b.parameters[name]) < 1e-6, name


@pytest.mark.parametrize("case", ["tp reduces the expert gradients", "clipping", "momentum", "weight decay",
                                  "AdamW", "option off"])
def test_a_gradient_that_is_reduced_clipped_decayed_or_given_momentum_keeps_the_unfused_update(case):
    mesh_text, optimizer, clip, options = {
        # At tp=2 without ep the experts are replicated over the tp ranks: their gradients are summed.
        "tp reduces the expert gradients": ("world=2,tp=2", sg.optim.SGD(lr=0.1), None, {}),
        "clipping": ("world=1", sg.optim.SGD(lr=0.1), 1.0, {}),
        "momentum": ("world=1", sg.optim.SGD(lr=0.1, momentum=0.9), None, {}),
        "weight decay": ("world=1", sg.optim.SGD(lr=0.1, weight_decay=0.01), None, {}),
        "AdamW": ("world=1", sg.optim.AdamW(lr=1e-3), None, {}),
        "option off": ("world=1", sg.optim.SGD(lr=0.1), None, {"fused_update": False}),
    }[case]
    model, inputs, loss_fn, program = setup(mesh_text, optimizer, clip, **options)
    assert not fused_nodes(program)
    assert any(node.target == WGRAD for node in program.graph_module.graph.nodes)


def test_the_fused_step_follows_every_other_reader_of_its_weight_and_the_output_leaves_the_weight_out():
    model, inputs, loss_fn, program = setup("world=1", sg.optim.SGD(lr=0.1))
    graph = program.graph_module.graph
    order = {node: index for index, node in enumerate(graph.nodes)}
    outputs = graph.output_node().args[0]
    parameters = {node for node, _ in meta.graph_inputs(graph, InputKind.PARAMETER)}
    steps = fused_nodes(program) + embedding_nodes(program) + projection_nodes(program)
    assert len(embedding_nodes(program)) == len(projection_nodes(program)) == 1
    for fused in steps:
        weight = fused.args[1 if fused.target == PROJECTION else 0]
        assert weight in parameters
        assert all(order[user] < order[fused] for user in weight.users if user is not fused and user.op != "output")
        assert weight not in outputs and outputs.count(None) == len(steps)
        # Nothing reads the norm's term before the kernel produces it.
        assert all(order[user] > order[fused] for user in fused.users)
    assert not any(node.target in (WGRAD, torch.ops.aten.embedding_dense_backward.default) for node in graph.nodes)


def test_the_cost_model_prices_the_fused_step_as_the_wgrad_plus_the_weight_read_and_written():
    model, inputs, loss_fn, program = setup("world=1", sg.optim.SGD(lr=0.1))
    node = fused_nodes(program)[0]
    pieces = local_pieces(program.graph_module, sg.MeshSpec.parse("world=1"))
    (x_shape, dtype), (dout_shape, _), (weight_shape, _) = (pieces[node.args[i]][0] for i in (1, 2, 0))
    work = node_work(node, pieces)
    size = dtype.itemsize
    assert work.kind == "grouped_mm" and work.flops == 2.0 * x_shape[0] * x_shape[1] * dout_shape[1]
    assert work.nbytes >= size * (math.prod(x_shape) + math.prod(dout_shape) + 2 * math.prod(weight_shape))


def test_fused_update_must_be_true_or_false_and_is_checked_before_tracing(monkeypatch):
    import shardgraph.compiler

    def no_trace(*args, **kwargs):
        raise AssertionError("traced before the options were checked")

    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=2, seq_len=4)
    monkeypatch.setattr(shardgraph.compiler, "trace", no_trace)
    with pytest.raises(ValueError, match="fused_update must be True or False"):
        sg.compile(model, sg.MeshSpec.parse("world=1"), inputs, loss_fn, optimizer=sg.optim.SGD(lr=0.1),
                   fused_update="yes")


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_under_inductor_the_fused_step_updates_the_donated_weight_in_place_and_as_unfused():
    # torch.compile functionalizes the in-place op; with every other reader of the weight ordered
    # before it (its ``after`` operands) inductor writes the donated input in place again
    # instead of cloning the weight before the kernel and copying it back after.
    import torch._inductor.config as inductor_config

    model, inputs, loss_fn, fused = setup("world=1", sg.optim.SGD(lr=0.1))
    *_, unfused = setup("world=1", sg.optim.SGD(lr=0.1), fused_update=False)
    state_a, state_b = fused.init_state(model, 0), unfused.init_state(model, 0)
    storage = {name: tensor.untyped_storage().data_ptr() for name, tensor in state_a.parameters.items()}
    # torch's loggers do not propagate to the root logger: the handler goes on inductor's own.
    logger, handler = logging.getLogger("torch._inductor.fx_passes.reinplace"), _Messages()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with inductor_config.patch(force_disable_caches=True):
            loss_a, state_a, metrics_a = fused.train_step(state_a, inputs, compile="inductor")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    reports = [m for m in handler.messages if any(op in m for op in ("grouped_mm_wgrad_sgd_", "embedding_sgd_",
                                                                       "linear_cross_entropy_sgd_"))]
    assert len(reports) == len(fused_nodes(fused)) + len(embedding_nodes(fused)) + len(projection_nodes(fused))
    assert embedding_nodes(fused) and projection_nodes(fused)
    assert all("remain clones=[]" in r for r in reports), reports
    assert all(state_a.parameters[name].untyped_storage().data_ptr() == where for name, where in storage.items())
    loss_b, state_b, metrics_b = unfused.train_step(state_b, inputs, compile="inductor")
    assert relative(loss_a, loss_b) < 1e-6 and relative(metrics_a["grad_norm"], metrics_b["grad_norm"]) < 1e-6
    for _ in range(1):
        loss_a, state_a, metrics_a = fused.train_step(state_a, inputs, compile="inductor")
        loss_b, state_b, metrics_b = unfused.train_step(state_b, inputs, compile="inductor")
        assert relative(loss_a, loss_b) < 1e-6 and relative(metrics_a["grad_norm"], metrics_b["grad_norm"]) < 1e-6
    # Two steps in: the embedding rows' sums were taken in another order (per index, not per
    # token), which the second step's forward carries everywhere at float32 rounding.
    for name in state_b.parameters:
        assert relative(state_a.parameters[name], state_b.parameters[name]) < 1e-5, name


def test_a_bf16_model_fuses_through_the_float32_norm_term_and_steps_as_the_unfused_program():
    # vector_norm of a 16-bit gradient sums float32 squares: the norm term starts with a cast,
    # which the fused kernel's float32 squares stand for.
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    model = model.to(torch.bfloat16)
    fused = sg.compile(model, sg.MeshSpec.parse("world=1"), inputs, loss_fn, optimizer=sg.optim.SGD(lr=0.1))
    unfused = sg.compile(model, sg.MeshSpec.parse("world=1"), inputs, loss_fn, optimizer=sg.optim.SGD(lr=0.1),
                         fused_update=False)
    assert len(fused_nodes(fused)) == len(expert_weights(model))
    loss_a, state_a, metrics_a = fused.train_step(fused.init_state(model, 0), inputs)
    loss_b, state_b, metrics_b = unfused.train_step(unfused.init_state(model, 0), inputs)
    assert torch.equal(loss_a, loss_b) and torch.equal(metrics_a["grad_norm"], metrics_b["grad_norm"])
    for name in state_b.parameters:
        assert torch.equal(state_a.parameters[name], state_b.parameters[name]), name


class _TinyLanguageModel(torch.nn.Module):
    def __init__(self, tied=False, padding_idx=None, scale_grad_by_freq=False):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq)
        self.project = torch.nn.Linear(8, 32, bias=False)
        if tied:
            self.project.weight = self.embed.weight

    def forward(self, ids):
        return self.project(torch.tanh(self.embed(ids)))


def _language_model_loss(logits, ids):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


@pytest.mark.parametrize("case", ["plain", "padding row", "tied to the output projection", "scaled by frequency"])
def test_an_embedding_steps_on_its_looked_up_rows_only_where_its_gradient_is_the_lookup_s_alone(case):
    torch.manual_seed(0)
    model = _TinyLanguageModel(tied=case == "tied to the output projection",
                               padding_idx=0 if case == "padding row" else None,
                               scale_grad_by_freq=case == "scaled by frequency")
    # Repeated indices and the padding row among them; most of the table is never looked up.
    ids = torch.tensor([[0, 3, 3, 7], [7, 0, 5, 3]])
    program = sg.compile(model, sg.MeshSpec.parse("world=1"), [ids], _language_model_loss,
                         optimizer=sg.optim.SGD(lr=0.5))
    fused = case in ("plain", "padding row")
    assert len(embedding_nodes(program)) == int(fused)
    reference = copy.deepcopy(model)
    torch_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    state = program.init_state(model, 0)
    for _ in range(2):
        loss_reference = _language_model_loss(reference(ids), ids)
        torch_optimizer.zero_grad()
        loss_reference.backward()
        norm_reference = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
        torch_optimizer.step()
        loss, state, metrics = program.train_step(state, [ids])
        assert relative(loss, loss_reference.detach()) < 1e-6
        assert relative(metrics["grad_norm"], norm_reference) < 1e-6
    for name, parameter in reference.named_parameters():
        assert relative(state.parameters[name], parameter.detach()) < 1e-6, name
    if fused:
        untouched = torch.ones(32, dtype=torch.bool)
        untouched[ids.flatten()] = False
        assert torch.equal(state.parameters["embed.weight"][untouched], model.embed.weight.detach()[untouched])


def test_the_cost_model_prices_the_embedding_step_by_the_looked_up_rows_not_the_table():
    model = _TinyLanguageModel()
    model.embed = torch.nn.Embedding(4096, 8)
    model.project = torch.nn.Linear(8, 4096, bias=False)
    ids = torch.randint(0, 4096, (2, 4))
    program = sg.compile(model, sg.MeshSpec.parse("world=1"), [ids], _language_model_loss,
                         optimizer=sg.optim.SGD(lr=0.5))
    node, = embedding_nodes(program)
    work = node_work(node, local_pieces(program.graph_module, sg.MeshSpec.parse("world=1")))
    assert work.kind == "indexing" and work.flops == 8 * 8
    # Eight rows of 8 float32 values, each read and written with a float32 sum: far below the
    # 4096 x 8 table that the dense step passes over three times.
    assert 8 * 8 * 4 * 4 <= work.nbytes < 4096 * 8 * 4
