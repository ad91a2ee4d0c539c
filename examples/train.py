"""Train a small MoE on real text: the Python standard library's own source, one token per byte.

The whole step (forward, backward, gradient synchronisation, clipping, AdamW) is one compiled
``sg.TrainingProgram``; this script feeds it batches, a warmup + cosine learning rate, logs and
checkpoints. It runs three ways:

    # one process, every rank of the mesh in the simulator
    python examples/train.py --model tiny --mesh world=4,tp=2,ep=2 --steps 200 \\
        --log examples/results/train_tiny.jsonl --plot docs/train_tiny_loss.png
    # one process per rank over gloo on the CPU (NCCL with --device cuda, one GPU per process)
    torchrun --standalone --nproc-per-node 4 examples/train.py --backend distributed --mesh world=4,tp=2,ep=2 \
        --steps 20 --log-file gloo.jsonl
    # resume the latest checkpoint, on any mesh
    python examples/train.py --mesh world=8,tp=2,ep=4 --checkpoint-dir ckpt --resume

Models: a bundled config (``tiny``, ``small``, ... from examples/moe_model.py) or ``hf:mixtral`` /
``hf:qwen2_moe`` (examples/hf_models.py), each with its vocabulary set to the 256 byte values.

Data: the standard library's top-level ``.py`` files in sorted order, concatenated as bytes and
cut into windows of ``--seq`` bytes; each epoch visits the windows in a permutation seeded by
``--seed`` and the epoch, so a batch is a function of the data position alone (the number of
sequences consumed), which the checkpoint records.

Every ``--checkpoint-every`` steps the full state is gathered (parameters, both AdamW moments,
the step) and written with the data position to ``<checkpoint-dir>/step_NNNNNN/``
(``shardgraph.checkpoint.save_train_state``, atomic). ``--resume`` loads one into a program
compiled for whatever ``--mesh`` this run has.

Each step's record (``--log``, JSON lines): step, loss, grad_norm (before clipping), lr,
tokens_per_s (the global batch over the step's wall time; in the simulator every rank runs in
this one process, so it is the simulator's rate, not a mesh's), memory_mb (resident set size
from /proc/self/statm on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU; rank 0's).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
import sysconfig
import time

# Run as a script (python or torchrun examples/train.py), the checkout's root is not on sys.path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import shardgraph as sg  # noqa: E402
from shardgraph.checkpoint import TRAIN_STATE_FILE, load_train_state, save_train_state  # noqa: E402
from shardgraph.progress import is_terminal  # noqa: E402

__all__ = ["ByteCorpus", "learning_rate", "build_model", "latest_checkpoint", "main", "parse_args"]

VOCAB_SIZE = 256  # one token per byte value
# A checkpoint must be resumed with these as saved: another model does not load, and another seed
# or sequence length would make the recorded data position point at other data.
RESUME_MUST_MATCH = ("model", "seed", "seq")


def learning_rate(step: int, *, peak: float, warmup: int, total: int, minimum: float = 0.0) -> float:
    """Linear warmup to ``peak`` over the first ``warmup`` steps, then a cosine down to ``minimum``
    at step ``total``. ``step`` counts from 1 (the step being taken)."""
    if step <= warmup:
        return peak * step / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return minimum + 0.5 * (peak - minimum) * (1.0 + math.cos(math.pi * progress))


class ByteCorpus:
    """The standard library's top-level ``.py`` files as one byte string, served as windows."""

    def __init__(self, seq_len: int, seed: int, root: str | None = None):
        root = root or sysconfig.get_paths()["stdlib"]
        self.files = sorted(glob.glob(os.path.join(root, "*.py")))
        if not self.files:
            raise FileNotFoundError(f"no .py files under {root}: the standard library's source is needed as text")
        data = bytearray()
        for path in self.files:
            with open(path, "rb") as handle:
                data += handle.read()
        self.tokens = torch.frombuffer(data, dtype=torch.uint8).long()
        self.seq_len, self.seed = seq_len, seed
        self.windows = len(self.tokens) // seq_len
        if self.windows < 1:
            raise ValueError(f"the corpus ({len(self.tokens)} bytes) is shorter than one sequence of {seq_len}")
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders[epoch] = torch.randperm(self.windows, generator=generator)
        return self._orders[epoch]

    def batch(self, position: int, batch_size: int) -> torch.Tensor:
        """Sequences ``position .. position + batch_size - 1`` of the seeded order: ``[batch, seq]`` int64."""
        rows = []
        for index in range(position, position + batch_size):
            window = int(self._order(index // self.windows)[index % self.windows])
            rows.append(self.tokens[window * self.seq_len:(window + 1) * self.seq_len])
        return torch.stack(rows)


def build_model(name: str, seed: int):
    """``(model, loss_fn)``: a bundled config or ``hf:<family>``, with a vocabulary of the 256 bytes."""
    torch.manual_seed(seed)
    if name.startswith("hf:"):
        from examples import hf_models

        return hf_models.build(name[3:], seed=seed, vocab_size=VOCAB_SIZE), hf_models.lm_loss
    from examples.moe_model import CONFIGS, MoETransformer, UnknownConfigError, lm_loss

    if name not in CONFIGS:
        raise UnknownConfigError(f"unknown model {name!r}; known: {', '.join(CONFIGS)}, hf:mixtral, hf:qwen2_moe")
    return MoETransformer(dataclasses.replace(CONFIGS[name], vocab_size=VOCAB_SIZE)), lm_loss


def memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on a GPU; this process's resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as handle:
            resident_pages = int(handle.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # no /proc (macOS): the peak, which is what resource offers, in bytes there
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def checkpoint_directory(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:06d}")


def latest_checkpoint(root: str) -> str | None:
    """The step directory under ``root`` with the highest step that holds a complete state file.

    A save interrupted mid-write leaves only a temporary file, so its directory is skipped."""
    found = [path for path in glob.glob(os.path.join(root, "step_*"))
             if os.path.exists(os.path.join(path, TRAIN_STATE_FILE))]
    return max(found, key=lambda path: int(path.rsplit("_", 1)[1]), default=None)


def _on_device(state: sg.TrainState, device: torch.device) -> sg.TrainState:
    return sg.TrainState({n: t.to(device) for n, t in state.parameters.items()},
                         {n: {s: t.to(device) for s, t in slots.items()} for n, slots in state.optimizer.items()},
                         state.step)


class SimulatedMesh:
    """Every rank of the mesh in this process (``simulate_train_step``)."""

    rank = 0

    def __init__(self, program, source):
        self.program = program
        self.states = program.init_states(source)

    def step(self, batch, lr):
        loss, self.states, metrics = self.program.simulate_train_step(self.states, batch, lr=lr)
        return loss, metrics

    def gathered(self) -> sg.TrainState:
        return self.program.gather_state(self.states)


class ThisRank:
    """This process's rank under torch.distributed (``train_step`` on its piece of the batch)."""

    def __init__(self, program, source, rank: int):
        self.program, self.rank = program, rank
        self.state = program.init_state(source, rank)

    def step(self, batch, lr):
        loss, self.state, metrics = self.program.train_step(self.state, self.program.local_batch(self.rank, batch),
                                                            lr=lr)
        return loss, metrics

    def gathered(self) -> sg.TrainState:
        # Every rank's pieces travel whole to every rank (all_gather_object): fine for the small
        # models trained here; a large model would write each rank's pieces where it is instead.
        from shardgraph.runtime.distributed import gather_objects

        states = gather_objects(_on_device(self.state, torch.device("cpu")), "the checkpoint's state gather")
        return self.program.gather_state(states)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="tiny",
                        help="a config of examples/moe_model.py (tiny, small, ...) or hf:mixtral / hf:qwen2_moe")
    parser.add_argument("--mesh", default="world=4,tp=2,ep=2", help="the mesh, as the CLI reads it")
    parser.add_argument("--steps", type=int, default=200, help="steps of the schedule (the run's length)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this step as if interrupted; the schedule still spans --steps")
    parser.add_argument("--batch", type=int, default=32, help="global batch, in sequences")
    parser.add_argument("--seq", type=int, default=128, help="sequence length, in bytes")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=20, help="steps of linear warmup")
    parser.add_argument("--min-lr", type=float, default=1e-3, help="learning rate at the last step")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW's (norms and biases get none)")
    parser.add_argument("--clip", type=float, default=1.0, help="global gradient norm clip (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the data order")
    parser.add_argument("--checkpoint-dir", default=None, help="where step_NNNNNN/ checkpoints go")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="a checkpoint directory to resume, or (bare) the latest under --checkpoint-dir")
    # torchrun's own parser reads a bare --log as an ambiguous abbreviation of its --log-dir and
    # stops; --log-file passes through it.
    parser.add_argument("--log", "--log-file", dest="log", default=None,
                        help="JSON lines, one per step (--log-file under torchrun)")
    parser.add_argument("--plot", default=None, help="a PNG of the loss per step")
    parser.add_argument("--print-every", type=int, default=10, help="steps between printed lines")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", choices=("simulate", "distributed"), default="simulate",
                        help="simulate: every rank in this process; distributed: one process per rank (torchrun)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seq < 2 or args.checkpoint_every < 1:
        parser.error("--steps, --batch and --checkpoint-every must be positive and --seq at least 2")
    if args.resume == "latest" and not args.checkpoint_dir:
        parser.error("a bare --resume resumes the latest checkpoint under --checkpoint-dir, which is not given")
    return args


