"""The default plan finds routed experts by the graph's structure, not by their parameter names.

GraniteMoE keeps its experts under ``block_sparse_moe``, Jamba and LFM2 under ``feed_forward``,
and a user's registered class names its weights as it likes: wherever a ``moe_experts`` op reads
its weights from, those parameters are split over ep, and the sharded step matches eager.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardgraph as sg
from passes.plan import default_plan, expert_parameters
from shardgraph.check import parity_errors
from shardgraph.frontend import register_experts, trace, unregister_experts

TOLERANCE = 1e-5


def granite():
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

    torch.manual_seed(0)
    return GraniteMoeForCausalLM(GraniteMoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, attn_implementation="eager"))


def lm_loss(output, ids):
    logits = output.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class NamedOddly(nn.Module):
    """Experts whose weights are called neither gate_up_proj nor w1/w2/w3."""

    def __init__(self, experts=4, hidden=8, intermediate=4):
        super().__init__()
        self.wi = nn.Parameter(torch.randn(experts, 2 * intermediate, hidden) * 0.3)
        self.wo = nn.Parameter(torch.randn(experts, hidden, intermediate) * 0.3)

    def forward(self, x, ids, weights):
        out = torch.zeros_like(x)
        for slot in range(ids.shape[1]):
            gate, up = torch.einsum("th,tih->ti", x, self.wi[ids[:, slot]]).chunk(2, dim=-1)
            out = out + weights[:, slot, None] * torch.einsum("ti,thi->th", F.silu(gate) * up, self.wo[ids[:, slot]])
        return out


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4, bias=False)
        self.ffn = NamedOddly()

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        weights, ids = self.router(tokens).softmax(-1).topk(2, dim=-1)
        return x + self.ffn(tokens, ids, weights).reshape(x.shape)


def test_hf_experts_under_any_block_name_are_expert_sharded_by_structure():
    model = granite()
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(1))
    traced = trace(model, (ids,), lm_loss)
    mesh = sg.MeshSpec.parse("world=8,tp=2,ep=2,etp=2")
    found = expert_parameters(traced.graph_module, mesh)
    # Read as the op's own operands: held as the op computes with them, gate/up rows interleaved.
    assert {name: (found.style, found.sharding) for name, found in found.items()} == {
        f"model.layers.{i}.block_sparse_moe.experts.{name}": held for i in range(2) for name, held in (
            ("gate_up_proj", ("expert_colwise", sg.Sharding.of(ep=sg.Shard(0), etp=sg.InterleavedShard(1, 2)))),
            ("down_proj", ("expert_rowwise", sg.Sharding.of(ep=sg.Shard(0), etp=sg.Shard(2)))))}
    plan = default_plan(traced.parameter_names, traced.graph_module)
    program = sg.compile(model, mesh, (ids,), lm_loss, plan=plan)
    gate_up = program.parameter_sharding("model.layers.0.block_sparse_moe.experts.gate_up_proj")
    assert gate_up.placement("ep") == sg.Shard(0) and gate_up.placement("etp") == sg.InterleavedShard(1, 2)
    assert program.parameter_sharding("model.layers.1.block_sparse_moe.experts.down_proj").placement("etp") == sg.Shard(2)
    errors, _ = parity_errors(program, model, (ids,), lm_loss)
    assert errors.within(TOLERANCE), errors


def test_the_name_only_default_plan_matches_experts_under_any_block_name():
    names = ["model.layers.0.feed_forward.experts.gate_up_proj", "model.layers.0.feed_forward.experts.down_proj",
             "model.layers.0.mlp.shared_experts.gate_up_proj", "model.layers.0.mlp.gate_up_proj"]
    plan = default_plan(names)
    from passes.plan import resolve_plan

    placed = resolve_plan({n: (4, 8, 8) if "experts" in n else (8, 8) for n in names}, plan, sg.MeshSpec(4, ep=4))
    assert placed[names[0]].style == "expert_colwise" and placed[names[1]].style == "expert_rowwise"
    # A shared expert or a dense fused MLP is not a routed expert.
    assert placed[names[2]].style == "replicate" and placed[names[3]].style == "replicate"


@pytest.fixture
def registered():
    register_experts(NamedOddly, lambda module, x, ids, weights: torch.ops.shardgraph.moe_experts(
        x, ids, weights, module.wi, module.wo, "silu"))
    yield
    unregister_experts(NamedOddly)


def test_registered_experts_with_their_own_names_are_expert_sharded_and_match_eager(registered):
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(4, 4, 8)
    loss_fn = lambda out, x: out.pow(2).mean()  # noqa: E731
    traced = trace(model, (x,), loss_fn)
    plan = default_plan(traced.parameter_names, traced.graph_module)
    assert plan == {"ffn.wi": "expert_colwise", "ffn.wo": "expert_rowwise"}
    program = sg.compile(model, sg.MeshSpec.parse("world=4,tp=2,ep=2"), (x,), loss_fn, plan=plan)
    assert program.parameter_sharding("ffn.wi").placement("ep") == sg.Shard(0)

    errors, _ = parity_errors(program, model, (x,), loss_fn)
    assert errors.within(TOLERANCE), errors


class StoredOtherwise(nn.Module):
    """Gated experts with biases, each stored in another layout than the moe_experts operand it
    becomes: gate/up ``[E, H, 2I]`` (the op reads its transpose), its bias flat ``[E * 2I]`` (read
    as a ``[E, 2I]`` view), down flattened ``[E * I, H]`` as DBRX stores it (read as ``view(E, I,
    H).transpose(1, 2)``) and its bias ``[H, E]`` (read through a permute)."""

    def __init__(self, experts=4, hidden=8, intermediate=4):
        super().__init__()
        self.experts, self.intermediate = experts, intermediate
        self.gate_up = nn.Parameter(torch.randn(experts, hidden, 2 * intermediate) * 0.3)
        self.gate_up_bias = nn.Parameter(torch.randn(experts * 2 * intermediate) * 0.3)
        self.down = nn.Parameter(torch.randn(experts * intermediate, hidden) * 0.3)
        self.down_bias = nn.Parameter(torch.randn(hidden, experts) * 0.3)

    def forward(self, x, ids, weights):
        down = self.down.view(self.experts, self.intermediate, -1)
        out = torch.zeros_like(x)
        for slot in range(ids.shape[1]):
            chosen = ids[:, slot]
            gate_up = torch.einsum("th,thi->ti", x, self.gate_up[chosen])
            gate_up = gate_up + self.gate_up_bias.view(self.experts, -1)[chosen]
            gate, up = gate_up.chunk(2, dim=-1)
            expert_out = torch.einsum("ti,tih->th", F.silu(gate) * up, down[chosen]) + self.down_bias.t()[chosen]
            out = out + weights[:, slot, None] * expert_out
        return out


def _read_stored_otherwise(module, x, ids, weights):
    experts, intermediate = module.experts, module.intermediate
    return torch.ops.shardgraph.moe_experts(
        x, ids, weights, module.gate_up.transpose(1, 2), module.down.view(experts, intermediate, -1).transpose(1, 2),
        "silu", module.gate_up_bias.view(experts, -1), module.down_bias.permute(1, 0))


@pytest.fixture
def stored_otherwise():
    register_experts(StoredOtherwise, _read_stored_otherwise)
    yield
    unregister_experts(StoredOtherwise)


def _redistributions_between_parameters_and_experts(placed):
    """``(producer, consumer)`` pairs on the paths from the parameters to every ``moe_experts``
    operand where the consumer asks for another split than the producer holds."""
    from shardgraph import meta
    from shardgraph.fx_graph import tensor_inputs

    found, frontier = [], [node for node in placed.graph_module.graph.nodes
                            if str(node.target) == "shardgraph.moe_experts.default"]
    assert frontier
    while frontier:
        node = frontier.pop()
        inputs = tensor_inputs(node)
        operands = range(3, len(inputs)) if str(node.target) == "shardgraph.moe_experts.default" else range(len(inputs))
        for position in operands:
            producer = inputs[position]
            if meta.sharding(producer) != meta.placed(node).input_shardings[position]:
                found.append((producer.name, node.name))
            frontier.append(producer)
    return found


class StoredOtherwiseBlock(Block):
    def __init__(self):
        super().__init__()
        self.ffn = StoredOtherwise()


def test_experts_stored_transposed_flattened_and_permuted_with_biases_are_held_as_the_op_splits_them(
        stored_otherwise):
    torch.manual_seed(0)
    model = StoredOtherwiseBlock()
    x = torch.randn(4, 4, 8)
    loss_fn = lambda out, x: out.pow(2).mean()  # noqa: E731
    program = sg.compile(model, sg.MeshSpec.parse("world=8,tp=2,ep=2,etp=2"), (x,), loss_fn)
    held = {name: program.parameter_sharding(f"ffn.{name}") for name in ("gate_up", "gate_up_bias", "down",
                                                                          "down_bias")}
    assert held == {
        # [E, H, 2I]: experts over ep, the gate half and the up half of the same units on each etp rank.
        "gate_up": sg.Sharding.of(ep=sg.Shard(0), etp=sg.InterleavedShard(2, stripes=2)),
        # [E * 2I]: 2 experts per ep rank, and of each its gate and its up rows: 4 stripes over etp.
        "gate_up_bias": sg.Sharding.of(ep=sg.Shard(0), etp=sg.InterleavedShard(0, stripes=4)),
        # [E * I, H]: 2 experts per ep rank, half of each one's rows per etp rank.
        "down": sg.Sharding.of(ep=sg.Shard(0), etp=sg.InterleavedShard(0, stripes=2)),
        # [H, E]: experts over ep; added once after the etp reduction, so whole over etp.
        "down_bias": sg.Sharding.of(ep=sg.Shard(1)),
    }, held
    assert _redistributions_between_parameters_and_experts(program.placed) == []
    errors, _ = parity_errors(program, model, (x,), loss_fn)
    assert errors.within(TOLERANCE), errors


def test_a_plan_style_other_than_the_role_found_splits_as_the_style_says_and_expert_replicate_drops_etp(
        stored_otherwise):
    torch.manual_seed(0)
    x = torch.randn(4, 4, 8)
    traced = trace(StoredOtherwiseBlock(), (x,), lambda out, x: out.pow(2).mean())
    down = expert_parameters(traced.graph_module, sg.MeshSpec.parse("world=8,tp=2,ep=2,etp=2"))["ffn.down"]
    assert down.style == "expert_rowwise"
    assert down.held("expert_rowwise") == sg.Sharding.of(ep=sg.Shard(0), etp=sg.InterleavedShard(0, stripes=2))
    assert down.held("expert_replicate") == sg.Sharding.of(ep=sg.Shard(0))  # whole experts on every etp rank
    assert down.held("expert_colwise") is None and down.held("replicate") is None


def test_an_expert_style_on_a_parameter_no_moe_op_reads_is_refused_naming_it():
    # It once reached propagation, which refused a node mixing the dense and expert views.
    from examples.moe_model import shardgraph_entry
    from passes.plan import PlanError

    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=4, seq_len=4)
    with pytest.raises(PlanError, match=r"'layers.0.self_attn.k_proj.weight' is given the expert style "
                                        r"'expert_replicate' by pattern '\*k_proj.weight'.*no MoE op reads it"):
        sg.compile(model, sg.MeshSpec(world=2, ep=2), inputs, loss_fn, plan={"*k_proj.weight": "expert_replicate"})
