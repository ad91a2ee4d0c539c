"""torchtitan the package: its own Qwen3 MoE training at the shapes benchmarks/multigpu.py runs.

torchtitan 0.3.0's ``Qwen3Model`` (``torchtitan.models.qwen3``), built from its own layer
builder (``_build_qwen3_moe_layers``: fused-QKV GQA attention with QK norms, its MoE with the
softmax ``TokenChoiceTopKRouter``, top-k renormalised, grouped experts and the "standard"
all-to-all token dispatcher, and its initialisers) at the sizes of an example config
(``--config``, ``examples/moe_model.py``'s ``CONFIGS``: ``qwen3_30b_a3b`` is the Qwen3-30B-A3B
layer, hidden 2048, 32/4 heads of 128, 128 experts top-8, expert intermediate 768, vocab
151936; ``--layers`` of them), then trained as torchtitan's trainer does it
(``torchtitan/trainer.py``), piece by piece, without its data loader, tokenizer, checkpointer and
metrics (the trainer module imports torchdata and tensorboard, which this benchmark does not need):

* ``ParallelDims`` from a ``ParallelismConfig`` (tensor_parallel_degree = tp,
  expert_parallel_degree = ep, data_parallel_shard_degree = -1: FSDP over the rest), the model
  built on the meta device, ``parallelize_qwen3`` (its TP/EP sharding, per-block
  ``torch.compile`` when compiled, FSDP2 ``fully_shard`` with its mixed precision: bf16
  parameters in compute, fp32 gradient reduction, fp32 master weights and AdamW state),
  ``to_empty`` + ``init_weights``;
* the optimizer from ``OptimizersContainer.Config`` (AdamW, torchtitan's "fused" implementation,
  the same lr / betas / eps / weight decay as our AdamW step in benchmarks/train_step.py),
  torchtitan's MoE load-balancing hook, its ``ChunkedLossWrapper`` over ``CrossEntropyLoss`` (the
  Qwen3-30B-A3B recipe's loss), compiled with the model when compiled;
* a step: zero_grad, forward + loss + backward under its SPMD context, ``clip_grad_norm_``
  (max norm 1.0, EP-aware), ``optimizers.step()``.

Choices where torchtitan offers several, recorded in the JSON:

* ``--spmd-backend partial_dtensor`` (default): DTensor on the model-parallel axes, FSDP2 on the
  data-parallel ones. torchtitan's default ``spmd_types`` makes ``fully_shard`` take
  ``dp_mesh_dims``, which torch 2.13's FSDP refuses here for plain tensors ("all parameters must
  be DTensors on the full SPMD mesh") and torch 2.11 (the GPU machines') does not have;
* ``--attention sdpa`` (default): torchtitan's ``ScaledDotProductAttention`` (cuDNN / flash,
  causal), the same attention as ours for one document per sequence as here. ``flex`` is
  torchtitan's Qwen3 default (FlexAttention with a causal block mask, compiled with
  max-autotune: minutes of compile per shape; it has no backward on a CPU);
* ``--ac none`` (default, like our program's ``recompute="none"``; ``selective`` / ``full`` are
  torchtitan's);
* ``--cuda-graphs off`` (default). torchtitan's trainer captures forward + backward as one CUDA
  graph unless its EP dispatcher syncs with the host, which the standard one does: ``auto``
  follows that rule (a graph at ep = 1 only).

torchtitan 0.3.0 has no expert-tensor-parallel axis: a mesh with etp > 1 runs with etp = 1 (the
experts whole on each ep rank) and says so (``mesh_run``, ``note``).

Timing: median of ``--steps`` steps after ``--warmup`` (the first compiles), tokens per second
(global batch x sequence / step), MFU (``multigpu.model_flops``: 6 x matmul parameters x tokens
+ causal attention, over ``multigpu.PEAK_FLOPS`` = 989e12 per GPU), peak memory, the losses, and
with ``--profile`` a torch.profiler breakdown (``multigpu.profile_step``).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 8 benchmarks/titan_package.py --mesh world=8,tp=2,ep=4 --layers 2
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 benchmarks/titan_package.py --mesh world=4,tp=2,ep=2 \\
        --backend gloo --config tiny --layers 2 --batch 8 --seq 16 --steps 2 --no-compile    # CPU smoke

On a CPU (``--backend gloo``) it runs with two adaptations, both for the CPU only: torchtitan
builds its meshes on ``torchtitan.tools.utils.device_type``, which is "cuda" on any machine
without an accelerator, so its mesh module is pointed at "cpu"; and FSDP reduces with sums
(``set_force_sum_reduction_for_comms``) because gloo has no PREMUL_SUM (torchtitan sets the
divide factor to 1, so the sums are the same numbers). ``--backend nccl`` without a GPU is
refused.

Needs the torchtitan 0.3.0 wheel and what it imports beyond torch (spmd_types, einops, tyro,
docstring_parser, typeguard; the wheels benchmarks/moe_block.py's docstring lists), installed
with ``pip install --no-deps --target DIR`` and DIR on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import shardgraph as sg  # noqa: E402
from examples.moe_model import CONFIGS, MoEConfig  # noqa: E402

# The AdamW of our program's step (benchmarks/train_step.py), given to torchtitan's optimizer too.
ADAMW = dict(lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
MAX_NORM = 1.0


class TorchtitanUnavailable(RuntimeError):
    """torchtitan (or what it imports) is not importable, or cannot run on this device."""


def import_torchtitan() -> None:
    """Import what this benchmark uses from torchtitan, or raise ``TorchtitanUnavailable``.

    ``Decoder.Config.update_from_config`` imports ``torchtitan.trainer`` only to ask whether its
    config is a ``Trainer.Config``; that module imports torchdata and tensorboard (its data
    loader and metrics), which this benchmark does not use. Where they are missing, a stand-in
    module with a ``Trainer.Config`` nothing is an instance of takes its place, so the model
    config takes torchtitan's documented path for callers that are not its trainer."""
    try:
        import torchtitan.models.qwen3  # noqa: F401
        from torchtitan.config import ParallelismConfig  # noqa: F401
    except ImportError as error:
        raise TorchtitanUnavailable(f"torchtitan not importable: {type(error).__name__}: {error}") from error
    if "torchtitan.trainer" not in sys.modules:
        try:
            import torchtitan.trainer  # noqa: F401
        except ImportError:
            stand_in = types.ModuleType("torchtitan.trainer")

            class Trainer:
                class Config:  # nothing is an instance of this: the non-trainer path
                    pass

            stand_in.Trainer = Trainer
            sys.modules["torchtitan.trainer"] = stand_in