def _resume_point(args, say):
    """``(full state or None, data position)`` to start from."""
    path = args.resume
    if path == "latest":
        path = latest_checkpoint(args.checkpoint_dir)
        if path is None:
            say(f"no checkpoint under {args.checkpoint_dir} yet: starting from step 0")
            return None, 0
    if path is None:
        return None, 0
    state, metadata = load_train_state(path)
    for key in RESUME_MUST_MATCH:
        if metadata.get(key) != getattr(args, key):
            raise SystemExit(f"{path} was saved with --{key} {metadata.get(key)}; this run has {getattr(args, key)}")
    say(f"resuming {path}: step {state.step}, data position {metadata['data_position']} (saved on {metadata['mesh']})")
    return state, int(metadata["data_position"])


def _open_log(path: str | None, first_step: int):
    """The log, open for writing; a resumed run keeps the records before its first step and drops
    the later ones (steps taken after the checkpoint), so the file reads as one run however often
    it was interrupted."""
    if path is None:
        return None
    kept = []
    if first_step > 1 and os.path.exists(path):
        with open(path) as handle:
            kept = [line for line in handle if line.strip() and json.loads(line)["step"] < first_step]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handle = open(path, "w")
    handle.writelines(kept)
    return handle


def plot_loss(records, path: str, title: str) -> None:
    from examples.plot_png import Series, line_chart

    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    window = 10
    mean = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
            for i in range(len(losses))]
    line_chart(path, [Series(steps, losses, (150, 190, 240), "loss per step", 1),
                      Series(steps, mean, (20, 70, 160), f"mean of {window} steps")],
               title=title, x_label="step", y_label="loss (nats per byte)")


