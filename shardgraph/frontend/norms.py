"""RMSNorm modules traced as one ``shardgraph.rms_norm`` op.

A module is traced as the op when its own forward computes what the op computes: it has no
children, one 1-D parameter as wide as its input's last dim, a float epsilon attribute
(``variance_epsilon``, ``eps``, ``epsilon``), a forward of one positional argument, and on probes
its forward gives the op's result: bit for bit in bfloat16 (which tells the two roundings of
``shardgraph/ops/norm.py`` apart: HF's upcast to float32, or the input's own dtype) and in float64
and float32. Nothing is recognised by class or attribute name alone; a norm that computes
anything else (Gemma's ``1 + weight``, ``nn.RMSNorm``'s weight multiplied before the cast, a
centred LayerNorm) keeps its own forward and is traced as the aten ops it runs.

While ``trace`` runs, each recognised module gets the op as an instance-level ``forward`` (removed
again afterwards, also when tracing fails), reading its weight from the module at call time so
the parameter keeps its name.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from typing import Callable, Iterator

import torch
from torch import nn

from kernels.caches import switched

__all__ = ["norm_rounding", "norms_installed", "norms_traced_as_ops"]

_EPSILON_NAMES = ("variance_epsilon", "eps", "epsilon")
# Off: every norm is traced as the aten ops its forward runs (to compare the two).
TRACE_AS_OP = True
# (class, parameter shape and name, epsilon, scalar attributes) -> upcast (True or False) or None.
_CHECKED: dict[tuple, bool | None] = {}


def norms_traced_as_ops(enabled: bool):
    """Recognised norms traced as ``shardgraph.rms_norm`` (the default) or as their own aten ops."""
    return switched(sys.modules[__name__], "TRACE_AS_OP", bool(enabled))


def _epsilon(module: nn.Module) -> float | None:
    for name in _EPSILON_NAMES:
        value = module.__dict__.get(name)
        if isinstance(value, float):
            return value
    return None


def _one_argument(forward: Callable) -> bool:
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.default is p.empty and p.kind in positional]
    return len(required) == 1 and not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters)


def _scalar_settings(module: nn.Module) -> tuple:
    return tuple(sorted((name, value) for name, value in vars(module).items()
                        if isinstance(value, (bool, int, float, str, type(None)))))


def _probe_forward(module: nn.Module, name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    twin = copy.copy(module)
    twin._parameters = dict(module._parameters)
    twin._parameters[name] = nn.Parameter(weight, requires_grad=False)
    try:
        with torch.no_grad():
            out = type(module).forward(twin, x)
    except Exception:  # noqa: BLE001 - a forward that cannot run on a probe is not a norm this op computes
        return None
    return out if isinstance(out, torch.Tensor) else None


def _computes(module: nn.Module, name: str, width: int, epsilon: float, upcast: bool) -> bool:
    from ..ops.norm import rms_norm

    generator = torch.Generator().manual_seed(2)
    # Rows of very different scales, so that a missing or misplaced epsilon shows too.
    x = torch.randn(3, 5, width, generator=generator, dtype=torch.float64)
    x = x * torch.logspace(-3, 2, 5, dtype=torch.float64).reshape(1, 5, 1)
    weight = torch.randn(width, generator=generator, dtype=torch.float64) + 1.5
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        probe, probe_weight = x.to(dtype), weight.to(dtype)
        got = _probe_forward(module, name, probe, probe_weight)
        expected = rms_norm(probe, probe_weight, epsilon, upcast)[0]
        if got is None or got.shape != expected.shape or got.dtype != expected.dtype:
            return False
        same = (torch.equal(got, expected) if dtype != torch.float64
                else torch.allclose(got, expected, rtol=1e-12, atol=0.0))
        if not same:
            return False
    return True


def norm_rounding(module: nn.Module) -> tuple[str, float, bool] | None:
    """``(parameter name, epsilon, upcast)`` where ``module``'s forward is ``shardgraph.rms_norm``
    with that rounding (``upcast``: HF's float32 statistics), else None."""
    if (next(module.children(), None) is not None or len(module._parameters) != 1 or module._buffers
            or "forward" in module.__dict__):
        return None
    (name, weight), = module._parameters.items()
    epsilon = _epsilon(module)
    if weight is None or weight.dim() != 1 or weight.shape[0] == 0 or epsilon is None:
        return None
    if not _one_argument(module.forward):
        return None
    key = (type(module), tuple(weight.shape), name, epsilon, _scalar_settings(module))
    if key not in _CHECKED:
        _CHECKED[key] = next((upcast for upcast in (True, False)
                              if _computes(module, name, weight.shape[0], epsilon, upcast)), None)
    upcast = _CHECKED[key]
    return None if upcast is None else (name, epsilon, upcast)


def _forward_as_op(module: nn.Module, name: str, epsilon: float, upcast: bool) -> Callable:
    from ..ops import norm  # noqa: F401 - registers torch.ops.shardgraph.rms_norm

    def forward(x):
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != getattr(module, name).shape[0]:
            return type(module).forward(module, x)
        # The op also returns rstd for its backward; the model sees the output only.
        return torch.ops.shardgraph.rms_norm(x, getattr(module, name), epsilon, upcast)[0]

    return forward


@contextlib.contextmanager
def norms_installed(model: nn.Module) -> Iterator[list[str]]:
    """Give every recognised norm of ``model`` the op as forward; yield their paths. On exit each
    instance's own ``forward`` attribute is restored (or removed)."""
    found = []
    if TRACE_AS_OP:
        for path, module in model.named_modules():
            rounding = norm_rounding(module)
            if rounding is not None:
                found.append((path or "<root>", module, rounding))
    patched = []
    try:
        for _path, module, (name, epsilon, upcast) in found:
            patched.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
            module.forward = _forward_as_op(module, name, epsilon, upcast)
        yield [path for path, _, _ in found]
    finally:
        for module, had_own, previous in reversed(patched):
            if had_own:
                module.forward = previous
            else:
                del module.forward
