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

With ``donate_state`` (the default) a step writes its new values into the tensors of the state
it was given and marks that state consumed, as ``jax.jit``'s ``donate_argnums``: one copy of the
weights and optimizer state, not two.

In one process, ``init_states`` / ``simulate_train_step`` / ``gather_state`` do the same for
every rank of the mesh in the simulator, from the global batch; ``gather_state`` rebuilds the
full parameters and state (replicas checked bit-identical), for checkpoints and for loading the
state into a program compiled for another mesh (``init_state(full_state, rank)``).

``train_step(..., compile="cuda_graph")`` replays a world=1 step on a CUDA device as one captured
CUDA graph, which removes the host's per-op launch time from the step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn


from .program import ShardedProgram
from .meta import InputKind
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
    # Set when a step that donates its state consumed this one: its tensors now hold the next
    # step's values, so reading them as this step's would be silently wrong.
    donated: bool = field(default=False, compare=False, repr=False)

    def state_dict(self) -> dict:
        return {"parameters": dict(self.parameters), "optimizer": {n: dict(s) for n, s in self.optimizer.items()},
                "step": self.step}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "TrainState":
        return cls(dict(state["parameters"]), {n: dict(s) for n, s in state.get("optimizer", {}).items()},
                   int(state.get("step", 0)))


@dataclass
class _CapturedStep:
    """A program's step as a CUDA graph on one device (``train_step(compile="cuda_graph")``).

    ``graph`` is None from the warm-up step until the capture. ``batch`` holds the tensors the
    graph reads the batch from; ``held`` what every argument was at the capture (``_signature``),
    in ``_arguments`` order with None at the batch's positions; ``outputs`` the graph's outputs,
    which every replay overwrites."""

    device: torch.device
    stream: torch.cuda.Stream
    graph: torch.cuda.CUDAGraph | None = None
    batch: list[torch.Tensor] = field(default_factory=list)
    held: list = field(default_factory=list)
    outputs: tuple = ()


def _signature(tensor: torch.Tensor) -> tuple:
    """What a captured graph relies on in a tensor it reads or writes in place: its memory and layout."""
    return tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype


class TrainingProgram(ShardedProgram):
    def __init__(self, traced, placed, lowered, mesh, donates_state: bool = False):
        super().__init__(traced, placed, lowered, mesh)
        self.donates_state = donates_state
        self._scalar_inputs: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cuda_graph_replay: _CapturedStep | None = None
        # (name, sharding, padding) -> a piece's shape: every step checks every piece's shape, and
        # working one out costs more host time than the check.
        self._local_shapes: dict[tuple, tuple[int, ...]] = {}
        self.optimizer = traced.optimizer
        self.clip_grad_norm = traced.clip_grad_norm
        self.state_slots = list(traced.state_slots)
        self.trainable_names = list(traced.gradient_names)

    # ------------------------------------------------------------------ state
    def init_state(self, model_or_state: nn.Module | Mapping | TrainState, rank: int) -> TrainState:
        """This rank's pieces of a model's parameters (or of a full state from ``gather_state``, or
        a full parameter dict), with zero optimizer state where none is given. A program that
        donates its state gets pieces of their own memory, so stepping never writes into the
        model or the state they came from."""
        full = self._full_state(model_or_state)
        parameters = self.local_parameters(rank, full.parameters)
        own = (lambda piece: piece.clone()) if self.donates_state else (lambda piece: piece)
        parameters = {name: own(piece) for name, piece in parameters.items()}
        optimizer = {}
        for name, slot in self.state_slots:
            value = full.optimizer.get(name, {}).get(slot)
            if value is None:
                value = torch.zeros_like(full.parameters[name])
            optimizer.setdefault(name, {})[slot] = own(self.shard_held(value.detach(), self.state_sharding(name),
                                                                        self.state_padding(name), rank,
                                                                        f"{name}:{slot}"))
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
        _refuse_donated(state, rank)
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
            if piece is None or tuple(piece.shape) != self._local_shape(name, self.state_sharding(name),
                                                                        self.state_padding(name)):
                raise StateError(f"rank {rank}: optimizer state {name}:{slot} is missing or shaped for another mesh")

    def state_sharding(self, name: str):
        """How parameter ``name``'s optimizer state is split: like the parameter, or with
        ``zero=1`` also over the data-parallel axis of its view. For a state held padded
        (``state_padding``), a sharding of the padded shape."""
        slot = self.optimizer.state_slots()[0]
        return self._sharding_of_input[(InputKind.OPTIMIZER_STATE, f"{name}:{slot}")]

    def state_padding(self, name: str):
        """How parameter ``name``'s optimizer state is held padded with zeros (a
        ``placement.Padding``), or None: with ``zero>=1``, where the data-parallel axis divides
        none of the parameter's free dims. ``init_state`` pads, ``gather_state`` drops the padding."""
        return self.placed.state_paddings.get(name)

    def local_parameters_shape(self, name: str) -> tuple[int, ...]:
        return self._local_shape(name, self.parameter_sharding(name), self.parameter_padding(name))

    def _local_shape(self, name: str, sharding, padding=None) -> tuple[int, ...]:
        from .placement import local_shape

        key = (name, sharding, padding)
        if key not in self._local_shapes:
            shape = tuple(self.traced.parameter_shapes[name])
            held = shape if padding is None else padding.held_shape(shape)
            self._local_shapes[key] = tuple(int(s) for s in local_shape(held, sharding, self.mesh, name=name))
        return self._local_shapes[key]

    def gather_state(self, states: Sequence[TrainState]) -> TrainState:
        """Full parameters and optimizer state from every rank's pieces (replicas checked equal), in
        their logical shapes: a padded piece's padding is checked zero and dropped."""
        if len(states) != self.mesh.world:
            raise StateError(f"gather_state needs one state per rank ({self.mesh.world}), got {len(states)}")
        for rank, state in enumerate(states):
            _refuse_donated(state, rank)
        parameters = {
            name: self.unshard_held([s.parameters[name] for s in states], self.parameter_sharding(name),
                                     self.parameter_padding(name), self.traced.parameter_shapes[name], name)
            for name in self.parameter_names}
        optimizer: dict[str, dict[str, torch.Tensor]] = {}
        for name, slot in self.state_slots:
            optimizer.setdefault(name, {})[slot] = self.unshard_held(
                [s.optimizer[name][slot] for s in states], self.state_sharding(name), self.state_padding(name),
                self.traced.parameter_shapes[name], f"{name}:{slot}")
        return TrainState(parameters, optimizer, states[0].step)

    # ------------------------------------------------------------------ steps
    def _arguments(self, state: TrainState, batch, buffers, scalars: tuple[torch.Tensor, torch.Tensor],
                   seed: int | None = None) -> list:
        return ([state.parameters[n] for n in self.parameter_names] + [buffers[n] for n in self.buffer_names]
                + list(batch) + [state.optimizer[n][slot] for n, slot in self.state_slots] + list(scalars)
                + self._seed_input(seed))

    def _scalars(self, state: TrainState, lr: float, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The learning rate and step number as float64 tensors on the state's device. ``shared``
        keeps one pair per device and refills it: a new tensor on a GPU each step is a copy from
        pageable host memory, which waits for the GPU to finish the previous step."""
        device = next(iter(state.parameters.values())).device
        if not shared:
            return (torch.tensor(float(lr), dtype=torch.float64, device=device),
                    torch.tensor(float(state.step + 1), dtype=torch.float64, device=device))
        if device not in self._scalar_inputs:
            self._scalar_inputs[device] = (torch.zeros((), dtype=torch.float64, device=device),
                                           torch.zeros((), dtype=torch.float64, device=device))
        lr_tensor, step_tensor = self._scalar_inputs[device]
        lr_tensor.fill_(float(lr))
        step_tensor.fill_(float(state.step + 1))
        return lr_tensor, step_tensor

    def _consume(self, state: TrainState) -> None:
        if self.donates_state:
            state.donated = True

    def _check_donated_memory(self, states: Sequence[TrainState]) -> None:
        """Every tensor a donating step writes must be memory of its own: two pieces sharing
        storage (one tensor given for two slots, or for one slot on two simulated ranks) would
        each be overwritten by the other's update."""
        if not self.donates_state:
            return
        owners: dict[int, str] = {}
        for rank, state in enumerate(states):
            written = [(name, state.parameters[name]) for name in self.trainable_names]
            written += [(f"{name}:{slot}", state.optimizer[name][slot]) for name, slot in self.state_slots]
            for label, tensor in written:
                where = tensor.untyped_storage().data_ptr()
                if where in owners:
                    raise StateError(f"rank {rank}: {label} shares memory with {owners[where]}; a step writes its "
                                     f"new values in place, so each must have its own (init_state gives that)")
                owners[where] = f"{label} of rank {rank}"

    def _result(self, state: TrainState, outputs) -> tuple[torch.Tensor, TrainState, dict]:
        loss, rest = outputs[0], list(outputs[1:])
        count = len(self.trainable_names)
        parameters = dict(state.parameters)
        # None: the step updated the donated tensor in place and returned nothing for it
        # (passes/fuse_wgrad_sgd.py), so the tensor given is the new value.
        parameters.update((name, state.parameters[name] if value is None else value)
                          for name, value in zip(self.trainable_names, rest[:count]))
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

    def _graph(self, compile: str | None):
        """The graph a step runs: the plain graph (``_plain_graph``; also for
        ``compile="cuda_graph"``, which captures it), or (``compile="inductor"``) the lowered graph
        under ``torch.compile``, compiled once per program."""
        if compile is None or compile == "cuda_graph":
            return self._plain_graph()
        if compile != "inductor":
            raise ValueError(f"train_step: compile must be None, 'inductor' or 'cuda_graph', got {compile!r}")
        # At world > 1 the collectives are torch's c10d ops on named groups, which dynamo traces
        # and inductor lowers like any other op.
        return self._graph_under(compile)

    def train_step(self, state: TrainState, batch: Sequence[torch.Tensor], lr: float | None = None,
                   buffers: Mapping[str, torch.Tensor] | None = None, communicator=None, *,
                   check: bool | None = None, compile: str | None = None, seed: int | None = None):
        """This rank's step under torch.distributed (or on one device with ``communicator=None`` at
        world=1): ``(loss, new state, {"grad_norm": ..., "lr": ...})``. ``batch`` is this rank's
        piece (``local_batch``). The first step runs ``run``'s guards (same program everywhere,
        replicated parameters equal); ``check`` as for ``run``. A program compiled with
        ``donate_state`` (the default) writes the new state into ``state``'s tensors and marks
        ``state`` consumed: continue with the state it returns. ``compile="inductor"`` runs the
        step's graph under ``torch.compile`` (any world: the collectives are c10d ops): the update
        fuses into a few kernels. A model that draws random numbers needs ``seed`` (the same on
        every rank; a new one each step for new noise): see ``ShardedProgram.step``.

        ``compile="cuda_graph"`` runs the lowered graph as it is, captured as one CUDA graph and
        replayed, so the host's time to launch each op leaves the step. It takes a world=1
        program that donates its state (``donate_state=True``), draws no random numbers, and a
        state and batch on one CUDA device; anything else is refused before any work. The first
        call is an ordinary step (on the stream that captures later: Triton's autotuning and
        cuBLAS's workspace happen there), the second captures the graph and replays it, and
        every later call copies the batch into the graph's batch tensors and replays. A state
        whose tensors are not those of the capture (another state, one loaded from a checkpoint,
        buffers passed anew) is captured again, with a warning. The returned loss and gradient
        norm are copies, so they stay valid after later steps."""
        lr = self._learning_rate(lr)
        graph = self._graph(compile)
        if compile == "cuda_graph":
            self._refuse_cuda_graph(state, batch)
        if communicator is None and self.mesh.world > 1:
            communicator = self._default_communicator(debug_enabled(None))
        rank = getattr(communicator, "rank", 0)
        self._check_local_state(state, rank)
        self._check_donated_memory([state])
        self.check_batch(batch, local=self.mesh.world > 1, where="train_step")
        buffers = self._rank_buffers(rank, buffers)
        if communicator is not None:
            self._check_first_step(communicator, state.parameters, buffers, check, debug_enabled(None))
        arguments = self._arguments(state, batch, buffers, self._scalars(state, lr, shared=True), seed)
        if compile == "cuda_graph":
            outputs = self._replayed_step(state, communicator, arguments)
        else:
            outputs = graph(communicator, *arguments)
        self._consume(state)
        loss, new_state, metrics = self._result(state, outputs)
        metrics["lr"] = lr
        return loss, new_state, metrics

    # ------------------------------------------------------------------ CUDA graph replay
    def _refuse_cuda_graph(self, state: TrainState, batch: Sequence[torch.Tensor]) -> None:
        """Why this step cannot run as a replayed CUDA graph, as a ``ValueError``; nothing if it can.
        What is not a state or batch at all is left to ``train_step``'s own checks."""
        where = "train_step(compile='cuda_graph')"
        if self.mesh.world != 1:
            raise ValueError(f"{where}: cuda_graph replays one device's step, and this program is for {self.mesh}; "
                             f"a step at world>1 runs collectives (and with experts over ranks reads the "
                             f"dispatch's split sizes on the host), which this mode does not capture: use "
                             f"compile=None or 'inductor'")
        if not self.donates_state:
            raise ValueError(f"{where}: the program does not donate its state, so each step's new state is a "
                             f"tensor of the graph's own memory that the next replay overwrites; compile it "
                             f"with donate_state=True (the default of sg.compile)")
        if self.takes_seed:
            raise ValueError(f"{where}: the model draws random numbers, which the program draws on the host "
                             f"from the seed; a replay would repeat the captured step's numbers every step. "
                             f"Use compile=None or 'inductor'")
        if not isinstance(state, TrainState) or not state.parameters:
            return
        device = next(iter(state.parameters.values())).device
        if device.type != "cuda":
            raise ValueError(f"{where}: the state is on {device}; a CUDA graph replays work on a CUDA device, "
                             f"so the state (init_state of a model on the GPU) must be on one")
        for name, tensor in zip(self.input_names, batch):
            if isinstance(tensor, torch.Tensor) and tensor.device != device:
                raise ValueError(f"{where}: batch input {name!r} is on {tensor.device} and the state on {device}; "
                                 f"the graph reads its batch on the state's device")

    def _batch_positions(self) -> range:
        first = len(self.parameter_names) + len(self.buffer_names)
        return range(first, first + len(self.input_names))

    def _argument_labels(self) -> list[str]:
        """What each of ``_arguments``'s tensors is, in its order, for messages."""
        return ([f"parameter {n!r}" for n in self.parameter_names] + [f"buffer {n!r}" for n in self.buffer_names]
                + [f"batch input {n!r}" for n in self.input_names]
                + [f"optimizer state {n}:{slot}" for n, slot in self.state_slots]
                + ["the learning rate", "the step number"])

    def _replayed_step(self, state: TrainState, communicator, arguments: list) -> list:
        """The step's outputs, through this program's CUDA graph (``train_step``'s
        ``compile="cuda_graph"``). The first call on a device runs the graph eagerly on the
        stream that captures it later: autotuning, timing a kernel's schedules and allocating
        cuBLAS's workspace cannot happen inside a capture."""
        device = arguments[0].device
        record = self._cuda_graph_replay
        if record is None or record.device != device:
            record = self._cuda_graph_replay = _CapturedStep(device, torch.cuda.Stream(device))
            record.stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(record.stream):
                outputs = self._plain_graph()(communicator, *arguments)
            torch.cuda.current_stream(device).wait_stream(record.stream)
            return outputs
        batch = self._batch_positions()
        moved = self._moved_argument(record, arguments)
        if record.graph is None or moved is not None:
            if moved is not None:
                warnings.warn(f"train_step(compile='cuda_graph'): {moved} is not the tensor the step was captured "
                              f"with; capturing the step again (a state that keeps its tensors is replayed)",
                              RuntimeWarning, stacklevel=3)
            self._capture(record, state, communicator, arguments, batch)
        else:
            for static, given in zip(record.batch, arguments[batch.start:batch.stop]):
                static.copy_(given)
        # A capture runs nothing: this replay is the step, on the first call as on every later one.
        record.graph.replay()
        loss, *rest = record.outputs
        # The next replay overwrites the graph's loss and norm in place: a caller that keeps the
        # losses of several steps must hold values of its own (two 0-d copies a step).
        return [loss.clone(), *rest[:-1], rest[-1].clone()]

    def _moved_argument(self, record: _CapturedStep, arguments: list) -> str | None:
        """The first argument other than the batch whose memory or layout is not the capture's, named; or None.

        Recapturing is the choice for a state that moved (copying it into the captured tensors
        would be the other): the captured kernels read and write fixed addresses, and a new
        state that is then kept step after step costs one capture, where copying would cost a
        pass over every weight and optimizer slot each time it differs."""
        if record.graph is None:
            return None
        for position, (held, argument) in enumerate(zip(record.held, arguments)):
            if held is not None and held != _signature(argument):
                return self._argument_labels()[position]
        return None

    def _capture(self, record: _CapturedStep, state: TrainState, communicator, arguments: list, batch: range) -> None:
        """Capture the step into ``record``: the batch into tensors of the record's own, every
        other argument read (and the state written) where it is now."""
        # The old graph's memory (its pool, the batch copies) goes before the new capture takes its own.
        record.graph, record.outputs, record.batch, record.held = None, (), [], []
        static = [arguments[i].clone() for i in batch]
        captured = list(arguments)
        captured[batch.start:batch.stop] = static
        graph = torch.cuda.CUDAGraph()
        caller_stream = torch.cuda.current_stream(record.device)
        try:
            # torch.cuda.graph synchronizes the device before it begins. thread_local: a capture
            # must not fail the CUDA calls of other threads (a data loader pinning its batches).
            with torch.cuda.graph(graph, stream=record.stream, capture_error_mode="thread_local"):
                outputs = self._plain_graph()(communicator, *captured)
        except Exception as error:
            # torch.cuda.graph's exit stops at a failed capture_end, before it gives back the
            # stream it made current: the caller's later work would run on the capture stream.
            torch.cuda.set_stream(caller_stream)
            raise RuntimeError(
                f"train_step(compile='cuda_graph'): the step cannot be captured as a CUDA graph "
                f"({type(error).__name__}: {error}); an op in it reads a value on the host or does work a capture "
                f"cannot record (a host synchronisation, a copy from pageable memory). Use compile=None or "
                f"'inductor'") from error
        self._check_written_in_place(state, outputs)
        record.graph, record.outputs, record.batch = graph, tuple(outputs), static
        record.held = [None if i in batch else _signature(argument) for i, argument in enumerate(arguments)]

    def _check_written_in_place(self, state: TrainState, outputs) -> None:
        """Every new parameter and optimizer slot a captured step returns is the given tensor,
        written in place (``passes/donate_state.py``, or None where a fused update wrote it)."""
        count = len(self.trainable_names)
        written = [(f"parameter {name!r}", state.parameters[name], value)
                   for name, value in zip(self.trainable_names, outputs[1:1 + count])]
        written += [(f"optimizer state {name}:{slot}", state.optimizer[name][slot], value)
                    for (name, slot), value in zip(self.state_slots, outputs[1 + count:])]
        for label, given, value in written:
            if value is not None and value.data_ptr() != given.data_ptr():
                raise RuntimeError(f"train_step(compile='cuda_graph'): the captured step returns {label} in a tensor "
                                   f"of the graph's own memory, not written into the one it was given "
                                   f"(passes/donate_state.py); the next replay would overwrite the state it returned")

    def simulate_train_step(self, states: Sequence[TrainState], batch: Sequence[torch.Tensor], lr: float | None = None,
                            buffers: Mapping[str, torch.Tensor] | None = None, seed: int | None = None):
        """Every rank's step in the simulator from the global batch: ``(loss, states, metrics)``;
        the loss and metrics are checked identical on every rank. ``seed``: see ``train_step``."""
        lr = self._learning_rate(lr)
        self._seed_input(seed)
        if len(states) != self.mesh.world:
            raise StateError(f"simulate_train_step needs one state per rank ({self.mesh.world}), got {len(states)}")
        self.check_batch(batch, where="simulate_train_step")
        buffers = self.default_buffers if buffers is None else buffers
        per_rank = []
        for rank, state in zip(self.mesh.ranks, states):
            self._check_local_state(state, rank)
            local_buffers = dict(zip(self.buffer_names, self._local_buffers(rank, buffers))) if self.buffer_names else {}
            per_rank.append((state, self.local_batch(rank, batch), local_buffers))
        self._check_donated_memory(states)
        simulator = Simulator(self.mesh)
        # Each rank its own scalars: the simulator's ranks may run at once.
        results = simulator.run(
            lambda comm, state, local_batch, local_buffers: self._result(
                state, self._plain_graph()(comm, *self._arguments(state, local_batch, local_buffers,
                                                                self._scalars(state, lr, shared=False), seed))),
            per_rank)
        for state in states:
            self._consume(state)
        losses = [loss for loss, _, _ in results]
        norms = [metrics["grad_norm"] for _, _, metrics in results]
        for rank in self.mesh.ranks:
            if not same_bits(losses[rank], losses[0]) or not same_bits(norms[rank], norms[0]):
                raise AssertionError(f"rank {rank} computed loss {losses[rank].item()} / grad norm "
                                     f"{norms[rank].item()}, rank 0 {losses[0].item()} / {norms[0].item()}")
        metrics = {"grad_norm": norms[0], "lr": lr, "simulator": simulator}
        return losses[0], [state for _, state, _ in results], metrics



def _refuse_donated(state: TrainState, rank: int) -> None:
    if state.donated:
        raise StateError(f"rank {rank}: this TrainState (after step {state.step}) was donated to the next step, "
                         f"which wrote its new values into the same tensors; use the state that step returned "
                         f"(or compile with donate_state=False to keep every state)")