def titan_degrees(mesh: sg.MeshSpec) -> tuple[int, int, str | None]:
    """(tp, ep, note) torchtitan runs for ``mesh``: it has no etp axis."""
    if mesh.pp != 1:
        raise ValueError(f"titan_package runs no pipeline parallelism (mesh has pp={mesh.pp})")
    note = None
    if mesh.etp > 1:
        note = (f"torchtitan 0.3.0 has no expert tensor parallelism: etp={mesh.etp} is run as etp=1 (every expert "
                f"whole on its ep rank; efsdp = world / ep)")
    return mesh.tp, mesh.ep, note


def model_config(config: MoEConfig, seq: int, attention: str):
    """torchtitan's ``Qwen3Model.Config`` at ``config``'s sizes, built as its ``_30b_a3b`` is
    (models/qwen3/__init__.py), with the RoPE table sized to ``seq`` (what its trainer's
    ``update_from_config`` does) and the inner attention ``attention``."""
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.qwen3 import (_EMBEDDING_INIT, _LINEAR_INIT, Qwen3Model, _build_qwen3_moe_layers,
                                         _qwen3_norm)

    if config.shared_expert_intermediate_size:
        raise ValueError("torchtitan's Qwen3 MoE has no shared expert; pick a config without one (tiny, small, "
                         "qwen3_30b_a3b)")
    if not config.qk_norm:
        config = replace(config, qk_norm=True)  # Qwen3 always has them; a few norm weights more
    head_dim = config.attention_head_dim
    dim, vocab = config.hidden_size, config.vocab_size
    layers = _build_qwen3_moe_layers(
        fuse_qkv=True, n_layers=config.num_layers, dim=dim, n_heads=config.num_heads, n_kv_heads=config.num_kv_heads,
        head_dim=head_dim, moe_hidden_dim=config.moe_intermediate_size, num_experts=config.num_experts,
        top_k=config.top_k, attn_backend="flex", moe_comm_backend="standard",
        rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=seq, theta=1000000.0))
    if attention == "sdpa":
        for layer in layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    elif attention != "flex":
        raise ValueError(f"attention must be sdpa or flex, got {attention!r}")
    return Qwen3Model.Config(
        vocab_size=vocab, dim=dim, norm=_qwen3_norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=_EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=_LINEAR_INIT),
        layers=layers)


