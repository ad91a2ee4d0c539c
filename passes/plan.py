"""Parameter plans: glob patterns over a model's own parameter names, mapped to placements.

A plan is an ordered mapping ``pattern -> style``, HF-style::

    {
        "layers.*.self_attn.q_proj.weight": "colwise",
        "layers.*.self_attn.o_proj.weight": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "expert_colwise",
        "layers.*.mlp.experts.down_proj": "expert_rowwise",
        "layers.*.mlp.gate.weight": "replicate",
    }

``*`` matches one dotted name component or more (``fnmatch``), so ``layers.*.mlp.gate.weight``
matches every layer. Parameters no pattern matches are replicated. A pattern that matches no
parameter, and a parameter that two patterns match with different styles, are errors naming them.

Styles and what they mean for a parameter of shape ``shape``:

=================  =====================================================================
``replicate``      ``Replicate()`` on every dense axis
``colwise``        Linear weight ``[out, in]``: ``Shard(0)`` over tp (bias ``Shard(0)``)
``rowwise``        Linear weight ``[out, in]``: ``Shard(1)`` over tp (bias replicated)
``vocab``          Embedding ``[vocab, hidden]``: ``Shard(0)`` over tp
``expert_colwise`` ``[E, 2I, H]`` fused gate/up: ``Shard(0)`` over ep and, when etp > 1,
                   ``InterleavedShard(1, stripes=2)`` over etp, so each etp rank holds the
                   same part of every expert's gate and up; ``[E, I, H]`` (separate w1/w3):
                   ``Shard(1)`` over etp
``expert_rowwise`` ``[E, H, I]``: ``Shard(0)`` over ep, ``Shard(2)`` over etp
``expert_replicate`` ``Shard(0)`` over ep only (every etp rank holds whole experts)
=================  =====================================================================

Expert styles live on the expert view (edp, ep, etp); the others on the dense view (dp, tp).
Every parameter is replicated over its view's data-parallel axis (dp or edp).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Mapping, Sequence

from shardgraph.mesh import MeshSpec
from shardgraph.meta import View
from shardgraph.placement import InterleavedShard, Shard, Sharding, ShardingError, local_shape

__all__ = ["PlanError", "ParameterPlacement", "STYLES", "STYLE_DESCRIPTIONS", "resolve_plan", "default_plan",
           "DEFAULT_PLANS"]

STYLES = (
    "replicate",
    "colwise",
    "rowwise",
    "vocab",
    "expert_colwise",
    "expert_rowwise",
    "expert_replicate",
)


# One line per style, listed by ``shardgraph compile --help``.
STYLE_DESCRIPTIONS = {
    "replicate": "whole tensor on every rank",
    "colwise": "Linear weight [out, in] split on out over tp (bias split too)",
    "rowwise": "Linear weight [out, in] split on in over tp (bias whole)",
    "vocab": "Embedding [vocab, hidden] split on vocab over tp",
    "expert_colwise": "experts [E, 2I, H] over ep; gate/up rows interleaved over etp",
    "expert_rowwise": "experts [E, H, I] over ep; I split over etp",
    "expert_replicate": "experts over ep only; every etp rank holds whole experts",
}


class PlanError(ValueError):
    """A plan that names an unknown style, matches nothing, or matches a parameter twice."""


@dataclass(frozen=True)
class ParameterPlacement:
    name: str
    style: str
    pattern: str | None
    sharding: Sharding

    @property
    def view(self) -> View:
        return View.EXPERT if self.style.startswith("expert") else View.DENSE


def _style_sharding(name: str, style: str, shape: Sequence[int], mesh: MeshSpec) -> Sharding:
    ndim = len(shape)
    if style == "replicate":
        return Sharding.replicate()
    if style in ("colwise", "rowwise", "vocab"):
        if ndim == 1:
            # A bias: column-parallel layers own a slice of the outputs, row-parallel layers add
            # their bias once after the reduction, so it stays whole.
            return Sharding.of(tp=Shard(0)) if style == "colwise" else Sharding.replicate()
        if ndim != 2:
            raise PlanError(f"parameter {name!r} has shape {tuple(shape)}; style {style!r} needs a 2-d weight")
        return Sharding.of(tp=Shard(1) if style == "rowwise" else Shard(0))
    if ndim != 3:
        raise PlanError(
            f"parameter {name!r} has shape {tuple(shape)}; expert style {style!r} needs [experts, out, in]"
        )
    if style == "expert_replicate" or mesh.etp == 1:
        return Sharding.of(ep=Shard(0))
    if style == "expert_rowwise":
        return Sharding.of(ep=Shard(0), etp=Shard(2))
    # expert_colwise: a fused [E, 2I, H] weight keeps gate and up halves aligned per etp rank.
    return Sharding.of(ep=Shard(0), etp=InterleavedShard(1, stripes=2) if _is_fused(name) else Shard(1))


def _is_fused(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("gate_up_proj", "w13", "w_gate_up", "gate_up")


def resolve_plan(
    parameter_shapes: Mapping[str, Sequence[int]],
    plan: Mapping[str, str],
    mesh: MeshSpec,
    fused_names: Sequence[str] = (),
) -> dict[str, ParameterPlacement]:
    """Placement of every parameter under ``plan``; unmatched parameters are replicated.

    ``fused_names`` lists parameters that hold fused gate/up rows regardless of their leaf name.
    Divisibility of every sharded dim is checked here, before anything is traced or lowered.
    """
    for pattern, style in plan.items():
        if style not in STYLES:
            raise PlanError(f"plan pattern {pattern!r} names unknown style {style!r}; known: {', '.join(STYLES)}")
    matched_by: dict[str, list[str]] = {name: [] for name in parameter_shapes}
    unmatched = []
    for pattern in plan:
        hits = [name for name in parameter_shapes if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            unmatched.append(pattern)
        for name in hits:
            matched_by[name].append(pattern)
    if unmatched:
        sample = ", ".join(list(parameter_shapes)[:4])
        raise PlanError(
            f"plan patterns match no parameter: {', '.join(repr(p) for p in unmatched)} "
            f"(parameter names look like: {sample}, ...)"
        )
    result = {}
    for name, shape in parameter_shapes.items():
        patterns = matched_by[name]
        styles = {plan[p] for p in patterns}
        if len(styles) > 1:
            raise PlanError(
                f"parameter {name!r} is matched by patterns with different styles: "
                + ", ".join(f"{p!r} -> {plan[p]!r}" for p in patterns)
            )
        style = plan[patterns[0]] if patterns else "replicate"
        sharding = _style_sharding(name, style, shape, mesh)
        if name in fused_names and style == "expert_colwise" and mesh.etp > 1:
            sharding = Sharding.of(ep=Shard(0), etp=InterleavedShard(1, stripes=2))
        try:
            local_shape(tuple(shape), sharding, mesh, name=f"parameter {name!r} ({style})")
        except ShardingError as error:
            raise PlanError(str(error)) from None
        result[name] = ParameterPlacement(name, style, patterns[0] if patterns else None, sharding)
    return result


# Default plans per model family. Attention is Megatron-style (colwise q/k/v, rowwise o), routed
# experts are expert-parallel; router gate, norms, embedding and lm_head stay replicated, so the
# loss needs no vocabulary-parallel cross entropy.
_ATTENTION = {
    "*self_attn.q_proj.weight": "colwise",
    "*self_attn.k_proj.weight": "colwise",
    "*self_attn.v_proj.weight": "colwise",
    "*self_attn.o_proj.weight": "rowwise",
}

DEFAULT_PLANS: dict[str, dict[str, str]] = {
    # shardgraph's example model and HF Mixtral / Qwen2-MoE / Qwen3-MoE (transformers 5.x fused experts)
    "hf_fused_experts": {
        **_ATTENTION,
        "*mlp.experts.gate_up_proj": "expert_colwise",
        "*mlp.experts.down_proj": "expert_rowwise",
    },
    # torchtitan-style GroupedExperts with separate w1 (gate), w3 (up), w2 (down)
    "torchtitan": {
        "*attention.wq.weight": "colwise",
        "*attention.wk.weight": "colwise",
        "*attention.wv.weight": "colwise",
        "*attention.wo.weight": "rowwise",
        "*moe.experts.w1": "expert_colwise",
        "*moe.experts.w3": "expert_colwise",
        "*moe.experts.w2": "expert_rowwise",
    },
}


def default_plan(parameter_names: Sequence[str]) -> dict[str, str]:
    """The default plan of the model family these parameter names belong to.

    Patterns that would match nothing in this model (no attention projections, say) are
    dropped, so a default plan never fails for a missing layer kind.
    """
    names = list(parameter_names)
    family = "torchtitan" if any(n.endswith("experts.w1") for n in names) else "hf_fused_experts"
    plan = {}
    for pattern, style in DEFAULT_PLANS[family].items():
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            plan[pattern] = style
    return plan
