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
                   same part of every expert's gate and up; ``[E, I, H]`` (separate w1/w3,
                   or the up rows of ungated experts) and interleaved gate/up rows:
                   ``Shard(1)`` over etp
``expert_rowwise`` ``[E, H, I]``: ``Shard(0)`` over ep, ``Shard(2)`` over etp
``expert_replicate`` ``Shard(0)`` over ep only (every etp rank holds whole experts)
``expert_colwise_bias`` ``[E, 2I]`` gate/up bias: ``Shard(0)`` over ep, over etp split as the
                   gate/up rows (``InterleavedShard(1, stripes=2)``; ``Shard(1)`` when the rows
                   are interleaved)
``expert_rowwise_bias`` ``[E, H]`` down bias: ``Shard(0)`` over ep only; it is added once,
                   after the etp reduction of the down product
=================  =====================================================================

Where the traced graph is given, the routed-expert parameters are found by structure
(``expert_parameters``) and each is held as the ``moe_experts`` op computes with its operand: the
split above (the activation's gate/up layout decides the gate/up rows' etp split) carried back
through the ops between the stored parameter and the operand, transposes, permutes, views and
reshapes, casts and the gate/up concatenation, to the stored dims. GPT-OSS stores ``gate_up_proj
[E, H, 2I]`` with gate and up columns interleaved and the adapter hands the op its ``transpose(1,
2)``, so over etp it is split ``Shard(2)`` (a contiguous run of (gate, up) pairs), and ``down_proj
[E, I, H]`` ``Shard(1)``; Llama 4's concatenated ``[E, H, 2I]`` is ``InterleavedShard(2, 2)``;
DBRX's flattened ``[E * I, H]`` weights are ``Shard(0)`` over ep (whole experts) and
``InterleavedShard(0, E / ep)`` over etp (rows of every local expert). Biases the same way.

The expert styles also take one expert's own 2-d Linear weight, as blocks with an
``nn.ModuleList`` of expert MLPs hold them (``experts.3.gate_proj.weight [I, H]``,
``experts.3.down_proj.weight [H, I]``). The frontend stacks them in the graph into the
``[E, 2I, H]`` / ``[E, H, I]`` operands, so the split of a piece is the split of the stack
with the expert dim dropped: over etp as above (gate/up ``Shard(0)``, down ``Shard(1)``), and
over ep on the hidden dim (gate/up ``Shard(1)``, down ``Shard(0)``). A piece is one parameter
that no single ep rank owns alone, so its hidden dim is what ep splits: every rank stores 1/ep of
each expert and the stacked weights are gathered over ep before the expert computation (as
ZeRO-3 does), and their gradients cut back. Stored stacked (one ``[E, ...]`` parameter per
projection) the experts would be split by expert with no gathering; that needs the parameter
list of the program to differ from the model's.

Expert styles live on the expert view (edp, ep, etp); the others on the dense view (dp, tp).
Every parameter is replicated over its view's data-parallel axis (dp or edp).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Mapping, Sequence

from shardgraph.mesh import MeshSpec
from shardgraph.meta import View
from shardgraph.placement import InterleavedShard, Padding, Shard, Sharding, ShardingError, local_shape

from .attention_plan import attention_sites, site_styles
from .rules.moe import expert_bias_shardings, expert_weight_shardings

__all__ = ["PlanError", "ParameterPlacement", "ExpertParameter", "STYLES", "STYLE_DESCRIPTIONS", "resolve_plan", "default_plan",
           "DEFAULT_PLANS", "expert_parameters", "parameter_placements"]

STYLES = (
    "replicate",
    "colwise",
    "rowwise",
    "vocab",
    "expert_colwise",
    "expert_rowwise",
    "expert_replicate",
    "expert_colwise_bias",
    "expert_rowwise_bias",
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
    "expert_colwise_bias": "experts' gate/up bias [E, 2I] over ep; split over etp as the gate/up rows",
    "expert_rowwise_bias": "experts' down bias [E, H] over ep; whole on every etp rank",
}


class PlanError(ValueError):
    """A plan that names an unknown style, matches nothing, or matches a parameter twice."""


