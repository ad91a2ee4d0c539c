"""The Python function behind each ``shardgraph::`` op, for a program that calls it directly.

An op called through the dispatcher costs host time before its body runs: tens of microseconds
for a ``torch.library.custom_op`` (its autograd wrapper, the checks on its outputs), several for
one defined at the schema level. A lowered program run as it is (no autograd: its backward is
explicit, no compiler tracing it) needs none of that, and calls about a hundred such ops a step
(``shardgraph.ops.as_direct_calls``). ``custom_op`` and ``impl`` define an op as torch.library's own
functions do and record its body here under the op's name."""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["BODIES", "custom_op", "impl"]

# "namespace::name" -> the function the op's kernel runs on every device.
BODIES: dict[str, Callable] = {}


def custom_op(qualname: str, *, mutates_args=()):
    """``torch.library.custom_op(qualname, mutates_args=...)``, the body recorded in ``BODIES``."""
    def define(body: Callable):
        BODIES[qualname] = body
        return torch.library.custom_op(qualname, mutates_args=mutates_args)(body)

    return define


def impl(library: torch.library.Library, name: str, body: Callable) -> None:
    """``body`` as the kernel of ``library``'s op ``name`` on every device (CompositeExplicitAutograd:
    autograd, where the op has it, is registered on its own), recorded in ``BODIES``."""
    BODIES[f"{library.ns}::{name}"] = body
    library.impl(name, body, "CompositeExplicitAutograd")
