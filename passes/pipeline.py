"""The compile pipeline as a list of passes, each with the conditions it requires and ensures.

    decompose_split_norms traced          -> traced          norms whose weight the plan splits as aten ops
    decompose_loss        traced          -> traced          mean losses as sum / count
    recompute             traced          -> traced          layers' activations recomputed in the backward (option)
    gather_parameters     traced          -> traced          zero=3: parameters gathered before their readers
    pad_parameters        traced          -> traced          zero>=1: what dp/edp divides no dim of held padded
    propagate             traced          -> placed          a PlacedValue on every node
    check_random_draws    placed          -> placed          random draws read whole or by rows only
    add_communicator      placed          -> communicator    the collectives' input
    lower_redistribute    communicator    -> typed collectives, gradient sync
    exact_partial_reductions  typed collectives -> partial products on the routing path in float32
    lower_localize        placed          -> shape arguments in local sizes
    lower_moe             communicator    -> no MoE op left; dispatch + grouped GEMMs
    fuse_linear_cross_entropy  placed, local sizes -> output projection + loss + backward as one chunked op (option)
    bucket_gradient_sync  typed collectives -> one all-reduce per gradient bucket
    cast_gradient_reductions  typed collectives -> gradients reduced in reduce_dtype (option)
    schedule_gradient_sync  typed collectives -> each gradient reduced right after it is computed
    lower_collectives     typed collectives -> torch's _c10d_functional ops + wait_tensor, nothing else
    schedule_collectives  c10d            -> ops issued early, waits late (overlap), bytes in flight bounded
    donate_state          communicator    -> new parameters and state written into the old (option)
    fuse_wgrad_sgd        donated         -> SGD steps where their gradients are made (wgrad, embedding, loss) (option)

Conditions are checked before and after every pass (as ``torch.fx.passes.infra.pass_base``'s
``requires`` / ``ensures``), so a pass that breaks the next one's assumption fails at the seam
that broke, naming the pass and the node, instead of somewhere downstream. fx's ``Graph.lint``
(every argument a node of the graph defined before its reader, names unique) is the one check
that walks every argument of every node (a fifth of a second at 48 layers, when every pass ran it):
it runs once, on the lowered graph, or after every pass where ``CompileOptions.lint_each_pass`` is
set (by default where the environment variable ``SHARDGRAPH_LINT_EACH_PASS`` is 1, as the test
suite sets it), which names the pass that broke it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch.fx import GraphModule

from shardgraph import meta
from shardgraph.frontend.context import collection_paused
from shardgraph.fx_graph import copy_graph_module
from shardgraph.mesh import MeshSpec
from shardgraph.meta import InputKind, MetadataError
from shardgraph.runtime import c10d, collectives

from .add_communicator import add_communicator
from .bucket_gradient_sync import bucket_gradient_sync
from .cast_gradient_reductions import cast_gradient_reductions
from .check_random_draws import check_random_draws
from .cost import LinkModel
from .decompose_loss import decompose_loss
from .decompose_split_norms import decompose_split_norms
from .donate_state import donate_state
from .exact_partial_reductions import exact_partial_reductions
from .fuse_wgrad_sgd import fuse_wgrad_sgd
from .fuse_linear_cross_entropy import fuse_linear_cross_entropy
from .gather_parameters import gather_parameters
from .lower_localize import lower_localize
from .lower_moe import is_moe_backward, is_moe_forward, lower_moe
from .lower_collectives import CALL_FORM, lower_collectives
from .lower_redistribute import lower_redistribute
from .pad_parameters import pad_parameters
from .propagate import PlacedGraph, propagate
from .recompute import recompute
from .schedule_collectives import schedule_collectives
from .schedule_gradient_sync import schedule_gradient_sync

__all__ = ["Condition", "Pass", "PassContractError", "CompileOptions", "Compiled", "PIPELINE", "WELL_FORMED", "run_pipeline"]


class PassContractError(AssertionError):
    """A pass was handed, or left behind, a graph that breaks a stated condition."""


@dataclass(frozen=True)
class Condition:
    """A named property of a graph module; ``check`` returns what breaks it (empty: it holds)."""

    name: str
    check: Callable[[GraphModule], list[str]]


def _traced(gm: GraphModule) -> list[str]:
    try:
        inputs = meta.graph_inputs(gm.graph)
        meta.output_roles(gm)
    except MetadataError as error:
        return [str(error)]
    return [f"placeholder {node.name} is a communicator before lowering" for node, record in inputs
            if record.kind is InputKind.COMMUNICATOR]


def _placed(gm: GraphModule) -> list[str]:
    return [f"node {node.name} has no PlacedValue" for node in gm.graph.nodes if meta.placed(node) is None]


def _has_communicator(gm: GraphModule) -> list[str]:
    try:
        meta.communicator_node(gm.graph)
    except MetadataError as error:
        return [str(error)]
    return []


_COLLECTIVE_FUNCTIONS = set(collectives.COLLECTIVE_FUNCTIONS)


def _collectives_typed(gm: GraphModule) -> list[str]:
    """Every collective, in the call form or as a c10d op, carries its ``Collective`` record."""
    return [f"collective node {node.name} ({getattr(node.target, '__name__', node.target)}) has no Collective record"
            for node in gm.graph.nodes
            if node.op == "call_function" and (node.target in _COLLECTIVE_FUNCTIONS or c10d.is_issue(node))
            and meta.collective(node) is None]


def _c10d_only(gm: GraphModule) -> list[str]:
    """Collectives only as torch's c10d ops, each waited on exactly once before its value is read."""
    problems = [f"node {node.name} calls {node.target.__name__}, a collective in the call form"
                for node in gm.graph.nodes if node.op == "call_function" and node.target in CALL_FORM]
    for node in gm.graph.nodes:
        if c10d.is_issue(node):
            users = list(node.users)
            if len(users) != 1 or not c10d.is_wait(users[0]):
                problems.append(f"c10d op {node.name} is read by {[u.name for u in users]}, not by one wait_tensor")
    return problems


