"""One MoE block, router through combine, forward + backward on one device: shardgraph against
HF transformers, torch.compile, torchtitan, and the block's grouped GEMMs alone.

Every column runs the same block from the same weights on the same input: the input ``x [1, T, H]``
and every weight take gradients, and the loss is ``(out.float() * probe).sum()`` with a fixed
random ``probe``, so a step is the forward, the loss and the gradients of the input and of every
parameter (``torch.autograd.grad``, nothing accumulated into ``.grad``). bf16 by default.

Columns (``--columns``, comma-separated; all by default):

  ours                 the HF block compiled by ``shardgraph.compile(block, MeshSpec.parse("world=1"),
                       (probe,), loss)``: one fx graph of the loss and every gradient, the experts
                       lowered to sort + our Triton grouped GEMMs + combine; run by
                       ``program.single_device_step()`` (the input is held as a parameter of a
                       wrapper module so the program returns its gradient)
  ours_inductor        the same program under ``torch.compile`` (``single_device_step(compile="inductor")``;
                       another ``--compile-backend`` compiles the graph module with that backend)
                       (both compiled with the fused MoE path off: ``kernels.fused_moe.use_fused_moe("off")``)
  ours_aten_rows       ours and ours_inductor with the MoE row steps (dispatch gather, combine and
  ours_aten_rows_inductor  their gradients) as aten ops, which inductor fuses, instead of the row
                       kernels (``kernels.moe_rows``): what the program ran before them
  ours_fused           the same program compiled with the fused MoE expert kernels
  ours_fused_inductor  (``use_fused_moe("on")``: gathered gate/up product with the activation in its
                       epilogue, down dgrad with the activation's derivative, gathered gate/up wgrad;
                       ``docs/kernels.md``), eagerly and under ``torch.compile``; each row records
                       ``fused_moe_layers``, the MoE layers the program runs fused (0 where the
                       kernels cannot run: a CPU without ``TRITON_INTERPRET=1``)
  hf                   the HF block eagerly, with the experts implementation transformers picks by
                       default for the family (5.x: ``grouped_mm``, one ``torch._grouped_mm`` per
                       projection; recorded per row as ``hf_experts``)
  hf_compiled          ``torch.compile`` of that block
  torchtitan           torchtitan's ``torchtitan.models.common.moe.MoE`` (the ``torchtitan`` package,
                       0.3.0) configured as the same block, eagerly
  torchtitan_compiled  ``torch.compile`` of it
  grouped_gemm_only    the block's grouped GEMMs alone with the token counts per expert the
                       routing gives: gate_up forward, down forward, and each one's dgrad and wgrad
                       (six grouped products; for DeepSeek-V3 also the shared expert's nine dense
                       ``torch.mm``), once with ``torch._grouped_mm`` and once with our kernels
                       (``kernels.grouped_mm`` / ``grouped_mm_dgrad`` / ``grouped_mm_wgrad``); the
                       faster is the ceiling (``ceiling_ms``), both are recorded

Shapes (``--shapes``):

  qwen3_30b_a3b        ``Qwen3MoeSparseMoeBlock``: E=128, top-8, H=2048, I=768, softmax, top-k renormalised
  deepseek_v3_local32  ``DeepseekV3MoE`` with n_group=1, topk_group=1 (no group limit): H=7168,
                       I=2048, sigmoid scores, top-k renormalised and scaled by 2.5, and its shared
                       expert (one, width 2048) ON in every column. E=32 experts with top-8: the 32
                       experts one rank holds of DeepSeek-V3's 256 at EP=8, where each rank's
                       experts receive T*8 token copies for its T tokens when routing is
                       balanced, as here
  olmoe                ``OlmoeSparseMoeBlock``: E=64, top-8, H=2048, I=1024, softmax, not renormalised

Tokens (``--tokens``): 8192 and 32768. Routing (``--routing``):

  balanced             token t picks experts (t*k + j) mod E, j < k: every expert gets T*k/E tokens
  skewed               each token picks k distinct experts drawn with Zipf weights 1/(rank+1)
                       (expert 0 the most popular): expert 0 gets nearly every token

The routing is made by the router itself: the router weight has orthonormal rows and the input
is set so that its router logits are uniform in [-0.5, 0.5] plus 2 on each token's chosen experts
(the rest of the input is noise orthogonal to the router's rows), so every implementation's top-k
picks those experts (checked on the device per row against the HF router: ``routing_matches``)
while no score saturates. Each row records the tokens per expert (min / max / mean).

Correctness, before any timing: for every (shape, routing), every column's output (ours: the
gradient of a probe held as a parameter, which is the output) and the gradients of the input and
of every weight are compared in float32 with the HF block run eagerly with HF's per-expert loop,
at a small shape of the same family (E=8, top-2, H=64, I=32, ``--check-tokens`` tokens, the same
routing) on ``--check-device`` (the CPU by default, where every column runs float32; the compiled
columns there under ``--check-compile-backend``, aot_eager on a CPU). torchtitan's grouped
experts cast every operand to bf16 before ``torch._grouped_mm``, so its float32 check runs with
``Tensor.bfloat16`` as the identity; compiled, ``torch._grouped_mm`` takes bf16 only, so
torchtitan_compiled is compared with torchtitan eager in bf16 (within 2e-2). ``grouped_gemm_only``
is compared with per-expert float32 products. A column over ``--check-tol`` (1e-4 relative,
Frobenius) is marked ``wrong`` in the JSON and with ``!`` in the table, is still timed, and is
left out of the ratios. On the device, each column's first step at the row's shape is also
compared with HF eager's in the compute dtype (``rel_err_vs_hf``: the input's and every weight's
gradient, the worst of them; over 5e-2 marks the column too; ``loss_rel_diff_vs_hf`` is recorded).

Timing: median of ``--steps`` steps after ``--warmup`` (CUDA events around each step), peak
memory over the timed steps (``max_memory_allocated``, and the part above what was allocated
before them). A column that runs out of memory is recorded as ``oom`` and the next one runs; the
JSON (default ``benchmarks/results/moe_block.json``) is rewritten after every column. Per row:
``ours_ms`` (the fastest of the ours columns, fused or not), ``ours_unfused_ms`` and
``ours_fused_ms`` (the faster of each pair), ``fused_over_ceiling``, ``unfused_over_fused``, ``best_other_ms`` (the fastest of the HF and
torchtitan columns), ``ours_over_ceiling`` and ``best_other_over_ours``.

torchtitan 0.3.0 and what it imports that torch does not bring: the wheels
``torchtitan-0.3.0-py3-none-any.whl``, ``spmd_types-0.2.3-py3-none-any.whl``,
``einops-0.8.2-py3-none-any.whl``, ``tyro-1.0.17-py3-none-any.whl``,
``docstring_parser-0.18.0-py3-none-any.whl``, ``typeguard-4.6.1-py3-none-any.whl`` (pure Python;
installed with ``pip install --no-deps --target``). Without them the torchtitan columns are
recorded as not importable and the others run.

    python benchmarks/moe_block.py                                   # one H100 / H200, every row
    python benchmarks/moe_block.py --shapes qwen3_30b_a3b --tokens 8192 --columns ours,hf,grouped_gemm_only
    python benchmarks/moe_block.py --device cpu --tiny --compile-backend aot_eager   # seconds, on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import kernels  # noqa: E402
from kernels.fused_moe import use_fused_moe  # noqa: E402
from kernels.moe_rows import use_row_kernels  # noqa: E402
import shardgraph as sg  # noqa: E402
from benchmarks.fused_loss import measure  # noqa: E402
from benchmarks.train_step import (benchmark_device, is_out_of_memory, print_profile, profile_steps,  # noqa: E402
                                   synchronize, versions)
from benchmarks.train_step import release as release_memory  # noqa: E402

COLUMNS = ("ours", "ours_inductor", "ours_aten_rows", "ours_aten_rows_inductor", "ours_fused", "ours_fused_inductor", "hf", "hf_compiled", "torchtitan",
           "torchtitan_compiled", "grouped_gemm_only")
BLOCK_COLUMNS = COLUMNS[:-1]
UNFUSED_COLUMNS = ("ours", "ours_inductor", "ours_aten_rows", "ours_aten_rows_inductor")
ATEN_ROWS_COLUMNS = ("ours_aten_rows", "ours_aten_rows_inductor")
FUSED_COLUMNS = ("ours_fused", "ours_fused_inductor")
OURS_COLUMNS = UNFUSED_COLUMNS + FUSED_COLUMNS
OTHER_COLUMNS = ("hf", "hf_compiled", "torchtitan", "torchtitan_compiled")
ROUTINGS = ("balanced", "skewed")
FULL_TOKENS = (8192, 32768)
TINY_TOKENS = (64, 128)
ROUTE_MARGIN = 2.0  # added to the chosen experts' router logits, which otherwise spread over [-0.5, 0.5]
DEVICE_TOLERANCE = 5e-2  # each column's first step against HF eager's, in the compute dtype
COMPILED_BF16_TOLERANCE = 2e-2  # torchtitan compiled against torchtitan eager, both bf16


@dataclasses.dataclass(frozen=True)
class Shape:
    family: str  # qwen3_moe | deepseek_v3 | olmoe
    experts: int
    top_k: int
    hidden: int
    inner: int
    score: str  # softmax | sigmoid
    norm_topk: bool
    route_scale: float = 1.0
    shared_experts: int = 0  # DeepSeek-V3's shared expert count (its width: shared_experts * inner)


SHAPES = {
    "qwen3_30b_a3b": Shape("qwen3_moe", 128, 8, 2048, 768, "softmax", True),
    "deepseek_v3_local32": Shape("deepseek_v3", 32, 8, 7168, 2048, "sigmoid", True, 2.5, 1),
    "olmoe": Shape("olmoe", 64, 8, 2048, 1024, "softmax", False),
}


def tiny(shape: Shape) -> Shape:
    """The family's block shrunk to run on a CPU in milliseconds (the router still needs H >= E)."""
    return dataclasses.replace(shape, experts=8, top_k=2, hidden=64, inner=32)


