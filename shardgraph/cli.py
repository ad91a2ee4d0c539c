"""Command line: ``python -m shardgraph`` (or ``shardgraph``).

    shardgraph mesh world=8,tp=2,ep=4        rank tables and groups of a folded mesh
    shardgraph demo --mesh world=8,tp=2,ep=4 shard an expert weight and an activation across the
                                             mesh in the simulator and print where every piece lives
"""

from __future__ import annotations

import argparse
import sys

import torch

from .mesh import MeshError, MeshSpec
from .placement import InterleavedShard, Replicate, Shard, Sharding, ShardingError, local_shape, run_plan, shard, unshard
from .runtime.simulate import Simulator


class CliError(Exception):
    """A one-line error with a hint, printed without a stack trace."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


def _mesh(text: str) -> MeshSpec:
    try:
        return MeshSpec.parse(text)
    except MeshError as error:
        raise CliError(str(error), "write the mesh as world=N[,tp=N][,ep=N][,etp=N][,pp=N]") from None


def _runs_text(runs) -> str:
    return " ".join(f"[{r.global_start}:{r.global_start + r.length})" for r in runs)


def command_mesh(args) -> int:
    print(_mesh(args.mesh).describe())
    return 0


def command_demo(args) -> int:
    mesh = _mesh(args.mesh)
    if mesh.pp != 1:
        raise CliError(f"demo shards across one pipeline stage; got pp={mesh.pp}", "drop pp from --mesh")
    print(mesh.describe())
    generator = torch.Generator().manual_seed(0)
    experts = max(mesh.ep, 1) * 2
    intermediate, hidden = 4 * mesh.etp, 8
    print()
    print(
        f"routed-expert weight w_gate_up [E={experts}, 2I={2 * intermediate}, H={hidden}]: experts over ep, "
        f"gate/up rows interleaved over etp (every etp rank holds the same part of gate and of up)"
    )
    weight = torch.randn(experts, 2 * intermediate, hidden, generator=generator)
    weight_sharding = Sharding.of(ep=Shard(0), etp=InterleavedShard(1, stripes=2))
    _show(mesh, weight, weight_sharding, "w_gate_up")

    batch, sequence = 2 * mesh.dp, 4 * mesh.tp
    print()
    print(f"activation [B={batch}, S={sequence}, H={hidden}]: batch over dp, sequence over tp")
    activation = torch.randn(batch, sequence, hidden, generator=generator)
    activation_sharding = Sharding.of(dp=Shard(0), tp=Shard(1))
    pieces = _show(mesh, activation, activation_sharding, "activation")

    # Rebuild the replicated activation the way a program would: all-gather over tp, then dp.
    simulator = Simulator(mesh)
    gathered = simulator.all_gather(dict(enumerate(pieces)), "tp", dim=1)
    gathered = simulator.all_gather(gathered, "dp", dim=0)
    exact = all(torch.equal(gathered[r], activation) for r in mesh.ranks)
    print()
    print("simulated all_gather over tp (dim 1) then dp (dim 0):")
    for record in simulator.records:
        axis = record.axis if isinstance(record.axis, str) else "*".join(record.axis)
        print(f"  {record.kind:<10} {axis:<3} group {record.group}  sent/rank {record.bytes_sent[0]} B")
    print(f"every rank now holds the whole activation, bit-exact: {exact}")
    return 0 if exact else 1


def _show(mesh: MeshSpec, tensor: torch.Tensor, sharding: Sharding, name: str):
    shape = tuple(tensor.shape)
    local = local_shape(shape, sharding, mesh, name)
    print(f"  sharding {sharding!r}: global {list(shape)} -> local {list(local)} on every rank")
    dims = sorted({p.dim for p in sharding.placements if p.is_shard()})
    pieces = []
    for rank in mesh.ranks:
        piece = shard(tensor, sharding, mesh, rank, name)
        pieces.append(piece)
        where = "  ".join(f"dim{d} {_runs_text(run_plan(shape, sharding, mesh, rank, d, name))}" for d in dims)
        print(f"  rank {rank}: {where or 'whole tensor'}")
    rebuilt = unshard(pieces, sharding, mesh, global_shape=shape, name=name, check_replicas=True)
    print(f"  unshard(pieces) == {name}: {torch.equal(rebuilt, tensor)}")
    return pieces


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardgraph", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    mesh = commands.add_parser("mesh", help="print the rank tables and groups of a folded mesh")
    mesh.add_argument("mesh", help="e.g. world=8,tp=2,ep=4")
    mesh.set_defaults(handler=command_mesh)
    demo = commands.add_parser("demo", help="shard tensors across a mesh in the simulator and show the pieces")
    demo.add_argument("--mesh", default="world=8,tp=2,ep=2,etp=2", help="e.g. world=8,tp=2,ep=4")
    demo.set_defaults(handler=command_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (CliError, MeshError, ShardingError) as error:
        hint = getattr(error, "hint", "")
        print(f"shardgraph: error: {error}" + (f"\n  hint: {hint}" if hint else ""), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
