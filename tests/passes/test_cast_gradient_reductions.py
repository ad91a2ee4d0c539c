"""reduce_dtype: gradients are summed across ranks in the chosen dtype, the chain of one
gradient's reductions casts once each way, and the bytes recorded are the bytes sent."""

import pytest
import torch

import shardgraph as sg
from examples.moe_model import shardgraph_entry
from passes.bucket_gradient_sync import flatten
from shardgraph import meta
from shardgraph.meta import Purpose


def _compile(mesh_text, model_dtype=torch.float32, **options):
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    model = model.to(model_dtype)
    return model, inputs, sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn, **options)


def _gradient_reductions(program):
    return [node for node in program.graph_module.graph.nodes
            if (record := meta.collective(node)) is not None and record.purpose is Purpose.GRADIENT_SYNC
            and record.kind.value in ("all_reduce", "reduce_scatter")]


def _dtype(node):
    """The dtype a node of the lowered graph holds."""
    if node.target is torch.ops.prims.convert_element_type.default:
        return node.args[1]
    if node.target is flatten:
        members = {_dtype(member) for member in node.args[0]}
        assert len(members) == 1, f"{node.name} flattens gradients of several dtypes {members}"
        return members.pop()
    if meta.collective_or_part(node) is not None:
        # A collective, its wait or a layout step of it: the dtype of what it moves.
        return _dtype(meta.moved_tensor(node))
    return meta.tensor_value(node).dtype


def _reduced_dtype(node):
    return _dtype(meta.moved_tensor(node))


@pytest.mark.parametrize("optimizer", [None, sg.optim.AdamW(lr=1e-3)], ids=["gradients", "train-step"])
def test_bf16_reduction_halves_the_gradient_bytes_and_the_simulator_sends_them(optimizer):
    mesh = "world=8,tp=2,ep=2,etp=2"
    model, inputs, default = _compile(mesh, compute_dtype=torch.bfloat16, optimizer=optimizer)
    _, _, halved = _compile(mesh, compute_dtype=torch.bfloat16, optimizer=optimizer, reduce_dtype=torch.bfloat16)
    reductions = _gradient_reductions(halved)
    assert reductions and all(_reduced_dtype(node) == torch.bfloat16 for node in reductions)
    assert all(_reduced_dtype(node) == torch.float32 for node in _gradient_reductions(default))

    def family(program):
        # Every collective of the gradient synchronisation: the reductions and the all-gathers
        # after them (a gradient sharded over tp where its parameter is replicated) run in bf16.
        return program.report(format="dict")["totals"]["communication_bytes_per_rank_by_family"]["gradient sync"]

    assert family(halved) == pytest.approx(family(default) / 2)
    # The simulator counts what the tensors it is handed weigh. Both programs route the same
    # tokens (the dispatch bytes depend on the routing, not on the prediction), so what the
    # simulator saves is exactly the predicted saving on the gradient synchronisation.
    assert _simulated_bytes(default, model, inputs, optimizer) - _simulated_bytes(halved, model, inputs, optimizer) \
        == pytest.approx(family(default) - family(halved), rel=1e-6)


def _simulated_bytes(program, model, inputs, optimizer):
    if optimizer is None:
        result = program.run_simulated({n: p.detach() for n, p in model.named_parameters()}, inputs)
        assert all(g.dtype == torch.float32 for g in result.gradients.values())
        return sum(result.simulator.bytes_sent_by_axis(0).values())
    _, _, metrics = program.simulate_train_step(program.init_states(model), inputs)
    return sum(metrics["simulator"].bytes_sent_by_axis(0).values())


def _fed_by(node):
    """The value a c10d collective moves, before the layout steps of its own expansion."""
    source = meta.moved_tensor(node)
    while (part := meta.collective_part(source)) is not None and part.issue == node.name:
        source = meta.moved_tensor(source)
    return source


def _result(node):
    """The value a c10d collective leaves, after its wait and the layout steps of its expansion."""
    result = next(iter(node.users))
    while True:
        following = [u for u in result.users if (part := meta.collective_part(u)) is not None
                     and part.issue == node.name]
        if not following:
            return result
        result = following[0]


def test_a_gradient_reduced_over_two_axes_is_cast_once_each_way():
    # With zero=1 a gradient partial over dp and tp is reduce-scattered over dp (to its optimizer
    # state's split) and all-reduced over tp: a chain of two reductions. (Without zero it is one
    # all-reduce over the dp*tp group.)
    _, _, program = _compile("world=4,tp=2,ep=2", compute_dtype=torch.bfloat16, optimizer=sg.optim.AdamW(lr=0.1),
                             reduce_dtype=torch.bfloat16, zero=1)
    graph = program.graph_module.graph

    def synchronises(node):
        record = meta.collective_or_part(node)
        return record is not None and record.purpose is Purpose.GRADIENT_SYNC

    # The casts around the gradient synchronisation (exact routing casts the router's inputs).
    casts = [n for n in graph.nodes if n.target is torch.ops.prims.convert_element_type.default
             and (synchronises(n.args[0]) or any(synchronises(user) for user in n.users))]
    reductions = _gradient_reductions(program)
    # A chain ends in a reduction or in the all-gather after it (both in bf16).
    in_bf16 = [n for n in graph.nodes if (record := meta.collective(n)) is not None
               and record.purpose is Purpose.GRADIENT_SYNC and _reduced_dtype(n) == torch.bfloat16]
    chained = [n for n in reductions if meta.collective_or_part(_fed_by(n)) is not None]
    assert chained, "the tiny model at tp=2 with zero=1 has gradients reduced over dp and then tp"
    # A reduction reads the previous one directly, still in bf16; only a reduction that reads
    # no other reduction has a cast in front of it, and only the last of a chain casts back.
    firsts = [n for n in reductions if meta.collective_or_part(_fed_by(n)) is None]
    lasts = [n for n in in_bf16 if not any(meta.collective_or_part(u) is not None for u in _result(n).users)]
    assert all(_fed_by(n).target is torch.ops.prims.convert_element_type.default for n in firsts)
    assert len(casts) == len(firsts) + len(lasts)


def test_fp32_reduction_of_a_bf16_model_sums_in_fp32_and_returns_bf16_gradients():
    model, inputs, program = _compile("world=4,tp=2,ep=2", model_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    assert all(_reduced_dtype(node) == torch.float32 for node in _gradient_reductions(program))
    result = program.run_simulated({n: p.detach() for n, p in model.named_parameters()}, inputs)
    assert all(g.dtype == torch.bfloat16 for g in result.gradients.values())
    _, _, plain = _compile("world=4,tp=2,ep=2", model_dtype=torch.bfloat16)
    reference = plain.run_simulated({n: p.detach() for n, p in model.named_parameters()}, inputs)
    for name, gradient in reference.gradients.items():
        # Same sums but rounded once instead of per step: within bf16 rounding of each other.
        difference = (result.gradients[name].float() - gradient.float()).norm()
        assert difference <= 2e-2 * gradient.float().norm() + 1e-6, name


def test_a_reduce_dtype_that_is_not_a_floating_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="reduce_dtype must be a floating-point torch.dtype"):
        _compile("world=2,tp=2", reduce_dtype=torch.int32)