# ---------------------------------------------------------------------------------- the HF block
def hf_config(shape: Shape, experts_implementation: str | None = None):
    from transformers import DeepseekV3Config, OlmoeConfig, Qwen3MoeConfig

    common = dict(hidden_size=shape.hidden, moe_intermediate_size=shape.inner, num_experts_per_tok=shape.top_k,
                  norm_topk_prob=shape.norm_topk, hidden_act="silu", vocab_size=16, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=4)
    if shape.family == "qwen3_moe":
        config = Qwen3MoeConfig(**common, num_experts=shape.experts, intermediate_size=4 * shape.inner,
                                mlp_only_layers=[], decoder_sparse_step=1)
    elif shape.family == "olmoe":
        config = OlmoeConfig(**{**common, "intermediate_size": shape.inner}, num_experts=shape.experts)
    elif shape.family == "deepseek_v3":
        config = DeepseekV3Config(**common, n_routed_experts=shape.experts, n_group=1, topk_group=1,
                                  routed_scaling_factor=shape.route_scale, n_shared_experts=shape.shared_experts,
                                  first_k_dense_replace=0, intermediate_size=4 * shape.inner, q_lora_rank=16,
                                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    else:
        raise ValueError(f"unknown family {shape.family!r}")
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    return config


def default_experts_implementation(shape: Shape) -> str:
    """What transformers resolves for a model of the family built without asking for one (a
    bare block's config says None, which HF runs as its per-expert loop)."""
    return _default_experts_implementation(shape.family)


@functools.lru_cache(maxsize=None)
def _default_experts_implementation(family: str) -> str:
    from transformers import DeepseekV3Model, OlmoeModel, Qwen3MoeModel

    model_class = {"qwen3_moe": Qwen3MoeModel, "olmoe": OlmoeModel, "deepseek_v3": DeepseekV3Model}[family]
    shape = tiny(next(s for s in SHAPES.values() if s.family == family))
    with torch.device("meta"):  # one layer, no memory
        model = model_class(hf_config(shape))
    return model.config._experts_implementation


def hf_block(shape: Shape, experts_implementation: str) -> nn.Module:
    """The family's MoE block (float32, on the current default device, weights uninitialised)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    block_class = {"qwen3_moe": Qwen3MoeSparseMoeBlock, "olmoe": OlmoeSparseMoeBlock,
                   "deepseek_v3": DeepseekV3MoE}[shape.family]
    return block_class(hf_config(shape, experts_implementation))


def block_weights(shape: Shape, device, seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Weights by the HF block's parameter names, drawn in float32 on ``device`` and stored in
    ``dtype``. The router's rows are orthonormal, so the input built by ``routed_input`` sets its
    logits exactly."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    e, h, i = shape.experts, shape.hidden, shape.inner

    def randn(size, scale):
        return (torch.randn(size, generator=generator, device=device) * scale).to(dtype)

    router = torch.linalg.qr(torch.randn(h, e, generator=generator, device=device))[0].t()  # [E, H], W W^T = 1
    weights = {"gate.weight": router.contiguous().to(dtype),
               "experts.gate_up_proj": randn((e, 2 * i, h), h ** -0.5),
               "experts.down_proj": randn((e, h, i), i ** -0.5)}
    if shape.shared_experts:
        width = shape.shared_experts * i
        weights.update({"shared_experts.gate_proj.weight": randn((width, h), h ** -0.5),
                        "shared_experts.up_proj.weight": randn((width, h), h ** -0.5),
                        "shared_experts.down_proj.weight": randn((h, width), width ** -0.5)})
    return weights


def load_weights(block: nn.Module, weights: dict[str, torch.Tensor], dtype) -> nn.Module:
    parameters = dict(block.named_parameters())
    if sorted(parameters) != sorted(weights):
        raise AssertionError(f"{type(block).__name__} has parameters {sorted(parameters)}, expected {sorted(weights)}")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.data = weights[name].to(dtype).clone(memory_format=torch.contiguous_format)
    # Buffers (torchtitan's tokens_per_expert_E) follow the weights to their device.
    return block.to(next(iter(weights.values())).device)


# ---------------------------------------------------------------------------------- routing
def expert_choices(shape: Shape, tokens: int, routing: str, seed: int) -> torch.Tensor:
    """``[T, k]`` distinct expert ids per token."""
    e, k = shape.experts, shape.top_k
    if routing == "balanced":
        return (torch.arange(tokens * k).reshape(tokens, k)) % e
    if routing == "skewed":
        preference = 1.0 / torch.arange(1, e + 1, dtype=torch.float64)
        generator = torch.Generator().manual_seed(seed + 1)
        return torch.multinomial(preference.expand(tokens, e), k, replacement=False, generator=generator)
    raise ValueError(f"unknown routing {routing!r}; choose from {', '.join(ROUTINGS)}")


def routed_input(shape: Shape, choices: torch.Tensor, router: torch.Tensor, seed: int) -> torch.Tensor:
    """``x [1, T, H]`` float32 whose router logits ``x @ W.T`` are uniform in [-0.5, 0.5] plus
    ``ROUTE_MARGIN`` on each token's chosen experts (``W`` has orthonormal rows, and the rest of
    ``x`` is noise orthogonal to them): every top-k picks exactly those experts, and no score
    saturates, so the router's gradient is not lost in rounding."""
    tokens = choices.shape[0]
    generator = torch.Generator().manual_seed(seed + 2)
    router = router.cpu().double()
    noise = torch.randn(tokens, shape.hidden, generator=generator, dtype=torch.float64)
    noise -= (noise @ router.t()) @ router  # nothing along the router's rows
    logits = torch.rand(tokens, shape.experts, generator=generator, dtype=torch.float64) - 0.5
    logits.scatter_add_(1, choices, torch.full(choices.shape, ROUTE_MARGIN, dtype=torch.float64))
    return (noise + logits @ router).float().unsqueeze(0)


