"""The placement rule registry: one short function per op family.

A rule answers, for one op node, which placements its tensor inputs may have and what its
output's placement then is. Rules state the *local semantics* contract that lowering relies on:

    running the op on every rank's local pieces (with shape arguments rewritten to local sizes)
    yields the local piece of the output under the output placement.

So ``sum`` over a dim sharded on an axis gives ``Partial("sum")`` on that axis, ``softmax`` over
a sharded dim is not offered at all, and ``mm`` of ``Shard(1)`` by ``Shard(0)`` gives
``Partial("sum")``.

Most ops treat mesh axes independently; their rules are written per axis: given the current
placement of every tensor input on one axis, return candidate ``(input placements, output
placement)`` pairs. ``propagate`` picks, per axis, the candidate whose input redistributions
cost the fewest bytes under the link model. Rules that must see all axes at once (the MoE ops,
which take dense-view tokens and expert-view weights) are registered with ``whole=True`` and
return ``Strategy`` objects directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.fx import Node

from shardgraph.mesh import MeshSpec
from shardgraph.meta import View
from shardgraph.meta import value as value_of
from shardgraph.placement import Placement, Sharding

__all__ = [
    "AxisCandidate",
    "Strategy",
    "RuleContext",
    "RULES",
    "register",
    "rule_for",
    "registered_ops",
    "value_of",
]


@dataclass(frozen=True)
class AxisCandidate:
    """On one axis: the placement each tensor input needs, and the output placement(s)."""

    inputs: tuple[Placement | None, ...]
    output: Placement | tuple[Placement | None, ...]
    note: str = ""


@dataclass(frozen=True)
class Strategy:
    """On every axis of a view: the sharding each tensor input needs, and the output sharding(s)."""

    inputs: tuple[Sharding | None, ...]
    output: Sharding | tuple[Sharding | None, ...]
    view: View = View.DENSE
    note: str = ""


@dataclass
class RuleContext:
    """What a rule may look at: the node, its inputs' current shardings, global shapes, the mesh."""

    node: Node
    mesh: MeshSpec
    inputs: list[Node]
    input_shardings: list[Sharding]
    view: View
    axes: tuple[str, ...]

    @property
    def args(self) -> tuple:
        return self.node.args

    @property
    def kwargs(self) -> dict:
        return self.node.kwargs

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(value_of(n).shape) for n in self.inputs]

    @property
    def output_value(self) -> Any:
        return value_of(self.node)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(value_of(self.node).shape)

    def size(self, axis: str) -> int:
        return self.mesh.size(axis)


AxisRule = Callable[[RuleContext, str, tuple[Placement, ...]], Sequence[AxisCandidate]]
WholeRule = Callable[[RuleContext], Sequence[Strategy]]


@dataclass(frozen=True)
class RegisteredRule:
    family: str
    function: Callable
    whole: bool


RULES: dict[Any, RegisteredRule] = {}


def register(*targets, family: str | None = None, whole: bool = False):
    """Register ``fn`` as the rule for every op in ``targets`` (OpOverload, OpOverloadPacket or callable)."""

    def decorator(fn):
        name = family or fn.__name__.removeprefix("rule_")
        for target in targets:
            overloads = _overloads(target)
            for overload in overloads:
                RULES[overload] = RegisteredRule(name, fn, whole)
        return fn

    return decorator


def _overloads(target) -> list:
    if isinstance(target, str):
        # Ops registered by other packages (``"shardgraph.moe_experts"``) are matched by name, so a
        # rule can exist before the op's library is imported.
        return [target]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return [getattr(target, name) for name in target.overloads()]
    return [target]


def registered_ops() -> list[str]:
    """Every op with a rule, by name (``aten.mm.default``, ``shardgraph.moe_experts``): the op
    catalogue a traced graph may use without ``replicate_fallback``."""
    return sorted({_name(target) for target in RULES})


def _name(target) -> str:
    # A plain function (the parameter gather marker) by its import path, not by its address.
    if callable(target) and hasattr(target, "__qualname__") and not isinstance(target, torch._ops.OpOverload):
        return f"{target.__module__}.{target.__qualname__}"
    return str(target)


def rule_for(target) -> RegisteredRule | None:
    rule = RULES.get(target)
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = RULES.get(target.overloadpacket) or RULES.get(str(target.overloadpacket))
    return rule


# Import the families so their @register calls run.
from . import attention, factory, matmul, moe, pointwise, reduction, shape, embedding, loss, index, convolution, gather, random_draws, norm, rotary  # noqa: E402,F401,E501