class TitanTraining:
    """torchtitan's model, parallelisation, optimizer and loss on this rank; ``step()`` is one
    training step on this rank's rows of the global batch."""

    def __init__(self, mesh: sg.MeshSpec, device: torch.device, config: MoEConfig, batch: int, seq: int, *,
                 compile_model: bool = True, attention: str = "sdpa", ac: str = "none",
                 spmd_backend: str = "partial_dtensor", cuda_graphs: str = "off", seed: int = 0):
        import_torchtitan()
        import torchtitan.distributed.parallel_dims as parallel_dims_module
        from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
        from torchtitan.components.optimizer import default_adamw, register_moe_load_balancing_hook
        from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
        from torchtitan.distributed import ParallelDims
        from torchtitan.distributed import utils as dist_utils
        from torchtitan.models.qwen3 import parallelize_qwen3

        if device.type == "cpu":
            # torchtitan builds its meshes on tools.utils.device_type, "cuda" wherever no
            # accelerator is found: on a CPU the meshes must be CPU (gloo) meshes.
            parallel_dims_module.device_type = "cpu"
        self.device, self.mesh = device, mesh
        tp, ep, self.note = titan_degrees(mesh)
        world = dist.get_world_size()
        if world != mesh.world:
            raise ValueError(f"the process group has {world} ranks, the mesh {mesh} needs {mesh.world}")
        dp = world // tp
        if batch % dp:
            raise ValueError(f"global batch {batch} does not split over torchtitan's dp = world / tp = {dp}")
        self.batch, self.seq, self.local_batch = batch, seq, batch // dp
        # Everything its parallelize function and model config read from a trainer config.
        settings = types.SimpleNamespace(
            parallelism=ParallelismConfig(tensor_parallel_degree=tp, expert_parallel_degree=ep,
                                          data_parallel_shard_degree=-1, spmd_backend=spmd_backend),
            training=TrainingConfig(local_batch_size=self.local_batch, seq_len=seq, max_norm=MAX_NORM,
                                    mixed_precision_param="bfloat16", mixed_precision_reduce="float32",
                                    dtype="float32", disable_cuda_graphs=cuda_graphs == "off"),
            compile=CompileConfig(enable=compile_model, components=["model", "loss"]),
        )
        self.settings = settings
        torch.autograd.set_multithreading_enabled(False)  # what its init_distributed does (SPMD mesh TLS)
        dist_utils.set_spmd_backend(spmd_backend)
        self.parallel_dims = parallel_dims = ParallelDims.from_config(settings.parallelism, world)
        parallel_dims.build_mesh()

        self.model_config = titan_config = model_config(config, seq, attention)
        titan_config.update_from_config(config=settings)
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = titan_config.build()
        ac_config = None
        if ac != "none":
            from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

            ac_config = {"selective": SelectiveAC.Config(), "full": FullAC.Config()}[ac]
        model = parallelize_qwen3(model, parallel_dims=parallel_dims, training=settings.training,
                                  parallelism=settings.parallelism, compile_config=settings.compile,
                                  ac_config=ac_config, dump_folder=os.environ.get("TMPDIR", "/tmp"))
        if device.type == "cpu":
            # gloo has no PREMUL_SUM; torchtitan sets FSDP's divide factor to 1, so a plain sum
            # reduces the same numbers.
            from torch.distributed.fsdp import FSDPModule

            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.set_force_sum_reduction_for_comms(True)
        model.to_empty(device=device)
        torch.manual_seed(seed)
        with torch.no_grad():
            model.init_weights(buffer_device=None)
        model.train()
        self.model = model
        self.parameters = sum(p.numel() for p in model.parameters())  # local (sharded) elements

        self.loss_fn = ChunkedLossWrapper.Config(
            loss_fn=CrossEntropyLoss.Config(global_vocab_size=config.vocab_size)).build(
                compile_config=settings.compile)
        self.loss_fn.set_lm_head(model.lm_head)
        model._skip_lm_head = True
        self.optimizers = default_adamw(**ADAMW).build(model_parts=[model])
        register_moe_load_balancing_hook(self.optimizers, [model], parallel_dims)
        self.context = dist_utils.get_spmd_context(parallel_dims=parallel_dims, spmd_typechecking=False)
        self.clip_grad_norm_ = dist_utils.clip_grad_norm_
        self.attention = attention

        # This rank's rows of one global batch (the same tokens on every rank, as ours).
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=generator)
        batch_rank = parallel_dims.get_mesh("batch").get_local_rank() if parallel_dims.dp_enabled else 0
        rows = tokens[batch_rank * self.local_batch:(batch_rank + 1) * self.local_batch]
        self.inputs = rows[:, :-1].contiguous().to(device)
        self.labels = rows[:, 1:].contiguous().to(device)
        self.positions = torch.arange(seq, device=device).expand(self.local_batch, seq).contiguous()
        self.global_valid_tokens = torch.tensor(float(batch * seq), device=device)
        self.forward_backward = self._forward_backward
        self.cuda_graphs = cuda_graphs == "auto" and device.type == "cuda" and ep == 1
        if self.cuda_graphs:
            from torchtitan.distributed.cudagraph import wrap_with_cuda_graph

            self.forward_backward = wrap_with_cuda_graph(self._forward_backward)
        self.losses: list[float] = []

    def _forward_backward(self, inputs, labels, global_valid_tokens, extra):
        # torchtitan's Trainer._forward_backward_body
        with self.context():
            pred = self.model(inputs, **extra)
            loss, _ = self.loss_fn(pred, labels, global_valid_tokens, positions=extra["positions"])
            del pred
            loss.backward()
        return loss

    def step(self) -> torch.Tensor:
        self.optimizers.zero_grad(set_to_none=not self.cuda_graphs)
        extra = {"positions": self.positions}
        if self.attention == "flex":
            extra["attention_masks"] = self.model.get_attention_masks(positions=self.positions)
        inputs, labels = self.inputs, self.labels
        if self.parallel_dims.spmd_backend == "spmd_types":
            from torchtitan.distributed.spmd_types import annotate_input_spmd_types

            inputs, labels, extra = annotate_input_spmd_types(self.parallel_dims, inputs, labels, extra)
        loss = self.forward_backward(inputs, labels, self.global_valid_tokens, extra)
        self.clip_grad_norm_([p for p in self.model.parameters()], MAX_NORM, foreach=True,
                             pp_mesh=None, ep_enabled=self.parallel_dims.ep_enabled)
        self.optimizers.step()
        return loss

    def global_loss(self, loss: torch.Tensor) -> float:
        """A step's mean loss over the global batch from this rank's ``loss`` (each rank's is its
        own sum over the global token count, so the sum over the data-parallel ranks)."""
        if isinstance(loss, DTensor):  # loss-parallel over tp: its replicated value
            loss = loss.full_tensor()
        loss = loss.float().clone()
        if self.parallel_dims.dp_enabled:
            group = self.parallel_dims.get_mesh("batch").get_group()
            dist.all_reduce(loss, group=group)
        return loss.item()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_titan(mesh: sg.MeshSpec, rank: int, device: torch.device, config: str, layers: int, batch: int, seq: int,
              steps: int, *, warmup: int = 3, compile_model: bool = True, attention: str = "sdpa", ac: str = "none",
              spmd_backend: str = "partial_dtensor", cuda_graphs: str = "off", profile: bool = False) -> dict:
    """torchtitan's training at ``config`` x ``layers``: timings, MFU, losses (JSON-ready)."""
    import multigpu

    settings = replace(CONFIGS[config], num_layers=layers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    training = TitanTraining(mesh, device, settings, batch, seq, compile_model=compile_model, attention=attention,
                             ac=ac, spmd_backend=spmd_backend, cuda_graphs=cuda_graphs)
    build_s = time.perf_counter() - started
    kept = []  # each step's loss on this rank, reduced to the global loss after the timing

    def step():
        kept.append(training.step().detach().clone())  # (a CUDA graph's loss is overwritten by its next replay)

    _synchronize(device)
    begin = time.perf_counter()
    step()
    _synchronize(device)
    first_step_s = time.perf_counter() - begin
    timing = multigpu.timed_steps(step, device, steps, max(warmup - 1, 0))
    median = statistics.median(timing["step_s"])
    losses = [training.global_loss(loss) for loss in kept]
    tp, ep, note = titan_degrees(mesh)
    flops = multigpu.model_flops(settings, batch, seq)
    result = {
        "package": "torchtitan", "torchtitan": _version("torchtitan"),
        "model": "torchtitan.models.qwen3.Qwen3Model (its MoE layers)", "config": config, "layers": layers,
        "mesh_requested": str(mesh), "mesh_run": f"world={mesh.world},tp={tp},ep={ep}", "note": note,
        "parallel_dims": {"dp_replicate": training.parallel_dims.dp_replicate,
                          "dp_shard": training.parallel_dims.dp_shard, "tp": tp, "ep": ep,
                          "efsdp": training.parallel_dims.dp_shard * tp // ep},
        "spmd_backend": spmd_backend, "attention": attention, "activation_checkpointing": ac,
        "torch_compile": compile_model, "cuda_graphs": training.cuda_graphs,
        "mixed_precision": {"param": "bfloat16", "reduce": "float32", "master_weights": "float32"},
        "optimizer": {"name": "AdamW", "implementation": "fused", **ADAMW, "max_norm": MAX_NORM},
        "moe_load_balance_coeff": getattr(_first_moe(training.model), "load_balance_coeff", None),
        "batch": batch, "seq": seq, "local_batch": training.local_batch, "steps": steps,
        "build_s": build_s, "first_step_s": first_step_s, "median_step_s": median,
        **timing, "warmup": warmup,  # the first step (timed alone: first_step_s) included
        "tokens_per_s": batch * seq / median,
        "tokens_per_s_per_gpu": batch * seq / median / mesh.world,
        "model_flops_per_step": flops, "mfu": flops / (median * mesh.world * multigpu.PEAK_FLOPS),
        "losses": losses,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if profile:
        result["profile"] = multigpu.profile_step(training.step, device, median)
    return result


def _first_moe(model):
    for block in model.layers.values():
        if getattr(block, "moe_enabled", False):
            return block.moe
    return None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def add_titan_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The torchtitan options (``prefix`` "titan-" where another benchmark takes them)."""
    parser.add_argument(f"--{prefix}attention", default="sdpa", choices=["sdpa", "flex"],
                        help="torchtitan's inner attention (flex: its Qwen3 default, max-autotune compile)")
    parser.add_argument(f"--{prefix}ac", default="none", choices=["none", "selective", "full"],
                        help="torchtitan's activation checkpointing")
    parser.add_argument(f"--{prefix}spmd-backend", default="partial_dtensor",
                        choices=["partial_dtensor", "spmd_types", "full_dtensor"])
    parser.add_argument(f"--{prefix}cuda-graphs", default="off", choices=["off", "auto"],
                        help="auto: forward + backward as one CUDA graph where torchtitan's trainer would (ep = 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", required=True, help="as benchmarks/multigpu.py: world=8,tp=2,ep=4")
    parser.add_argument("--config", default="qwen3_30b_a3b", help="examples/moe_model.py config (sizes)")
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"], help="gloo runs on the CPU")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences per step)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="without torchtitan's torch.compile")
    parser.add_argument("--profile", action="store_true", help="torch.profiler breakdown of 3 steps")
    add_titan_arguments(parser)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "titan_package.json"))
    args = parser.parse_args()
    if args.backend == "nccl" and not torch.cuda.is_available():
        raise SystemExit("titan_package: --backend nccl needs a GPU and none is visible; on a CPU pass "
                         "--backend gloo (tiny configs, --no-compile)")
    try:
        import_torchtitan()
    except TorchtitanUnavailable as error:
        raise SystemExit(f"titan_package: {error}") from None
    from shardgraph.runtime.distributed import init_from_environment

    init_from_environment(args.backend)
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if args.backend == "nccl" else torch.device("cpu")
    mesh = sg.MeshSpec.parse(args.mesh)
    result = {"mesh": args.mesh, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "world": dist.get_world_size()}
    result["titan"] = run_titan(mesh, rank, device, args.config, args.layers, args.batch, args.seq, args.steps,
                                warmup=args.warmup, compile_model=not args.no_compile, attention=args.attention,
                                ac=args.ac, spmd_backend=args.spmd_backend, cuda_graphs=args.cuda_graphs,
                                profile=args.profile)
    if rank == 0:
        print(json.dumps(result, indent=1))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
