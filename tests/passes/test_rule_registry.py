"""Every placement a rule claims is what running its op on every rank's pieces gives.

The rule contract (``passes/rules/__init__.py``): running the op on every rank's local pieces,
with size arguments rewritten to local sizes (``passes/lower_localize.py``), yields the local
piece of the output under the output placement. This file checks that claim for every op in
the registry, the way ``torch/distributed/tensor/_ops/strategy_validation.py`` checks DTensor's
strategies: for each sample call (``op_samples.py``) on a 2- and a 4-rank ``tp`` axis, the rule
is asked about many input placements; every distinct candidate it returns is run: the inputs
are cut into the candidate's input placements, the one-op graph is localised and run once per
rank, and the pieces are put together under the claimed output placement and compared with the
op on the whole tensors.

``Partial`` inputs are random splits (pieces that sum, or average, to the value), not the
whole-value-on-one-rank form ``placement.shard`` gives, so an op that is not linear in a
partial input shows the difference. ``Replicate`` outputs must be bit-identical on every rank.

Test ids read as the claim: ``mm.default(f8x16,f16x8)-tp4-given(S1,S0)-needs(S1,S0)->Psum`` is
"on a 4-rank axis, asked about inputs ``(Shard(1), Shard(0))``, the mm rule claims that inputs
``(Shard(1), Shard(0))`` give ``Partial("sum")``". ``S<d>`` is ``Shard(d)``, ``I<d>x<s>``
``InterleavedShard(d, s)``, ``R`` ``Replicate()``, ``Psum``/``Pavg`` ``Partial``, ``-`` None.
"""

from __future__ import annotations

import functools
import itertools
import random
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.utils._pytree as pytree
from torch.fx import Graph, GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

from passes.lower_localize import lower_localize
from passes.rules import RULES, RuleContext, registered_ops, rule_for
from shardgraph import meta
from shardgraph.fx_graph import copy_graph_module, tensor_inputs
from shardgraph.mesh import MeshSpec
from shardgraph.meta import PlacedValue, View
from shardgraph.placement import InterleavedShard, Partial, Replicate, Shard, Sharding, ShardingError, shard, unshard

from .op_samples import Sample, samples

AXIS = "tp"
AXIS_SIZES = (2, 4)

# Registered ops with no sample, and why. The MoE ops are not run per rank: lowering
# (``passes/lower_moe.py``) replaces each with dispatch, grouped GEMM and combine steps around
# all-to-alls, so "the op on local pieces" is not their local form. Their strategies are whole-
# mesh (dense tokens, expert-view weights); ``tests/passes/test_lower_moe.py``,
# ``tests/ops/test_moe_op.py`` and ``tests/test_parity.py`` check them.
EXCLUDED = {
    "shardgraph.moe_experts": "lowered to dispatch / all-to-all / combine, not run per rank",
    "shardgraph.moe_experts_backward": "lowered to dispatch / all-to-all / combine, not run per rank",
    "passes.gather_parameters.gather_parameter": "removed by lower_localize once lower_redistribute put its "
                                                 "all-gather on its input (tests/passes/test_gather_parameters.py)",
}

# Input placements tried per sample: every one-input placement, and pairs of non-replicated
# inputs up to this many (a fixed-seed sample of them beyond it).
MAX_COMBINATIONS = 400


# ------------------------------------------------------------------------------------ tracing
@dataclass
class Traced:
    """A sample's one-op graph: its op node, global input tensors (placeholder order) and outputs."""

    sample: Sample
    graph_module: GraphModule
    node_name: str
    tensors: list[torch.Tensor]
    expected: list


def _registry_name(op) -> str:
    """The name ``registered_ops`` lists the op's rule under (custom ops by their packet)."""
    return str(op) if op in RULES else str(op.overloadpacket)


def _with_tensors(sample: Sample, replacements) -> tuple[tuple, dict]:
    """The sample's ``(args, kwargs)`` with its tensors (lists included) replaced in order."""
    leaves, spec = pytree.tree_flatten((sample.args, sample.kwargs))
    replacements = iter(replacements)
    return pytree.tree_unflatten([next(replacements) if isinstance(leaf, torch.Tensor) else leaf
                                  for leaf in leaves], spec)