def tokens_per_expert(choices: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.bincount(choices.reshape(-1), minlength=experts)


# ---------------------------------------------------------------------------------- torchtitan
def torchtitan_block(shape: Shape) -> nn.Module:
    """torchtitan's MoE configured as the HF block: the same scores, top-k normalisation and
    scaling, no load-balancing bias, and DeepSeek-V3's shared expert where the shape has one."""
    from torchtitan.models.common.feed_forward import FeedForward
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import MoE, GroupedExperts, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    e, k, h, i = shape.experts, shape.top_k, shape.hidden, shape.inner
    shared = None
    if shape.shared_experts:
        width = shape.shared_experts * i
        shared = FeedForward.Config(w1=Linear.Config(in_features=h, out_features=width),
                                    w2=Linear.Config(in_features=width, out_features=h),
                                    w3=Linear.Config(in_features=h, out_features=width))
    config = MoE.Config(
        num_experts=e,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=h, hidden_dim=i, num_experts=e),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=e, top_k=k)),
        router=TokenChoiceTopKRouter.Config(num_experts=e, gate=Linear.Config(in_features=h, out_features=e),
                                            top_k=k, score_func=shape.score, route_norm=shape.norm_topk,
                                            route_scale=shape.route_scale),
        load_balance_coeff=None, shared_experts=shared)
    return config.build()


