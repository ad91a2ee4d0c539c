"""Checkpoints: HF-style safetensors in and out of per-rank pieces, and DTensor export.

Load (``load_local``) reads, for one rank, only the slices of each tensor that the rank owns:
the parameter's run plan (``shardgraph.placement.run_plan``) gives the global index ranges on
every dim, and safetensors' lazy slices read just those bytes. Checkpoint keys are matched to the
graph's parameter names:

* the same name (transformers 5.x fused ``experts.gate_up_proj`` / ``down_proj``, torchtitan's
  3-d ``w1``/``w2``/``w3``, every dense parameter);
* per-expert keys, fused on load: ``experts.{e}.w1`` + ``experts.{e}.w3`` (or ``gate_proj`` /
  ``up_proj``) rows become expert ``e``'s gate and up rows of ``gate_up_proj``; ``experts.{e}.w2``
  (or ``down_proj``) becomes ``down_proj[e]``; a 3-d ``experts.w1`` is stacked from
  ``experts.{e}.w1``;
* module renames that HF checkpoints carry (Mixtral's ``block_sparse_moe`` for ``mlp``).

Every key and shape is checked before any rank reads a byte: a missing key, or one of the wrong
shape, is an error naming the key and both shapes. ``save_checkpoint`` assembles the pieces on
one rank and writes them back under the keys they were loaded from (bit-exact round trip),
with the model's persistent buffers (a router's ``expert_bias``; ``load_buffers`` reads them
back). Saving refuses, naming what it found:

* replicas that differ between ranks (a replicated parameter whose copies diverged), unless
  ``keep="rank0"`` says to write the copy of the lowest ranks and drop the others;
* a directory that holds another layout: an HF sharded index (``model.safetensors.index.json``,
  which ``CheckpointIndex`` reads before ``model.safetensors``, so the old shards would be
  loaded back), shard files, or a ``model.safetensors`` with other keys, shapes or dtypes.

The file is written under a temporary name in the same directory and renamed over the old one
(``os.replace``), so a crash mid-write leaves the previous checkpoint whole.

Training state: ``save_train_state`` writes a gathered ``TrainState`` (``program.gather_state``:
full parameters, every optimizer slot, the step) and a caller's JSON metadata (a data position,
say) into ``train_state.safetensors``, one file so that one atomic rename replaces all of it.
Parameters keep their own names, so ``load_local`` reads a rank's slices of the weights from it
like from any checkpoint; optimizer slots are ``"{parameter}:{slot}"``, the names the training
graph gives their inputs. ``load_train_state`` returns the full state, which any program loads
whatever its mesh (``init_state`` / ``init_states``).

A zero=3 parameter held padded (``program.parameter_padding``) is saved and indexed in its own
shape: ``load_local`` reads a rank's rows of it and fills the rows past its size with zeros,
``save_checkpoint`` drops them.

DTensor: ``to_dtensor`` wraps a local piece as a DTensor on a DeviceMesh laid out like the
mesh view, for torch.distributed.checkpoint; ``InterleavedShard`` has no DTensor form and is
refused with a pointer to the safetensors path.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .mesh import MeshSpec
from .placement import InterleavedShard, Sharding, run_plan, shard, to_dtensor_placements, unshard

__all__ = [
    "CheckpointError",
    "CheckpointIndex",
    "LoadPlan",
    "plan_load",
    "load_local",
    "load_buffers",
    "save_checkpoint",
    "save_train_state",
    "load_train_state",
    "TRAIN_STATE_FILE",
    "shard_optimizer_state",
    "to_dtensor",
    "device_mesh_for",
]

_RENAMES = [("mlp.", "block_sparse_moe.")]
_GATE_NAMES, _UP_NAMES, _DOWN_NAMES = ("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: missing keys or wrong shapes, named."""


