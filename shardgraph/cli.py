"""Command line: ``python -m shardgraph`` (or ``shardgraph``).

    shardgraph compile examples/moe_model.py --mesh world=8,tp=2,ep=4 --check [--report] [--dump out/]
                                             compile a model file's ``shardgraph_entry()``, check parity
                                             against the unsharded model in the simulator, print the report
    shardgraph report out/report.json        print a saved report
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


def _load_entry(path: str):
    import importlib.util
    import os

    if not os.path.isfile(path):
        raise CliError(f"model file {path!r} does not exist", "pass a Python file defining shardgraph_entry(), e.g. examples/moe_model.py")
    spec = importlib.util.spec_from_file_location(f"shardgraph_model_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - reported as one line
        raise CliError(f"cannot import {path}: {type(error).__name__}: {error}", "run the file with python to see the error") from None
    entry = getattr(module, "shardgraph_entry", None)
    if entry is None:
        raise CliError(f"{path} defines no shardgraph_entry()",
                       "add def shardgraph_entry(config='tiny', device='cpu') -> (model, example_inputs, loss_fn)")
    return entry


def command_compile(args) -> int:
    import json

    from .check import parity_errors
    from .compile import compile as compile_model
    from .report import format_summary

    mesh = _mesh(args.mesh)
    entry = _load_entry(args.model)
    kwargs = {"config": args.config}
    if args.batch_size:
        kwargs["batch_size"] = args.batch_size
    if args.seq_len:
        kwargs["seq_len"] = args.seq_len
    try:
        model, inputs, loss_fn = entry(**kwargs)
    except KeyError as error:
        raise CliError(str(error).strip("'\""), "choose --config among the names it lists") from None
    plan = None
    if args.plan:
        with open(args.plan, encoding="utf-8") as handle:
            plan = json.load(handle)
    program = compile_model(model, mesh, inputs, loss_fn, plan=plan)
    print(f"compiled {args.model} ({args.config}) for {mesh}")
    status = 0
    if args.check:
        errors, _ = parity_errors(program, model, inputs, loss_fn)
        ok = errors.within(args.tolerance)
        print(f"parity vs. unsharded model (float32, one SGD step): loss {errors.loss:.2e}  gradients "
              f"{errors.gradients:.2e} (worst: {errors.worst_gradient})  weights {errors.weights:.2e}  "
              f"-> {'OK' if ok else 'FAILED'} (tolerance {args.tolerance:g})")
        status = 0 if ok else 1
    report = program.report(format="dict")
    print()
    print(program.report(max_values=args.max_values) if args.report else format_summary(report))
    if args.dump:
        written = program.dump(args.dump)
        print(f"\nwrote {len(written)} files to {args.dump}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
    return status


def command_report(args) -> int:
    import json

    from .report import format_report

    try:
        with open(args.file, encoding="utf-8") as handle:
            report = json.load(handle)
    except FileNotFoundError:
        raise CliError(f"report file {args.file!r} does not exist", "write one with: shardgraph compile ... --dump DIR") from None
    except json.JSONDecodeError as error:
        raise CliError(f"{args.file} is not JSON ({error})", "pass the report.json that a dump wrote") from None
    if report.get("schema_version") != 1:
        raise CliError(f"{args.file} has report schema {report.get('schema_version')!r}; this version reads 1",
                       "re-create the report with this version of shardgraph")
    print(format_report(report, max_values=args.max_values))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardgraph", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compile_parser = commands.add_parser("compile", help="compile a model file and report (and check) the program")
    compile_parser.add_argument("model", help="Python file with shardgraph_entry(), e.g. examples/moe_model.py")
    compile_parser.add_argument("--mesh", required=True, help="e.g. world=8,tp=2,ep=4")
    compile_parser.add_argument("--config", default="tiny", help="config name passed to shardgraph_entry (default tiny)")
    compile_parser.add_argument("--batch-size", type=int, default=0)
    compile_parser.add_argument("--seq-len", type=int, default=0)
    compile_parser.add_argument("--plan", help="JSON file {pattern: style}; default: the model family's plan")
    compile_parser.add_argument("--check", action="store_true", help="run all ranks in the simulator and compare with the unsharded model")
    compile_parser.add_argument("--tolerance", type=float, default=1e-5)
    compile_parser.add_argument("--report", action="store_true", help="print the full report, not only the summary")
    compile_parser.add_argument("--max-values", type=int, default=40)
    compile_parser.add_argument("--dump", help="directory for graph dumps and report.json")
    compile_parser.add_argument("--json", help="write the report as JSON here")
    compile_parser.set_defaults(handler=command_compile)
    report = commands.add_parser("report", help="print a saved report.json")
    report.add_argument("file")
    report.add_argument("--max-values", type=int, default=60)
    report.set_defaults(handler=command_report)
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
    except (CliError, MeshError, ShardingError, ValueError, TypeError) as error:
        hint = getattr(error, "hint", "")
        print(f"shardgraph: error: {error}" + (f"\n  hint: {hint}" if hint else ""), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
