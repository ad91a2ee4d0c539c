"""The compiled training step: ``(state, batch, lr) -> (loss, state, metrics)``, as ``jax.jit`` of a
train step gives.

``sg.compile(model, mesh, inputs, loss_fn, optimizer=sg.optim.AdamW(...), clip_grad_norm=1.0)``
returns a ``TrainingProgram``. Its graph takes every parameter, buffer and batch tensor, every
trainable parameter's optimizer state, the learning rate and the step number, and returns the
loss, the new parameters and state, and the gradient norm before clipping. Each rank holds a
``TrainState`` of its own pieces: a state tensor is split exactly like its parameter, so the update
needs no communication beyond the gradients' own synchronisation.

    state = program.init_state(model, rank)                     # this rank's pieces, zero state
    loss, state, metrics = program.train_step(state, batch_local, lr=lr_schedule(step))

In one process, ``init_states`` / ``simulate_train_step`` / ``gather_state`` do the same for
every rank of the mesh in the simulator, from the global batch; ``gather_state`` rebuilds the
full parameters and state (replicas checked bit-identical), for checkpoints and for loading the
state into a program compiled for another mesh (``init_state(full_state, rank)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from .placement import shard, unshard
from .program import ShardedProgram
from .runtime.guards import debug_enabled, same_bits
from .runtime.simulate import Simulator

__all__ = ["TrainState", "TrainingProgram", "StateError"]


class StateError(ValueError):
    """A training state that does not belong to this program (another model, mesh or optimizer)."""


@dataclass
class TrainState:
    """One rank's pieces (or, gathered, the full tensors) of everything a step reads and writes."""

    parameters: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    step: int = 0

    def state_dict(self) -> dict:
        return {"parameters": dict(self.parameters), "optimizer": {n: dict(s) for n, s in self.optimizer.items()},
                "step": self.step}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "TrainState":
        return cls(dict(state["parameters"]), {n: dict(s) for n, s in state.get("optimizer", {}).items()},
                   int(state.get("step", 0)))


