"""One GPU, one training step: the eager model, ``torch.compile`` of it, and the shardgraph program.

For each model, from the same seed and the same batch, time forward + backward + SGD update
(plain SGD, lr 1e-3, no momentum) of:

  eager               the model as written, ``loss.backward()``, ``torch.optim.SGD(foreach=True)``,
                      ``zero_grad(set_to_none=True)``; ``ours`` computes its experts with a per-expert
                      loop, HF models with the implementation --hf-experts names (transformers' default,
                      grouped_mm in 5.x: one ``torch._grouped_mm`` per projection; or its per-expert loop)
  torch_compile       the same with ``torch.compile(model)`` in the forward (``--compile-mode``)
  shardgraph          ``shardgraph.compile(model, MeshSpec(world=1))``: one fx graph of loss and every
                      gradient, the MoE layers lowered to sort + grouped GEMMs + combine and attention
                      to the fused SDPA op, run by ``program.step`` with a one-rank communicator; SGD
                      applied to the gradients it returns with one ``torch._foreach_add_``
  shardgraph_compile  the same program's graph module under ``torch.compile(dynamic=False)`` (inductor
                      fuses the elementwise ops around the grouped GEMM and attention custom ops, which
                      stay opaque: their fake kernels give dynamo the shapes). ``shardgraph_compiled``
                      is accepted as another name for it
  shardgraph_cudagraph  the same under ``mode="reduce-overhead"``: the whole step replayed as one CUDA
                      graph, which the program allows because nothing in it reads a value on the host;
                      parameters are marked static, so the replay reads them where SGD updates them
  shardgraph_sgd      ``shardgraph.compile(..., optimizer=sg.optim.SGD(lr))``: the same SGD step inside the
                      program, each new weight written into the old one (donated state) and, for the
                      expert weights, taken in their grouped wgrad's epilogue (``fused_update``:
                      the gradient never written); run by ``program.train_step``
  shardgraph_sgd_compile  the same under ``train_step(..., compile="inductor")``;
                      ``shardgraph_sgd_compile_unfused`` with ``fused_update=False`` (every update
                      an elementwise step that inductor fuses)
  shardgraph_sgd_cudagraph  shardgraph_sgd under ``train_step(..., compile="cuda_graph")``: the same plain
                      program (no inductor) captured once as a CUDA graph and replayed each step, so the
                      host's per-op launch time leaves the step. Its first step runs the program
                      eagerly (the warm-up), the second captures it (``capture_step_s``, counted in
                      ``compile_s``); both come before the timed steps whatever ``--warmup`` says.
                      CUDA only: with ``--device cpu`` its row records the refusal
  shardgraph_sgd_aten_norms, shardgraph_sgd_compile_aten_norms  shardgraph_sgd and shardgraph_sgd_compile
                      with the model's RMSNorms traced as the aten ops their forward runs instead of
                      the ``shardgraph.rms_norm`` op (``shardgraph.frontend.norms``): what the
                      program ran before the op
  shardgraph_sgd_aten_rotary  shardgraph_sgd with rotary embedding traced as the model's aten ops
                      instead of the ``shardgraph.rotary`` op (``shardgraph.frontend.rotary``)
  shardgraph_sgd_dispatched  shardgraph_sgd running the program as lowered (``use_direct_calls(False)``):
                      its ``shardgraph::`` ops through torch's dispatcher rather than as their Python
                      bodies, its parameter updates op by op rather than as foreach ops: the host
                      time the plain graph saves
  shardgraph_compile_aten_rows  shardgraph_compile with the MoE row steps (dispatch gather, combine
                      and their gradients) as aten ops that inductor fuses, instead of the row
                      kernels (``kernels.moe_rows``): what the program ran before them
  torch_compile_cudagraph  the model under ``torch.compile(mode="reduce-overhead")``, for comparison

AdamW (``--variants adamw`` names the first four below): the same training step with
``AdamW(lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on every parameter)`` after the global
gradient norm is clipped to 1.0, fp32 master weights, fp32 gradients and fp32 Adam state, forward
and backward computed in ``--dtype`` (bf16). The model is built in fp32 for these, not cast:

  eager_adamw         the model's parameters cast to bf16 (buffers keep their dtype, as in the
                      program) and ``torch.optim.AdamW(fused=True)`` on the fp32 originals, each with
                      a persistent fp32 gradient buffer (Megatron's ``main_grad``): per step the bf16
                      gradients are copied into it (``_foreach_copy_``), ``clip_grad_norm_(foreach)``,
                      the fused step, and the masters copied back into the bf16 parameters
  torch_compile_adamw the same with ``torch.compile(model)`` in the forward (the fused optimizer is
                      already one kernel per group, and stays eager)
  shardgraph_adamw    ``shardgraph.compile(..., optimizer=sg.optim.AdamW(...), clip_grad_norm=1.0,
                      compute_dtype=torch.bfloat16)``: forward, backward, norm, clipping and update in
                      one graph, the bf16 casts of the fp32 parameters inside it; run by
                      ``program.train_step(state, batch, lr=...)``, state from ``program.init_state``
  shardgraph_adamw_compile  the same step with that graph module under ``torch.compile(dynamic=False)``
                      (``program.train_step(..., compile="inductor")``)
  eager_adamw_autocast  (not in the group) the fp32 model under ``torch.autocast(bf16)`` with fused
                      AdamW on its own parameters: what many torch users write, but not the same
                      compute: ops autocast does not cover run in fp32, HF's grouped_mm experts among
                      them (transformers casts the input to the fp32 weight), which is why the
                      master-weight copy above is the baseline

The program donates its state (``donate_state``, the default): each new weight and Adam moment is
written into the old one's tensor as soon as the old one has no reader left, so the step holds 12
bytes per parameter of state (master and moments) plus the fp32 gradients while they live, against
12 + 4 (persistent fp32 gradient) + 2 + 2 (bf16 weights and gradients) for eager_adamw. Four layers
of the Qwen3-30B-A3B shape are 3.1e9 parameters.

The first four SGD variants run by default (``--variants`` picks any, comma- or space-separated).
Models (``--models``), all at Qwen3-30B-A3B's
layer shape (hidden 2048, 32 query / 4 KV heads of 128, 128 experts, top-8, expert intermediate 768,
vocab 151936) with ``--layers`` layers, SDPA attention, bf16 parameters (fp32 for the AdamW
variants), built on the device:

  ours        examples/moe_model.py ``MoETransformer``, config ``qwen3_30b_a3b`` (qk-norm, no shared expert)
  mixtral     HF ``MixtralForCausalLM``
  qwen2_moe   HF ``Qwen2MoeForCausalLM`` with a shared expert of 2048 behind its sigmoid gate
  qwen3_moe   HF ``Qwen3MoeForCausalLM`` (Qwen3-30B-A3B's own layer: q/k norms, top-k weights renormalised)

Reported per row: median / p10 / p90 step ms over ``--steps`` steps (CUDA events around each step,
synchronised at its end) after ``--warmup`` steps, tokens/s (batch * seq / median), speed-up over
eager and over torch_compile, peak memory over the timed steps (``max_memory_allocated``, for a
replayed CUDA graph over its capture, whose allocations are the pool every replay uses; and
reserved; the parameters' bytes are their own column; on a GPU
``alloc_retries``, the allocations in the timed steps that had to empty the allocator's cache and
retry, which stall the step near the card's memory limit), the first
step's loss and its relative difference from eager's (same weights and batch: ~1e-2 or better in
bf16), ``compile_s`` (shardgraph.compile's wall time, plus the first step where torch.compile works, or
the CUDA graph's capture step),
host-device syncs in one step (``torch.cuda.set_sync_debug_mode("warn")``), dynamo's graph
breaks, MFU (model FLOPs: 6 x active matmul parameters x tokens plus causal attention, over the
median step, over 989 TFLOP/s, the dense bf16 peak of an H100 / H200 SXM), and the last step's loss
against the baseline's after as many updates from the same weights on the same batch (the AdamW
rows compare with eager_adamw / torch_compile_adamw, the SGD rows with eager / torch_compile). A variant that runs out of memory is recorded as ``oom``, one that fails otherwise with its
error, and the others still run; the JSON is rewritten after every row.

``--profile`` runs torch.profiler over 3 steps of ``--profile-variants`` (the shardgraph ones) and
splits the GPU kernel time by class: grouped GEMM, attention, dense GEMM, optimizer update,
elementwise/reduction (aten kernels and inductor's fused triton_poi/red/per kernels, whose names
can mention grouped_mm or attention without being them), memcpy/memset, other; idle is the
unprofiled median step minus the kernel time (the profiled step's wall time carries the profiler's
own host overhead, so it is recorded but not used for idle). With the 25 longest kernels.
``--check`` also runs one step of eager and of shardgraph from identical weights and compares the
loss, every parameter after the SGD update, and the updates themselves.

    python benchmarks/train_step.py --profile        # one H100, ~6 min: benchmarks/results/train_step.json
    python benchmarks/train_step.py --device cpu --tiny --steps 2 --warmup 1
    python benchmarks/train_step.py --device cpu --tiny --dtype float32 --check --compile-backend aot_eager
    python benchmarks/train_step.py --models mixtral --variants adamw --steps 10   # one H100: AdamW rows
    python benchmarks/train_step.py --models ours --variants shardgraph_sgd,shardgraph_sgd_cudagraph   # one H100
    python benchmarks/train_step.py --device cpu --tiny --steps 2 --warmup 1 --variants eager_adamw shardgraph_adamw
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

import shardgraph as sg  # noqa: E402
from examples.moe_model import CONFIGS, MoETransformer, lm_loss  # noqa: E402
from kernels import embedding_sgd, moe_rows  # noqa: E402
from shardgraph.frontend.norms import norms_traced_as_ops  # noqa: E402
from shardgraph.frontend.rotary import rotary_traced_as_op  # noqa: E402
from shardgraph.ops.direct_calls import use_direct_calls  # noqa: E402

MODELS = ("ours", "mixtral", "qwen2_moe", "qwen3_moe")
# AdamW steps: fp32 master weights and fp32 Adam state, computing in --dtype (see the docstring).
ADAMW_VARIANTS = ("eager_adamw", "torch_compile_adamw", "shardgraph_adamw", "shardgraph_adamw_compile")
VARIANTS = ("eager", "torch_compile", "torch_compile_cudagraph", "shardgraph", "shardgraph_compile",
            "shardgraph_cudagraph", "shardgraph_compile_aten_rows", "shardgraph_sgd", "shardgraph_sgd_compile",
            "shardgraph_sgd_cudagraph", "shardgraph_sgd_compile_unfused", "shardgraph_sgd_aten_norms",
            "shardgraph_sgd_compile_aten_norms",
            "shardgraph_sgd_aten_rotary", "shardgraph_sgd_dispatched",
            *ADAMW_VARIANTS, "eager_adamw_autocast")
DEFAULT_VARIANTS = ("eager", "torch_compile", "shardgraph", "shardgraph_compile")
VARIANT_ALIASES = {"shardgraph_compiled": "shardgraph_compile"}
# sg.compile options every shardgraph variant of the run is compiled with (--loss-chunk-mib).
COMPILE_OPTIONS: dict = {}
VARIANT_GROUPS = {"adamw": ADAMW_VARIANTS, "sgd": DEFAULT_VARIANTS}  # --variants adamw: the four AdamW ones
MODEL_VARIANTS = ("eager", "torch_compile", "torch_compile_cudagraph")  # SGD on the model itself
MASTER_VARIANTS = ("eager_adamw", "torch_compile_adamw", "eager_adamw_autocast")  # torch.optim.AdamW
PROGRAM_ADAMW_VARIANTS = ("shardgraph_adamw", "shardgraph_adamw_compile")  # AdamW in the program
# SGD in the program, the new weights written in place (the expert weights' steps in their wgrad)
PROGRAM_SGD_VARIANTS = ("shardgraph_sgd", "shardgraph_sgd_compile", "shardgraph_sgd_cudagraph",
                        "shardgraph_sgd_compile_unfused", "shardgraph_sgd_aten_norms",
                        "shardgraph_sgd_compile_aten_norms", "shardgraph_sgd_aten_rotary", "shardgraph_sgd_dispatched")
PROGRAM_STATE_VARIANTS = PROGRAM_ADAMW_VARIANTS + PROGRAM_SGD_VARIANTS
FP32_MODEL_VARIANTS = MASTER_VARIANTS + PROGRAM_ADAMW_VARIANTS  # built in float32: master weights
NO_TORCH_COMPILE = ("eager", "shardgraph", "eager_adamw", "eager_adamw_autocast", "shardgraph_adamw", "shardgraph_sgd",
                    "shardgraph_sgd_aten_norms", "shardgraph_sgd_aten_rotary", "shardgraph_sgd_cudagraph",
                    "shardgraph_sgd_dispatched")
# The plain program captured as a CUDA graph by train_step (no torch.compile): a CUDA device only.
CUDA_GRAPH_STEP_VARIANTS = ("shardgraph_sgd_cudagraph",)
LEARNING_RATE = 1e-3  # SGD
# AdamW, the same in every AdamW variant: torch's default betas / eps, decoupled decay on every
# parameter, the global gradient norm clipped to 1.0 before the update (clip_grad_norm_).
ADAMW = dict(lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
CLIP_GRAD_NORM = 1.0
# MFU's denominator: dense bf16 tensor-core peak of an H100 / H200 SXM (989 TFLOP/s, no sparsity).
PEAK_FLOPS = 989e12

# Qwen3-30B-A3B's layer; --tiny keeps the structure and shrinks every size (about 4e5 parameters
# per model at one layer), so the whole script runs on a CPU in seconds.
FULL_SHAPE = dict(vocab_size=151936, hidden_size=2048, num_heads=32, num_kv_heads=4, head_dim=128,
                  num_experts=128, top_k=8, moe_intermediate_size=768, shared_expert_intermediate_size=2048)
TINY_SHAPE = dict(vocab_size=512, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                  num_experts=8, top_k=2, moe_intermediate_size=64, shared_expert_intermediate_size=128)
FULL_DEFAULTS = dict(layers=4, seq=4096, batch=2)
TINY_DEFAULTS = dict(layers=2, seq=32, batch=2)


# ---------------------------------------------------------------------------------- models
def build(name: str, layers: int, tiny: bool, seed: int, hf_experts: str = "default"):
    """``(model, loss_fn)`` on the current default device, float32, weights from ``seed``.

    ``hf_experts`` picks HF transformers' expert implementation: ``"default"`` is what the
    installed transformers chooses (5.x: ``"grouped_mm"``), ``"eager"`` HF's per-expert loop."""
    shape = TINY_SHAPE if tiny else FULL_SHAPE
    if name == "ours":
        config = dataclasses.replace(CONFIGS["qwen3_30b_a3b"], num_layers=layers)
        if tiny:
            config = dataclasses.replace(
                config, vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], num_heads=shape["num_heads"],
                num_kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"], num_experts=shape["num_experts"],
                top_k=shape["top_k"], moe_intermediate_size=shape["moe_intermediate_size"])
        torch.manual_seed(seed)
        return MoETransformer(config), lm_loss
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return build_hf(name, layers, shape, seed, hf_experts)