@dataclass(frozen=True)
class ParameterPlacement:
    name: str
    style: str
    pattern: str | None
    sharding: Sharding  # how the program holds it: the plan's split, and with zero=3 also over dp/edp
    # With zero=3, the split its readers see once it is gathered over dp/edp (the plan's split).
    gathered: Sharding | None = None
    # With zero=3, where no dim divides over dp/edp: the dim held padded with zeros (``sharding``
    # is then of the padded shape; readers see the logical one).
    padding: Padding | None = None
    # A routed expert's parameter, found by structure (``expert_parameters``), whatever its style.
    expert: bool = False

    @property
    def view(self) -> View:
        """The view the parameter is read and differentiated in. An expert style's is the expert
        view; so is a routed expert's that the plan leaves replicated (the MoE op reads it there,
        so its gradient arrives split over ep and summed over edp, and a ZeRO split of its state
        must be over edp, not dp)."""
        if self.style.startswith("expert"):
            return View.EXPERT
        if self.expert and View.of_sharding(self.gathered or self.sharding) is None:
            return View.EXPERT
        return View.DENSE


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
    if style in ("expert_colwise_bias", "expert_rowwise_bias"):
        if ndim != 2:
            raise PlanError(f"parameter {name!r} has shape {tuple(shape)}; style {style!r} needs an [experts, n] bias")
        gate_up, down = expert_bias_shardings(mesh)
        return gate_up if style == "expert_colwise_bias" else down
    if ndim == 2:
        return _expert_piece_sharding(style, mesh)
    if ndim != 3:
        raise PlanError(
            f"parameter {name!r} has shape {tuple(shape)}; expert style {style!r} needs [experts, out, in], or "
            f"one expert's [out, in] Linear weight"
        )
    if style == "expert_replicate" or mesh.etp == 1:
        return Sharding.of(ep=Shard(0))
    if style == "expert_rowwise":
        return Sharding.of(ep=Shard(0), etp=Shard(2))
    # expert_colwise: a fused [E, 2I, H] weight keeps gate and up halves aligned per etp rank.
    return Sharding.of(ep=Shard(0), etp=InterleavedShard(1, stripes=2) if _is_fused(name) else Shard(1))


def _expert_piece_sharding(style: str, mesh: MeshSpec) -> Sharding:
    """One expert's 2-d Linear weight (gate/up ``[I, H]``, down ``[H, I]``): the stacked layout's
    split with the expert dim dropped over etp, and its hidden dim over ep."""
    hidden_dim, intermediate_dim = (0, 1) if style == "expert_rowwise" else (1, 0)
    if style == "expert_replicate" or mesh.etp == 1:
        return Sharding.of(ep=Shard(hidden_dim))
    return Sharding.of(ep=Shard(hidden_dim), etp=Shard(intermediate_dim))