def torchtitan_weights(shape: Shape, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF block's weights under torchtitan's names: gate_up [E, 2I, H] is gate rows then up rows."""
    i = shape.inner
    gate_up = weights["experts.gate_up_proj"]
    out = {"router.gate.weight": weights["gate.weight"],
           "routed_experts.inner_experts.w1_EFD": gate_up[:, :i], "routed_experts.inner_experts.w3_EFD": gate_up[:, i:],
           "routed_experts.inner_experts.w2_EDF": weights["experts.down_proj"]}
    if shape.shared_experts:
        out.update({"shared_experts.w1.weight": weights["shared_experts.gate_proj.weight"],
                    "shared_experts.w3.weight": weights["shared_experts.up_proj.weight"],
                    "shared_experts.w2.weight": weights["shared_experts.down_proj.weight"]})
    return out


def hf_gradients_from_torchtitan(shape: Shape, gradients: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inner = "routed_experts.inner_experts."
    out = {"gate.weight": gradients["router.gate.weight"],
           "experts.gate_up_proj": torch.cat([gradients[inner + "w1_EFD"], gradients[inner + "w3_EFD"]], dim=1),
           "experts.down_proj": gradients[inner + "w2_EDF"]}
    if shape.shared_experts:
        out.update({"shared_experts.gate_proj.weight": gradients["shared_experts.w1.weight"],
                    "shared_experts.up_proj.weight": gradients["shared_experts.w3.weight"],
                    "shared_experts.down_proj.weight": gradients["shared_experts.w2.weight"]})
    return out


@contextlib.contextmanager
def bfloat16_as_identity():
    """``Tensor.bfloat16()`` returns the tensor itself: torchtitan's grouped experts call it on
    every operand before ``torch._grouped_mm``, which would make a float32 check a bf16 one."""
    original = torch.Tensor.bfloat16
    torch.Tensor.bfloat16 = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.bfloat16 = original


def torchtitan_importable() -> str | None:
    """None where torchtitan's MoE imports, else why not."""
    try:
        import torchtitan.models.common.moe  # noqa: F401
    except Exception as error:  # ImportError, or an import-time failure inside it
        return f"torchtitan not importable: {type(error).__name__}: {error}"[:400]
    return None


# ---------------------------------------------------------------------------------- columns
class BlockWithInput(nn.Module):
    """The block with its input held as a parameter, so the shardgraph program returns the
    input's gradient with the weights'. With ``output_probe`` the forward also multiplies the
    output by that probe, held as a parameter too: its gradient is then the output itself (the
    correctness check reads the output this way)."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor, output_probe: torch.Tensor | None = None):
        super().__init__()
        self.block = block
        self.hidden = nn.Parameter(hidden.clone())
        self.output_probe = nn.Parameter(output_probe.clone()) if output_probe is not None else None

    def forward(self, probe):
        out = self.block(self.hidden)
        if self.output_probe is not None:
            return out.float() * self.output_probe
        return out


def probe_loss(out, probe):
    return (out.float() * probe).sum()


class EagerStep:
    """forward + loss + ``torch.autograd.grad`` of a module (eager or ``torch.compile``d):
    ``step() -> (loss, {"hidden": dx, parameter name: gradient})``."""

    def __init__(self, module: nn.Module, hidden: torch.Tensor, probe: torch.Tensor, compile_backend=None):
        self.module, self.probe = module, probe
        self.hidden = hidden.detach().clone().requires_grad_()
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.parameters = [p for n, p in module.named_parameters() if p.requires_grad]
        self.forward = module if compile_backend is None else torch.compile(module, backend=compile_backend)
        self.last_out = None

    def step(self, keep_output: bool = False):
        out = self.forward(self.hidden)
        loss = probe_loss(out, self.probe)
        gradients = torch.autograd.grad(loss, [self.hidden, *self.parameters])
        if keep_output:
            self.last_out = out.detach()
        return loss.detach(), dict(zip(["hidden", *self.names], gradients))


class ProgramStep:
    """The shardgraph program of ``BlockWithInput(block, hidden)``: ``step() -> (loss, gradients)``
    with the input's gradient under ``"hidden"`` and the block's under their HF names. ``fused``:
    compiled with the fused MoE expert kernels on, else off; ``fused_layers`` counts the MoE
    layers that took them."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor, probe: torch.Tensor, compile_backend=None,
                 output_probe: torch.Tensor | None = None, fused: bool = False, row_kernels: bool = True):
        self.model = BlockWithInput(block, hidden, output_probe)
        self.probe = probe
        self.row_kernels = row_kernels
        loss_fn = probe_loss if output_probe is None else (lambda out, probe: out.sum())
        started = time.perf_counter()
        with use_fused_moe("on" if fused else "off"):
            self.program = sg.compile(self.model, sg.MeshSpec.parse("world=1"), (probe,), loss_fn)
        self.compile_s = time.perf_counter() - started
        self.fused_layers = sum(node.target is torch.ops.shardgraph.gather_glu_grouped_mm.default
                                for node in self.program.graph_module.graph.nodes)
        self.parameters = {name: p.detach() for name, p in self.model.named_parameters()}
        if compile_backend is None or compile_backend == "inductor":
            self._step = self.program.single_device_step(compile=compile_backend and "inductor")
        else:  # another torch.compile backend (aot_eager in the CPU tests): the graph module under it
            compiled = torch.compile(self.program.graph_module, backend=compile_backend, dynamic=False)
            program = self.program
            buffers = [program.default_buffers[n] for n in program.buffer_names]

            def step(parameters, batch):
                outputs = compiled(None, *[parameters[n] for n in program.parameter_names], *buffers, *batch)
                return outputs[0], dict(zip(self.program.gradient_names, outputs[1:]))

            self._step = step

    def step(self, keep_output: bool = False):
        # Read while inductor traces the first step (and guarded on), at every step eagerly.
        with use_row_kernels(self.row_kernels):
            loss, gradients = self._step(self.parameters, (self.probe,))
        renamed = {name.removeprefix("block."): g for name, g in gradients.items()}
        return loss, renamed


def make_step(column: str, shape: Shape, weights, hidden, probe, dtype, args, experts_impl: str):
    """The column's step object at ``shape`` (weights and input already on the device)."""
    backend = args.compile_backend if column.endswith(("_compiled", "_inductor")) else None
    if column in OURS_COLUMNS:
        block = load_weights(hf_block(shape, experts_impl), weights, dtype)
        return ProgramStep(block, hidden.to(dtype), probe, backend, fused=column in FUSED_COLUMNS,
                           row_kernels=column not in ATEN_ROWS_COLUMNS)
    if column in ("hf", "hf_compiled"):
        block = load_weights(hf_block(shape, experts_impl), weights, dtype)
        return EagerStep(block, hidden.to(dtype), probe, backend)
    if column in ("torchtitan", "torchtitan_compiled"):
        block = load_weights(torchtitan_block(shape), torchtitan_weights(shape, weights), dtype)
        return EagerStep(block, hidden.to(dtype), probe, backend)
    raise ValueError(column)


