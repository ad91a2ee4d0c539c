"""Shared helpers for the frontend tests: reference gradients and graph queries."""

import torch

MOE_FORWARD = "shardgraph.moe_experts.default"
MOE_BACKWARD = "shardgraph.moe_experts_backward.default"


def relative_error(value, reference):
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def reference_loss_and_gradients(model, inputs, loss_fn):
    """The model run eagerly: loss and ``{name: gradient}`` of every trainable parameter."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = loss_fn(model(*inputs), *inputs)
    return loss.detach(), dict(zip(trainable, torch.autograd.grad(loss, list(trainable.values()))))


def calls(traced, target: str):
    return [n for n in traced.graph_module.graph.nodes if n.op == "call_function" and str(n.target) == target]


def assert_moe_operands_read_as_computed_over_ep_etp(placed) -> None:
    """Every ``moe_experts`` op of a placed graph at etp > 1 reads its weights split as the lowering
    computes with them (gate/up rows interleaved, down's intermediate dim), so nothing is
    redistributed between a stored expert layout and the op."""
    import shardgraph as sg
    from shardgraph import meta

    nodes = calls(placed, MOE_FORWARD)
    assert nodes
    for node in nodes:
        record = meta.placed(node)
        assert record.input_shardings[3] == sg.Sharding.of(ep=sg.Shard(0), etp=sg.InterleavedShard(1, stripes=2))
        assert record.input_shardings[4] == sg.Sharding.of(ep=sg.Shard(0), etp=sg.Shard(2))


def worst_gradient_error(gradients, reference):
    assert set(gradients) == set(reference)
    return max((relative_error(gradients[n], reference[n]), n) for n in reference)
