"""Deep models are traced from a few layers: the replicated graph must be the full trace's.

Each case traces the same model twice, once writing out the repeated layers from a traced
prefix and once tracing every layer (``reuse_layers=False``), and compares the two graphs node
for node: name, op, target, argument structure, every record the passes read (placeholder
records, phase, gradient marks, module stack, source trace, value shapes and dtypes) and the
output roles; then the compiled programs, and the replicated program's parity with the model.
"""

import logging

import pytest
import torch
from torch.fx import Node

import shardgraph as sg
from examples.moe_model import MoEConfig, MoETransformer, lm_loss, make_batch, shardgraph_entry
from passes.pipeline import CompileOptions, run_pipeline
from shardgraph import meta
from shardgraph.frontend import trace
from shardgraph.mesh import MeshSpec
from tests.passes.test_layer_reuse import _argument

_trace_module = __import__("importlib").import_module("shardgraph.frontend.trace")


def _value(found):
    if isinstance(found, torch.Tensor):
        return (tuple(found.shape), tuple(found.stride()), found.dtype, found.requires_grad)
    if isinstance(found, (tuple, list)):
        return tuple(_value(item) for item in found)
    return repr(found)


def _target(target) -> str:
    if isinstance(target, str) or isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{target.__module__}.{target.__qualname__}"


def _records(node: Node) -> tuple:
    return (meta.graph_input(node), meta.phase(node), meta.gradient_of(node), meta.module_stack(node),
            meta.stack_trace(node), _value(node.meta.get("val")), _value(node.meta.get("eager_input_vals")),
            meta.placed(node), meta.collective(node), sorted(set(node.meta) - {"tensor_meta"}))


def _tensor_meta(node: Node):
    return repr(node.meta.get("tensor_meta"))


def _described(gm) -> list[tuple]:
    return [(node.op, node.name, _target(node.target), _argument(node.args), _argument(node.kwargs), _records(node))
            for node in gm.graph.nodes]


def _assert_same_graph(left_gm, right_gm, what: str) -> None:
    left, right = _described(left_gm), _described(right_gm)
    assert len(left) == len(right), what
    for mine, theirs in zip(left, right):
        assert mine == theirs, f"{what}: graphs differ at node {theirs[1]}"
    # fx's tensor_meta (read by no pass) is carried wherever the value is the prefix's; nodes
    # whose shape grows with the layers (the stack of all gradient norms, its squares) have none.
    grown = set()
    for node in left_gm.graph.nodes:
        if node.target == torch.ops.aten.stack.default or any(source in grown for source in node.all_input_nodes):
            grown.add(node)
    for mine, theirs in zip(left_gm.graph.nodes, right_gm.graph.nodes):
        if "tensor_meta" not in mine.meta and "tensor_meta" in theirs.meta:
            assert mine in grown, f"{what}: {mine.name} lost its tensor_meta"
    for mine, theirs in zip(left_gm.graph.nodes, right_gm.graph.nodes):
        if "tensor_meta" in mine.meta:
            assert _tensor_meta(mine) == _tensor_meta(theirs), f"{what}: tensor_meta differs at {mine.name}"


def _replicated_trace(model, inputs, monkeypatch, **options):
    """``trace``, checking that it wrote the repeated layers out rather than tracing each."""
    replicated = []
    original = _trace_module._replicated_joint_graph

    def spying(*args, **kwargs):
        found = original(*args, **kwargs)
        replicated.append(True)
        return found

    monkeypatch.setattr(_trace_module, "_replicated_joint_graph", spying)
    fast = trace(model, inputs, lm_loss, **options)
    assert replicated, "the repeated layers were traced one by one"
    return fast


def _traced_both(model, inputs, monkeypatch, **options):
    fast = _replicated_trace(model, inputs, monkeypatch, **options)
    return fast, trace(model, inputs, lm_loss, reuse_layers=False, **options)


CASES = [
    ("tiny", 6, {}),
    ("small", 6, {"compute_dtype": torch.bfloat16}),
    ("tiny_shared", 6, {"optimizer": sg.optim.AdamW(lr=1e-3, weight_decay=0.1), "clip_grad_norm": 1.0,
                        "compute_dtype": torch.bfloat16}),
]