def hf_named(column: str, shape: Shape, gradients: dict) -> dict:
    if column.startswith("torchtitan"):
        return {"hidden": gradients["hidden"], **hf_gradients_from_torchtitan(shape, gradients)}
    return gradients


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def release(device) -> None:
    """Between columns: dynamo's compiled code dropped and, on a GPU, the freed memory returned
    (``gc.collect`` over torch's and transformers' heap costs a quarter second: not on a CPU)."""
    if device.type == "cuda":
        release_memory(device)
    else:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------- grouped GEMMs alone
class GroupedGemms:
    """The block's GEMMs alone at the routing's token counts, on random bf16 operands of the
    block's shapes: gate_up ``x @ W1[e].T`` and down ``h @ W2[e].T`` forward, their dgrads and
    wgrads (and the shared expert's dense products). ``run(impl)`` with ``torch`` or ``ours``."""

    def __init__(self, shape: Shape, counts: torch.Tensor, dtype, device, seed: int):
        generator = torch.Generator(device=device).manual_seed(seed + 3)
        e, h, i = shape.experts, shape.hidden, shape.inner
        rows = int(counts.sum())

        def randn(*size):
            return torch.randn(*size, generator=generator, device=device).to(dtype)

        self.experts = e
        self.offsets = torch.cumsum(counts.to(device), 0).to(torch.int32)
        self.sizes = counts.tolist()
        self.x, self.act = randn(rows, h), randn(rows, i)  # gate_up's input, down's input
        self.w_gate_up, self.w_down = randn(e, 2 * i, h) * h ** -0.5, randn(e, h, i) * i ** -0.5
        self.d_down, self.d_gate_up = randn(rows, h), randn(rows, 2 * i)  # the outputs' gradients
        self.shared = None
        if shape.shared_experts:
            tokens, width = rows // shape.top_k, shape.shared_experts * i
            self.shared = dict(x=randn(tokens, h), w_gate=randn(width, h), w_up=randn(width, h),
                               w_down=randn(h, width), act=randn(tokens, width), d_out=randn(tokens, h),
                               d_inner=randn(tokens, width))

    def run(self, impl: str):
        """Six grouped products (and nine dense ones): ``{name: output}``."""
        offsets = self.offsets
        if impl == "torch":
            out = {
                "gate_up": torch._grouped_mm(self.x, self.w_gate_up.transpose(1, 2), offs=offsets),
                "down": torch._grouped_mm(self.act, self.w_down.transpose(1, 2), offs=offsets),
                "down_dgrad": torch._grouped_mm(self.d_down, self.w_down, offs=offsets),
                "down_wgrad": torch._grouped_mm(self.d_down.t(), self.act, offs=offsets),
                "gate_up_dgrad": torch._grouped_mm(self.d_gate_up, self.w_gate_up, offs=offsets),
                "gate_up_wgrad": torch._grouped_mm(self.d_gate_up.t(), self.x, offs=offsets),
            }
        elif impl == "ours":
            out = {
                "gate_up": kernels.grouped_mm(self.x, self.w_gate_up, offsets, w_layout="enk"),
                "down": kernels.grouped_mm(self.act, self.w_down, offsets, w_layout="enk"),
                "down_dgrad": kernels.grouped_mm_dgrad(self.d_down, self.w_down, offsets, w_layout="enk"),
                "down_wgrad": kernels.grouped_mm_wgrad(self.act, self.d_down, offsets, self.experts, w_layout="enk"),
                "gate_up_dgrad": kernels.grouped_mm_dgrad(self.d_gate_up, self.w_gate_up, offsets, w_layout="enk"),
                "gate_up_wgrad": kernels.grouped_mm_wgrad(self.x, self.d_gate_up, offsets, self.experts,
                                                          w_layout="enk"),
            }
        else:
            raise ValueError(impl)
        if self.shared is not None:
            s = self.shared
            out.update({
                "shared_gate": s["x"] @ s["w_gate"].t(), "shared_up": s["x"] @ s["w_up"].t(),
                "shared_down": s["act"] @ s["w_down"].t(),
                "shared_down_dgrad": s["d_out"] @ s["w_down"], "shared_down_wgrad": s["d_out"].t() @ s["act"],
                "shared_gate_dgrad": s["d_inner"] @ s["w_gate"], "shared_gate_wgrad": s["d_inner"].t() @ s["x"],
                "shared_up_dgrad": s["d_inner"] @ s["w_up"], "shared_up_wgrad": s["d_inner"].t() @ s["x"],
            })
        return out

    def reference(self) -> dict:
        """Per expert ``torch.mm`` in float32."""
        f = {k: getattr(self, k).float() for k in ("x", "act", "w_gate_up", "w_down", "d_down", "d_gate_up")}
        out = {k: [] for k in ("gate_up", "down", "down_dgrad", "gate_up_dgrad")}
        wgrads = {"down_wgrad": [], "gate_up_wgrad": []}
        start = 0
        for e, size in enumerate(self.sizes):
            rows = slice(start, start + size)
            out["gate_up"].append(f["x"][rows] @ f["w_gate_up"][e].t())
            out["down"].append(f["act"][rows] @ f["w_down"][e].t())
            out["down_dgrad"].append(f["d_down"][rows] @ f["w_down"][e])
            out["gate_up_dgrad"].append(f["d_gate_up"][rows] @ f["w_gate_up"][e])
            wgrads["down_wgrad"].append(f["d_down"][rows].t() @ f["act"][rows])
            wgrads["gate_up_wgrad"].append(f["d_gate_up"][rows].t() @ f["x"][rows])
            start += size
        return {**{k: torch.cat(v) for k, v in out.items()}, **{k: torch.stack(v) for k, v in wgrads.items()}}