def _call(sample: Sample, *tensors):
    args, kwargs = _with_tensors(sample, tensors)
    return sample.op(*args, **kwargs)


def _spliced(sample: Sample, traced: GraphModule) -> GraphModule:
    """The op as one node over ``traced``'s placeholders, for ops make_fx decomposes on the way in
    (``reshape``, ``to.dtype``, ``contiguous``: CompositeImplicitAutograd ops never reach the
    tracer). Their rules still apply to graphs that keep them (export, pre-dispatch tracing)."""
    graph = Graph()
    placeholders = []
    for old in traced.graph.nodes:
        if old.op == "placeholder":
            placeholders.append(graph.placeholder(old.name))
            meta.set_value(placeholders[-1], meta.value(old))
    node = graph.call_function(sample.op, *_with_tensors(sample, placeholders))
    fake = [meta.value(p) for p in placeholders]
    with fake[0].fake_mode:
        meta.set_value(node, _call(sample, *fake))
    graph.output(node)
    return GraphModule(torch.nn.Module(), graph)


def trace(sample: Sample) -> Traced:
    tensors = [leaf for leaf in pytree.tree_leaves((sample.args, sample.kwargs)) if isinstance(leaf, torch.Tensor)]
    gm = make_fx(functools.partial(_call, sample), tracing_mode="fake")(*tensors)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == sample.op]
    if not nodes:
        gm = _spliced(sample, gm)
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == sample.op]
    assert len(nodes) == 1, f"{sample.label} traced to {[str(n.target) for n in gm.graph.nodes]}"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # Every tensor argument is its own placeholder, read once by the op, so the rule's inputs
    # (``tensor_inputs``) are the placeholders in order.
    assert tensor_inputs(nodes[0]) == placeholders, sample.label
    expected = _call(sample, *tensors)
    expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    return Traced(sample, gm, nodes[0].name, tensors, expected)


# ------------------------------------------------------------------------------------ claims
def fmt(placement) -> str:
    if isinstance(placement, tuple):
        return "(" + ",".join(fmt(p) for p in placement) + ")"
    if placement is None:
        return "-"
    if isinstance(placement, InterleavedShard):
        return f"I{placement.dim}x{placement.stripes}"
    if isinstance(placement, Shard):
        return f"S{placement.dim}"
    if isinstance(placement, Partial):
        return f"P{placement.op}"
    return "R"


@dataclass(frozen=True)
class Claim:
    """One candidate of one rule on one sample: the input placements it needs, the output it claims."""

    traced: Traced
    size: int
    given: tuple
    needs: tuple
    output: object
    error: str = ""  # the rule raised, or its candidate does not fit the op's inputs

    @property
    def id(self) -> str:
        return (f"{self.traced.sample.label}-{AXIS}{self.size}-given{fmt(self.given)}-needs{fmt(self.needs)}"
                f"->{fmt(self.output)}")


def input_options(value: torch.Tensor, size: int) -> list:
    """The placements an input may arrive in on a ``size``-rank axis (even splits only)."""
    options = [Replicate()]
    for dim, length in enumerate(value.shape):
        if length % size == 0:
            options.append(Shard(dim))
        options += [InterleavedShard(dim, stripes) for stripes in (2, 4) if length % (stripes * size) == 0]
    if value.dtype.is_floating_point:
        options += [Partial("sum"), Partial("avg")]
    return options