def build_hf(family: str, layers: int, shape: dict, seed: int, hf_experts: str):
    """examples/hf_models.py's ``build`` (it seeds, then builds from a config) at ``shape``."""
    from examples.hf_models import build as hf_build
    from examples.hf_models import lm_loss as hf_loss

    overrides = dict(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], num_hidden_layers=layers,
                     num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                     head_dim=shape["head_dim"], num_experts_per_tok=shape["top_k"], use_cache=False)
    if hf_experts != "default":
        overrides["experts_implementation"] = hf_experts
    if family == "mixtral":
        overrides.update(intermediate_size=shape["moe_intermediate_size"], num_local_experts=shape["num_experts"],
                         sliding_window=None)
    else:
        # intermediate_size sizes dense MLP layers, which these models (every layer sparse) have none of.
        overrides.update(intermediate_size=4 * shape["moe_intermediate_size"],
                         moe_intermediate_size=shape["moe_intermediate_size"], num_experts=shape["num_experts"])
        if family == "qwen2_moe":
            overrides.update(shared_expert_intermediate_size=shape["shared_expert_intermediate_size"])
    return hf_build(family, attn_implementation="sdpa", seed=seed, **overrides), hf_loss


def row_name(name: str, hf_experts: str) -> str:
    return name if name == "ours" else f"{name}/{hf_experts}"