class CheckpointIndex:
    """Keys, shapes and files of a safetensors checkpoint (one file, or an index of shards)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(index):
                with open(index, encoding="utf-8") as handle:
                    weight_map = json.load(handle)["weight_map"]
                files = {key: os.path.join(path, name) for key, name in weight_map.items()}
            else:
                single = os.path.join(path, "model.safetensors")
                if not os.path.exists(single):
                    raise CheckpointError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")
                files = None
                path = single
        else:
            files = None
        if files is None:
            with safe_open(path, "pt") as handle:
                files = {key: path for key in handle.keys()}
        self.files = files
        self.shapes: dict[str, tuple[int, ...]] = {}
        by_file: dict[str, list[str]] = {}
        for key, file in files.items():
            by_file.setdefault(file, []).append(key)
        for file, keys in by_file.items():
            with safe_open(file, "pt") as handle:
                for key in keys:
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def read(self, key: str, index: tuple) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[key], "pt") as handle:
            return handle.get_slice(key)[index]


@dataclass(frozen=True)
class Source:
    """Where a parameter's values are: one key, or per-expert keys fused along a dim."""

    kind: str  # "direct" | "experts_fused" | "experts_stacked"
    keys: tuple = ()  # direct: (key,); fused: ((gate_e, up_e) per expert); stacked: (key_e per expert)


@dataclass
class LoadPlan:
    sources: dict[str, Source] = field(default_factory=dict)


def _variants(name: str) -> list[str]:
    names = [name]
    for old, new in _RENAMES:
        if old in name:
            names.append(name.replace(old, new))
    return names


