"""The compiled program: a pure function of (parameters, batch), runnable on any backend.

``ShardedProgram`` holds the traced graph, the placed graph (a sharding and its reason on every
value) and the lowered graph, one fx GraphModule that every rank runs with its own communicator.
It shards full parameters and batches into per-rank pieces, runs all ranks in the simulator or
this rank under torch.distributed, and reassembles full gradients for checking.

Every way in refuses a batch of another count, shape or dtype than the one compiled, naming the
input, before any work (a lowered graph's shapes are fixed). ``run`` checks on the first step
that every rank runs the same program and that replicated values agree; ``run_simulated``
refuses a non-finite loss or gradient, and with ``debug=True`` (or ``SHARDGRAPH_DEBUG=1``) both
name the first node whose value became NaN or inf. ``docs/runtime.md`` lists the guards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch.fx import GraphModule

from . import meta
from .mesh import MeshSpec
from .ops import direct_calls
from .ops.aten_forms import as_aten_ops
from .ops.direct_calls import as_direct_calls, without_autograd
from .meta import InputKind
from .placement import Padding, Sharding, local_shape, shard, unshard
from .runtime.guards import (
    NonFiniteError,
    NonFiniteLocator,
    ProgramMismatchError,
    check_replicas,
    debug_enabled,
    describe_first_nonfinite,
    fingerprint_mismatch,
    nonfinite_inputs,
    program_fingerprint,
    same_bits,
)
from .runtime.simulate import Simulator

__all__ = ["BatchError", "ShardedProgram", "StepResult"]


class BatchError(ValueError):
    """A batch that is not the one the program was compiled for (count, shape or dtype)."""


@dataclass
class StepResult:
    loss: torch.Tensor
    gradients: dict[str, torch.Tensor]
    simulator: Simulator | None = None


def _tracing_host_values(compiled):
    """``compiled`` called with dynamo tracing the values a multi-rank program reads on the host
    (the all-to-all split sizes of an MoE dispatch, the row counts of uneven gathers) as unbacked
    symbolic sizes, and ops whose output size depends on data (``repeat_interleave`` of counts)
    likewise. Without it each of those values is a Python int that the compiled graph is
    specialised on: every new routing recompiles (tens of seconds a step) until dynamo's cache
    limit sends the step back to eager. The world=1 program reads nothing on the host and keeps
    dynamo's defaults."""

    def run(*args, **kwargs):
        with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
            return compiled(*args, **kwargs)

    return run