def experts_implementation(model) -> str:
    """What the model's experts run: HF's resolved implementation, or ``loop`` (ours)."""
    config = getattr(model, "config", None)
    return getattr(config, "_experts_implementation", None) or "loop"


def matmul_parameters_per_token(name: str, shape: dict, layers: int) -> int:
    """Parameters one token multiplies by (active ones: top_k of the experts; the lm_head, not
    the embedding lookup)."""
    hidden, heads, kv_heads, head_dim = shape["hidden_size"], shape["num_heads"], shape["num_kv_heads"], shape["head_dim"]
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    router = hidden * shape["num_experts"]
    experts = shape["top_k"] * 3 * hidden * shape["moe_intermediate_size"]
    shared = 3 * hidden * shape["shared_expert_intermediate_size"] + hidden if name == "qwen2_moe" else 0
    return layers * (attention + router + experts + shared) + hidden * shape["vocab_size"]


def model_flops(name: str, args) -> float:
    """Model FLOPs of one training step: 6 x active matmul parameters x tokens, plus causal
    attention (QK^T and PV over the lower triangle: 2 * batch * seq^2 * heads * head_dim forward,
    three times that for forward + backward), per layer. Recomputation is not counted."""
    shape = TINY_SHAPE if args.tiny else FULL_SHAPE
    tokens = args.batch * args.seq
    attention = 3 * 2 * args.batch * args.seq ** 2 * shape["num_heads"] * shape["head_dim"] * args.layers
    return 6.0 * matmul_parameters_per_token(name, shape, args.layers) * tokens + attention


# ---------------------------------------------------------------------------------- world=1 communicator
class SingleRankCommunicator:
    """The communicator of the only rank of ``MeshSpec(world=1)``: every collective is the identity.

    Written here rather than taken from the runtime: ``Simulator(mesh).communicator(0)`` would be
    correct but keeps every collective's tensors in its rendezvous table (cleared only by
    ``Simulator.run``) and records bytes, and ``DistributedCommunicator`` needs an initialised
    process group. The lowered world=1 graphs of the three models do not read their ``comm`` input
    at all (``comm_users`` in each shardgraph row lists what does), so this only has to be right if
    a later lowering starts calling it. Nothing in a functional graph writes into a collective's
    result in place, so handing back the input itself is safe."""

    def __init__(self, mesh):
        self.mesh, self.rank = mesh, 0

    def all_reduce(self, tensor, axis, op="sum", tag=""):
        return tensor

    def all_gather(self, tensor, axis, dim=0, tag=""):
        return tensor

    def reduce_scatter(self, tensor, axis, dim=0, op="sum", tag=""):
        return tensor

    def all_to_all(self, tensor, axis, input_splits, dim=0, tag=""):
        return tensor

    def broadcast(self, tensor, axis, source_index=0, tag=""):
        return tensor

    def group(self, axis):
        return (0,)

    def index(self, axis):
        return 0


def comm_users(program) -> list[str]:
    """The nodes of the lowered graph that read its communicator (the first placeholder)."""
    comm = next(n for n in program.graph_module.graph.nodes if n.op == "placeholder")
    return [f"{node.name}: {getattr(node.target, '__qualname__', node.target)}" for node in comm.users]


# ---------------------------------------------------------------------------------- variants
def train_step_compile(variant: str) -> str | None:
    """``train_step``'s ``compile`` for a variant with the optimizer in the program."""
    if variant in CUDA_GRAPH_STEP_VARIANTS:
        return "cuda_graph"
    return None if variant in NO_TORCH_COMPILE else "inductor"