def _resolve(name: str, shape: tuple[int, ...], index: CheckpointIndex, problems: list[str]) -> Source | None:
    for candidate in _variants(name):
        if candidate in index.shapes:
            if index.shapes[candidate] != shape:
                problems.append(f"key {candidate!r} has shape {index.shapes[candidate]}, parameter {name!r} needs {shape}")
                return None
            return Source("direct", (candidate,))
    leaf = name.rsplit(".", 1)[-1]
    base = name[: -len(leaf)]
    if len(shape) == 3 and base.endswith("experts."):
        experts = shape[0]
        for prefix in _variants(base):
            if leaf in ("gate_up_proj",):
                per_expert = (shape[1] // 2, shape[2])
                pairs = []
                for gate_name, up_name in zip(_GATE_NAMES, _UP_NAMES):
                    keys = [(f"{prefix}{e}.{gate_name}.weight", f"{prefix}{e}.{up_name}.weight") for e in range(experts)]
                    if all(g in index.shapes for g, _ in keys):
                        pairs = keys
                        break
                if pairs:
                    for gate, up in pairs:
                        for key in (gate, up):
                            if key not in index.shapes:
                                problems.append(f"key {key!r} is missing (needed for {name!r})")
                            elif index.shapes[key] != per_expert:
                                problems.append(f"key {key!r} has shape {index.shapes[key]}, {name!r} needs {per_expert}")
                    return Source("experts_fused", tuple(pairs))
            else:
                names = {"down_proj": _DOWN_NAMES, "w1": ("w1",), "w2": ("w2",), "w3": ("w3",)}.get(leaf, (leaf,))
                for stem in names:
                    keys = [next((k for k in (f"{prefix}{e}.{stem}.weight", f"{prefix}{e}.{stem}") if k in index.shapes),
                                 f"{prefix}{e}.{stem}.weight") for e in range(experts)]
                    if any(k in index.shapes for k in keys):
                        for key in keys:
                            if key not in index.shapes:
                                problems.append(f"key {key!r} is missing (needed for {name!r})")
                            elif index.shapes[key] != tuple(shape[1:]):
                                problems.append(f"key {key!r} has shape {index.shapes[key]}, {name!r} needs {tuple(shape[1:])}")
                        return Source("experts_stacked", tuple(keys))
    problems.append(f"no key for parameter {name!r} {shape} (tried {', '.join(repr(v) for v in _variants(name))})")
    return None


def plan_load(index: CheckpointIndex, parameter_shapes: Mapping[str, Sequence[int]]) -> LoadPlan:
    """Match every parameter to checkpoint keys; every mismatch is reported at once."""
    problems: list[str] = []
    plan = LoadPlan()
    for name, shape in parameter_shapes.items():
        source = _resolve(name, tuple(shape), index, problems)
        if source is not None:
            plan.sources[name] = source
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return plan


def _runs_per_dim(shape, sharding, mesh, rank, name):
    runs = []
    for dim in range(len(shape)):
        if any(p.is_shard(dim) for p in sharding.placements):
            runs.append([(r.global_start, r.global_start + r.length) for r in run_plan(shape, sharding, mesh, rank, dim, name)])
        else:
            runs.append([(0, shape[dim])])
    return runs


def _read_block(index: CheckpointIndex, source: Source, shape, block) -> torch.Tensor:
    """Global index ranges ``block`` (one (start, stop) per dim) of the logical parameter."""
    if source.kind == "direct":
        return index.read(source.keys[0], tuple(slice(a, b) for a, b in block))
    (e0, e1), rest = block[0], block[1:]
    pieces = []
    for expert in range(e0, e1):
        if source.kind == "experts_stacked":
            pieces.append(index.read(source.keys[expert], tuple(slice(a, b) for a, b in rest)))
            continue
        gate, up = source.keys[expert]
        half = shape[1] // 2
        (r0, r1), tail = rest[0], tuple(slice(a, b) for a, b in rest[1:])
        parts = []
        if r0 < half:
            parts.append(index.read(gate, (slice(r0, min(r1, half)),) + tail))
        if r1 > half:
            parts.append(index.read(up, (slice(max(r0, half) - half, r1 - half),) + tail))
        pieces.append(torch.cat(parts, dim=0))
    return torch.stack(pieces)


def load_local(path_or_index, program, rank: int, plan: LoadPlan | None = None) -> dict[str, torch.Tensor]:
    """This rank's pieces of every parameter, reading only the slices it owns."""
    index = path_or_index if isinstance(path_or_index, CheckpointIndex) else CheckpointIndex(path_or_index)
    shapes = {name: tuple(program.traced.parameter_shapes[name]) for name in program.parameter_names}
    plan = plan or plan_load(index, shapes)
    mesh = program.mesh
    local = {}
    for name, shape in shapes.items():
        sharding = program.parameter_sharding(name)
        padding = _parameter_padding(program, name)
        held = shape if padding is None else padding.held_shape(shape)
        runs = _runs_per_dim(held, sharding, mesh, rank, name)
        blocks = []
        for combination in itertools.product(*[range(len(r)) for r in runs]):
            blocks.append((combination, _read_held_block(index, plan.sources[name], shape,
                                                         [runs[d][i] for d, i in enumerate(combination)], padding)))
        local[name] = _assemble(blocks, [len(r) for r in runs])
    return local


def _parameter_padding(program, name: str):
    """How the program holds ``name`` padded (zero=3, ``ShardedProgram.parameter_padding``), or None."""
    found = getattr(program, "parameter_padding", None)
    return found(name) if found is not None else None


def _read_held_block(index: CheckpointIndex, source: Source, shape, block, padding) -> torch.Tensor:
    """``_read_block`` of a parameter held padded: the rows past the logical size are zeros."""
    if padding is None:
        return _read_block(index, source, shape, block)
    dim = padding.dim
    start, stop = block[dim]
    parts = []
    if min(stop, padding.size) > start:
        parts.append(_read_block(index, source, shape, block[:dim] + [(start, min(stop, padding.size))] + block[dim + 1:]))
    if stop > max(start, padding.size):
        # The dtype of the checkpoint's tensor, from one element of it where the block holds none.
        like = parts[0] if parts else _read_block(index, source, shape, [(a, a + 1) if d != dim else (0, 1)
                                                                         for d, (a, _) in enumerate(block)])
        zeros = [b - a for a, b in block]
        zeros[dim] = stop - max(start, padding.size)
        parts.append(torch.zeros(zeros, dtype=like.dtype))
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]


def _assemble(blocks, counts):
    """Concatenate blocks indexed by their run position per dim (runs are in local order)."""
    if len(counts) == 0:
        return blocks[0][1]

    def build(prefix, dim):
        if dim == len(counts):
            return next(block for key, block in blocks if key == tuple(prefix))
        return torch.cat([build(prefix + [i], dim + 1) for i in range(counts[dim])], dim=dim)

    return build([], 0).contiguous()