# ---------------------------------------------------------------------------------- correctness
def check_shape(shape_name: str, shape: Shape, routing: str, columns, args) -> dict:
    """Every block column against the HF block run eagerly, float32, at ``tiny(shape)`` on
    ``args.check_device``: the output and the gradients of the input and of every weight."""
    device = torch.device(args.check_device)
    small = tiny(shape)
    choices = expert_choices(small, args.check_tokens, routing, args.seed)
    weights = block_weights(small, device, args.seed)
    hidden = routed_input(small, choices, weights["gate.weight"], args.seed).to(device)
    probe = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(args.seed + 4)).to(device)
    experts_impl = default_experts_implementation(small)
    result = {"shape": shape_name, "routing": routing, "check_shape": dataclasses.asdict(small),
              "tokens": args.check_tokens, "device": str(device), "dtype": "float32", "tolerance": args.check_tol,
              "columns": {}}
    reference = EagerStep(load_weights(hf_block(small, "eager"), weights, torch.float32), hidden, probe)
    _, expected = reference.step(keep_output=True)
    expected_out = reference.last_out.float()
    routed = reference.module.gate(hidden.reshape(-1, small.hidden))[2]
    result["routing_matches"] = bool(torch.equal(routed.sort(-1).values.cpu(), choices.sort(-1).values))
    for column in columns:
        entry: dict = {}
        try:
            if column == "grouped_gemm_only":
                gemms = GroupedGemms(small, tokens_per_expert(choices, small.experts), torch.float32, device, args.seed)
                want = gemms.reference()
                for impl in ("torch", "ours"):
                    got = gemms.run(impl)
                    entry[impl] = max(relative(got[k], want[k]) for k in want)
                entry["max_rel_err"] = max(entry["torch"], entry["ours"])
            else:
                entry.update(check_column(column, small, weights, hidden, probe, expected, expected_out,
                                          experts_impl, args))
            entry["passed"] = entry["max_rel_err"] < entry.get("tolerance", args.check_tol)
        except Exception as error:  # a column that cannot run here is recorded, the others still run
            entry = {"passed": False, "error": f"{type(error).__name__}: {error}"[:600]}
            traceback.print_exc()
        result["columns"][column] = entry
        release(device)
    return result


def check_column(column, shape, weights, hidden, probe, expected, expected_out, experts_impl, args) -> dict:
    args = argparse.Namespace(**{**vars(args), "compile_backend": args.check_compile_backend})
    backend = args.compile_backend if column.endswith(("_compiled", "_inductor")) else None
    if column == "torchtitan_compiled":
        return check_compiled_torchtitan(shape, weights, hidden, probe, args)
    fused_layers = None
    if column in OURS_COLUMNS:
        fused = column in FUSED_COLUMNS
        # The fused kernels are checked where they will be timed: on a CUDA device they run there
        # (float32, IEEE products); on a CPU they run only under TRITON_INTERPRET=1.
        where = torch.device(args.device) if fused and torch.device(args.device).type == "cuda" else hidden.device
        block = load_weights(hf_block(shape, experts_impl), {n: w.to(where) for n, w in weights.items()},
                             torch.float32)
        # The output probe is the loss's probe, so the loss and every gradient are those of the
        # timed program; the output probe's gradient is the block's output.
        runner = ProgramStep(block, hidden.to(where), probe.to(where), backend, output_probe=probe.to(where),
                             fused=fused, row_kernels=column not in ATEN_ROWS_COLUMNS)
        fused_layers = runner.fused_layers
        _, got = runner.step()
        got = {name: g.to(hidden.device) for name, g in got.items()}
        out = got.pop("output_probe")
    else:
        patch = bfloat16_as_identity() if column.startswith("torchtitan") else contextlib.nullcontext()
        with patch:
            runner = make_step(column, shape, weights, hidden, probe, torch.float32, args, experts_impl)
            _, got = runner.step(keep_output=True)
        out = runner.last_out.float()
        got = hf_named(column, shape, got)
    errors = {"output": relative(out.reshape(expected_out.shape), expected_out)}
    errors.update({f"grad {name}": relative(got[name], expected[name]) for name in expected})
    worst = max(errors, key=errors.get)
    checked = {"max_rel_err": errors[worst], "worst": worst, "errors": errors}
    if fused_layers is not None:
        checked.update(fused_moe_layers=fused_layers, device=str(runner.probe.device))
    return checked


def check_compiled_torchtitan(shape, weights, hidden, probe, args) -> dict:
    """torch._grouped_mm's fake kernel takes bf16 only, so torchtitan under torch.compile cannot
    run in float32: it is compared with torchtitan eager in bf16 instead (eager's own float32
    check is the torchtitan column's), within ``COMPILED_BF16_TOLERANCE``."""
    results = []
    for backend in (None, args.compile_backend):
        runner = make_step("torchtitan" if backend is None else "torchtitan_compiled", shape, weights, hidden,
                           probe, torch.bfloat16, args, None)
        _, got = runner.step(keep_output=True)
        results.append((runner.last_out.float(), hf_named("torchtitan", shape, got)))
    (want_out, want), (out, got) = results
    errors = {"output": relative(out, want_out)}
    errors.update({f"grad {name}": relative(got[name], want[name]) for name in want})
    worst = max(errors, key=errors.get)
    return {"max_rel_err": errors[worst], "worst": worst, "errors": errors, "tolerance": COMPILED_BF16_TOLERANCE,
            "against": "torchtitan eager, bf16"}


# ---------------------------------------------------------------------------------- timing
def timed(fn, device, steps: int, warmup: int) -> dict:
    """Median / min ms of ``fn()`` over ``steps`` after ``warmup`` (fused_loss.measure), and its
    peak memory: in all and above what was allocated before the timed steps."""
    row = measure(fn, device, steps, warmup)
    timed_row = {"ms": row["median_ms"], "min_ms": row["min_ms"], "steps_ms": row["steps_ms"]}
    if "peak_gib" in row:
        timed_row.update(peak_gib=row["peak_gib"], peak_above_start_gib=row["peak_above_inputs_gib"])
    return timed_row


def compare_with_hf(loss, gradients, reference) -> dict:
    """Relative errors of a first step against HF eager's (same dtype, same shape)."""
    _, ref_gradients = reference
    return {name: relative(gradients[name], g) for name, g in ref_gradients.items() if name in gradients}


