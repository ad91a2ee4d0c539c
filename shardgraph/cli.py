"""Command line: ``python -m shardgraph`` (or ``shardgraph``).

    shardgraph compile MODEL.py --mesh world=8,tp=2,ep=4 [--check] [--report] [--dump DIR] [--json FILE]
        compile a model file's shardgraph_entry() and print the report's summary; the model is built
        on the meta device (no weights allocated) unless --check runs it against the unsharded model
    shardgraph dump MODEL.py DIR --mesh world=8,tp=2,ep=4
        compile and write the traced, placed and lowered graphs, per-rank tables, report.json, graph.html
    shardgraph report DIR/report.json      print a saved report (a dump directory works too)
    shardgraph mesh world=8,tp=2,ep=4      rank tables and groups of a folded mesh
    shardgraph demo --mesh world=8,tp=2,ep=4
        shard an expert weight and an activation across the mesh in the simulator and show every piece

Every error is one ``error:`` line and one ``hint:`` line on stderr with exit status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys

import torch

from .mesh import MeshError, MeshSpec
from .placement import InterleavedShard, Shard, Sharding, ShardingError, local_shape, run_plan, shard, unshard
from .progress import Stages
from .runtime.simulate import Simulator

__all__ = ["CliError", "available_memory_bytes", "build_parser", "check_memory_estimate", "describe_error", "main"]

EXIT_ERROR = 2
MESH_HINT = "write the mesh as world=N[,tp=N][,ep=N][,etp=N][,pp=N]; `shardgraph mesh SPEC` prints its groups"
REPORT_FIELDS = ("schema_version", "mesh", "values", "collectives", "totals", "layers")
# A message longer than this (an error listing hundreds of ops) is cut; --debug shows all of it.
MAX_MESSAGE = 600
MAX_LISTED_FALLBACKS = 20


class CliError(Exception):
    """A one-line error with a hint, printed without a stack trace."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class _Parser(argparse.ArgumentParser):
    """Usage errors as ``CliError``, so they print like every other error."""

    def error(self, message):
        raise CliError(message, f"`{self.prog} --help` lists the arguments")


# ---------------------------------------------------------------------------------------- mesh, demo
def _mesh(text: str) -> MeshSpec:
    try:
        return MeshSpec.parse(text)
    except MeshError as error:
        raise CliError(str(error), MESH_HINT) from None


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