def main(argv=None) -> list[dict]:
    """Train; returns this run's step records (every rank's, under torch.distributed)."""
    args = parse_args(argv)
    started = time.perf_counter()
    mesh = sg.MeshSpec.parse(args.mesh)
    device = torch.device(args.device)
    if args.backend == "distributed":
        from shardgraph.runtime.distributed import init_from_environment

        # torchrun leaves the group to this process; a caller that made one (spawn_gloo) ends its own.
        owns_group = not torch.distributed.is_initialized()
        init_from_environment("nccl" if args.device == "cuda" else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if world != mesh.world:
            raise SystemExit(f"{world} processes were started for the mesh {args.mesh}, which has {mesh.world} ranks")
        if args.device == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    else:
        rank, owns_group = 0, False

    def say(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    model, loss_fn = build_model(args.model, args.seed)
    model = model.to(device)
    corpus = ByteCorpus(args.seq, args.seed)
    say(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters; mesh {args.mesh} "
        f"({args.backend}, {device}); corpus {len(corpus.files)} files, {len(corpus.tokens):,} bytes; "
        f"{args.batch} x {args.seq} tokens per step")
    optimizer = sg.optim.AdamW(lr=args.lr, weight_decay=args.weight_decay, no_decay=["*norm*", "*bias"])
    program = sg.compile(model, mesh, (corpus.batch(0, args.batch).to(device),), loss_fn, optimizer=optimizer,
                         clip_grad_norm=args.clip or None)
    resumed, position = _resume_point(args, say)
    source = model if resumed is None else _on_device(resumed, device)
    runner = ThisRank(program, source, rank) if args.backend == "distributed" else SimulatedMesh(program, source)
    first = (resumed.step if resumed is not None else 0) + 1
    last = min(args.steps, args.stop_after or args.steps)
    log = _open_log(args.log, first) if rank == 0 else None
    bar = None
    if rank == 0 and is_terminal(sys.stderr):
        from tqdm import tqdm

        bar = tqdm(total=last - first + 1, desc="train", file=sys.stderr, dynamic_ncols=True)
    records = []
    training_started = time.perf_counter()
    for step in range(first, last + 1):
        batch = (corpus.batch(position, args.batch).to(device),)
        position += args.batch
        lr = learning_rate(step, peak=args.lr, warmup=args.warmup, total=args.steps, minimum=args.min_lr)
        step_started = time.perf_counter()
        loss, metrics = runner.step(batch, lr)
        loss_value, norm = loss.item(), metrics["grad_norm"].item()  # .item() waits for the step
        seconds = time.perf_counter() - step_started
        record = {"step": step, "loss": loss_value, "grad_norm": norm, "lr": lr,
                  "tokens_per_s": args.batch * args.seq / seconds, "memory_mb": memory_mb(device)}
        records.append(record)
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
        line = (f"step {step:5d}  loss {loss_value:.4f}  grad_norm {norm:.3f}  lr {lr:.2e}  "
                f"{record['tokens_per_s']:,.0f} tokens/s  {record['memory_mb']:.0f} MB")
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
            bar.update()
            if step % args.print_every == 0 or step in (first, last):
                bar.write(line)
        elif step % args.print_every == 0 or step in (first, last):
            say(line)
        if args.checkpoint_dir and (step % args.checkpoint_every == 0 or step == last):
            full = runner.gathered()
            if rank == 0:
                metadata = {"data_position": position, "mesh": args.mesh, "steps": args.steps,
                            **{key: getattr(args, key) for key in RESUME_MUST_MATCH}}
                save_train_state(full, checkpoint_directory(args.checkpoint_dir, step), metadata)
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
    if rank == 0 and records:
        training_s = time.perf_counter() - training_started
        say(f"steps {first}..{last}: loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}; "
            f"{training_s:.1f} s training, {time.perf_counter() - started:.1f} s in all")
        if args.plot:
            if args.log:
                with open(args.log) as handle:  # the whole run, across resumes
                    plotted = [json.loads(line) for line in handle if line.strip()]
            else:
                plotted = records
            plot_loss(plotted, args.plot, f"{args.model} on {args.mesh}: training loss")
    if owns_group:
        torch.distributed.destroy_process_group()
    return records


if __name__ == "__main__":
    main()