def time_block_column(column, shape, weights, hidden, probe, dtype, device, args, experts_impl, reference):
    """One column at one row: ``(entry, reference)``; ``hf`` returns its first step as the
    reference the later columns are compared with."""
    entry: dict = {}
    step = None
    try:
        synchronize(device)
        started = time.perf_counter()
        step = make_step(column, shape, weights, hidden, probe, dtype, args, experts_impl)
        loss, gradients = step.step()
        synchronize(device)
        entry["first_step_s"] = time.perf_counter() - started
        if isinstance(step, ProgramStep):
            entry["shardgraph_compile_s"] = step.compile_s
            entry["fused_moe_layers"] = step.fused_layers
        gradients = hf_named(column, shape, gradients)
        if column == "hf":
            reference = (loss.double().item(), {n: g.detach() for n, g in gradients.items()})
        elif reference is not None:
            # The loss, a sum of terms of both signs, is recorded but not judged: its relative
            # difference says little in bf16.
            entry["loss_rel_diff_vs_hf"] = abs(loss.double().item() - reference[0]) / max(abs(reference[0]), 1e-30)
            errors = compare_with_hf(loss, gradients, reference)
            entry["rel_err_vs_hf"] = max(errors.values())
            entry["rel_err_vs_hf_worst"] = max(errors, key=errors.get)
        del loss, gradients
        entry.update(timed(step.step, device, args.steps, args.warmup))
        if column in args.profile:
            entry["profile"] = profile_steps(step, device, entry["ms"])
            print_profile(column, entry["profile"], digits=2, kernels=20)
    except Exception as error:
        if is_out_of_memory(error):
            entry = {"error": "oom", "error_detail": f"{type(error).__name__}: {error}"[:400]}
        else:
            entry = {"error": f"{type(error).__name__}: {error}"[:1000]}
            traceback.print_exc()
    del step
    release(device)
    return entry, reference


def time_grouped_gemms(shape, counts, dtype, device, args) -> dict:
    entry: dict = {}
    try:
        gemms = GroupedGemms(shape, counts, dtype, device, args.seed)
        for impl in ("torch", "ours"):
            try:
                entry[impl] = timed(lambda impl=impl: gemms.run(impl), device, args.steps, args.warmup)
            except Exception as error:
                entry[impl] = {"error": "oom" if is_out_of_memory(error) else f"{type(error).__name__}: {error}"[:600]}
                release(device)
        timings = {impl: entry[impl]["ms"] for impl in ("torch", "ours") if "ms" in entry[impl]}
        if timings:
            entry["ms"] = min(timings.values())
            entry["ceiling_impl"] = min(timings, key=timings.get)
    except Exception as error:
        entry = {"error": "oom" if is_out_of_memory(error) else f"{type(error).__name__}: {error}"[:600]}
    release(device)
    return entry


def run_row(shape_name, tokens, routing, args, device, dtype, columns, check, save, rows) -> dict:
    full = SHAPES[shape_name]
    shape = tiny(full) if args.tiny else full
    choices = expert_choices(shape, tokens, routing, args.seed)
    counts = tokens_per_expert(choices, shape.experts)
    # In the compute dtype: every column copies what it loads, so nothing larger stays on the device.
    weights = block_weights(shape, device, args.seed, dtype)
    hidden = routed_input(shape, choices, weights["gate.weight"].float(), args.seed).to(device)
    probe = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(args.seed + 4)).to(device)
    experts_impl = default_experts_implementation(shape)
    row = {"shape": shape_name, "tokens": tokens, "routing": routing, "block": dataclasses.asdict(shape),
           "hf_experts": experts_impl, "tokens_per_expert": {"min": int(counts.min()), "max": int(counts.max()),
                                                             "mean": float(counts.float().mean())},
           "columns": {}}
    rows.append(row)
    # The router in the compute dtype on the device picks the intended experts.
    with torch.no_grad():
        gate = load_weights(hf_block(shape, experts_impl), weights, dtype).gate
        routed = gate(hidden.to(dtype).reshape(-1, shape.hidden))[2]
        row["routing_matches"] = bool(torch.equal(routed.sort(-1).values.cpu(), choices.sort(-1).values))
        del gate, routed
    reference = None
    for column in sorted(columns, key=lambda c: c != "hf"):  # hf first: the reference of the rest
        if column == "grouped_gemm_only":
            entry = time_grouped_gemms(shape, counts, dtype, device, args)
        elif column.startswith("torchtitan") and args.torchtitan_error:
            entry = {"error": args.torchtitan_error}
        else:
            entry, reference = time_block_column(column, shape, weights, hidden, probe, dtype, device, args,
                                                 experts_impl, reference)
        checked = check["columns"].get(column, {}) if check else {}
        entry["check_passed"] = checked.get("passed")
        entry["wrong"] = (checked.get("passed") is False
                          or entry.get("rel_err_vs_hf", 0.0) > DEVICE_TOLERANCE)
        row["columns"][column] = entry
        print(json.dumps({"shape": shape_name, "tokens": tokens, "routing": routing, "column": column,
                          **{k: v for k, v in entry.items() if k != "steps_ms" and not isinstance(v, dict)}}),
              flush=True)
        save()
    del reference
    add_ratios(row)
    save()
    return row


def add_ratios(row: dict) -> None:
    def usable(column):
        entry = row["columns"].get(column, {})
        return entry.get("ms") if entry.get("ms") is not None and not entry.get("wrong") else None

    ours = {c: usable(c) for c in OURS_COLUMNS if usable(c) is not None}
    unfused = [ms for c, ms in ours.items() if c in UNFUSED_COLUMNS]
    # A fused column counts as fused only where its program took the fused kernels.
    fused = [ms for c, ms in ours.items() if c in FUSED_COLUMNS and row["columns"][c].get("fused_moe_layers")]
    others = {c: usable(c) for c in OTHER_COLUMNS if usable(c) is not None}
    ceiling = usable("grouped_gemm_only")
    row["ours_ms"] = min(ours.values()) if ours else None
    row["ours_best"] = min(ours, key=ours.get) if ours else None
    row["best_other_ms"] = min(others.values()) if others else None
    row["best_other"] = min(others, key=others.get) if others else None
    row["ceiling_ms"] = ceiling
    row["ours_over_ceiling"] = row["ours_ms"] / ceiling if row["ours_ms"] and ceiling else None
    row["best_other_over_ours"] = row["best_other_ms"] / row["ours_ms"] if row["ours_ms"] and others else None
    row["ours_unfused_ms"] = min(unfused) if unfused else None
    row["ours_fused_ms"] = min(fused) if fused else None
    row["fused_over_ceiling"] = row["ours_fused_ms"] / ceiling if fused and ceiling else None
    row["unfused_over_fused"] = row["ours_unfused_ms"] / row["ours_fused_ms"] if fused and unfused else None