class TrainingProgram(ShardedProgram):
    def __init__(self, traced, placed, lowered, mesh):
        super().__init__(traced, placed, lowered, mesh)
        self.optimizer = traced.optimizer
        self.clip_grad_norm = traced.clip_grad_norm
        self.state_slots = list(traced.state_slots)
        self.trainable_names = list(traced.gradient_names)

    # ------------------------------------------------------------------ state
    def init_state(self, model_or_state: nn.Module | Mapping | TrainState, rank: int) -> TrainState:
        """This rank's pieces of a model's parameters (or of a full state from ``gather_state``, or
        a full parameter dict), with zero optimizer state where none is given."""
        full = self._full_state(model_or_state)
        parameters = self.local_parameters(rank, full.parameters)
        optimizer = {}
        for name, slot in self.state_slots:
            value = full.optimizer.get(name, {}).get(slot)
            if value is None:
                value = torch.zeros_like(full.parameters[name])
            optimizer.setdefault(name, {})[slot] = shard(value.detach(), self.parameter_sharding(name), self.mesh, rank,
                                                         name=f"{name}:{slot}")
        return TrainState(parameters, optimizer, full.step)

    def init_states(self, model_or_state) -> list[TrainState]:
        """Every rank's ``init_state``, for the simulator."""
        return [self.init_state(model_or_state, rank) for rank in self.mesh.ranks]

    def _full_state(self, model_or_state) -> TrainState:
        if isinstance(model_or_state, nn.Module):
            return TrainState({n: p.detach() for n, p in model_or_state.named_parameters()})
        if isinstance(model_or_state, TrainState):
            state = model_or_state
        elif isinstance(model_or_state, Mapping) and "parameters" in model_or_state:
            state = TrainState.from_state_dict(model_or_state)
        elif isinstance(model_or_state, Mapping):
            state = TrainState(dict(model_or_state))
        else:
            raise StateError(f"init_state takes a model, a parameter dict or a TrainState, "
                             f"got {type(model_or_state).__name__}")
        self._check_full_state(state)
        return state

    def _check_full_state(self, state: TrainState) -> None:
        for name in self.parameter_names:
            if name not in state.parameters:
                raise StateError(f"the state has no parameter {name!r}: it belongs to another model")
            expected = tuple(self.traced.parameter_shapes[name])
            if tuple(state.parameters[name].shape) != expected:
                raise StateError(f"parameter {name!r} has shape {tuple(state.parameters[name].shape)} in the state; "
                                 f"the program was compiled for {expected}")
        for name, slots in state.optimizer.items():
            unknown = set(slots) - set(self.optimizer.state_slots())
            if unknown:
                raise StateError(f"optimizer state of {name!r} has slots {sorted(unknown)}; "
                                 f"{self.optimizer.name} keeps {list(self.optimizer.state_slots())}")

    def _check_local_state(self, state: TrainState, rank: int) -> None:
        if not isinstance(state, TrainState):
            raise StateError(f"train_step takes a TrainState (from init_state), got {type(state).__name__}")
        for name in self.parameter_names:
            piece = state.parameters.get(name)
            expected = tuple(self.local_parameters_shape(name))
            if piece is None or tuple(piece.shape) != expected:
                got = None if piece is None else tuple(piece.shape)
                raise StateError(f"rank {rank}: parameter {name!r} piece has shape {got}, this program's piece is "
                                 f"{expected} under {self.parameter_sharding(name)!r}: the state is from another "
                                 f"mesh or model; gather it and init_state it again")
        for name, slot in self.state_slots:
            piece = state.optimizer.get(name, {}).get(slot)
            if piece is None or tuple(piece.shape) != tuple(self.local_parameters_shape(name)):
                raise StateError(f"rank {rank}: optimizer state {name}:{slot} is missing or shaped for another mesh")

    def local_parameters_shape(self, name: str) -> tuple[int, ...]:
        from .placement import local_shape

        return tuple(int(s) for s in local_shape(tuple(self.traced.parameter_shapes[name]),
                                                 self.parameter_sharding(name), self.mesh, name=name))

    def gather_state(self, states: Sequence[TrainState]) -> TrainState:
        """Full parameters and optimizer state from every rank's pieces (replicas checked equal)."""
        if len(states) != self.mesh.world:
            raise StateError(f"gather_state needs one state per rank ({self.mesh.world}), got {len(states)}")
        parameters = {
            name: unshard([s.parameters[name] for s in states], self.parameter_sharding(name), self.mesh,
                          global_shape=self.traced.parameter_shapes[name], name=name, check_replicas=True)
            for name in self.parameter_names}
        optimizer: dict[str, dict[str, torch.Tensor]] = {}
        for name, slot in self.state_slots:
            optimizer.setdefault(name, {})[slot] = unshard(
                [s.optimizer[name][slot] for s in states], self.parameter_sharding(name), self.mesh,
                global_shape=self.traced.parameter_shapes[name], name=f"{name}:{slot}", check_replicas=True)
        return TrainState(parameters, optimizer, states[0].step)

    # ------------------------------------------------------------------ steps
    def _arguments(self, state: TrainState, batch, buffers, lr: float) -> list:
        scalar = dict(dtype=torch.float64, device=next(iter(state.parameters.values())).device)
        return ([state.parameters[n] for n in self.parameter_names] + [buffers[n] for n in self.buffer_names]
                + list(batch) + [state.optimizer[n][slot] for n, slot in self.state_slots]
                + [torch.tensor(float(lr), **scalar), torch.tensor(float(state.step + 1), **scalar)])

    def _result(self, state: TrainState, outputs) -> tuple[torch.Tensor, TrainState, dict]:
        loss, rest = outputs[0], list(outputs[1:])
        count = len(self.trainable_names)
        parameters = dict(state.parameters)
        parameters.update(zip(self.trainable_names, rest[:count]))
        optimizer: dict[str, dict[str, torch.Tensor]] = {}
        for (name, slot), value in zip(self.state_slots, rest[count:count + len(self.state_slots)]):
            optimizer.setdefault(name, {})[slot] = value
        metrics = {"grad_norm": rest[-1], "lr": None}
        return loss, TrainState(parameters, optimizer, state.step + 1), metrics

    def _learning_rate(self, lr) -> float:
        value = self.optimizer.lr if lr is None else lr
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"train_step: lr must be a non-negative number, got {value!r}")
        return float(value)

    def train_step(self, state: TrainState, batch: Sequence[torch.Tensor], lr: float | None = None,
                   buffers: Mapping[str, torch.Tensor] | None = None, communicator=None, *,
                   check: bool | None = None):
        """This rank's step under torch.distributed (or on one device with ``communicator=None`` at
        world=1): ``(loss, new state, {"grad_norm": ..., "lr": ...})``. ``batch`` is this rank's
        piece (``local_batch``). The first step runs ``run``'s guards (same program everywhere,
        replicated parameters equal); ``check`` as for ``run``."""
        lr = self._learning_rate(lr)
        if communicator is None and self.mesh.world > 1:
            communicator = self._default_communicator(debug_enabled(None))
        rank = getattr(communicator, "rank", 0)
        self._check_local_state(state, rank)
        self.check_batch(batch, local=self.mesh.world > 1, where="train_step")
        buffers = self._rank_buffers(rank, buffers)
        if communicator is not None:
            self._check_first_step(communicator, state.parameters, buffers, check, debug_enabled(None))
        outputs = self.graph_module(communicator, *self._arguments(state, batch, buffers, lr))
        loss, new_state, metrics = self._result(state, outputs)
        metrics["lr"] = lr
        return loss, new_state, metrics

    def simulate_train_step(self, states: Sequence[TrainState], batch: Sequence[torch.Tensor], lr: float | None = None,
                            buffers: Mapping[str, torch.Tensor] | None = None):
        """Every rank's step in the simulator from the global batch: ``(loss, states, metrics)``;
        the loss and metrics are checked identical on every rank."""
        lr = self._learning_rate(lr)
        if len(states) != self.mesh.world:
            raise StateError(f"simulate_train_step needs one state per rank ({self.mesh.world}), got {len(states)}")
        self.check_batch(batch, where="simulate_train_step")
        buffers = self.default_buffers if buffers is None else buffers
        per_rank = []
        for rank, state in zip(self.mesh.ranks, states):
            self._check_local_state(state, rank)
            local_buffers = dict(zip(self.buffer_names, self._local_buffers(rank, buffers))) if self.buffer_names else {}
            per_rank.append((state, self.local_batch(rank, batch), local_buffers))
        simulator = Simulator(self.mesh)
        results = simulator.run(
            lambda comm, state, local_batch, local_buffers: self._result(
                state, self.graph_module(comm, *self._arguments(state, local_batch, local_buffers, lr))),
            per_rank)
        losses = [loss for loss, _, _ in results]
        norms = [metrics["grad_norm"] for _, _, metrics in results]
        for rank in self.mesh.ranks:
            if not same_bits(losses[rank], losses[0]) or not same_bits(norms[rank], norms[0]):
                raise AssertionError(f"rank {rank} computed loss {losses[rank].item()} / grad norm "
                                     f"{norms[rank].item()}, rank 0 {losses[0].item()} / {norms[0].item()}")
        metrics = {"grad_norm": norms[0], "lr": lr, "simulator": simulator}
        return losses[0], [state for _, state, _ in results], metrics