def _no_moe_ops(gm: GraphModule) -> list[str]:
    return [f"MoE op {node.name} is still in the graph" for node in gm.graph.nodes
            if is_moe_forward(node) or is_moe_backward(node)]


def _well_formed(gm: GraphModule) -> list[str]:
    try:
        gm.graph.lint()
    except (RuntimeError, ValueError) as error:
        return [str(error)]
    return []


TRACED = Condition("traced: placeholders labelled, output roles present", _traced)
PLACED = Condition("placed: a PlacedValue on every node", _placed)
COMMUNICATOR = Condition("one communicator input", _has_communicator)
COLLECTIVES_TYPED = Condition("every collective carries a Collective record", _collectives_typed)
NO_MOE_OPS = Condition("no MoE op left to lower", _no_moe_ops)
C10D_ONLY = Condition("collectives are _c10d_functional ops, each with its wait_tensor", _c10d_only)
WELL_FORMED = Condition("well-formed (fx lint): every argument defined earlier in the graph, names unique",
                        _well_formed)


@dataclass(frozen=True)
class CompileOptions:
    mesh: MeshSpec
    plan: Mapping[str, str] | None = None
    batch_sharding: object = None
    link: LinkModel | None = None
    replicate_fallback: bool = False
    reduce_dtype: torch.dtype | None = None  # None: gradients are reduced in their own dtype
    donate_state: bool = False  # a training step writes its new parameters and state in place
    zero: int = 0  # 1: optimizer state split over the data-parallel axes, 3: parameters too (passes/optimizer_sharding.py)
    recompute: str = "none"  # "selective" | "full": activations recomputed in the backward (passes/recompute.py)
    reshard_after_forward: bool = True  # zero=3: gather each parameter again for the backward (passes/gather_parameters.py)
    fused_loss: bool = True  # output projection + cross-entropy as one chunked op (passes/fuse_linear_cross_entropy.py)
    loss_chunk_bytes: int | None = None  # that op's chunk budget; None: kernels.linear_cross_entropy.DEFAULT_CHUNK_BYTES
    fused_update: bool = True  # donated plain SGD steps taken where their gradients are made (passes/fuse_wgrad_sgd.py)
    # Most bytes of collectives in flight (issued, not yet waited on) that schedule_collectives
    # lets an early issue add; None: passes/schedule_collectives.py's default.
    prefetch_bytes: int | None = None
    # fx's lint after every pass, not only on the lowered graph: names the pass that left a
    # graph reading a value before (or without) its definition.
    lint_each_pass: bool = field(default_factory=lambda: os.environ.get("SHARDGRAPH_LINT_EACH_PASS") == "1")


@dataclass
class Compiled:
    """What the pipeline leaves: the placed graph (for reports) and the lowered program."""

    placed: PlacedGraph | None = None
    lowered: GraphModule | None = None
    pass_seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[GraphModule, CompileOptions, Compiled], GraphModule]
    requires: tuple[Condition, ...] = ()
    ensures: tuple[Condition, ...] = ()


def _propagate(gm: GraphModule, options: CompileOptions, compiled: Compiled) -> GraphModule:
    compiled.placed = propagate(gm, options.mesh, options.plan, batch_sharding=options.batch_sharding,
                                link=options.link, replicate_fallback=options.replicate_fallback, zero=options.zero,
                                in_place=True)
    # Lowering rewrites a copy: the placed graph stays as propagation left it, for the report.
    return copy_graph_module(compiled.placed.graph_module)