# ---------------------------------------------------------------------------------- output
def markdown(result: dict) -> str:
    columns = result["columns"]
    head = ["shape", "tokens", "routing", "tok/expert min-max", *[f"{c} ms" for c in columns],
            "ours / ceiling", "fused / ceiling", "best other / ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(columns) + 3)]
    for row in result["rows"]:
        cells = [row["shape"], str(row["tokens"]), row["routing"],
                 f"{row['tokens_per_expert']['min']}-{row['tokens_per_expert']['max']}"]
        for column in columns:
            entry = row["columns"].get(column, {})
            if "ms" in entry:
                text = f"{entry['ms']:.2f}"
                if column == "grouped_gemm_only":
                    parts = [f"{impl} {entry[impl]['ms']:.2f}" for impl in ("torch", "ours") if "ms" in entry[impl]]
                    text += f" ({', '.join(parts)})"
                cells.append(text + (" !" if entry.get("wrong") else ""))
            else:
                error = entry.get("error", "-")
                cells.append("oom" if error == "oom" else ("n/a" if "not importable" in error else "failed"))
        cells.append(f"{row['ours_over_ceiling']:.2f}" if row.get("ours_over_ceiling") else "-")
        cells.append(f"{row['fused_over_ceiling']:.2f}" if row.get("fused_over_ceiling") else "-")
        cells.append(f"{row['best_other_over_ours']:.2f}" if row.get("best_other_over_ours") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--tokens", default=None, help=f"comma-separated (default {FULL_TOKENS}; tiny {TINY_TOKENS})")
    parser.add_argument("--routing", default=",".join(ROUTINGS), help=f"comma-separated, from {', '.join(ROUTINGS)}")
    parser.add_argument("--columns", default=",".join(COLUMNS), help=f"comma-separated, from {', '.join(COLUMNS)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tiny", action="store_true", help="every shape shrunk (E=8, top-2, H=64, I=32): CPU runs")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; tiny 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps before timing (default 3; tiny 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: CPU tests)")
    parser.add_argument("--check-device", default="cpu", help="where the float32 correctness check runs")
    parser.add_argument("--check-compile-backend", default=None,
                        help="torch.compile backend of the check's compiled columns (default: aot_eager on a CPU, "
                             "--compile-backend elsewhere: inductor's CPU code is not what the GPU runs)")
    parser.add_argument("--check-tokens", type=int, default=64)
    parser.add_argument("--check-tol", type=float, default=1e-4)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--profile", default="", help="comma-separated block columns to profile after timing "
                                                      "(torch.profiler kernel breakdown, as train_step's --profile)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "moe_block.json"))
    args = parser.parse_args(argv)

    def names(text, known, what):
        chosen = [v for v in text.split(",") if v]
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"unknown {what} {unknown}; choose from {', '.join(known)}")
        return chosen

    args.shapes = names(args.shapes, SHAPES, "shapes")
    args.routing = names(args.routing, ROUTINGS, "routing")
    args.columns = [c for c in COLUMNS if c in names(args.columns, COLUMNS, "columns")]
    args.profile = names(args.profile, BLOCK_COLUMNS, "profile columns")
    if args.check_compile_backend is None:
        args.check_compile_backend = "aot_eager" if args.check_device == "cpu" else args.compile_backend
    default_tokens = TINY_TOKENS if args.tiny else FULL_TOKENS
    args.tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(default_tokens)
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = benchmark_device(args.device)
    dtype = getattr(torch, args.dtype)
    args.torchtitan_error = (torchtitan_importable()
                             if any(c.startswith("torchtitan") for c in args.columns) else None)
    if args.torchtitan_error:
        print(args.torchtitan_error, file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", **versions(),
              "torchtitan": None, "dtype": args.dtype, "tiny": args.tiny, "steps": args.steps,
              "warmup": args.warmup, "seed": args.seed, "compile_backend": args.compile_backend,
              "columns": args.columns, "shapes": {n: dataclasses.asdict(SHAPES[n]) for n in args.shapes},
              "route_margin": ROUTE_MARGIN, "device_tolerance": DEVICE_TOLERANCE, "complete": False,
              "checks": [], "rows": []}
    if not args.torchtitan_error and any(c.startswith("torchtitan") for c in args.columns):
        from importlib.metadata import PackageNotFoundError, version

        with contextlib.suppress(PackageNotFoundError):
            result["torchtitan"] = version("torchtitan")

    def save():
        # After every column, so a run stopped part-way keeps what it measured.
        result["total_wall_s"] = time.perf_counter() - started
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)

    for shape_name in args.shapes:
        for routing in args.routing:
            check = None
            if not args.skip_check:
                checked_columns = [c for c in args.columns
                                   if not (c.startswith("torchtitan") and args.torchtitan_error)]
                check = check_shape(shape_name, SHAPES[shape_name], routing, checked_columns, args)
                result["checks"].append(check)
                failed = {c: e.get("error", e.get("max_rel_err")) for c, e in check["columns"].items()
                          if not e["passed"]}
                print(f"check {shape_name} {routing}: routing matches {check['routing_matches']}, "
                      + (f"FAILED {failed}" if failed else "every column within "
                         f"{args.check_tol:g} of HF eager in float32"), flush=True)
                save()
            for tokens in args.tokens:
                run_row(shape_name, tokens, routing, args, device, dtype, args.columns, check, save, result["rows"])
    result["complete"] = True
    save()
    table = markdown(result)
    print(f"\n{result['device']}, torch {result['torch']}, transformers {result['transformers']}, "
          f"torchtitan {result['torchtitan']}, {args.dtype}; median ms of {args.steps} steps "
          f"(! = disagrees with HF eager)\n")
    print(table)
    print(f"\nwrote {args.out} ({result['total_wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
