"""The compiled program: a pure function of (parameters, batch), runnable on any backend.

``ShardedProgram`` holds the traced graph, the placed graph (a sharding and its reason on every
value) and the lowered graph, one fx GraphModule that every rank runs with its own communicator.
It shards full parameters and batches into per-rank pieces, runs all ranks in the simulator or
this rank under torch.distributed, and reassembles full gradients for checking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch.fx import GraphModule

from . import meta
from .mesh import MeshSpec
from .meta import InputKind
from .placement import Sharding, shard, unshard
from .runtime.simulate import Simulator

__all__ = ["ShardedProgram", "StepResult"]


@dataclass
class StepResult:
    loss: torch.Tensor
    gradients: dict[str, torch.Tensor]
    simulator: Simulator | None = None


class ShardedProgram:
    def __init__(self, traced, placed, lowered: GraphModule, mesh: MeshSpec):
        self.traced = traced
        self.placed = placed
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
        self.default_buffers: dict[str, torch.Tensor] = {}
        self._sharding_of_input = {(record.kind, record.name): meta.sharding(node) for node, record in inputs[1:]}

    # ------------------------------------------------------------------ shardings
    def parameter_sharding(self, name: str) -> Sharding:
        return self.placed.parameters[name].sharding

    def input_sharding(self, name: str) -> Sharding:
        return self._sharding_of_input[(InputKind.INPUT, name)]

    def local_parameters(self, rank: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's pieces of a full state dict (parameters by their model names)."""
        missing = [n for n in self.parameter_names if n not in state]
        if missing:
            raise KeyError(f"state dict lacks parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return {
            name: shard(state[name].detach(), self.parameter_sharding(name), self.mesh, rank, name=name)
            for name in self.parameter_names
        }

    def local_batch(self, rank: int, batch: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(batch) != len(self.input_names):
            raise ValueError(f"the program takes {len(self.input_names)} batch tensors {self.input_names}, got {len(batch)}")
        return [shard(t, self.input_sharding(name), self.mesh, rank, name=name) for name, t in zip(self.input_names, batch)]

    def _local_buffers(self, rank: int, buffers: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return [shard(buffers[name], self._sharding_of_input[(InputKind.BUFFER, name)], self.mesh, rank, name=name)
                for name in self.buffer_names]

    # ------------------------------------------------------------------ reports
    def report(self, format: str = "text", name: str | None = None, op: str | None = None,
               layer: str | None = None, max_values: int | None = 60):
        """The placement report as text (``format="text"``), a summary, or a JSON-ready dict."""
        from .report import build_report, format_report, format_summary

        report = build_report(self, name_pattern=name, op=op, layer=layer)
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
             buffers: Mapping[str, torch.Tensor] | None = None):
        """One rank's step on its local pieces: ``(loss, {name: local gradient})``."""
        buffers = buffers or {}
        args = [parameters[n] for n in self.parameter_names] + [buffers[n] for n in self.buffer_names] + list(batch)
        outputs = self.graph_module(comm, *args)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        if not getattr(self.traced, "has_loss", True):
            return outputs
        return outputs[0], dict(zip(self.gradient_names, outputs[1:]))

    def run_simulated(self, parameters: Mapping[str, torch.Tensor], batch: Sequence[torch.Tensor],
                      buffers: Mapping[str, torch.Tensor] | None = None) -> StepResult:
        """Every rank in one process, from full parameters and the global batch.

        Returns the loss (identical on every rank; checked) and full gradients rebuilt from the
        ranks' pieces (replicas checked bit-identical).
        """
        buffers = buffers if buffers is not None else self.default_buffers
        missing = [n for n in self.buffer_names if n not in buffers]
        if missing:
            raise KeyError(f"run_simulated needs the buffers {missing[:4]}; pass buffers={{name: tensor}}")
        simulator = Simulator(self.mesh)
        per_rank = []
        for rank in self.mesh.ranks:
            local_buffers = dict(zip(self.buffer_names, self._local_buffers(rank, buffers))) if self.buffer_names else {}
            per_rank.append((self.local_parameters(rank, parameters), self.local_batch(rank, batch), local_buffers))
        results = simulator.run(lambda comm, p, b, buf: self.step(comm, p, b, buf), per_rank)
        losses = [r[0] for r in results]
        for rank, loss in enumerate(losses):
            if not torch.equal(loss, losses[0]):
                raise AssertionError(f"rank {rank} computed loss {loss.item()} but rank 0 computed {losses[0].item()}")
        gradients = {}
        for name in self.gradient_names:
            pieces = [r[1][name] for r in results]
            gradients[name] = unshard(pieces, self.parameter_sharding(name), self.mesh,
                                      global_shape=tuple(parameters[name].shape), name=f"gradient of {name}",
                                      check_replicas=True)
        return StepResult(losses[0], gradients, simulator)

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
        graph = self.graph_module
        if compile is not None:
            graph = torch.compile(graph, dynamic=False, mode="reduce-overhead" if compile == "cudagraph" else None)
        marked: set[int] = set()

        def step(parameters: Mapping[str, torch.Tensor], batch: Sequence[torch.Tensor],
                 buffers: Mapping[str, torch.Tensor] | None = None):
            buffers = self.default_buffers if buffers is None else buffers
            missing = [n for n in self.parameter_names if n not in parameters]
            missing += [n for n in self.buffer_names if n not in buffers]
            if missing:
                raise KeyError(f"single_device_step lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if len(batch) != len(self.input_names):
                raise ValueError(f"the program takes {len(self.input_names)} batch tensors {self.input_names}, "
                                 f"got {len(batch)}")
            arguments = [parameters[n] for n in self.parameter_names] + [buffers[n] for n in self.buffer_names]
            if compile == "cudagraph":
                # Static addresses: the replay reads these in place instead of copying them in.
                for tensor in arguments:
                    if id(tensor) not in marked:
                        torch._dynamo.mark_static_address(tensor)
                        marked.add(id(tensor))
            outputs = graph(None, *arguments, *batch)
            return outputs[0], dict(zip(self.gradient_names, outputs[1:]))

        return step

    def run(self, parameters_local: Mapping[str, torch.Tensor], batch_local: Sequence[torch.Tensor],
            buffers_local: Mapping[str, torch.Tensor] | None = None, communicator=None):
        """This rank's step under torch.distributed (initialised by torchrun or ``spawn_gloo``)."""
        if communicator is None:
            from .runtime.distributed import DistributedCommunicator

            if getattr(self, "_communicator", None) is None:
                self._communicator = DistributedCommunicator(self.mesh)
            communicator = self._communicator
        return self.step(communicator, parameters_local, batch_local, buffers_local)