def _is_fused(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("gate_up_proj", "w13", "w_gate_up", "gate_up")


def resolve_plan(
    parameter_shapes: Mapping[str, Sequence[int]],
    plan: Mapping[str, str],
    mesh: MeshSpec,
    expert_layouts: Mapping[str, "ExpertParameter"] | None = None,
) -> dict[str, ParameterPlacement]:
    """Placement of every parameter under ``plan``; unmatched parameters are replicated.

    ``expert_layouts`` (``expert_parameters`` with the mesh) gives the routed-expert parameters
    found by structure, each held in its stored dims as its ``moe_experts`` operand is split where
    the plan gives it the role found (``ExpertParameter.held``); otherwise the style decides.
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
        structural = (expert_layouts or {}).get(name)
        if expert_layouts is not None and structural is None and style.startswith("expert"):
            # Only an operand of a MoE op lives in the expert view; any other parameter given an
            # expert style would reach its dense readers split over ep, which nothing can bridge.
            known = ", ".join(sorted(expert_layouts)[:4]) or "none in this graph"
            raise PlanError(
                f"parameter {name!r} is given the expert style {style!r} by pattern {patterns[0]!r}, but no "
                f"MoE op reads it as a routed expert's weight (those are: {known}"
                f"{', ...' if len(expert_layouts) > 4 else ''}); give it a dense style: colwise, rowwise, replicate "
                f"or vocab")
        sharding = structural.held(style) if structural is not None else None
        described = f"parameter {name!r} ({style})" if sharding is None else \
            f"parameter {name!r} ({style}, stored as {tuple(shape)})"
        if sharding is None:
            sharding = _style_sharding(name, style, shape, mesh)
        try:
            local_shape(tuple(shape), sharding, mesh, name=described)
        except ShardingError as error:
            raise PlanError(str(error)) from None
        result[name] = ParameterPlacement(name, style, patterns[0] if patterns else None, sharding,
                                          expert=structural is not None)
    return result


# Default plans per model family. Attention is Megatron-style (colwise q/k/v, rowwise o), routed
# experts are expert-parallel; router gate, norms, embedding and lm_head stay replicated, so the
# loss needs no vocabulary-parallel cross entropy. Given the traced graph, attention projections
# and experts are found by structure (``attention_parameters``, ``expert_parameters``); the name
# patterns below serve where the graph holds no attention (or no experts) that structure finds.
_ATTENTION = {
    "*self_attn.q_proj.weight": "colwise",
    "*self_attn.k_proj.weight": "colwise",
    "*self_attn.v_proj.weight": "colwise",
    "*self_attn.o_proj.weight": "rowwise",
}
_TITAN_ATTENTION = {
    "*attention.wq.weight": "colwise",
    "*attention.wk.weight": "colwise",
    "*attention.wv.weight": "colwise",
    "*attention.wo.weight": "rowwise",
}

# Blocks with an nn.ModuleList of expert MLPs: the frontend traces them as moe_experts on the
# stacked weights, or refuses the block, so these names only reach a plan for recognised experts.
_EXPERT_LISTS = {
    "*experts.[0-9]*.gate_proj.weight": "expert_colwise",
    "*experts.[0-9]*.up_proj.weight": "expert_colwise",
    "*experts.[0-9]*.down_proj.weight": "expert_rowwise",
    "*experts.[0-9]*.w1.weight": "expert_colwise",
    "*experts.[0-9]*.w3.weight": "expert_colwise",
    "*experts.[0-9]*.w2.weight": "expert_rowwise",
}

DEFAULT_PLANS: dict[str, dict[str, str]] = {
    # shardgraph's example model and HF transformers 5.x fused experts, whatever the block holding
    # them is called (``mlp``, ``block_sparse_moe``, ``feed_forward``)
    "hf_fused_experts": {
        **_ATTENTION,
        "*.experts.gate_up_proj": "expert_colwise",
        "*.experts.down_proj": "expert_rowwise",
        **_EXPERT_LISTS,
    },
    # torchtitan-style GroupedExperts with separate w1 (gate), w3 (up), w2 (down)
    "torchtitan": {
        **_TITAN_ATTENTION,
        "*moe.experts.w1": "expert_colwise",
        "*moe.experts.w3": "expert_colwise",
        "*moe.experts.w2": "expert_rowwise",
        **_EXPERT_LISTS,
    },
}

_SINKS = {"*self_attn.sinks": "colwise"}

_EXPERT_STYLES = ("expert_colwise", "expert_rowwise", "expert_replicate", "expert_colwise_bias", "expert_rowwise_bias")


def default_plan(parameter_names: Sequence[str], graph_module=None, mesh: MeshSpec | None = None) -> dict[str, str]:
    """The default plan of the model family these parameter names belong to.

    Patterns that would match nothing in this model (no attention projections, say) are
    dropped, so a default plan never fails for a missing layer kind. Given the traced graph, the
    routed-expert weights are found from its structure (``expert_parameters``: the parameters
    every ``moe_experts`` op reads its weights from), and so are the attention projections
    (``attention_parameters``: the Linears that make each attention's query, key and value per
    head are colwise, the one reading its output rowwise), whatever the model calls them; the
    name patterns for experts, and for attention, are then not used. ``mesh`` lets the attention
    walk check that tp divides the heads (an attention it does not divide stays replicated).
    """
    names = list(parameter_names)
    family = "torchtitan" if any(n.endswith("experts.w1") for n in names) else "hf_fused_experts"
    experts = expert_parameters(graph_module) if graph_module is not None else {}
    tp = mesh.tp if mesh is not None else None
    sites = attention_sites(graph_module, tp) if graph_module is not None else []
    attention = site_styles(sites) if sites else None
    by_name_attention = {**_ATTENTION, **_TITAN_ATTENTION}
    plan = {}
    for pattern, style in DEFAULT_PLANS[family].items():
        if experts and style in _EXPERT_STYLES:
            continue
        if attention is not None and pattern in by_name_attention:
            continue
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            plan[pattern] = style
    plan.update({_literal(name): found.style for name, found in experts.items() if name in names})
    plan.update({_literal(name): style for name, style in (attention or {}).items()
                 if name in names and name not in experts})
    # GPT-OSS's attention sinks: one learned logit per head, split with the heads where the
    # heads are split (by name, or by structure when some projection was found colwise).
    if attention is None or "colwise" in attention.values():
        plan.update({pattern: style for pattern, style in _SINKS.items()
                     if any(fnmatch.fnmatchcase(n, pattern) for n in names)})
    return plan


def _literal(name: str) -> str:
    """A glob pattern that matches exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


# ----------------------------------------------------------------------------- routed-expert parameters
# The parameters a moe_experts op reads its expert operands from, and how each is held. A block may
# store its experts in another layout than the op's operands and hand the op a view: GPT-OSS and
# Llama 4 keep gate_up_proj [E, H, 2I] and down_proj [E, I, H] (the op reads their transposes);
# DBRX keeps w1/v1/w2 flattened as [E * I, H] (the op reads [E, I, H] views, w1 and v1
# concatenated); torchtitan concatenates w1 and w3. The split the op computes with
# (``rules.moe.expert_weight_shardings`` / ``expert_bias_shardings``, which follow the activation's
# gate/up layout) is carried back through those ops to the stored dims, so the parameter is held
# exactly as its operand is split and propagation places every op between them with no
# redistribution. One walk does it for the four operands, weights and biases alike.
_EXPERT_CASTS = ("aten._to_copy.", "aten.clone.", "aten.alias.", "aten.detach.", "aten.contiguous.",
                 "prims.convert_element_type.")
_EXPERT_VIEWS = ("aten.view.", "aten._unsafe_view.", "aten.reshape.")
_EXPERT_PERMUTES = ("aten.t.", "aten.transpose.", "aten.permute.")
# moe_experts operand positions: (position, argument name, structural style).
_EXPERT_OPERANDS = ((3, "w_gate_up", "expert_colwise"), (4, "w_down", "expert_rowwise"),
                    (6, "gate_up_bias", "expert_colwise_bias"), (7, "down_bias", "expert_rowwise_bias"))


@dataclass(frozen=True)
class ExpertParameter:
    """A parameter that a ``moe_experts`` op reads an expert operand from.

    ``style``: the operand's role (``expert_colwise`` gate/up, ``expert_rowwise`` down,
    ``expert_colwise_bias``, ``expert_rowwise_bias``); ``layout``: how the op's gate/up rows hold
    each intermediate unit (``concatenated``, ``interleaved``, ``ungated``:
    ``ops.moe.GatedActivation.layout``); ``sharding``: the split of the stored parameter that gives
    the op its operand as the lowering computes with it, None where no mesh was given or the path
    holds an op no split is carried back through (the stack of one expert's pieces, a reshape that
    merges the split dim); ``refusal``: why no stored split can give the op its operand (ep does
    not divide the experts of a flattened weight's view, two readers that need it split apart)."""

    style: str
    layout: str = "concatenated"
    sharding: Sharding | None = None
    refusal: str | None = None

    def held(self, style: str) -> Sharding | None:
        """How the plan holds the parameter under ``style``: the carried split where ``style`` is the
        role found, without its etp split under ``expert_replicate``; None where the style's own
        split decides (another style, or no split carried). A refusal is raised where it applies."""
        if style not in (self.style, "expert_replicate"):
            return None
        if self.refusal is not None:
            raise PlanError(self.refusal)
        if self.sharding is None or style == self.style:
            return self.sharding
        kept = {axis: placement for axis, placement in self.sharding.items() if axis != "etp"}
        return Sharding(tuple(kept), tuple(kept.values()))


class _NoLayout(Exception):
    """An op a split cannot be carried back through (the parameter's role is still known)."""


def expert_parameters(graph_module, mesh: MeshSpec | None = None) -> dict[str, ExpertParameter]:
    """``{parameter name: ExpertParameter}`` for every parameter a ``moe_experts`` op reads an
    expert operand from: ``expert_colwise`` behind ``w_gate_up``, ``expert_rowwise`` behind
    ``w_down``, ``expert_colwise_bias`` / ``expert_rowwise_bias`` behind the biases, through
    casts, transposes and permutes, views and reshapes, the gate/up concatenation, the stack of
    per-expert pieces, and (after ``gather_parameters`` / ``pad_parameters``) the gather and the
    slice that drops padding. Given ``mesh``, each carries the split its operand needs back to the
    stored dims (``ExpertParameter.sharding``). A parameter reached through any other op is left
    to the name patterns (its layout is not known here)."""
    from .rules.moe import moe_layout

    found: dict[str, ExpertParameter] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or str(node.target) != "shardgraph.moe_experts.default":
            continue
        layout = moe_layout(node)[0]
        wanted = ((*expert_weight_shardings(mesh, layout), *expert_bias_shardings(mesh, layout)) if mesh is not None
                  else (None,) * 4)
        for (position, argument, style), sharding in zip(_EXPERT_OPERANDS, wanted):
            operand = node.args[position] if position < len(node.args) else node.kwargs.get(argument)
            if operand is None:
                continue
            for name, stored, problem in _parameters_behind(operand, sharding, None, mesh):
                refusal = None if problem is None else f"expert weight {name!r} of {node.name}: {problem}"
                earlier = found.get(name)
                if earlier is not None and earlier.refusal is None and refusal is None and (
                        earlier.style != style or earlier.sharding != stored):
                    refusal = (f"parameter {name!r} is read by moe_experts as {earlier.style} {earlier.sharding!r} "
                               f"and, by {node.name}, as {style} {stored!r}: no one stored split gives both")
                if earlier is None or earlier.refusal is None:
                    found[name] = ExpertParameter(style, layout, stored, refusal)
    return found


def _parameters_behind(node, wanted: Sharding | None, problem: str | None, mesh: MeshSpec | None):
    """``(parameter name, its split, refusal)`` for every parameter ``node``'s value is read from
    through the ops ``expert_parameters`` walks, ``wanted`` (the split of ``node``'s value) carried
    back through each; None once an op does not carry it."""
    from shardgraph import meta
    from shardgraph.meta import InputKind

    from .gather_parameters import is_parameter_gather

    if node.op == "placeholder":
        record = meta.graph_input(node)
        if record is not None and record.kind is InputKind.PARAMETER:
            yield record.name, wanted, problem
        return
    if node.op != "call_function":
        return
    target = str(node.target)
    if target.startswith(_EXPERT_CASTS) or is_parameter_gather(node) or meta.padding(node) is not None:
        # Same elements in the same dims (a gathered parameter's split is its gathered view's; the
        # slice that drops padding leaves the logical shape the plan splits).
        sources = [(node.args[0], wanted)]
    elif target.startswith(_EXPERT_PERMUTES):
        sources = [(node.args[0], None if wanted is None else _back_through_permute(node, wanted))]
    elif target.startswith(_EXPERT_VIEWS):
        try:
            carried = None if wanted is None else _back_through_view(node, wanted, mesh)
        except _NoLayout:
            carried = None
        except PlanError as error:
            carried, problem = None, problem or str(error)
        sources = [(node.args[0], carried)]
    elif target.startswith("aten.cat."):
        try:
            carried = None if wanted is None else _back_through_cat(node, wanted)
        except _NoLayout:
            carried = None
        sources = [(piece, carried) for piece in node.args[0]]
    elif target.startswith("aten.stack."):
        # One expert's piece: ep splits the stacked experts, which no split of a piece is; the
        # expert styles split pieces on their own (``_expert_piece_sharding``).
        sources = [(piece, None) for piece in node.args[0]]
    else:
        return
    for source, carried in sources:
        yield from _parameters_behind(source, carried, problem, mesh)


def _shape_of(node) -> tuple[int, ...]:
    from shardgraph import meta

    return tuple(meta.value(node).shape)


def _moved_sharding(wanted: Sharding, source_dim: dict[int, int]) -> Sharding:
    """``wanted`` with every split of dim d moved to dim ``source_dim[d]``."""
    placements = {}
    for axis, placement in wanted.items():
        if isinstance(placement, InterleavedShard):
            placement = InterleavedShard(source_dim[placement.dim], stripes=placement.stripes)
        elif isinstance(placement, Shard):
            placement = Shard(source_dim[placement.dim])
        placements[axis] = placement
    return Sharding(tuple(placements), tuple(placements.values()))


def _back_through_permute(node, wanted: Sharding) -> Sharding:
    target, ndim = str(node.target), len(_shape_of(node))
    if target.startswith("aten.t."):
        source_of = [1, 0] if ndim == 2 else [0]
    elif target.startswith("aten.transpose."):
        d0, d1 = (d % ndim for d in node.args[1:3])
        source_of = list(range(ndim))
        source_of[d0], source_of[d1] = d1, d0
    else:
        source_of = [d % ndim for d in node.args[1]]  # output dim j is input dim permutation[j]
    return _moved_sharding(wanted, dict(enumerate(source_of)))


def _prior_sizes(sharding: Sharding, axis: str, dim: int, mesh: MeshSpec) -> int:
    """Product of the axes before ``axis`` (view order) that shard ``dim``."""
    factor = 1
    for other, placement in sharding.items():
        if other == axis:
            break
        if placement.is_shard(dim):
            factor *= mesh.size(other)
    return factor


def _back_through_view(node, wanted: Sharding, mesh: MeshSpec) -> Sharding:
    """The split of a view's input that gives its output the split ``wanted``. Only views that
    split a stored dim into several are carried back: a block of the outer dim is a block of the
    stored dim; a split of an inner dim is an interleaved split of the stored dim, one stripe per
    outer index in the piece this axis receives (``placement.py``'s nesting)."""
    from .rules.shape import view_groups

    in_shape, out_shape = _shape_of(node.args[0]), _shape_of(node)
    groups = view_groups(in_shape, out_shape)
    axes = [axis for axis, _ in wanted.items()]
    placements = {}
    for axis, placement in wanted.items():
        if not placement.is_shard():
            placements[axis] = placement
            continue
        dim = placement.dim % len(out_shape)
        in_dims, out_dims = next((i, o) for i, o in groups if dim in o)
        if len(in_dims) != 1:
            raise _NoLayout(f"{node.name} merges dims {in_dims} into the split dim {dim}")
        position = out_dims.index(dim)
        for other, other_placement in wanted.items():
            outer_split = any(other_placement.is_shard(d) for d in out_dims[:position])
            if other != axis and (outer_split and axes.index(other) > axes.index(axis)
                                  or any(other_placement.is_shard(d) for d in out_dims[1:position + 1])):
                raise _NoLayout(f"{node.name}: {wanted!r} nests its splits of {out_dims} inner first")
        stripes = placement.stripes if isinstance(placement, InterleavedShard) else 1
        if position == 0:
            if out_shape[dim] % (_prior_sizes(wanted, axis, dim, mesh) * mesh.size(axis) * stripes):
                raise PlanError(f"{axis}={mesh.size(axis)} does not divide dim {dim} (size {out_shape[dim]}) of the "
                                f"view {list(out_shape)} that moe_experts reads: ranks would hold parts of experts")
        else:
            stripes *= out_shape[out_dims[0]] // _prior_sizes(wanted, axis, out_dims[0], mesh)
            for d in out_dims[1:position]:
                stripes *= out_shape[d]
        placements[axis] = InterleavedShard(in_dims[0], stripes) if stripes > 1 else Shard(in_dims[0])
    return Sharding(tuple(placements), tuple(placements.values()))


def _back_through_cat(node, wanted: Sharding) -> Sharding:
    """The split of each piece of a ``cat`` that gives the result the split ``wanted``: a split of the
    joined dim must take the same part of every piece (an interleaved split, one stripe per piece)."""
    pieces = node.args[0]
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(_shape_of(node))
    if len({_shape_of(piece)[dim] for piece in pieces}) != 1:
        raise _NoLayout(f"{node.name} joins pieces of different sizes")
    placements = {}
    for axis, placement in wanted.items():
        if placement.is_shard(dim):
            if not isinstance(placement, InterleavedShard) or placement.stripes % len(pieces):
                raise _NoLayout(f"{node.name}: {placement!r} does not split its pieces alike")
            stripes = placement.stripes // len(pieces)
            placement = InterleavedShard(dim, stripes) if stripes > 1 else Shard(dim)
        placements[axis] = placement
    return Sharding(tuple(placements), tuple(placements.values()))


def parameter_placements(graph_module, mesh: MeshSpec, plan: Mapping[str, str] | None = None
                         ) -> dict[str, ParameterPlacement]:
    """The plan's placement of every parameter placeholder of a traced graph, by its logical shape
    (a placeholder held padded, ``meta.padding``, counts without its padding). Experts are found
    by structure (``expert_parameters``), each held as its ``moe_experts`` operand is split, in its
    stored dims; without a ``plan``, ``default_plan``, which finds the attention projections by
    structure too (``passes/attention_plan.py``)."""
    from shardgraph import meta
    from shardgraph.meta import InputKind

    shapes = {}
    for node, record in meta.graph_inputs(graph_module.graph, InputKind.PARAMETER):
        held, padding = tuple(meta.value(node).shape), meta.padding(node)
        shapes[record.name] = held if padding is None else padding.logical_shape(held)
    experts = expert_parameters(graph_module, mesh)
    if plan is None:
        plan = default_plan(list(shapes), graph_module, mesh)
    return resolve_plan(shapes, plan, mesh, expert_layouts=experts)