class ShardedProgram:
    def __init__(self, traced, placed, lowered: GraphModule, mesh: MeshSpec):
        self.traced = traced
        self.placed = placed
        # fx generates a lazy graph module's code on its first call, renaming nodes while it
        # does; the simulator's ranks make that first call from several threads at once, which
        # mixes up the names (a value read before its line). Steps run the plain graph, whose
        # code _plain_graph generates before its first call; the lowered graph's own is left
        # until something runs or reads it.
        self.graph_module = lowered
        self.mesh = mesh
        inputs = meta.graph_inputs(lowered.graph)
        if [record.kind for _, record in inputs][:1] != [InputKind.COMMUNICATOR]:
            raise ValueError("the lowered program must take the communicator as its first input (add_communicator)")
        self.parameter_names = list(traced.parameter_names)
        # Frozen parameters are inputs without a gradient output.
        self.gradient_names = list(getattr(traced, "gradient_names", None) or traced.parameter_names)
        self.buffer_names = list(getattr(traced, "buffer_names", []))
        self.input_names = list(getattr(traced, "input_names", []))
        # The model draws random numbers: every step takes a seed (shardgraph/ops/random.py).
        self.takes_seed = bool(getattr(traced, "takes_seed", False))
        self.default_buffers: dict[str, torch.Tensor] = {}
        # The buffers a checkpoint holds: compile() keeps the model's persistent ones (a router's
        # expert_bias, not a rotary table); a program built from a traced graph keeps them all.
        self.persistent_buffer_names = list(self.buffer_names)
        self._sharding_of_input = {(record.kind, record.name): meta.sharding(node) for node, record in inputs[1:]}
        self._input_dtypes = {record.name: meta.value(node).dtype
                              for node, record in meta.graph_inputs(traced.graph_module.graph, InputKind.INPUT)}
        # run(): ranks of this process whose first step was checked, and whether the ranks were
        # found to run the same program.
        self._checked_ranks: set[int] = set()
        self._compiled_graphs: dict = {}
        self._program_checked = False
        self._communicator = None

    # ------------------------------------------------------------------ shardings
    def parameter_sharding(self, name: str) -> Sharding:
        """How the program holds parameter ``name`` (with ``zero=3`` also split over dp/edp). For a
        parameter held padded (``parameter_padding``), a sharding of the padded shape."""
        return self.placed.parameters[name].sharding

    def parameter_padding(self, name: str) -> Padding | None:
        """How parameter ``name`` is held padded with zeros, or None: with ``zero=3``, a parameter
        whose data-parallel axis divides none of its free dims has the first of them padded to a
        multiple of the axis size (``passes/pad_parameters.py``). Everything a user gives or gets
        (full parameters, gradients, states) has the logical shape; only the pieces are padded."""
        return self.placed.parameters[name].padding

    def held_shape(self, name: str) -> tuple[int, ...]:
        """The global shape the program holds parameter ``name`` in: its own, or padded."""
        shape = tuple(self.traced.parameter_shapes[name])
        padding = self.parameter_padding(name)
        return shape if padding is None else padding.held_shape(shape)

    def shard_held(self, tensor: torch.Tensor, sharding: Sharding, padding: Padding | None, rank: int,
                    name: str) -> torch.Tensor:
        """``rank``'s piece of a logical tensor held with ``padding`` (zeros appended) under ``sharding``."""
        return shard(tensor if padding is None else padding.pad(tensor), sharding, self.mesh, rank, name=name)

    def unshard_held(self, pieces, sharding: Sharding, padding: Padding | None, shape, name: str) -> torch.Tensor:
        """The logical tensor from every rank's pieces of it as held (replicas checked equal; the
        padding checked zero, which every update keeps it)."""
        held = tuple(shape) if padding is None else padding.held_shape(shape)
        full = unshard(pieces, sharding, self.mesh, global_shape=held, name=name, check_replicas=True)
        if padding is None:
            return full
        extra = full.narrow(padding.dim, padding.size, padding.padded - padding.size)
        if bool((extra != 0).any()):
            raise ValueError(f"{name}: the padding of {padding!r} holds non-zero values; a padded value must keep "
                             f"zeros there (the pieces were written by something other than the program)")
        return padding.unpad(full)

    def input_sharding(self, name: str) -> Sharding:
        return self._sharding_of_input[(InputKind.INPUT, name)]

    def buffer_sharding(self, name: str) -> Sharding:
        return self._sharding_of_input[(InputKind.BUFFER, name)]

    def input_shape(self, name: str, local: bool = False) -> tuple[int, ...]:
        """The compiled shape of batch input ``name``: global, or one rank's piece (``local``)."""
        shape = tuple(self.traced.input_shapes[name])
        return tuple(local_shape(shape, self.input_sharding(name), self.mesh, name=name)) if local else shape

    def check_batch(self, batch: Sequence[torch.Tensor], local: bool = False, where: str = "the program") -> None:
        """Refuse a batch whose count, shapes or dtypes differ from the compiled ones, naming the input.

        Every shape in the lowered graph is fixed at compile time (views, splits, local sizes), so
        another batch shape would fail deep inside torch or, worse, run with wrong sizes.
        """
        if len(batch) != len(self.input_names):
            raise BatchError(f"{where}: the program takes {len(self.input_names)} batch tensors {self.input_names}, "
                             f"got {len(batch)}")
        for name, tensor in zip(self.input_names, batch):
            if not isinstance(tensor, torch.Tensor):
                raise BatchError(f"{where}: batch input {name!r} is a {type(tensor).__name__}, not a tensor")
            expected = self.input_shape(name, local)
            if tuple(tensor.shape) != expected:
                piece = (f"this rank's piece of the global {self.input_shape(name)} under "
                         f"{self.input_sharding(name)!r}" if local else "the global batch")
                raise BatchError(
                    f"{where}: batch input {name!r} has shape {tuple(tensor.shape)}, but the program was compiled "
                    f"for {expected} ({piece}); compile again for this shape, or pad the batch to it")
            dtype = self._input_dtypes.get(name)
            if dtype is not None and tensor.dtype != dtype:
                raise BatchError(f"{where}: batch input {name!r} has dtype {tensor.dtype}, but the program was "
                                 f"compiled for {dtype}")

    def local_parameters(self, rank: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's pieces of a full state dict (parameters by their model names)."""
        missing = [n for n in self.parameter_names if n not in state]
        if missing:
            raise KeyError(f"state dict lacks parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return {
            name: self.shard_held(state[name].detach(), self.parameter_sharding(name), self.parameter_padding(name),
                                   rank, name)
            for name in self.parameter_names
        }

    def local_batch(self, rank: int, batch: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's pieces of the global batch (checked against the compiled shapes first)."""
        self.check_batch(batch, where="local_batch")
        return [shard(t, self.input_sharding(name), self.mesh, rank, name=name) for name, t in zip(self.input_names, batch)]

    def _local_buffers(self, rank: int, buffers: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return [shard(buffers[name], self._sharding_of_input[(InputKind.BUFFER, name)], self.mesh, rank, name=name)
                for name in self.buffer_names]

    # ------------------------------------------------------------------ reports
    def report(self, format: str = "text", name: str | None = None, op: str | None = None,
               layer: str | None = None, max_values: int | None = 60, hardware="h100", link=None):
        """The placement report as text (``format="text"``), a summary, or a JSON-ready dict.
        ``hardware`` (``"h100"``, ``"h200"``, ``"cpu"``) and ``link`` (a calibrated
        ``LinkModel``) price the predicted step time (``shardgraph/predict.py``)."""
        from .report import build_report, format_report, format_summary

        report = build_report(self, name_pattern=name, op=op, layer=layer, hardware=hardware, link=link)
        if format == "dict":
            return report
        if format == "summary":
            return format_summary(report)
        return format_report(report, max_values=max_values)

    def dump(self, directory: str, collapse_above: int = 400) -> list[str]:
        """Write the traced, placed and lowered graphs, per-rank tables, the report and a picture."""
        from .dump import dump_program

        return dump_program(self, directory, collapse_above=collapse_above)

    # ------------------------------------------------------------------ execution
    def step(self, comm, parameters: Mapping[str, torch.Tensor], batch: Sequence[torch.Tensor],
             buffers: Mapping[str, torch.Tensor] | None = None, graph=None, seed: int | None = None):
        """One rank's step on its local pieces: ``(loss, {name: local gradient})``.

        Without ``buffers`` the rank's pieces of the model's own (``default_buffers``) are used.
        ``graph`` runs the lowered graph another way (a ``NonFiniteLocator``'s ``run``). A program
        whose model draws random numbers (``takes_seed``) needs ``seed``, the same on every rank:
        it draws what the model draws eagerly after ``torch.manual_seed(seed)``.
        """
        if buffers is None:
            rank = comm.rank if comm is not None else 0
            buffers = dict(zip(self.buffer_names, self._local_buffers(rank, self.default_buffers)))
        args = [parameters[n] for n in self.parameter_names] + [buffers[n] for n in self.buffer_names] + list(batch)
        args += self._seed_input(seed)
        outputs = (graph if graph is not None else self._plain_graph())(comm, *args)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        if not getattr(self.traced, "has_loss", True):
            return outputs
        return outputs[0], dict(zip(self.gradient_names, outputs[1:]))

    def _seed_input(self, seed) -> list[torch.Tensor]:
        from .frontend.trace import seed_tensor

        found = seed_tensor(seed, self.takes_seed, "the program")
        return [] if found is None else [found]

    def _named_inputs(self, parameters, buffers, batch):
        """``(label, tensor)`` of every input of a step, for the non-finite checks."""
        return ([(f"parameter {n!r}", parameters[n]) for n in self.parameter_names]
                + [(f"buffer {n!r}", buffers[n]) for n in self.buffer_names]
                + [(f"batch input {n!r}", t) for n, t in zip(self.input_names, batch)])

    def run_simulated(self, parameters: Mapping[str, torch.Tensor], batch: Sequence[torch.Tensor],
                      buffers: Mapping[str, torch.Tensor] | None = None, debug: bool | None = None,
                      seed: int | None = None) -> StepResult:
        """Every rank in one process, from full parameters and the global batch.

        Returns the loss (identical on every rank; checked) and full gradients rebuilt from the
        ranks' pieces (replicas checked bit-identical). A non-finite loss or gradient raises
        ``NonFiniteError`` naming the inputs that hold NaN or inf; with ``debug`` (default:
        ``SHARDGRAPH_DEBUG``) inputs are checked before the step and every rank runs the graph
        node by node, so the error names the rank, node and source line of the first NaN or inf.
        ``seed``: see ``step``.
        """
        debug = debug_enabled(debug)
        self._seed_input(seed)  # a missing or unexpected seed fails here, not on a rank's thread
        self.check_batch(batch, where="run_simulated")
        buffers = buffers if buffers is not None else self.default_buffers
        missing = [n for n in self.buffer_names if n not in buffers]
        if missing:
            raise KeyError(f"run_simulated needs the buffers {missing[:4]}; pass buffers={{name: tensor}}")
        if debug:
            problems = nonfinite_inputs(self._named_inputs(parameters, buffers, batch))
            if problems:
                raise NonFiniteError("run_simulated: inputs are not finite before the step:\n  " + "\n  ".join(problems))
        simulator = Simulator(self.mesh)
        per_rank = []
        for rank in self.mesh.ranks:
            local_buffers = dict(zip(self.buffer_names, self._local_buffers(rank, buffers))) if self.buffer_names else {}
            per_rank.append((self.local_parameters(rank, parameters), self.local_batch(rank, batch), local_buffers))
        locators: dict[int, NonFiniteLocator] = {}

        def rank_step(comm, p, b, buf):
            if not debug:
                return self.step(comm, p, b, buf, seed=seed)
            locators[comm.rank] = NonFiniteLocator(self.graph_module)
            return self.step(comm, p, b, buf, graph=locators[comm.rank].run, seed=seed)

        results = simulator.run(rank_step, per_rank)
        losses = [r[0] for r in results]
        for rank, loss in enumerate(losses):
            # Bitwise, NaN included: a NaN loss on every rank is one NaN, not a disagreement.
            if not same_bits(loss, losses[0]):
                raise AssertionError(f"rank {rank} computed loss {loss.item()} but rank 0 computed {losses[0].item()}")
        gradients = {}
        for name in self.gradient_names:
            pieces = [r[1][name] for r in results]
            gradients[name] = self.unshard_held(pieces, self.parameter_sharding(name), self.parameter_padding(name),
                                                 tuple(parameters[name].shape), f"gradient of {name}")
        not_finite = [name for name, g in gradients.items() if not bool(torch.isfinite(g).all())]
        if not bool(torch.isfinite(losses[0]).all()) or not_finite:
            findings = {rank: locator.first for rank, locator in locators.items()} if debug else None
            raise NonFiniteError(self._nonfinite_message(
                "run_simulated", losses[0], not_finite, nonfinite_inputs(self._named_inputs(parameters, buffers, batch)),
                findings))
        return StepResult(losses[0], gradients, simulator)

    @staticmethod
    def _nonfinite_message(where, loss, gradient_names, input_problems, findings) -> str:
        parts = [f"{where}: the loss is {loss.item()}" if not bool(torch.isfinite(loss).all())
                 else f"{where}: the loss is finite ({loss.item():.6g})"]
        if gradient_names:
            shown = ", ".join(repr(n) for n in gradient_names[:6]) + (" ..." if len(gradient_names) > 6 else "")
            parts.append(f"the gradients of {len(gradient_names)} parameters are not finite ({shown})")
        lines = ["; ".join(parts)]
        if input_problems:
            lines.append("inputs that were not finite before the step: " + "; ".join(input_problems[:6]))
        if findings is not None:
            lines.append(describe_first_nonfinite(findings))
        else:
            lines.append(f"run with debug=True (or SHARDGRAPH_DEBUG=1) to find the node and source line where the "
                         f"first NaN or inf appeared")
        return "\n  ".join(lines)

    def _graph_under(self, compile: str | None):
        """The lowered graph module, or it under ``torch.compile`` (``"inductor"``, or
        ``"cudagraph"``: inductor replayed as CUDA graphs), compiled once per mode."""
        if compile is None:
            return self._plain_graph()
        if compile not in self._compiled_graphs:
            compiled = torch.compile(
                as_aten_ops(self.graph_module), dynamic=False,
                mode="reduce-overhead" if compile == "cudagraph" else None)
            self._compiled_graphs[compile] = _tracing_host_values(compiled) if self.mesh.world > 1 else compiled
        return self._compiled_graphs[compile]

    def single_device_step(self, compile: str | None = None):
        """``step(parameters, batch, buffers=None) -> (loss, {name: gradient})`` for a world=1 program.

        Every pass has run (fused attention, grouped GEMMs, MoE path with no host sync), and no
        communicator is involved. ``compile="inductor"`` runs the graph under ``torch.compile``
        (elementwise ops fused around the grouped GEMM and attention ops, which stay as they
        are); ``compile="cudagraph"`` also replays the whole step as one CUDA graph, which needs
        the parameters and buffers to keep their storage between steps (update them in place) and
        returns outputs that the next step overwrites. ``benchmarks/train_step.py`` times these.
        """
        if self.mesh.world != 1:
            raise ValueError(f"single_device_step needs a world=1 program, this one is for {self.mesh}; "
                             f"use run() under torch.distributed or run_simulated()")
        if compile not in (None, "inductor", "cudagraph"):
            raise ValueError(f"single_device_step: compile must be None, 'inductor' or 'cudagraph', got {compile!r}")
        graph = self._graph_under(compile)
        marked: set[int] = set()

        def step(parameters: Mapping[str, torch.Tensor], batch: Sequence[torch.Tensor],
                 buffers: Mapping[str, torch.Tensor] | None = None, seed: int | None = None):
            buffers = self.default_buffers if buffers is None else buffers
            missing = [n for n in self.parameter_names if n not in parameters]
            missing += [n for n in self.buffer_names if n not in buffers]
            if missing:
                raise KeyError(f"single_device_step lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            self.check_batch(batch, where="single_device_step")
            arguments = [parameters[n] for n in self.parameter_names] + [buffers[n] for n in self.buffer_names]
            if compile == "cudagraph":
                # Static addresses: the replay reads these in place instead of copying them in.
                for tensor in arguments:
                    if id(tensor) not in marked:
                        torch._dynamo.mark_static_address(tensor)
                        marked.add(id(tensor))
            outputs = graph(None, *arguments, *batch, *self._seed_input(seed))
            return outputs[0], dict(zip(self.gradient_names, outputs[1:]))

        return step

    def run(self, parameters_local: Mapping[str, torch.Tensor], batch_local: Sequence[torch.Tensor],
            buffers_local: Mapping[str, torch.Tensor] | None = None, communicator=None, *,
            check: bool | None = None, debug: bool | None = None, compile: str | None = None,
            seed: int | None = None):
        """This rank's step under torch.distributed (initialised by torchrun or ``spawn_gloo``).

        ``batch_local`` is this rank's piece (``local_batch``); without ``buffers_local`` the
        rank's pieces of the model's own buffers are used. On the first step (``check=None``;
        ``True`` checks again, ``False`` never) every rank checks that all run the same program
        and that replicated parameters and buffers agree across their groups. With ``debug``
        (default: ``SHARDGRAPH_DEBUG``) a NaN or inf in an input, the loss or a gradient raises
        ``NonFiniteError`` on every rank, naming the first node that produced one. ``debug`` must
        be the same on every rank: it adds collectives. ``compile="inductor"`` runs the step under
        ``torch.compile`` (compiled once per program and mode; the collectives are c10d ops that
        dynamo traces and inductor lowers). ``seed``: see ``step`` (the same on every rank).
        """
        if compile not in (None, "inductor"):
            raise ValueError(f"run: compile must be None or 'inductor', got {compile!r}")
        debug = debug_enabled(debug)
        self.check_batch(batch_local, local=True, where="run")
        communicator = communicator if communicator is not None else self._default_communicator(debug)
        rank = communicator.rank
        buffers_local = self._rank_buffers(rank, buffers_local)
        missing = [n for n in self.parameter_names if n not in parameters_local]
        missing += [n for n in self.buffer_names if n not in buffers_local]
        if missing:
            raise KeyError(f"run on rank {rank} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self._check_first_step(communicator, parameters_local, buffers_local, check, debug)
        if debug:
            return self._run_debug(communicator, parameters_local, batch_local, buffers_local, seed)
        graph = self._graph_under(compile) if compile is not None else self._eager_distributed_graph(communicator)
        return self.step(communicator, parameters_local, batch_local, buffers_local, graph=graph, seed=seed)

    def _eager_distributed_graph(self, communicator):
        """Under torch.distributed, eagerly: the plain graph with its collectives' failures named
        (``with_named_failures``); otherwise the plain graph (``_plain_graph``)."""
        if not self._distributed(communicator):
            return self._plain_graph()
        return self._plain_graph(named_failures=True)

    def _plain_graph(self, named_failures: bool = False):
        """The lowered graph as a step runs it with no compiler: its per-parameter SGD updates and
        norms as foreach ops (``passes/foreach_parameter_updates.py``), its ``shardgraph::`` ops
        called as their Python bodies (``ops.as_direct_calls``: the same values without the
        dispatcher's host time), autograd off; as lowered inside ``ops.use_direct_calls(False)``; with
        ``named_failures``, its collectives' failures named (``with_named_failures``). Made once
        per graph module."""
        direct = direct_calls.DIRECT_CALLS
        key = ("plain", direct, named_failures)
        cached = self._compiled_graphs.get(key)
        if cached is not None and cached[0] is self.graph_module:
            return cached[1]
        graph = self.graph_module
        if direct:
            from passes.foreach_parameter_updates import foreach_parameter_updates

            from .fx_graph import copy_graph_module

            graph = as_direct_calls(foreach_parameter_updates(copy_graph_module(graph)), copy=False)
        if named_failures:
            from .runtime.distributed import with_named_failures

            graph = with_named_failures(graph)
        # Written now, not on the first call: the simulator's ranks call it from several threads.
        if hasattr(graph, "real_recompile"):
            graph.real_recompile()
        if direct:
            graph = without_autograd(graph)
        self._compiled_graphs[key] = (self.graph_module, graph)
        return graph

    def _default_communicator(self, debug: bool):
        """This process's communicator over the default process group, made on first use."""
        from .runtime.distributed import DistributedCommunicator

        if self._communicator is None:
            # Before the communicator creates process groups: ranks running another program
            # would create other groups and hang there.
            self._check_same_program(debug)
            self._communicator = DistributedCommunicator(self.mesh)
        return self._communicator

    def _rank_buffers(self, rank: int, buffers_local) -> dict:
        """The buffers given, or this rank's pieces of the model's own."""
        if buffers_local is not None:
            return dict(buffers_local)
        return dict(zip(self.buffer_names, self._local_buffers(rank, self.default_buffers)))

    def _check_first_step(self, communicator, parameters_local, buffers_local, check, debug: bool) -> None:
        """On a rank's first step (``check=None``; ``True`` always, ``False`` never): the same
        program on every rank, and replicated parameters and buffers equal across their groups."""
        rank = communicator.rank
        if not (check or (check is None and rank not in self._checked_ranks)):
            return
        if self._distributed(communicator):
            self._check_same_program(debug)
        check_replicas(communicator, [(f"parameter {n!r}", parameters_local[n], self.parameter_sharding(n))
                                      for n in self.parameter_names]
                       + [(f"buffer {n!r}", buffers_local[n], self.buffer_sharding(n)) for n in self.buffer_names])
        self._checked_ranks.add(rank)

    @staticmethod
    def _distributed(communicator) -> bool:
        from .runtime.distributed import DistributedCommunicator

        return isinstance(communicator, DistributedCommunicator)

    def _check_same_program(self, debug: bool) -> None:
        """Every rank's fingerprint (and debug flag) gathered once; ``ProgramMismatchError`` if any differs."""
        if self._program_checked:
            return
        import torch.distributed as dist

        from .runtime.distributed import gather_objects

        mine = {**program_fingerprint(self), "debug": "on" if debug else "off"}
        found = fingerprint_mismatch(gather_objects(mine, "the start-up program check"))
        if found:
            raise ProgramMismatchError(f"rank {dist.get_rank()}: {found}")
        self._program_checked = True

    def _run_debug(self, comm, parameters, batch, buffers, seed=None):
        """``step`` node by node; non-finite inputs, loss or gradients raise on every rank, named."""
        distributed = self._distributed(comm)

        def everyone(local, what):
            # The ranks agree on the verdict, so all raise together rather than some hanging.
            if not distributed:
                return {comm.rank: local}
            from .runtime.distributed import gather_objects

            return dict(enumerate(gather_objects(local, what)))

        problems = everyone(nonfinite_inputs(self._named_inputs(parameters, buffers, batch)), "the debug input check")
        if any(problems.values()):
            lines = [f"rank {r}: {p}" for r, items in sorted(problems.items()) for p in items]
            raise NonFiniteError(f"rank {comm.rank}: inputs are not finite before the step:\n  " + "\n  ".join(lines))
        locator = NonFiniteLocator(self.graph_module)
        loss, gradients = self.step(comm, parameters, batch, buffers, graph=locator.run, seed=seed)
        local = {"loss": bool(torch.isfinite(loss).all()),
                 "gradients": [n for n, g in gradients.items() if not bool(torch.isfinite(g).all())],
                 "first": locator.first}
        verdicts = everyone(local, "the debug non-finite check")
        if any(not v["loss"] or v["gradients"] for v in verdicts.values()):
            bad = sorted({n for v in verdicts.values() for n in v["gradients"]})
            raise NonFiniteError(self._nonfinite_message(f"run on rank {comm.rank}", loss, bad, [],
                                                         {r: v["first"] for r, v in verdicts.items()}))
        return loss, gradients
