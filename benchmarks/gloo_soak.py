"""Many training steps on local gloo processes, run after run: does any rank crash?

A native crash in a gloo rank (a SIGSEGV, glibc's "malloc(): unaligned tcache chunk detected")
shows up once in thousands of collectives, too rarely for the test suite to catch it. This runs
the tiny example model's whole training step (AdamW, gradient clipping, ZeRO stage ``--zero``)
for ``--steps`` steps in as many processes as ``--mesh`` has ranks, ``--runs`` times, each run a
fresh set of processes, and prints one row per run: how it ended (``ok``, or the per-rank failure
``spawn_gloo`` reports), seconds, and the last loss (every run takes the same batches, so the
losses agree). Set ``MALLOC_CHECK_=3 MALLOC_PERTURB_=165`` to make glibc stop at the first
corrupted heap instead of later.

Usage: ``python benchmarks/gloo_soak.py [--mesh world=4,tp=2,ep=2] [--zero 3] [--steps 300]
[--runs 8]``. What such runs found, with gloo's default two worker threads per group and with
the one the communicator now gives each group: ``docs/runtime.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import shardgraph as sg  # noqa: E402
from examples.moe_model import shardgraph_entry  # noqa: E402


def soak_rank(rank: int, mesh_text: str, zero: int, steps: int) -> list[float]:
    from shardgraph.runtime.distributed import DistributedCommunicator

    torch.manual_seed(0)
    model, inputs, loss_fn = shardgraph_entry("tiny", batch_size=8, seq_len=8)
    optimizer = sg.optim.AdamW(lr=1e-3, weight_decay=0.1, no_decay=("*norm*",))
    program = sg.compile(model, sg.MeshSpec.parse(mesh_text), inputs, loss_fn, optimizer=optimizer,
                         clip_grad_norm=1.0, zero=zero)
    state = program.init_state(model, rank)
    communicator = DistributedCommunicator(program.mesh)
    losses = []
    for step in range(steps):
        # A new batch each step: new routing, so new all-to-all sizes.
        batch = [torch.randint(0, 64, inputs[0].shape, generator=torch.Generator().manual_seed(step))]
        loss, state, _ = program.train_step(state, program.local_batch(rank, batch), communicator=communicator)
        losses.append(loss.item())
    return losses


def main() -> None:
    from shardgraph.runtime.distributed import spawn_gloo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", default="world=4,tp=2,ep=2")
    parser.add_argument("--zero", type=int, choices=[0, 1, 3], default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gloo_soak.json"))
    args = parser.parse_args()
    world = sg.MeshSpec.parse(args.mesh).world
    rows = []
    print(f"{args.mesh} zero={args.zero}, {args.steps} AdamW steps per run on {world} gloo processes")
    print(f"{'run':>3} {'seconds':>8} {'last loss':>10}  ended")
    for run in range(1, args.runs + 1):
        started = time.perf_counter()
        try:
            losses = spawn_gloo(soak_rank, world, args.mesh, args.zero, args.steps, timeout=300)
            ended, last = "ok", losses[0][-1]
        except RuntimeError as error:
            ended, last = " / ".join(line for line in str(error).splitlines() if line.startswith("rank ")), None
        rows.append({"run": run, "seconds": time.perf_counter() - started, "last_loss": last, "ended": ended})
        print(f"{run:>3} {rows[-1]['seconds']:>8.1f} {last if last is not None else '-':>10}  {ended}", flush=True)
    crashed = sum(row["ended"] != "ok" for row in rows)
    print(f"{crashed} of {len(rows)} runs failed")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump({"mesh": args.mesh, "zero": args.zero, "steps": args.steps, "torch": torch.__version__,
                   "malloc_check": os.environ.get("MALLOC_CHECK_"), "rows": rows, "failed": crashed}, handle, indent=1)


if __name__ == "__main__":
    main()