# ---------------------------------------------------------------------------------------- model files
def _load_entry(path: str):
    import importlib.util

    if os.path.isdir(path) or not os.path.isfile(path):
        what = "is a directory" if os.path.exists(path) else "does not exist"
        raise CliError(f"model file {path!r} {what}",
                       "pass a Python file defining shardgraph_entry(), e.g. examples/moe_model.py")
    spec = importlib.util.spec_from_file_location(f"shardgraph_model_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - reported as one line
        raise CliError(f"cannot import {path}: {type(error).__name__}: {error}", "run the file with python to see the error") from None
    entry = getattr(module, "shardgraph_entry", None)
    if not callable(entry):
        raise CliError(f"{path} defines no shardgraph_entry()",
                       "add def shardgraph_entry(config=..., device='cpu') -> (model, example_inputs, loss_fn)")
    return entry


def _default_config(entry) -> str | None:
    parameter = inspect.signature(entry).parameters.get("config")
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def _entry_arguments(entry, args, device: str) -> dict:
    """Keyword arguments for ``entry``: only those it takes, so any model file's entry works."""
    parameters = inspect.signature(entry).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {}
    for flag, name, value in (("--config", "config", args.config), ("--batch-size", "batch_size", args.batch_size),
                              ("--seq-len", "seq_len", args.seq_len)):
        if value is None:
            continue
        if not (takes_any or name in parameters):
            raise CliError(f"{args.model}: shardgraph_entry() takes no {name!r} argument, so {flag} has no effect",
                           f"drop {flag}, or give shardgraph_entry a {name} parameter")
        kwargs[name] = value
    if takes_any or "device" in parameters:
        kwargs["device"] = device
    elif args.device not in (None, "cpu"):
        raise CliError(f"{args.model}: shardgraph_entry() takes no 'device' argument, so --device {args.device} "
                       f"cannot move the model", "give shardgraph_entry a device parameter (see examples/moe_model.py)")
    return kwargs


def _build(entry, args, device: str):
    kwargs = _entry_arguments(entry, args, device)
    try:
        built = entry(**kwargs)
    except KeyError as error:
        message = str(error.args[0]) if error.args else str(error)
        raise CliError(f"{args.model}: {message}", "choose --config among the names it lists") from None
    except ValueError as error:
        raise CliError(f"{args.model}: {error}", "check --config, --batch-size and --seq-len") from None
    if not (isinstance(built, (tuple, list)) and len(built) == 3 and isinstance(built[0], torch.nn.Module)):
        raise CliError(f"{args.model}: shardgraph_entry() returned {type(built).__name__}, not "
                       f"(model, example_inputs, loss_fn)", "return a tuple (nn.Module, tuple of inputs, loss_fn)")
    return built


def _device_of(model: torch.nn.Module) -> str:
    first = next(model.parameters(), None)
    return first.device.type if first is not None else "cpu"


# ---------------------------------------------------------------------------------------- memory
def available_memory_bytes(device: str) -> int | None:
    """Memory a run on ``device`` can still take; None where it cannot be told."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0] if torch.cuda.is_available() else None
    if device != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory_estimate(model: torch.nn.Module, mesh: MeshSpec, plan) -> tuple[int, int, int]:
    """``(total, weights, pieces)``: bytes the parity check holds at once, activations aside.

    The check keeps the weights, the reference gradients and the gradients rebuilt from the
    ranks (3 x weights), and every rank's piece of every parameter and gradient (2 x pieces,
    where pieces sums the local sizes over all ranks under the plan). ``model`` may live on the
    meta device: only shapes and dtypes are read.
    """
    from passes.plan import PlanError, default_plan, resolve_plan

    parameters = dict(model.named_parameters())
    shapes = {name: tuple(p.shape) for name, p in parameters.items()}
    weights = sum(p.numel() * p.element_size() for p in parameters.values())
    try:
        placements = resolve_plan(shapes, plan if plan is not None else default_plan(list(shapes)), mesh)
        per_rank = sum(math.prod(local_shape(shapes[name], placement.sharding, mesh, name))
                       * parameters[name].element_size() for name, placement in placements.items())
        pieces = per_rank * mesh.world
    except (PlanError, ShardingError):
        # The compile reports the plan's error; until then, assume every rank holds everything.
        pieces = weights * mesh.world
    return 3 * weights + 2 * pieces, weights, pieces


def _refuse_oversized_check(model, mesh: MeshSpec, plan, device: str, config: str) -> None:
    from .report import _bytes

    available = available_memory_bytes(device)
    if available is None:
        return
    needed, weights, pieces = check_memory_estimate(model, mesh, plan)
    if needed > available:
        raise CliError(
            f"--check of {config} on {device} needs about {_bytes(needed)} (3 x {_bytes(weights)} of weights and "
            f"gradients, 2 x {_bytes(pieces)} of the ranks' pieces, activations aside); "
            f"{_bytes(available)} is available",
            "drop --check to compile and report on the meta device (no weights allocated), or check a smaller --config",
        )


# ---------------------------------------------------------------------------------------- compile, dump
def _read_plan(path: str | None):
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            plan = json.load(handle)
    except json.JSONDecodeError as error:
        raise CliError(f"plan file {path} is not JSON ({error})",
                       'write {"glob over parameter names": "style"}') from None
    if not (isinstance(plan, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in plan.items())):
        raise CliError(f"plan file {path} holds {type(plan).__name__}, not an object of pattern -> style strings",
                       'write {"glob over parameter names": "style"}; `shardgraph compile --help` lists the styles')
    return plan


def _refuse_unusable_outputs(args) -> None:
    """Output paths checked before the compile, which can take minutes, rather than after it."""
    json_path = getattr(args, "json", None)
    if json_path:
        if os.path.isdir(json_path):
            raise CliError(f"--json {json_path} is a directory",
                           f"pass a file name, e.g. {os.path.join(json_path, 'report.json')}")
        parent = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(parent):
            raise CliError(f"--json {json_path}: directory {parent} does not exist", "create it, or write elsewhere")
    dump = getattr(args, "dump", None) or getattr(args, "directory", None)
    if dump and os.path.exists(dump) and not os.path.isdir(dump):
        raise CliError(f"dump directory {dump} is a file", "pass a new or existing directory")


def _prepare(args):
    """Mesh, device and plan of a compile or dump, every argument checked before any work."""
    mesh = _mesh(args.mesh)
    if mesh.pp != 1:
        raise CliError(f"pipeline parallelism is not compiled yet (mesh {args.mesh} has pp={mesh.pp})",
                       "drop pp from --mesh; `shardgraph mesh` shows pipeline stages")
    check = getattr(args, "check", False)
    if args.zero == 1 and not args.optimizer:
        raise CliError("--zero 1 splits optimizer state, and there is none without --optimizer",
                       "add --optimizer adamw (or sgd), or use --zero 3 (parameters and gradients split)")
    if args.keep_gathered and args.zero != 3:
        raise CliError("--keep-gathered is about parameters gathered by --zero 3", "add --zero 3, or drop the flag")
    if check and args.optimizer:
        raise CliError("--check compares the gradient and one SGD step with the unsharded model, not a compiled "
                       "optimizer step", "drop --optimizer to check; tests/test_training.py checks the step itself")
    device = args.device or ("cpu" if check else "meta")
    if check and device == "meta":
        raise CliError("--check runs the model, so it needs real weights; --device meta allocates none",
                       "drop --device meta (--check builds on cpu), or drop --check to compile and report only")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device}: no CUDA device is available", "use --device cpu or meta")
    _refuse_unusable_outputs(args)
    return mesh, device, _read_plan(args.plan)


def _compile(args, stages: Stages, mesh: MeshSpec, device: str, plan):
    """Build the model (sized up on meta first when a check will run) and compile it."""
    import shardgraph

    entry = _load_entry(args.model)
    config = args.config or _default_config(entry) or "default"
    check = getattr(args, "check", False)
    stages.start("build model")
    # An entry that can build on meta is sized up before any weight exists; any other is sized
    # after its build, still before the check multiplies its memory.
    sized_on_meta = check and "device" in _entry_arguments(entry, args, "meta")
    if sized_on_meta:
        _refuse_oversized_check(_build(entry, args, "meta")[0], mesh, plan, device, config)
    model, inputs, loss_fn = _build(entry, args, device)
    if check and not sized_on_meta:
        _refuse_oversized_check(model, mesh, plan, _device_of(model), config)
    stages.start("trace+compile")
    step = dict(zero=args.zero, reshard_after_forward=not args.keep_gathered)
    if args.optimizer:
        step["optimizer"] = shardgraph.optim.AdamW() if args.optimizer == "adamw" else shardgraph.optim.SGD(lr=0.01)
    compute_dtype = getattr(torch, args.compute_dtype) if args.compute_dtype else None
    program = shardgraph.compile(model, mesh, inputs, loss_fn, plan=plan, replicate_fallback=args.replicate_fallback,
                                 recompute=args.recompute, compute_dtype=compute_dtype, **step)
    built_on = _device_of(model)
    note = ", built on meta: no weights allocated" if built_on == "meta" else f", built on {built_on}"
    stages.echo(f"compiled {args.model} ({config}{note}) for {mesh} in {stages.seconds:.1f} s")
    return program, model, inputs, loss_fn


def _fallback_lines(program, asked: bool) -> list[str]:
    fallbacks = list(getattr(program.placed, "fallbacks", []) or [])
    if not asked and not fallbacks:
        return []
    if not fallbacks:
        return ["replicated for lack of a placement rule: none"]
    listed = ", ".join(fallbacks[:MAX_LISTED_FALLBACKS])
    more = f" and {len(fallbacks) - MAX_LISTED_FALLBACKS} more" if len(fallbacks) > MAX_LISTED_FALLBACKS else ""
    return [f"replicated for lack of a placement rule: {len(fallbacks)} op(s): {listed}{more}"]


def command_compile(args) -> int:
    from .check import parity_errors
    from .report import format_report, format_summary

    mesh, device, plan = _prepare(args)
    names = ["build model", "trace+compile", *(["check"] if args.check else []), "report",
             *(["dump"] if args.dump else [])]
    status = 0
    with Stages(names, "shardgraph compile", enabled=False if args.no_progress else None) as stages:
        program, model, inputs, loss_fn = _compile(args, stages, mesh, device, plan)
        if args.check:
            stages.start("check")
            errors, _ = parity_errors(program, model, inputs, loss_fn)
            ok = errors.within(args.tolerance)
            stages.echo(f"parity vs. unsharded model (float32, one SGD step): loss {errors.loss:.2e}  gradients "
                        f"{errors.gradients:.2e} (worst: {errors.worst_gradient})  weights {errors.weights:.2e}  "
                        f"-> {'OK' if ok else 'FAILED'} (tolerance {args.tolerance:g})")
            status = 0 if ok else 1
        stages.start("report")
        report = program.report(format="dict", hardware=args.hardware)
        text = format_report(report, max_values=args.max_values) if args.report else format_summary(report)
        stages.echo()
        stages.echo("\n".join([text] + _fallback_lines(program, args.replicate_fallback)))
        if args.dump:
            stages.start("dump")
            written = program.dump(args.dump)
            stages.echo(f"\nwrote {len(written)} files to {args.dump}")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(report, handle, indent=1)
    return status


def command_dump(args) -> int:
    mesh, device, plan = _prepare(args)
    with Stages(["build model", "trace+compile", "dump"], "shardgraph dump",
                enabled=False if args.no_progress else None) as stages:
        program, _, _, _ = _compile(args, stages, mesh, device, plan)
        stages.start("dump")
        written = program.dump(args.directory)
    names = sorted(os.path.basename(path) for path in written if "_rank" not in os.path.basename(path))
    print(f"wrote {len(written)} files to {args.directory}: {', '.join(names)} and one table per rank")
    for line in _fallback_lines(program, args.replicate_fallback):
        print(line)
    print(f"read the report with: shardgraph report {os.path.join(args.directory, 'report.json')}")
    return 0


# ---------------------------------------------------------------------------------------- report
def _load_report(path: str) -> dict:
    if os.path.isdir(path):
        inside = os.path.join(path, "report.json")
        if not os.path.isfile(inside):
            raise CliError(f"{path} is a directory without a report.json",
                           "pass a report.json, or a directory that `shardgraph dump` wrote")
        path = inside
    try:
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
    except FileNotFoundError:
        raise CliError(f"report file {path!r} does not exist",
                       "write one with: shardgraph dump MODEL.py DIR --mesh ...") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CliError(f"{path} is not JSON ({error})", "pass the report.json that a dump wrote") from None
    if not isinstance(report, dict):
        raise CliError(f"{path} holds a JSON {type(report).__name__}, not a report object",
                       "pass the report.json that `shardgraph dump` or `compile --json` wrote")
    missing = [field for field in REPORT_FIELDS if field not in report]
    if missing:
        raise CliError(f"{path} is not a shardgraph report: it lacks {', '.join(missing)}",
                       "pass the report.json that `shardgraph dump` or `compile --json` wrote")
    if report["schema_version"] != 1:
        raise CliError(f"{path} has report schema {report['schema_version']!r}; this version reads 1",
                       "re-create the report with this version of shardgraph")
    return report


def command_report(args) -> int:
    from .report import format_report

    report = _load_report(args.file)
    try:
        text = format_report(report, max_values=args.max_values)
    except KeyError as error:
        raise CliError(f"{args.file} lacks the field {error.args[0]!r} that schema 1 has",
                       "re-create the report with this version of shardgraph (docs/report.md has the schema)") from None
    except (TypeError, AttributeError, ValueError) as error:
        raise CliError(f"{args.file} has a field of the wrong type ({error})",
                       "re-create the report with this version of shardgraph (docs/report.md has the schema)") from None
    print(text)
    return 0


# ---------------------------------------------------------------------------------------- errors
def _one_line(text: str) -> str:
    first, *rest = [part.strip() for part in str(text).splitlines() if part.strip()] or [""]
    # "N op(s) have no placement rule ...:" introduces its list; other lines are sentences of their own.
    line = (" " if first.endswith(":") else "; ").join([first, "; ".join(rest)]) if rest else first
    return line if len(line) <= MAX_MESSAGE else line[:MAX_MESSAGE] + " ... (--debug shows all of it)"


def describe_error(error: BaseException) -> tuple[str, str]:
    """``(message, hint)`` for an error that ends a command."""
    from .frontend import AdapterError, TraceError
    from .runtime import CollectiveError

    try:
        from passes.plan import PlanError
        from passes.propagate import PropagationError
    except ImportError:  # a broken install must still print its error as one line
        PlanError = PropagationError = ()  # noqa: N806 - isinstance(x, ()) is False
    debug = "rerun with --debug for the traceback"
    if isinstance(error, CliError):
        return _one_line(error), error.hint
    if isinstance(error, KeyError):
        return _one_line(error.args[0] if error.args else "KeyError"), f"check the arguments; {debug}"
    if isinstance(error, OSError) and error.filename:
        return f"{error.strerror or error}: {error.filename}", "check the path"
    hints = (
        (MeshError, MESH_HINT),
        (PlanError, "fix the --plan file (`shardgraph compile --help` lists the styles), or drop --plan for the "
                    "default"),
        (PropagationError, "--replicate-fallback replicates ops that have no placement rule and lists them"
         if "no placement rule" in str(error) else f"a smaller mesh or --plan may place it; {debug}"),
        (ShardingError, "choose mesh sizes that divide the model's dimensions, or another --batch-size / --seq-len"),
        (AdapterError, "register the experts module with shardgraph.register_experts (docs/frontend.md)"),
        (TraceError, "the message names the module and line to change (docs/frontend.md)"),
        (CollectiveError, debug),
        (NotImplementedError, debug),
        (MemoryError, "drop --check: compile and report build the model on the meta device"),
        (OSError, "check the path"),
        ((ValueError, TypeError), f"check the arguments; {debug}"),
    )
    for kinds, hint in hints:
        if isinstance(error, kinds):
            return _one_line(f"{error}" or type(error).__name__), hint
    return _one_line(f"internal error: {type(error).__name__}: {error}"), f"{debug}, and report it"


# ---------------------------------------------------------------------------------------- parser
def _style_lines() -> str:
    from passes.plan import STYLE_DESCRIPTIONS

    width = max(map(len, STYLE_DESCRIPTIONS))
    return "\n".join(f"  {style:<{width}}  {text}" for style, text in STYLE_DESCRIPTIONS.items())


def _common_options(top_level: bool) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    # Below a command, SUPPRESS keeps `shardgraph --debug compile ...` from being reset to False.
    options.add_argument("--debug", action="store_true", default=False if top_level else argparse.SUPPRESS,
                         help="show the full traceback of an error instead of one line")
    return options


def _model_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("model", help="Python file defining shardgraph_entry(), e.g. examples/moe_model.py")
    options.add_argument("--mesh", required=True, help="folded mesh, e.g. world=8,tp=2,ep=4 (dp and edp are derived)")
    options.add_argument("--config", help="config name passed to shardgraph_entry (default: the entry's own default)")
    options.add_argument("--device", choices=("meta", "cpu", "cuda"),
                         help="where the model is built: meta allocates no weights "
                              "(default: meta, or cpu with --check)")
    options.add_argument("--batch-size", type=int, help="batch size of the example inputs (default: the entry's own)")
    options.add_argument("--seq-len", type=int, help="sequence length of the example inputs (default: the entry's own)")
    options.add_argument("--plan", metavar="FILE",
                         help='JSON file {"glob over parameter names": "style"} (default: the model family\'s plan)')
    options.add_argument("--replicate-fallback", action="store_true",
                         help="replicate ops that have no placement rule instead of refusing; the output lists them")
    options.add_argument("--no-progress", action="store_true",
                         help="no progress bar (it shows on a terminal only, once a run takes over a second)")
    options.add_argument("--optimizer", choices=("sgd", "adamw"),
                         help="compile the whole training step with this optimizer (default: the gradient only); "
                              "the report then counts optimizer state")
    options.add_argument("--zero", type=int, choices=(0, 1, 3), default=0,
                         help="1: optimizer state split over dp / edp (needs --optimizer); 3: the parameters too, "
                              "all-gathered before their forward and backward readers (FSDP)")
    options.add_argument("--keep-gathered", action="store_true",
                         help="with --zero 3: keep each parameter gathered from its forward to its backward instead "
                              "of gathering it again (less communication, more memory)")
    options.add_argument("--recompute", choices=("none", "selective", "full"), default="none",
                         help="activations recomputed in the backward: selective keeps matrix products, "
                              "full keeps each layer's input only")
    options.add_argument("--compute-dtype", choices=("float32", "bfloat16"),
                         help="compute forward and backward in this dtype from the model's own (master) weights")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardgraph", parents=[_common_options(True)],
                     description="Compile Mixture-of-Experts training steps for a folded mesh and report where every "
                                 "tensor lives and what every collective moves.",
                     epilog="`shardgraph COMMAND --help` describes a command's flags.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser,
                                     title="commands")
    common, model = _common_options(False), _model_options()
    styles = (f"plan styles (values of a --plan file):\n{_style_lines()}\n\n"
              "bundled model files: examples/moe_model.py, examples/hf_models.py, examples/titan_model.py\n"
              "(an unknown --config lists the file's configs)")
    formatter = argparse.RawDescriptionHelpFormatter

    compile_parser = commands.add_parser(
        "compile", parents=[model, common], formatter_class=formatter, epilog=styles,
        help="compile a model file and print the report's summary (--check: parity against the unsharded model)",
        description="Compile a model file's shardgraph_entry() for a mesh and print the report's summary.")
    compile_parser.add_argument("--check", action="store_true",
                                help="build on cpu, run all ranks in the simulator and compare loss, gradients and "
                                     "updated weights with the unsharded model (refused up front if it cannot fit)")
    compile_parser.add_argument("--tolerance", type=float, default=1e-5,
                                help="largest relative error --check accepts (default 1e-5)")
    compile_parser.add_argument("--report", action="store_true", help="print the full report, not only the summary")
    compile_parser.add_argument("--max-values", type=int, default=40,
                                help="rows of the values table that --report prints (default 40)")
    compile_parser.add_argument("--dump", metavar="DIR", help="also write what `shardgraph dump` writes into DIR")
    compile_parser.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE")
    compile_parser.add_argument("--hardware", choices=("h100", "h200", "cpu"), default="h100",
                                help="rates (passes/cost.py presets) of the report's predicted step time (default h100)")
    compile_parser.set_defaults(handler=command_compile)

    dump = commands.add_parser(
        "dump", parents=[model, common], formatter_class=formatter, epilog=styles,
        help="compile a model file and write its graphs, per-rank tables, report.json and graph.html",
        description="Compile a model file's shardgraph_entry() for a mesh and write traced.py, placed.py, lowered.py, "
                    "one table per rank, report.json and graph.html into a directory.")
    dump.add_argument("directory", help="directory to write into (created if missing)")
    dump.set_defaults(handler=command_dump)

    report = commands.add_parser("report", parents=[common], help="print a saved report.json",
                                 description="Print a report that `dump` or `compile --json` wrote.")
    report.add_argument("file", help="a report.json, or a directory that `shardgraph dump` wrote")
    report.add_argument("--max-values", type=int, default=60, help="rows of the values table (default 60)")
    report.set_defaults(handler=command_report)

    mesh = commands.add_parser("mesh", parents=[common], help="print the rank tables and groups of a folded mesh")
    mesh.add_argument("mesh", help="e.g. world=8,tp=2,ep=4")
    mesh.set_defaults(handler=command_mesh)

    demo = commands.add_parser("demo", parents=[common],
                               help="shard tensors across a mesh in the simulator and show the pieces")
    demo.add_argument("--mesh", default="world=8,tp=2,ep=2,etp=2",
                      help="e.g. world=8,tp=2,ep=4 (default world=8,tp=2,ep=2,etp=2)")
    demo.set_defaults(handler=command_demo)
    return parser


def main(argv=None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except KeyboardInterrupt:
        print("shardgraph: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (`| head`) has gone: quit quietly, and keep Python's exit-time flush of
        # stdout from raising again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except Exception as error:  # noqa: BLE001 - every error becomes one line unless --debug
        if debug:
            raise
        message, hint = describe_error(error)
        print(f"shardgraph: error: {message}", file=sys.stderr)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