@pytest.mark.parametrize("config, layers, options", CASES)
def test_replicated_trace_is_the_full_trace(config, layers, options, monkeypatch):
    model, inputs, _ = shardgraph_entry(config, device="meta", num_layers=layers)
    fast, full = _traced_both(model, inputs, monkeypatch, **options)
    _assert_same_graph(fast.graph_module, full.graph_module, "traced")
    assert meta.output_roles(fast.graph_module) == meta.output_roles(full.graph_module)
    assert fast.expert_modules == full.expert_modules
    assert (fast.parameter_names, fast.gradient_names, fast.state_slots) == (
        full.parameter_names, full.gradient_names, full.state_slots)
    assert len(model.layers) == layers  # the model keeps all its layers
    if config == "tiny":
        # The program compiled from either graph is the same, node for node.
        mesh = MeshSpec.parse("world=8,tp=2,ep=2,etp=2")
        left, right = (run_pipeline(traced.graph_module, CompileOptions(mesh)) for traced in (fast, full))
        _assert_same_graph(left.placed.graph_module, right.placed.graph_module, "placed")
        _assert_same_graph(left.lowered, right.lowered, "lowered")


def test_replicated_program_matches_the_model(monkeypatch):
    model, inputs, loss_fn = shardgraph_entry("tiny", num_layers=6)
    fast = _replicated_trace(model, inputs, monkeypatch)
    parameters = {n: p.detach() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = loss_fn(model(*inputs), *inputs)
    expected.backward()
    program = sg.compile_traced(fast, MeshSpec.parse("world=4,tp=2,ep=2"))
    step = program.run_simulated(parameters, inputs)
    torch.testing.assert_close(step.loss, expected.detach(), rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(step.gradients[name], param.grad, rtol=1e-5, atol=1e-6)


class _DenseLayer(torch.nn.Module):
    def __init__(self, size):
        super().__init__()
        self.up = torch.nn.Linear(size, 2 * size, bias=False)
        self.down = torch.nn.Linear(2 * size, size, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def test_leading_dense_layers_are_traced_and_the_moe_run_replicated(monkeypatch):
    # DeepSeek-V3's shape: the first layers hold a dense MLP, the rest routed experts.
    config = MoEConfig(num_layers=8)
    with torch.device("meta"):
        model = MoETransformer(config)
        for index in range(2):
            model.layers[index].mlp = _DenseLayer(config.hidden_size)
    inputs = make_batch(config, device="meta")
    fast, full = _traced_both(model, inputs, monkeypatch)
    _assert_same_graph(fast.graph_module, full.graph_module, "traced")
    assert meta.output_roles(fast.graph_module) == meta.output_roles(full.graph_module)


def test_layers_that_all_differ_are_traced_whole():
    config = MoEConfig(num_layers=6)
    with torch.device("meta"):
        model = MoETransformer(config)
        for index in range(0, 6, 2):
            model.layers[index].mlp = _DenseLayer(config.hidden_size)
    assert _trace_module._repeated_layers(model) is None


class _Counting:
    calls = 0


def test_a_layer_that_behaves_apart_falls_back_silently(caplog):
    # Same class, shapes and attributes everywhere, but every third layer call computes
    # differently: the middle layers' graphs disagree, so every layer is traced, silently.
    config = MoEConfig(num_layers=6)
    with torch.device("meta"):
        model = MoETransformer(config)
    base = type(model.layers[0])

    class Counting(base):
        def forward(self, x):
            _Counting.calls += 1
            return base.forward(self, x) * (2.0 if _Counting.calls % 3 == 0 else 1.0)

    for layer in model.layers:
        layer.__class__ = Counting
    inputs = make_batch(config, device="meta")
    with caplog.at_level(logging.DEBUG, logger="shardgraph.frontend.trace"):
        _Counting.calls = 0
        fast = trace(model, inputs, lm_loss)
    assert [record.levelno for record in caplog.records] == [logging.DEBUG]
    assert "traced one by one" in caplog.records[0].getMessage()
    _Counting.calls = 4  # the prefix's four layer calls came first
    full = trace(model, inputs, lm_loss, reuse_layers=False)
    _assert_same_graph(fast.graph_module, full.graph_module, "traced")
    assert len(model.layers) == 6