PIPELINE: tuple[Pass, ...] = (
    Pass("decompose_split_norms",
         lambda gm, options, compiled: decompose_split_norms(gm, options.mesh, options.plan), (TRACED,), (TRACED,)),
    Pass("decompose_loss", lambda gm, options, compiled: decompose_loss(gm), (TRACED,), (TRACED,)),
    Pass("recompute", lambda gm, options, compiled: recompute(gm, options.recompute), (TRACED,), (TRACED,)),
    Pass("gather_parameters", lambda gm, options, compiled: gather_parameters(gm, options.zero,
                                                                            options.reshard_after_forward),
         (TRACED,), (TRACED,)),
    Pass("pad_parameters", lambda gm, options, compiled: pad_parameters(gm, options.mesh, options.plan, options.zero),
         (TRACED,), (TRACED,)),
    Pass("propagate", _propagate, (TRACED,), (PLACED,)),
    Pass("check_random_draws", lambda gm, options, compiled: check_random_draws(gm), (PLACED,), (PLACED,)),
    Pass("add_communicator", lambda gm, options, compiled: add_communicator(gm), (PLACED,), (COMMUNICATOR,)),
    Pass("lower_redistribute", lambda gm, options, compiled: lower_redistribute(gm, options.mesh),
         (PLACED, COMMUNICATOR), (COLLECTIVES_TYPED,)),
    Pass("exact_partial_reductions", lambda gm, options, compiled: exact_partial_reductions(gm),
         (COLLECTIVES_TYPED,), (COLLECTIVES_TYPED,)),
    Pass("lower_localize", lambda gm, options, compiled: lower_localize(gm, options.mesh), (PLACED,), ()),
    Pass("lower_moe", lambda gm, options, compiled: lower_moe(gm, options.mesh), (COMMUNICATOR,),
         (NO_MOE_OPS, COLLECTIVES_TYPED)),
    Pass("fuse_linear_cross_entropy",
         lambda gm, options, compiled: fuse_linear_cross_entropy(gm, options.mesh, options.fused_loss,
                                                                 options.loss_chunk_bytes),
         (PLACED, COLLECTIVES_TYPED), (PLACED, COLLECTIVES_TYPED)),
    Pass("bucket_gradient_sync", lambda gm, options, compiled: bucket_gradient_sync(gm), (COLLECTIVES_TYPED,),
         (COLLECTIVES_TYPED, COMMUNICATOR)),
    Pass("cast_gradient_reductions", lambda gm, options, compiled: cast_gradient_reductions(gm, options.reduce_dtype),
         (COLLECTIVES_TYPED,), (COLLECTIVES_TYPED,)),
    Pass("schedule_gradient_sync", lambda gm, options, compiled: schedule_gradient_sync(gm), (COLLECTIVES_TYPED,),
         (COLLECTIVES_TYPED,)),
    Pass("lower_collectives", lambda gm, options, compiled: lower_collectives(gm, options.mesh),
         (COLLECTIVES_TYPED, COMMUNICATOR), (C10D_ONLY, COLLECTIVES_TYPED)),
    Pass("schedule_collectives", lambda gm, options, compiled: schedule_collectives(gm, options.prefetch_bytes),
         (C10D_ONLY, COLLECTIVES_TYPED), (C10D_ONLY, COLLECTIVES_TYPED)),
    Pass("donate_state", lambda gm, options, compiled: donate_state(gm) if options.donate_state else gm,
         (COMMUNICATOR,), (C10D_ONLY, COLLECTIVES_TYPED, COMMUNICATOR)),
    Pass("fuse_wgrad_sgd",
         lambda gm, options, compiled: fuse_wgrad_sgd(gm) if options.donate_state and options.fused_update else gm,
         (C10D_ONLY, COMMUNICATOR), (C10D_ONLY, COLLECTIVES_TYPED, COMMUNICATOR)),
)


def _check(step: Pass, conditions: tuple[Condition, ...], gm: GraphModule, when: str) -> None:
    for condition in conditions:
        problems = condition.check(gm)
        if problems:
            listed = "; ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise PassContractError(f"pass {step.name} {when} '{condition.name}': {listed}")


def run_pipeline(traced_module: GraphModule, options: CompileOptions,
                 passes: tuple[Pass, ...] = PIPELINE) -> Compiled:
    """Run ``passes`` over a copy of the traced graph module, checking every contract."""
    # The passes' nodes and records stay alive to the end, as the trace's do: see collection_paused.
    with collection_paused():
        gm = copy_graph_module(traced_module)
        compiled = Compiled()
        # What the previous pass was checked to ensure holds of the graph the next pass receives
        # (no code runs between them), so its requires need not walk the graph again for those.
        ensured: tuple[Condition, ...] = ()
        for step in passes:
            _check(step, tuple(c for c in step.requires if c not in ensured), gm, "requires")
            started = time.perf_counter()
            gm = step.run(gm, options, compiled)
            compiled.pass_seconds[step.name] = time.perf_counter() - started
            _check(step, step.ensures + ((WELL_FORMED,) if options.lint_each_pass else ()), gm, "did not ensure")
            ensured = step.ensures
        if not options.lint_each_pass:
            problems = WELL_FORMED.check(gm)
            if problems:
                raise PassContractError(f"the lowered graph is not '{WELL_FORMED.name}': {problems[0]} (lint_each_pass, "
                                        f"or SHARDGRAPH_LINT_EACH_PASS=1, names the pass that broke it)")
        compiled.lowered = gm
    return compiled