def combinations(options: list[list]) -> list[tuple]:
    """All-replicated, every one-input placement, pairs of non-replicated inputs, and every
    input alike (``cat`` of three offers its sharded candidate only then)."""
    replicated = tuple(Replicate() for _ in options)
    common = set.intersection(*(set(o) for o in options)) if options else set()
    found = [replicated] + [tuple(p for _ in options) for p in sorted(common - {Replicate()}, key=repr)]
    for count in (1, 2):
        for chosen in itertools.combinations(range(len(options)), count):
            for picks in itertools.product(*(options[i][1:] for i in chosen)):
                combination = list(replicated)
                for i, pick in zip(chosen, picks):
                    combination[i] = pick
                if tuple(combination) not in found:
                    found.append(tuple(combination))
    if len(found) > MAX_COMBINATIONS:
        singles = [c for c in found if sum(not p.is_replicate() for p in c) <= 1]
        pairs = [c for c in found if c not in singles]
        found = singles + random.Random(0).sample(pairs, MAX_COMBINATIONS - len(singles))
    return found


def claims_of(traced: Traced, size: int) -> list[Claim]:
    """The distinct candidates the sample's rule offers on a ``size``-rank axis, first asker kept."""
    mesh = MeshSpec(world=size, tp=size)
    node = next(n for n in traced.graph_module.graph.nodes if n.name == traced.node_name)
    inputs = tensor_inputs(node)
    rule = rule_for(node.target)
    found: dict[tuple, Claim] = {}
    for given in combinations([input_options(meta.value(n), size) for n in inputs]):
        context = RuleContext(node, mesh, inputs, [Sharding.of(tp=p) for p in given], View.DENSE, View.DENSE.axes)
        try:
            candidates = list(rule.function(context, AXIS, given))
        except Exception as error:  # a rule must answer every placement it can be asked about
            return [Claim(traced, size, given, given, None, f"rule raised {type(error).__name__}: {error}")]
        for candidate in candidates:
            if len(candidate.inputs) != len(inputs):
                claim = Claim(traced, size, given, candidate.inputs, candidate.output,
                              f"{len(candidate.inputs)} input placements for {len(inputs)} tensor inputs")
            else:
                # None: the rule does not care how that input arrives, so it stays as given.
                needs = tuple(g if w is None else w for g, w in zip(given, candidate.inputs))
                claim = Claim(traced, size, given, needs, candidate.output)
            found.setdefault((claim.needs, claim.output), claim)
    return list(found.values())


def _all_claims():
    params = []
    for sample in samples():
        traced = trace(sample)
        for size in AXIS_SIZES:
            params += [pytest.param(claim, id=claim.id) for claim in claims_of(traced, size)]
    return params


# ------------------------------------------------------------------------------------ running
def pieces_of(tensor: torch.Tensor, placement, mesh: MeshSpec, generator: torch.Generator) -> list[torch.Tensor]:
    """Every rank's piece of ``tensor`` under ``placement`` on the axis.

    Partial values are random splits: ``shard`` hands the whole value to one rank and zeros to
    the others, under which ``x * y`` of two partials would look exact.
    """
    if not isinstance(placement, Partial) or tensor.dtype == torch.bool:
        return [shard(tensor, Sharding.of(tp=placement), mesh, rank) for rank in mesh.ranks]
    if tensor.dtype.is_floating_point:
        noise = [torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) for _ in mesh.ranks]
    else:
        noise = [torch.randint(-5, 5, tensor.shape, generator=generator, dtype=tensor.dtype) for _ in mesh.ranks]
    if placement.op == "sum":
        return noise[:-1] + [tensor - sum(noise[:-1])]
    mean = sum(noise) / len(noise)
    return [tensor + n - mean for n in noise]


def _placed(placement):
    if isinstance(placement, tuple):
        return tuple(None if p is None else Sharding.of(tp=p) for p in placement)
    return Sharding.of(tp=placement)