class Runner:
    """One variant of one model: ``step()`` runs forward, backward and the update (SGD or AdamW).

    ``compute_dtype`` is what the AdamW variants compute in (their model comes in float32: the
    master weights); the SGD variants get a model already cast to it."""

    def __init__(self, variant: str, model, loss_fn, batch, compile_mode=None, compile_backend="inductor",
                 compute_dtype=None):
        self.variant, self.model, self.loss_fn, self.batch = variant, model, loss_fn, list(batch)
        self.compile_s = None
        self.comm_users: list[str] = []
        self.steps_taken, self.last_loss = 0, None
        self.compute_dtype = compute_dtype if compute_dtype not in (None, torch.float32) else None
        if variant in MODEL_VARIANTS:
            self.optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, foreach=True)
            mode = "reduce-overhead" if variant == "torch_compile_cudagraph" else compile_mode
            self.forward = model if variant == "eager" else torch.compile(model, mode=mode, backend=compile_backend)
            return
        if variant in MASTER_VARIANTS:
            self._init_master_weights(model, compile_mode, compile_backend)
            return
        if variant in CUDA_GRAPH_STEP_VARIANTS and self.batch[0].device.type != "cuda":
            # Before compiling: train_step would refuse the state's device only at the first step.
            raise ValueError(f"{variant} replays the step as a CUDA graph (train_step(compile='cuda_graph')): it "
                             f"needs --device cuda, not {self.batch[0].device.type}")
        started = time.perf_counter()
        with norms_traced_as_ops(not variant.endswith("_aten_norms")), \
                rotary_traced_as_op(not variant.endswith("_aten_rotary")):
            self._compile_program(variant, model, loss_fn)
        self.compile_s = time.perf_counter() - started
        self.comm_users = comm_users(self.program)
        self.comm = SingleRankCommunicator(self.program.mesh)
        self.buffers = dict(self.program.default_buffers)
        self.compiled = None
        # What an SGD update outside the program writes; an optimizer in the program updates its state.
        self.trainable = []
        if variant in PROGRAM_STATE_VARIANTS:
            # The state holds the only copy of the fp32 master weights (init_state gives pieces of
            # their own memory, which the donating step updates in place): the model's own
            # parameters are emptied so that the model does not keep a second copy alive.
            self.state = self.program.init_state(model, 0)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)
            self.model = None
            return
        # The program reads the parameters from these tensors (they share the model's storage)
        # and the SGD update writes into them.
        self.parameters = {name: p.detach() for name, p in model.named_parameters()}
        self.trainable = [self.parameters[name] for name in self.program.gradient_names]
        if variant in ("shardgraph_compile", "shardgraph_compile_aten_rows"):
            self.compiled = torch.compile(self.program.graph_module, mode=compile_mode, backend=compile_backend,
                                          dynamic=False)
        elif variant == "shardgraph_cudagraph":
            # Static addresses: the graph replay reads the parameters in place instead of copying
            # every one into its own buffers before each replay.
            for tensor in [*self.parameters.values(), *self.buffers.values()]:
                torch._dynamo.mark_static_address(tensor)
            self.compiled = torch.compile(self.program.graph_module, mode="reduce-overhead", backend=compile_backend,
                                          dynamic=False)
        program = self.program
        self.arguments = ([self.parameters[n] for n in program.parameter_names]
                          + [self.buffers[n] for n in program.buffer_names] + self.batch)

    def _compile_program(self, variant, model, loss_fn):
        if variant in PROGRAM_ADAMW_VARIANTS:
            self.program = sg.compile(model, sg.MeshSpec(world=1), self.batch, loss_fn, **COMPILE_OPTIONS,
                                      optimizer=sg.optim.AdamW(**ADAMW), clip_grad_norm=CLIP_GRAD_NORM,
                                      compute_dtype=self.compute_dtype)
        elif variant in PROGRAM_SGD_VARIANTS:
            self.program = sg.compile(model, sg.MeshSpec(world=1), self.batch, loss_fn, **COMPILE_OPTIONS,
                                      optimizer=sg.optim.SGD(lr=LEARNING_RATE),
                                      fused_update=variant != "shardgraph_sgd_compile_unfused")
        else:
            self.program = sg.compile(model, sg.MeshSpec(world=1), self.batch, loss_fn, **COMPILE_OPTIONS)

    def _init_master_weights(self, model, compile_mode, compile_backend):
        """torch.optim.AdamW(fused=True) on fp32 master weights.

        eager_adamw / torch_compile_adamw: the model's parameters are cast to the compute dtype
        (buffers keep theirs, as in the program) and the fp32 originals become the master
        weights, each with a persistent fp32 gradient buffer (Megatron's ``main_grad``); a step
        copies the compute gradients into it, clips, steps the optimizer and copies the masters
        back into the compute parameters. eager_adamw_autocast: the fp32 model itself under
        ``torch.autocast`` (no copies; ops autocast does not cover, HF's grouped_mm among them,
        run in fp32)."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.autocast = self.variant == "eager_adamw_autocast" and self.compute_dtype is not None
        if self.compute_dtype is None or self.autocast:
            self.compute_parameters = None
            self.masters = trainable
        else:
            self.masters = [p.detach() for p in trainable]  # keeps the fp32 storage
            with torch.no_grad():
                for parameter in trainable:
                    parameter.data = parameter.data.to(self.compute_dtype)
            self.compute_parameters = trainable
            for master in self.masters:
                master.grad = torch.empty_like(master)
        self.optimizer = torch.optim.AdamW(self.masters, **ADAMW, fused=True)
        self.forward = (model if self.variant != "torch_compile_adamw"
                        else torch.compile(model, mode=compile_mode, backend=compile_backend))

    def step(self) -> torch.Tensor:
        loss = self._step()
        self.steps_taken += 1
        self.last_loss = loss
        return loss

    def _step(self) -> torch.Tensor:
        # The row kernels' switch is read while inductor traces the first step, and guarded on.
        with moe_rows.use_row_kernels(self.variant != "shardgraph_compile_aten_rows"), \
                use_direct_calls(self.variant != "shardgraph_sgd_dispatched"):
            return self._variant_step()

    def _variant_step(self) -> torch.Tensor:
        if self.variant in MODEL_VARIANTS:
            loss = self.loss_fn(self.forward(*self.batch), *self.batch)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        if self.variant in MASTER_VARIANTS:
            return self._master_step()
        if self.variant in PROGRAM_STATE_VARIANTS:
            lr = ADAMW["lr"] if self.variant in PROGRAM_ADAMW_VARIANTS else LEARNING_RATE
            loss, self.state, _ = self.program.train_step(self.state, self.batch, lr=lr,
                                                          compile=train_step_compile(self.variant))
            return loss.detach()
        if self.compiled is None:
            loss, gradients = self.program.step(self.comm, self.parameters, self.batch, self.buffers)
            gradients = [gradients[name] for name in self.program.gradient_names]
        else:
            loss, *gradients = self.compiled(self.comm, *self.arguments)
        with torch.no_grad():
            torch._foreach_add_(self.trainable, gradients, alpha=-LEARNING_RATE)
        # A CUDA graph replay overwrites its outputs: keep the loss past the next step.
        return loss.detach().clone()

    def _master_step(self) -> torch.Tensor:
        if self.autocast:
            with torch.autocast(self.batch[0].device.type, dtype=self.compute_dtype):
                loss = self.loss_fn(self.forward(*self.batch), *self.batch)
        else:
            loss = self.loss_fn(self.forward(*self.batch), *self.batch)
        loss.backward()
        with torch.no_grad():
            if self.compute_parameters is not None:
                torch._foreach_copy_([m.grad for m in self.masters], [p.grad for p in self.compute_parameters])
            torch.nn.utils.clip_grad_norm_(self.masters, CLIP_GRAD_NORM, foreach=True)
            self.optimizer.step()
            if self.compute_parameters is not None:
                torch._foreach_copy_(self.compute_parameters, self.masters)
                for parameter in self.compute_parameters:
                    parameter.grad = None
            else:
                self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# ---------------------------------------------------------------------------------- measuring
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(runner, device, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            runner.step()
            times.append((time.perf_counter() - started) * 1e3)
    return times


def count_syncs(runner, device) -> int | None:
    """Host-device synchronisations in one step, as ``set_sync_debug_mode("warn")`` reports them."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def graph_breaks() -> dict:
    """Dynamo's graph breaks since the last ``counters.clear()``: how many, and the first reasons."""
    from torch._dynamo.utils import counters

    reasons = counters.get("graph_break", {})
    return {"count": sum(reasons.values()), "reasons": [str(r)[:300] for r in list(reasons)[:5]]}