def _diverged_ranks(pieces_by_rank, name: str, sharding: Sharding, mesh: MeshSpec) -> list[tuple[int, int]]:
    """``(rank, origin)`` for every rank whose replica differs from the lowest rank holding the same piece."""
    from .runtime.guards import same_bits

    replicate_axes = [axis for axis in sharding.view if sharding.placement(axis).is_replicate()]
    diverged = []
    for rank in mesh.ranks:
        coordinates = mesh.coords(rank)
        if not any(coordinates[axis] for axis in replicate_axes):
            continue
        origin = mesh.rank_of(**{a: (0 if a in replicate_axes else coordinates[a]) for a in sharding.view})
        if not same_bits(pieces_by_rank[rank][name], pieces_by_rank[origin][name]):
            diverged.append((rank, origin))
    return diverged


def _layout(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    return {key: (tuple(t.shape), str(t.dtype).replace("torch.", "")) for key, t in tensors.items()}


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _written_layout(path: str) -> dict[str, tuple]:
    """Keys, shapes and dtypes of a safetensors file, read from its header alone."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    return {key: (tuple(entry["shape"]), _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"]))
            for key, entry in header.items() if key != "__metadata__"}


def _refuse_other_layout(directory: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse to write beside a checkpoint of another layout: loading would read the old one, or a mix."""
    if not os.path.isdir(directory):
        return
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        raise CheckpointError(
            f"{directory} holds a sharded checkpoint ({os.path.basename(index)}); a model.safetensors written beside "
            f"it would never be read (the index is read first): save into an empty directory")
    shards = sorted(name for name in os.listdir(directory)
                    if name.endswith(".safetensors") and name != "model.safetensors")
    if shards:
        raise CheckpointError(f"{directory} holds other safetensors files {shards[:4]}; save into an empty directory "
                              f"rather than mix two checkpoints")
    _refuse_layout_change(os.path.join(directory, "model.safetensors"), tensors)


def _refuse_layout_change(existing: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse to overwrite a file holding other keys, shapes or dtypes: that is another model's."""
    if not os.path.exists(existing):
        return
    old, new = _written_layout(existing), _layout(tensors)
    if old != new:
        differences = [f"{key!r} {old.get(key, 'absent')} -> {new.get(key, 'absent')}"
                       for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
        raise CheckpointError(
            f"{existing} is a checkpoint of another layout ({len(differences)} keys differ: "
            f"{'; '.join(differences[:4])}{' ...' if len(differences) > 4 else ''}); overwriting it would replace "
            f"another model's checkpoint: save into an empty directory or remove it first")


def _write_atomically(tensors: Mapping[str, torch.Tensor], path: str,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write to a temporary name in the same directory, flush it to disk, then rename over ``path``."""
    from safetensors.torch import save_file

    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        save_file(dict(tensors), temporary, metadata={"format": "pt", **(metadata or {})})
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_checkpoint(pieces_by_rank: Sequence[Mapping[str, torch.Tensor]], program, directory: str,
                    plan: LoadPlan | None = None, *, keep: str | None = None,
                    buffers: Mapping[str, torch.Tensor] | None = None) -> str:
    """Assemble full tensors from every rank's pieces and write one safetensors file.

    With the ``plan`` a checkpoint was loaded with, keys are written as they were read
    (per-expert keys split back out), so loading what was saved gives identical tensors. The
    program's persistent buffers are written too, from ``buffers`` (full tensors by name) or
    else the program's ``default_buffers``. Replicas that differ between ranks are refused,
    naming the parameter and the ranks, unless ``keep="rank0"``: then the copy of the lowest
    ranks (coordinate 0 on every replicated axis; rank 0's where rank 0 holds one) is written.
    """
    if keep not in (None, "rank0"):
        raise ValueError(f"save_checkpoint: keep must be None (refuse diverged replicas) or 'rank0', got {keep!r}")
    mesh = program.mesh
    if keep is None:
        diverged = []
        for name in program.parameter_names:
            for rank, origin in _diverged_ranks(pieces_by_rank, name, program.parameter_sharding(name), mesh):
                diverged.append(f"parameter {name!r}: rank {rank}'s replica differs from rank {origin}'s")
        if diverged:
            raise CheckpointError(
                f"replicas that should be identical differ ({len(diverged)} found):\n  " + "\n  ".join(diverged[:8])
                + ("\n  ..." if len(diverged) > 8 else "")
                + "\npass keep='rank0' to save the lowest ranks' copies, or find why the ranks diverged")
    tensors: dict[str, torch.Tensor] = {}
    for name in program.parameter_names:
        sharding = program.parameter_sharding(name)
        shape = tuple(program.traced.parameter_shapes[name])
        padding = _parameter_padding(program, name)
        held = shape if padding is None else padding.held_shape(shape)
        full = unshard([pieces[name] for pieces in pieces_by_rank], sharding, mesh, global_shape=held, name=name)
        full = full if padding is None else padding.unpad(full)
        source = plan.sources.get(name) if plan is not None else None
        if source is None or source.kind == "direct":
            tensors[source.keys[0] if source else name] = full.contiguous()
        elif source.kind == "experts_stacked":
            for expert, key in enumerate(source.keys):
                tensors[key] = full[expert].contiguous()
        else:
            half = shape[1] // 2
            for expert, (gate, up) in enumerate(source.keys):
                tensors[gate] = full[expert, :half].contiguous()
                tensors[up] = full[expert, half:].contiguous()
    buffers = program.default_buffers if buffers is None else buffers
    missing = [name for name in program.persistent_buffer_names if name not in buffers]
    if missing:
        raise CheckpointError(f"save_checkpoint needs the persistent buffers {missing[:4]}; pass buffers={{name: tensor}}")
    for name in program.persistent_buffer_names:
        if name in tensors:
            raise CheckpointError(f"buffer {name!r} has the name of a parameter key already written")
        tensors[name] = buffers[name].detach().contiguous()
    _refuse_other_layout(directory, tensors)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "model.safetensors")
    _write_atomically(tensors, path)
    return path


def load_buffers(path_or_index, program, rank: int | None = None) -> dict[str, torch.Tensor]:
    """The program's persistent buffers from a checkpoint: full tensors, or ``rank``'s pieces.

    Every buffer is checked before any is read; a missing key or another shape is an error.
    """
    index = path_or_index if isinstance(path_or_index, CheckpointIndex) else CheckpointIndex(path_or_index)
    problems = []
    for name in program.persistent_buffer_names:
        expected = tuple(program.traced.buffer_shapes[name])
        if name not in index.shapes:
            problems.append(f"buffer {name!r} is missing")
        elif index.shapes[name] != expected:
            problems.append(f"key {name!r} has shape {index.shapes[name]}, buffer {name!r} needs {expected}")
    if problems:
        raise CheckpointError("checkpoint does not hold the model's persistent buffers:\n  " + "\n  ".join(problems))
    full = {name: index.read(name, ()) for name in program.persistent_buffer_names}
    if rank is None:
        return full
    return {name: shard(value, program.buffer_sharding(name), program.mesh, rank, name=name)
            for name, value in full.items()}


TRAIN_STATE_FILE = "train_state.safetensors"
# The safetensors header metadata key holding the step and the caller's metadata, as JSON: its
# presence is what tells a training state from a model checkpoint.
_TRAIN_STATE_METADATA = "shardgraph.train_state"


def save_train_state(state, directory: str, metadata: Mapping | None = None) -> str:
    """Write a gathered ``TrainState`` and JSON-serialisable ``metadata`` to ``directory/train_state.safetensors``.

    The write is atomic (temporary name, fsync, rename), so a crash mid-save leaves the previous
    state whole; a file there of another layout (another model or optimizer) is refused.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.parameters.items():
        if ":" in name:
            raise CheckpointError(f"parameter name {name!r} holds ':', which separates optimizer slots in the file")
        tensors[name] = value.detach().cpu().contiguous()
    for name, slots in state.optimizer.items():
        if name not in state.parameters:
            raise CheckpointError(f"optimizer state for {name!r}, which is not a parameter of the state")
        for slot, value in slots.items():
            tensors[f"{name}:{slot}"] = value.detach().cpu().contiguous()
    try:
        header = json.dumps({"step": int(state.step), "metadata": dict(metadata or {})})
    except TypeError as error:
        raise CheckpointError(f"save_train_state: metadata must be JSON-serialisable ({error})") from error
    path = os.path.join(directory, TRAIN_STATE_FILE)
    _refuse_layout_change(path, tensors)
    os.makedirs(directory, exist_ok=True)
    _write_atomically(tensors, path, {_TRAIN_STATE_METADATA: header})
    return path


def load_train_state(path: str):
    """``(TrainState, metadata)`` from ``save_train_state``'s file or its directory; full tensors on the CPU."""
    from safetensors import safe_open

    from .training import TrainState

    if os.path.isdir(path):
        path = os.path.join(path, TRAIN_STATE_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"no training state at {path} (save_train_state writes {TRAIN_STATE_FILE})")
    with safe_open(path, "pt") as handle:
        header = (handle.metadata() or {}).get(_TRAIN_STATE_METADATA)
        if header is None:
            raise CheckpointError(f"{path} is a model checkpoint, not a training state (no optimizer state or step): "
                                  f"load its weights with load_local")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    recorded = json.loads(header)
    parameters = {key: value for key, value in tensors.items() if ":" not in key}
    optimizer: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if ":" in key:
            name, slot = key.rsplit(":", 1)
            if name not in parameters:
                raise CheckpointError(f"{path}: optimizer state {key!r} belongs to no parameter in the file")
            optimizer.setdefault(name, {})[slot] = value
    return TrainState(parameters, optimizer, int(recorded["step"])), recorded["metadata"]


def shard_optimizer_state(state: Mapping[str, Mapping[str, torch.Tensor]], program, rank: int):
    """Per-parameter optimizer state (momentum, Adam moments) sharded exactly like the parameter."""
    result = {}
    for name, entries in state.items():
        sharding = program.parameter_sharding(name)
        shape = tuple(program.traced.parameter_shapes[name])
        padding = _parameter_padding(program, name)
        result[name] = {
            key: shard(value if padding is None else padding.pad(value), sharding, program.mesh, rank,
                       name=f"{name}.{key}")
            if isinstance(value, torch.Tensor) and tuple(value.shape) == shape else value
            for key, value in entries.items()
        }
    return result


def device_mesh_for(mesh: MeshSpec, view: str = "dense", device_type: str = "cpu"):
    """A torch DeviceMesh over this stage's ranks laid out as the view's axes (TP-lane-major)."""
    from torch.distributed.device_mesh import DeviceMesh

    if view == "expert":
        sizes, names = (mesh.edp, mesh.ep, mesh.etp), ("edp", "ep", "etp")
    else:
        sizes, names = (mesh.dp, mesh.tp), ("dp", "tp")
    ranks = torch.arange(mesh.stage).reshape(sizes)
    return DeviceMesh(device_type, ranks, mesh_dim_names=names)


def to_dtensor(local: torch.Tensor, sharding: Sharding, device_mesh, global_shape: Sequence[int] | None = None):
    """Wrap this rank's piece as a DTensor (DCP can then save and reshard it)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, InterleavedShard) for p in sharding.placements):
        raise CheckpointError(
            f"{sharding!r} has no DTensor form (InterleavedShard); save it through save_checkpoint (safetensors)"
        )
    placements = to_dtensor_placements(sharding, tuple(device_mesh.mesh_dim_names))
    kwargs = {"shape": torch.Size(global_shape), "stride": None} if global_shape is not None else {}
    if global_shape is not None:
        strides = [1] * len(global_shape)
        for d in range(len(global_shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * global_shape[d + 1]
        kwargs["stride"] = tuple(strides)
    return DTensor.from_local(local, device_mesh, placements, run_check=False, **kwargs)