def run_per_rank(claim: Claim) -> list[list[torch.Tensor]]:
    """Localise the one-op graph under the claim and run it on every rank's pieces."""
    mesh = MeshSpec(world=claim.size, tp=claim.size)
    gm = copy_graph_module(claim.traced.graph_module)
    node = next(n for n in gm.graph.nodes if n.name == claim.traced.node_name)
    for producer, placement in zip(tensor_inputs(node), claim.needs):
        meta.set_placed(producer, PlacedValue(Sharding.of(tp=placement)))
    meta.set_placed(node, PlacedValue(_placed(claim.output)))
    local = lower_localize(gm, mesh)
    generator = torch.Generator().manual_seed(zlib.crc32(claim.id.encode()))
    try:
        per_input = [pieces_of(t, p, mesh, generator) for t, p in zip(claim.traced.tensors, claim.needs)]
    except ShardingError as error:  # the candidate asks for a split that does not exist
        raise AssertionError(f"an input cannot take its claimed placement: {error}") from None
    outputs = []
    for rank in mesh.ranks:
        result = local(*(pieces[rank] for pieces in per_input))
        outputs.append(list(result) if isinstance(result, (tuple, list)) else [result])
    return outputs


def check(claim: Claim) -> None:
    """Raise (AssertionError or ShardingError) unless the claim holds."""
    assert not claim.error, claim.error
    sample, expected = claim.traced.sample, claim.traced.expected
    claimed = claim.output if isinstance(claim.output, tuple) else (claim.output,)
    assert len(claimed) == len(expected), f"{len(claimed)} output placements for {len(expected)} outputs"
    outputs = run_per_rank(claim)
    mesh = MeshSpec(world=claim.size, tp=claim.size)
    for k, (placement, want) in enumerate(zip(claimed, expected)):
        if placement is None:
            continue
        try:
            got = unshard([o[k] for o in outputs], Sharding.of(tp=placement), mesh, global_shape=want.shape,
                          name=f"output {k}", check_replicas=not sample.random)
        except ShardingError as error:  # wrong piece shapes, or replicas that differ
            raise AssertionError(f"the pieces are not {fmt(placement)}: {error}") from None
        assert got.dtype == want.dtype, f"output {k}: {got.dtype} pieces for a {want.dtype} value"
        if sample.random:
            continue
        if want.dtype.is_floating_point:
            tolerance = 1e-9 if want.dtype == torch.float64 else 1e-5
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, equal_nan=True,
                                       msg=lambda m: f"output {k} under {fmt(placement)}: {m}")
        else:
            same = torch.equal(got, want)
            assert same, f"output {k} under {fmt(placement)}: {int((got != want).sum())} of {want.numel()} differ"


# ------------------------------------------------------------------------------------ tests
def test_every_registered_op_has_a_sample_or_a_stated_exclusion():
    sampled = {_registry_name(sample.op) for sample in samples()}
    missing = set(registered_ops()) - sampled - set(EXCLUDED)
    assert not missing, f"registered ops without a sample in tests/passes/op_samples.py: {sorted(missing)}"
    assert set(EXCLUDED) <= set(registered_ops()), "an exclusion names an op that has no rule"
    assert not set(EXCLUDED) & sampled, "an excluded op has a sample: drop the exclusion"


@pytest.mark.parametrize("claim", _all_claims())
def test_claimed_output_placement_is_what_the_op_gives_on_local_pieces(claim):
    check(claim)


def _claim(sample: Sample, needs: tuple, output) -> Claim:
    return Claim(trace(sample), 2, needs, needs, output)


def test_the_check_refuses_a_wrong_output_placement():
    x = torch.randn(8, 16, dtype=torch.float64)
    mm = Sample(torch.ops.aten.mm.default, (x, x.t().contiguous()))
    check(_claim(mm, (Shard(1), Shard(0)), Partial("sum")))
    with pytest.raises(AssertionError):
        check(_claim(mm, (Shard(1), Shard(0)), Replicate()))


def test_the_check_splits_partial_inputs_so_a_nonlinear_claim_fails():
    # Under ``shard``'s whole-value-on-rank-0 form, x * y of two partials would come out right.
    x = torch.randn(8, 16, dtype=torch.float64)
    mul = Sample(torch.ops.aten.mul.Tensor, (x, x + 1))
    check(_claim(mul, (Partial("sum"), Replicate()), Partial("sum")))
    with pytest.raises(AssertionError):
        check(_claim(mul, (Partial("sum"), Partial("sum")), Partial("sum")))