# Checked in order; the first class with a key in the lower-cased kernel name wins. Inductor's
# fused kernels come first: their names list the ops they fused, grouped_mm or attention included.
# Grouped GEMMs: ours are the Triton kernels _grouped_product*/_grouped_wgrad*/_pingpong_product* (on the CPU the
# shardgraph::grouped_mm* ops), torch._grouped_mm's are CUTLASS kernels over a GroupProblemShape.
# The aten:: keys only match CPU op names (profile_steps' CPU fallback).
KERNEL_CLASSES = [
    ("dense GEMM", ("triton_tem_",)),
    ("elementwise/reduction", ("triton_poi_", "triton_red_", "triton_per_")),
    ("grouped GEMM", ("grouped", "groupproblemshape", "_pingpong_product")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("dense GEMM", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
    ("optimizer update", ("multi_tensor_apply", "_foreach_")),
    ("memcpy/memset", ("memcpy", "memset", "aten::copy_")),
    ("elementwise/reduction", ("at::native", "at_cuda_detail", "cub::", "elementwise", "reduce", "aten::")),
]


def classify(name: str) -> str:
    lowered = name.lower()
    return next((label for label, keys in KERNEL_CLASSES if any(k in lowered for k in keys)), "other kernels")


def timed_events(profiler, on_gpu: bool):
    """``(event, microseconds)`` of what a profile counts: on a GPU every device event (kernels,
    memcpy, memset) at its duration; on the CPU the aten / custom / c10d ops at their self time."""
    for event in profiler.events():
        if on_gpu:
            # A record_function range (Optimizer.step#AdamW.step, say) also shows on the GPU
            # timeline as an annotation spanning the kernels it launched: not a kernel of its own.
            if event.device_type == torch.autograd.DeviceType.CPU or getattr(event, "is_user_annotation", False):
                continue
            yield event, event.time_range.elapsed_us()
        elif event.device_type == torch.autograd.DeviceType.CPU and "::" in event.name:
            yield event, event.self_cpu_time_total


# Profiler ranges that say nothing about which op launched a kernel.
_UNNAMED_RANGES = ("ProfilerStep", "cudaLaunchKernel", "cuLaunchKernel", "cudaMemcpyAsync", "cudaMemsetAsync")


def launch_chains(profiler, depth: int = 3) -> dict[str, dict[str, int]]:
    """For each kernel name, the CPU op chains that launched it (innermost op first, ``depth``
    ops up the call tree, ``a < b`` reads "a called from b") with their launch counts: which op
    copies, for instance, when a profile shows copy kernels."""
    chains: dict[str, dict[str, int]] = {}
    for event in profiler.events():
        if event.device_type != torch.autograd.DeviceType.CPU or not event.kernels:
            continue
        names, parent = [], event
        while parent is not None and len(names) < depth:
            if not any(parent.name.startswith(skip) for skip in _UNNAMED_RANGES):
                names.append(parent.name[:80])
            parent = parent.cpu_parent
        chain = " < ".join(names)
        for kernel in event.kernels:
            counts = chains.setdefault(kernel.name, {})
            counts[chain] = counts.get(chain, 0) + 1
    return chains


def profile_steps(runner, device, median_ms: float, steps: int = 3) -> dict:
    """Kernel time per step by class, and idle time against the unprofiled median step.

    On a GPU: every device event (kernels, memcpy, memset) on the one stream, so their sum is the
    GPU's busy time. On the CPU (tests) the same breakdown of the aten / custom ops' self time, so
    the path runs everywhere."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            runner.step()
        synchronize(device)
    profiled_ms = (time.perf_counter() - started) * 1e3 / steps
    by_class, kernels = {}, {}
    for event, us in timed_events(profiler, on_gpu):
        ms = us / 1e3 / steps
        count, total = kernels.get(event.name, (0, 0.0))
        kernels[event.name] = (count + 1, total + ms)
        label = classify(event.name)
        by_class[label] = by_class.get(label, 0.0) + ms
    busy = sum(by_class.values())
    by_class = dict(sorted(by_class.items(), key=lambda kv: -kv[1]))
    by_class["idle / launch gaps"] = max(median_ms - busy, 0.0)
    top = sorted(kernels.items(), key=lambda item: -item[1][1])[:40]
    chains = launch_chains(profiler) if on_gpu else {}

    def launched_by(name):
        counts = sorted(chains.get(name, {}).items(), key=lambda kv: -kv[1])[:3]
        return [{"ops": chain, "calls_per_step": count / steps} for chain, count in counts]
    return {
        "measures": "GPU kernels" if on_gpu else "CPU op self time", "profiled_steps": steps,
        "step_ms": median_ms, "gpu_busy_ms": busy, "busy_fraction": busy / median_ms if median_ms else None,
        "ms_by_class": by_class, "step_wall_ms": profiled_ms,
        "top_kernels_ms": [{"name": name[:160], "ms": total, "calls_per_step": count / steps, "class": classify(name),
                            "launched_by": launched_by(name)}
                           for name, (count, total) in top],
    }


def host_profile(runner, device, steps: int = 5, top: int = 25) -> dict:
    """Where the host's time goes in a step: cProfile over ``steps`` steps, the ``top`` Python
    functions by their own time, per step. The host is what a step without a compiler waits on
    where its kernels are shorter than their launches."""
    import cProfile
    import pstats

    synchronize(device)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        runner.step()
    profiler.disable()
    host_ms = (time.perf_counter() - started) / steps * 1e3
    synchronize(device)
    rows = []
    for (filename, line, function), (_, calls, own, cumulative, _) in pstats.Stats(profiler).stats.items():
        rows.append({"function": f"{os.path.basename(filename)}:{line}({function})", "calls": calls / steps,
                     "own_us": own / steps * 1e6, "cumulative_us": cumulative / steps * 1e6})
    rows.sort(key=lambda r: -r["own_us"])
    return {"steps": steps, "host_ms_per_step_under_cprofile": host_ms, "functions": rows[:top]}


def print_host_profile(label: str, profile: dict) -> None:
    print(f"\n{label}: host time under cProfile {profile['host_ms_per_step_under_cprofile']:.1f} ms a step")
    print(f"{'own us':>9} {'cum us':>9} {'calls':>7}  function")
    for row in profile["functions"]:
        print(f"{row['own_us']:9.0f} {row['cumulative_us']:9.0f} {row['calls']:7.0f}  {row['function']}")


def print_profile(label: str, profile: dict, digits: int = 1, kernels: int | None = None) -> None:
    """``profile_steps``'s breakdown: one line of classes, then the top ``kernels`` kernels (all
    of them by default); milliseconds with ``digits`` decimals."""
    parts = ", ".join(f"{k} {v:.{digits}f}" for k, v in profile["ms_by_class"].items())
    print(f"profile {label} ({profile['measures']}, ms per step): step {profile['step_ms']:.{digits}f}, "
          f"busy {profile['gpu_busy_ms']:.{digits}f} ({show(profile['busy_fraction'], '.0%')}); {parts}", flush=True)
    for kernel in profile["top_kernels_ms"][:kernels]:
        print(f"  {kernel['ms']:8.3f} ms {kernel['calls_per_step']:6.0f}x  {kernel['class'][:16]:16}  "
              f"{kernel['name'][:110]}", flush=True)
        for launch in kernel.get("launched_by", []):
            print(f"{'':36}{launch['calls_per_step']:5.0f}x from {launch['ops'][:160]}", flush=True)


def release(device):
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA OOM, also where torch.compile wraps it (BackendCompilerFailed and the like)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def run_variant(name, variant, args, device, dtype, batch) -> dict:
    started_variant = time.perf_counter()
    row = {"model": row_name(name, args.hf_experts), "variant": variant, "batch": args.batch, "seq": args.seq,
           "layers": args.layers, "dtype": args.dtype}
    model = runner = None
    try:
        with torch.device(device):
            model, loss_fn = build(name, args.layers, args.tiny, args.seed, args.hf_experts)
        if variant in FP32_MODEL_VARIANTS:
            row["precision"] = (f"fp32 master weights, gradients and AdamW state; compute {args.dtype}"
                                + (" (autocast)" if variant == "eager_adamw_autocast" else ""))
        else:
            model = model.to(dtype)
        row["experts"] = experts_implementation(model)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["parameter_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        row["model_flops_per_step"] = model_flops(name, args)
        torch._dynamo.utils.counters.clear()  # graph breaks are counted per variant
        runner = Runner(variant, model, loss_fn, batch, args.compile_mode, args.compile_backend, compute_dtype=dtype)
        if variant in PROGRAM_STATE_VARIANTS:
            model = None  # its parameters were emptied: the program's state holds the weights
        if variant not in MODEL_VARIANTS + MASTER_VARIANTS:
            row["comm_users"] = runner.comm_users
            row["rms_norm_ops"] = sum(node.target == torch.ops.shardgraph.rms_norm.default
                                      for node in runner.program.graph_module.graph.nodes)
            row["rotary_ops"] = sum(node.target == torch.ops.shardgraph.rotary.default
                                    for node in runner.program.graph_module.graph.nodes)
        synchronize(device)
        started = time.perf_counter()
        row["first_loss"] = runner.step().float().item()
        synchronize(device)
        first_step_s = time.perf_counter() - started
        # shardgraph.compile's own time, plus the first step where torch.compile works in it.
        uses_torch_compile = variant not in NO_TORCH_COMPILE
        row["compile_s"] = ((runner.compile_s or 0.0) + (first_step_s if uses_torch_compile else 0.0)
                            if uses_torch_compile or runner.compile_s is not None else None)
        row["first_step_s"] = first_step_s
        if variant in CUDA_GRAPH_STEP_VARIANTS:
            # The first step warmed the program up eagerly; this one captures the CUDA graph (and
            # replays it): a one-time cost like a compilation, kept out of the counted and timed steps.
            torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            runner.step()
            synchronize(device)
            row["capture_step_s"] = time.perf_counter() - started
            row["compile_s"] += row["capture_step_s"]
            # What the capture allocated is the graph's pool, which every replay uses without
            # allocating: the step's peak is the capture's.
            capture_peak = torch.cuda.max_memory_allocated(device)
        for _ in range(max(args.warmup - runner.steps_taken, 0)):
            runner.step()
        if uses_torch_compile:
            row["graph_breaks"] = graph_breaks()
        row["host_syncs_per_step"] = count_syncs(runner, device)
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
        times = timed_steps(runner, device, args.steps)
        if device.type == "cuda":
            # Allocations that failed, emptied the allocator's cache (a device synchronisation and
            # cudaFree of every unused block) and tried again: close to the card's memory.
            row["alloc_retries"] = torch.cuda.memory_stats(device).get("num_alloc_retries", 0) - retries
            # A CUDA graph replay allocates nothing: its intermediates live in the graph's private
            # pool, which "allocated" does not show between replays; "reserved" does.
            peak = torch.cuda.max_memory_allocated(device)
            if variant in CUDA_GRAPH_STEP_VARIANTS:
                peak = max(peak, capture_peak)
            row["peak_gib"] = peak / 2**30
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        ordered = sorted(times)
        row.update(median_ms=statistics.median(times), p10_ms=ordered[int(0.1 * (len(ordered) - 1))],
                   p90_ms=ordered[int(math.ceil(0.9 * (len(ordered) - 1)))], steps_ms=times)
        row["tokens_per_s"] = args.batch * args.seq / (row["median_ms"] / 1e3)
        row["last_loss"], row["steps_taken"] = runner.last_loss.float().item(), runner.steps_taken
        row["mfu"] = (row["model_flops_per_step"] / (row["median_ms"] / 1e3) / PEAK_FLOPS
                      if device.type == "cuda" else None)
        if args.profile and variant in args.profile_variants:
            row["profile"] = profile_steps(runner, device, row["median_ms"])
        if variant in args.host_profile_variants:
            row["host_profile"] = host_profile(runner, device)
        if args.predict and getattr(runner, "program", None) is not None:
            row["prediction"] = predict_row(runner, variant, device, dtype, row["median_ms"])
    except Exception as error:  # a variant that cannot run is reported, the others still run
        if is_out_of_memory(error):
            row["error"] = "oom"
            row["error_detail"] = f"{type(error).__name__}: {error}"[:400]
        else:
            row["error"] = f"{type(error).__name__}: {error}"[:2000]
            print(f"{name} {variant} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    del runner, model
    release(device)
    row["wall_s"] = time.perf_counter() - started_variant
    return row


def update_seconds(variant: str, trainable, compute) -> float:
    """The SGD variants' update, applied outside the program: priced as one streaming op that
    reads each parameter and its gradient and writes the parameter (``ComputeRates.seconds`` of
    no FLOPs). The variants with the optimizer in the program have it in their prediction already."""
    if variant in PROGRAM_STATE_VARIANTS:
        return 0.0
    return compute.seconds(0.0, 3 * sum(t.numel() * t.element_size() for t in trainable))


def predict_row(runner, variant, device, dtype, measured_ms: float) -> dict:
    """The report's predicted step of the variant's program beside its measured median: on the
    preset rates of the card (``passes.cost.HARDWARE``), and on rates calibrated on this device
    (``calibrate_compute``) with the program's products, grouped GEMMs, attention and loss timed
    alone at its own shapes (``calibrate_kernels``). Op by op for the plain program, fused
    (``predict_step(fused=True)``) where inductor compiles it. The SGD variants apply their update
    outside the program: it is added as a streaming op (read parameter and gradient, write the
    parameter)."""
    from dataclasses import replace

    from passes.cost import HARDWARE, calibrate_compute
    from shardgraph.predict import calibrate_kernels, measured_efficiency, predict_step
    from shardgraph.report import local_pieces

    program = runner.program
    gm, mesh = program.graph_module, program.mesh
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    preset = HARDWARE["h200" if "H200" in name else "h100" if device.type == "cuda" else "cpu"]
    started = time.perf_counter()
    calibrated = replace(preset, name=f"{preset.name}-calibrated",
                         compute=calibrate_compute(device, dtype, size=4096 if device.type == "cuda" else 512))
    pieces = local_pieces(gm, mesh)
    measured = calibrate_kernels(gm, mesh, device, pieces=pieces)
    calibration_s = time.perf_counter() - started
    fused = variant not in NO_TORCH_COMPILE
    result = {"fused": fused, "calibration_s": calibration_s, "measured_ms": measured_ms,
              "kind_efficiency": measured_efficiency(gm, measured, preset.compute.matmul_flops, pieces),
              "calibrated_rates": {k: (str(v) if isinstance(v, dict) else v)
                                   for k, v in vars(calibrated.compute).items()}}
    for label, hardware, timed in (("preset", preset, None), ("calibrated", calibrated, measured)):
        prediction = predict_step(gm, mesh, hardware, pieces=pieces, fused=fused, measured=timed)
        update_s = update_seconds(variant, runner.trainable, hardware.compute)
        predicted_ms = (prediction.step_seconds + update_s) * 1e3
        result[label] = {"predicted_ms": predicted_ms, "predicted_over_measured": predicted_ms / measured_ms,
                         "update_outside_program_ms": update_s * 1e3,
                         "by_kind_ms": {k: v * 1e3 for k, v in prediction.compute_seconds_by_kind.items()},
                         "kernels": prediction.kernels, "launch_ms": prediction.launch_seconds * 1e3,
                         "measured_nodes": prediction.measured_nodes}
        print(f"{variant} predicted ({label}): {predicted_ms:.2f} ms against {measured_ms:.2f} ms measured "
              f"({predicted_ms / measured_ms:.3f}); by kind "
              + ", ".join(f"{k} {v:.2f}" for k, v in result[label]["by_kind_ms"].items())
              + f"; {prediction.kernels} kernels, launches {prediction.launch_seconds * 1e3:.2f} ms", flush=True)
    print(f"{variant} calibrated: " + ", ".join(f"{kind} {fraction:.3f} of peak" for kind, fraction
                                                  in result["kind_efficiency"].items())
          + f"; streaming {calibrated.compute.memory_bandwidth / 1e12:.2f} TB/s, indexing "
          f"{calibrated.compute.indexing_efficiency:.2f} of it, launch {calibrated.compute.launch_seconds * 1e6:.1f} us",
          flush=True)
    return result


def predict_only(name: str, variant: str, args, dtype, hardware: str) -> dict:
    """The preset prediction alone (no device, no run): the variant's program compiled from the
    model built on the meta device, priced by ``passes.cost.HARDWARE[hardware]`` as
    ``predict_row`` prices it, so a prediction printed here can be set beside a step measured
    on the card earlier."""
    from passes.cost import HARDWARE
    from shardgraph.predict import predict_step
    from shardgraph.report import local_pieces

    with torch.device("meta"):
        model, loss_fn = build(name, args.layers, args.tiny, args.seed, args.hf_experts)
    vocab = (TINY_SHAPE if args.tiny else FULL_SHAPE)["vocab_size"]
    batch = (torch.zeros(args.batch, args.seq, dtype=torch.long, device="meta").clamp_(max=vocab - 1),)
    if variant in PROGRAM_ADAMW_VARIANTS:
        program = sg.compile(model, sg.MeshSpec(world=1), batch, loss_fn, **COMPILE_OPTIONS,
                             optimizer=sg.optim.AdamW(**ADAMW), clip_grad_norm=CLIP_GRAD_NORM,
                             compute_dtype=dtype if dtype != torch.float32 else None)
    elif variant in PROGRAM_SGD_VARIANTS:
        model = model.to(dtype)
        program = sg.compile(model, sg.MeshSpec(world=1), batch, loss_fn, **COMPILE_OPTIONS,
                             optimizer=sg.optim.SGD(lr=LEARNING_RATE),
                             fused_update=variant != "shardgraph_sgd_compile_unfused")
    else:
        model = model.to(dtype)
        program = sg.compile(model, sg.MeshSpec(world=1), batch, loss_fn, **COMPILE_OPTIONS)
    prediction = predict_step(program.graph_module, program.mesh, hardware,
                              pieces=local_pieces(program.graph_module, program.mesh),
                              fused=variant not in NO_TORCH_COMPILE)
    trainable = [p for p in model.parameters() if p.requires_grad]
    predicted_ms = (prediction.step_seconds + update_seconds(variant, trainable, HARDWARE[hardware].compute)) * 1e3
    print(f"{variant} predicted ({hardware} presets): {predicted_ms:.2f} ms; by kind "
          + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in prediction.compute_seconds_by_kind.items()), flush=True)
    return {"model": name, "variant": variant, "hardware": hardware, "predicted_ms": predicted_ms}


def check_one_step(name, args, device, dtype, batch) -> dict:
    """From identical weights, one step of eager and of the shardgraph program: loss and weights.

    ``weights_max_rel_err`` compares the parameters after the update; ``update_max_rel_err`` the
    updates themselves (after - before: lr times the gradient), which a small learning rate does
    not hide. Both are per-tensor relative Frobenius norms, maximised over the parameters."""
    def weights(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def relative(a, b):
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    # Eager's weights before and after stay on the device (in the model's dtype) while the
    # shardgraph copy steps, and are compared tensor by tensor.
    with torch.device(device):
        model, loss_fn = build(name, args.layers, args.tiny, args.seed, args.hf_experts)
    model = model.to(dtype)
    eager_before = weights(model)
    runner = Runner("eager", model, loss_fn, batch)
    eager_loss = runner.step().double().cpu()
    eager_after = weights(model)
    del runner, model
    release(device)

    with torch.device(device):
        model, loss_fn = build(name, args.layers, args.tiny, args.seed, args.hf_experts)
    model = model.to(dtype)
    start = max(relative(p, eager_before[n]) for n, p in model.named_parameters())
    runner = Runner("shardgraph", model, loss_fn, batch)
    ours_loss = runner.step().double().cpu()
    after = {n: p.detach() for n, p in model.named_parameters()}
    weight_errors = {n: relative(after[n], eager_after[n]) for n in eager_after}
    # Both started from eager_before (initial_weights_max_rel_err says whether exactly).
    update_errors = {n: relative(after[n].double() - eager_before[n].double(),
                                 eager_after[n].double() - eager_before[n].double()) for n in eager_after}
    del runner, model, after, eager_before, eager_after
    release(device)
    worst_weight = max(weight_errors, key=weight_errors.get)
    worst_update = max(update_errors, key=update_errors.get)
    return {"model": row_name(name, args.hf_experts), "eager_loss": eager_loss.item(),
            "shardgraph_loss": ours_loss.item(), "loss_rel_err": relative(ours_loss, eager_loss),
            "initial_weights_max_rel_err": start, "weights_max_rel_err": weight_errors[worst_weight],
            "worst_parameter": worst_weight, "update_max_rel_err": update_errors[worst_update],
            "worst_update": worst_update, "parameters_compared": len(weight_errors)}


# ---------------------------------------------------------------------------------- output
def add_comparisons(rows):
    """Speed-ups and the first loss's relative difference, against the same model's eager and torch_compile."""
    def base(model, variant):
        return next((r for r in rows if r["model"] == model and r["variant"] == variant and "median_ms" in r), None)

    for row in rows:
        if "median_ms" not in row:
            continue
        # AdamW rows against the AdamW baselines (the same update, clipping and precision).
        suffix = "_adamw" if row["variant"] in FP32_MODEL_VARIANTS else ""
        eager, compiled = base(row["model"], "eager" + suffix), base(row["model"], "torch_compile" + suffix)
        row["speedup_vs_eager"] = eager["median_ms"] / row["median_ms"] if eager else None
        row["speedup_vs_torch_compile"] = compiled["median_ms"] / row["median_ms"] if compiled else None
        row["first_loss_rel_diff_vs_eager"] = (abs(row["first_loss"] - eager["first_loss"]) / abs(eager["first_loss"])
                                               if eager else None)
        # After the same number of updates from the same weights on the same batch.
        same_steps = eager and eager.get("steps_taken") == row.get("steps_taken") and "last_loss" in row
        row["last_loss_rel_diff_vs_eager"] = (abs(row["last_loss"] - eager["last_loss"]) / abs(eager["last_loss"])
                                              if same_steps else None)


def show(value, spec):
    return format(value, spec) if value is not None else "-"


def print_table(rows):
    print(f"{'model':17} {'experts':10} {'variant':23} {'batch':>5} {'seq':>5} {'median ms':>9} {'p10':>8} "
          f"{'p90':>8} {'tokens/s':>9} {'x eager':>7} {'x t.c':>6} {'peak GiB':>8} {'par GiB':>7} {'syncs':>5} "
          f"{'breaks':>6} {'compile s':>9} {'loss':>8} {'loss rel':>8} {'MFU':>5} {'last loss':>9} {'rel':>7}")
    for row in rows:
        head = (f"{row['model']:17} {row.get('experts', '-'):10} {row['variant']:23} {row['batch']:5d} "
                f"{row['seq']:5d}")
        if "median_ms" not in row:
            print(f"{head} {row.get('error', 'did not run')[:200]}")
            continue
        breaks = row["graph_breaks"]["count"] if "graph_breaks" in row else None
        print(f"{head} {row['median_ms']:9.2f} {row['p10_ms']:8.2f} {row['p90_ms']:8.2f} {row['tokens_per_s']:9.0f} "
              f"{show(row['speedup_vs_eager'], '7.2f')} {show(row['speedup_vs_torch_compile'], '6.2f')} "
              f"{show(row.get('peak_gib'), '8.2f')} {row['parameter_gib']:7.2f} "
              f"{show(row.get('host_syncs_per_step'), '5d')} {show(breaks, '6d')} "
              f"{show(row.get('compile_s'), '9.1f')} {row['first_loss']:8.4f} "
              f"{show(row.get('first_loss_rel_diff_vs_eager'), '8.1e')} {show(row.get('mfu'), '5.1%')} "
              f"{show(row.get('last_loss'), '9.4f')} {show(row.get('last_loss_rel_diff_vs_eager'), '7.1e')}")
    for row in rows:
        if "profile" in row:
            print()
            print_profile(f"{row['model']} {row['variant']}", row["profile"])
        if "host_profile" in row:
            print_host_profile(f"{row['model']} {row['variant']}", row["host_profile"])


def versions() -> dict:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for module in ("triton", "transformers"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            out[module] = None
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--variants", nargs="+", default=[",".join(DEFAULT_VARIANTS)],
                        help=f"comma- or space-separated, any of {', '.join(VARIANTS)}, or the groups "
                             f"{', '.join(VARIANT_GROUPS)}")
    for key in ("layers", "batch", "seq"):
        parser.add_argument(f"--{key}", type=int, default=None,
                            help=f"default {FULL_DEFAULTS[key]} ({TINY_DEFAULTS[key]} with --tiny)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3,
                        help="steps before timing (the first one compiles; shardgraph_sgd_cudagraph takes at least "
                             "two, the warm-up step and the capture)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tiny", action="store_true", help="every model shrunk to ~4e5 parameters (CPU runs, tests)")
    parser.add_argument("--hf-experts", default="default", choices=["default", "eager", "grouped_mm", "batched_mm"],
                        help="HF models' expert implementation (default: what transformers picks)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of torch_compile and shardgraph_compile, e.g. "
                             "max-autotune-no-cudagraphs")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (aot_eager: quick CPU tests)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler kernel breakdown of --profile-variants")
    parser.add_argument("--profile-variants", default="shardgraph,shardgraph_compile,shardgraph_cudagraph")
    parser.add_argument("--host-profile-variants", default="",
                        help="comma-separated variants whose host time is profiled with cProfile after the timed "
                             "steps (the top Python functions by own time, per step)")
    parser.add_argument("--check", action="store_true", help="also compare one SGD step of shardgraph with eager")
    parser.add_argument("--predict-only", metavar="HARDWARE", default=None,
                        help="print each shardgraph variant's preset prediction (passes.cost.HARDWARE name) from the "
                             "model built on the meta device, and run nothing")
    parser.add_argument("--predict", action="store_true",
                        help="the report's predicted step of each shardgraph variant beside its measured one, on "
                             "preset and on calibrated rates (predict_row)")
    parser.add_argument("--loss-chunk-mib", type=int, default=None,
                        help="the fused loss's chunk budget (sg.compile's loss_chunk_bytes) for every shardgraph "
                             "variant; default the library's")
    parser.add_argument("--embedding-kernel", default="default", choices=("default", "aten", "triton"),
                        help="the embedding's sparse SGD step (kernels/embedding_sgd.py): its default, the aten "
                             "form, or the one Triton kernel")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "train_step.json"))
    args = parser.parse_args(argv)
    defaults = TINY_DEFAULTS if args.tiny else FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    def names(text):
        expanded = []
        for name in (v for v in text.split(",") if v):
            expanded.extend(VARIANT_GROUPS.get(name, (VARIANT_ALIASES.get(name, name),)))
        return list(dict.fromkeys(expanded))

    args.models = [m for m in args.models.split(",") if m]
    args.variants, args.profile_variants = names(",".join(args.variants)), names(args.profile_variants)
    args.host_profile_variants = names(args.host_profile_variants)
    for kind, chosen, known in (("models", args.models, MODELS), ("variants", args.variants, VARIANTS),
                                ("profile variants", args.profile_variants, VARIANTS),
                                ("host profile variants", args.host_profile_variants, VARIANTS)):
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"unknown {kind} {unknown}; choose from {', '.join(known)}")
    if args.seq < 2:
        parser.error("--seq must be at least 2 (the loss predicts the next token)")
    return args


def benchmark_device(name: str) -> torch.device:
    """The device ``--device`` names; a CUDA device on a machine without one ends the run."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (with --tiny)")
    return device


def main(argv=None) -> dict:
    args = parse_args(argv)
    COMPILE_OPTIONS.clear()
    if args.loss_chunk_mib is not None:
        COMPILE_OPTIONS["loss_chunk_bytes"] = args.loss_chunk_mib << 20
    if args.predict_only:
        return {"predictions": [predict_only(name, variant, args, getattr(torch, args.dtype), args.predict_only)
                                for name in args.models for variant in args.variants
                                if variant not in MODEL_VARIANTS + MASTER_VARIANTS]}
    embedding_kernel = (contextlib.nullcontext() if args.embedding_kernel == "default"
                        else embedding_sgd.use_triton(args.embedding_kernel == "triton"))
    with embedding_kernel:
        return measure_all(args)


def measure_all(args) -> dict:
    """Every model and variant of the run, measured, tabulated and written (``main``'s work)."""
    device = benchmark_device(args.device)
    dtype = getattr(torch, args.dtype)
    vocab = (TINY_SHAPE if args.tiny else FULL_SHAPE)["vocab_size"]
    batch = (torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
             .to(device),)
    started = time.perf_counter()
    rows, checks = [], []
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **versions(),
        "dtype": args.dtype, "layers": args.layers, "batch": args.batch, "seq": args.seq,
        "tokens_per_step": args.batch * args.seq, "steps": args.steps, "warmup": args.warmup, "tiny": args.tiny,
        "seed": args.seed, "hf_experts": args.hf_experts, "compile_mode": args.compile_mode,
        "compile_backend": args.compile_backend, "learning_rate": LEARNING_RATE,
        "embedding_kernel": "triton" if embedding_sgd.TRITON_ENABLED else "aten",
        "loss_chunk_bytes": COMPILE_OPTIONS.get("loss_chunk_bytes"),
        "adamw": {**ADAMW, "clip_grad_norm": CLIP_GRAD_NORM}, "mfu_peak_flops": PEAK_FLOPS,
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "shape": TINY_SHAPE if args.tiny else FULL_SHAPE, "complete": False, "total_wall_s": 0.0,
        "rows": rows, "checks": checks,
    }

    def save():
        # After every row, so a run stopped part-way still leaves what it measured.
        result["total_wall_s"] = time.perf_counter() - started
        add_comparisons(rows)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)

    for name in args.models:
        if args.check:
            try:
                check = check_one_step(name, args, device, dtype, batch)
                print(f"check {check['model']}: one SGD step of shardgraph vs eager from identical weights: loss "
                      f"rel err {check['loss_rel_err']:.2e}, parameters after the update max rel err "
                      f"{check['weights_max_rel_err']:.2e} ({check['worst_parameter']}), the updates max rel err "
                      f"{check['update_max_rel_err']:.2e} ({check['worst_update']})", flush=True)
            except Exception as error:  # out of memory included: the timed variants still run
                check = {"model": row_name(name, args.hf_experts),
                         "error": "oom" if is_out_of_memory(error) else f"{type(error).__name__}: {error}"[:2000]}
                print(f"check {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                release(device)
            checks.append(check)
            save()
        for variant in args.variants:
            rows.append(run_variant(name, variant, args, device, dtype, batch))
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("profile", "steps_ms")}), flush=True)
            save()
    result["complete"] = True
    save()
    print()
    print_table(rows)
    print(f"\nwrote {args.out} ({result['total_wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
