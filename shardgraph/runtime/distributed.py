"""The torch.distributed runtime: one process per rank, gloo on CPU or NCCL on GPU.

``DistributedCommunicator`` has the simulator communicator's methods, so a lowered program runs
unchanged under either. Collectives go through torch's functional collectives
(``torch.distributed._functional_collectives``), each on the process group of one mesh group.
Every group of every axis is created up front, in the same order on every rank, as
``torch.distributed.new_group`` requires.

``spawn_gloo(fn, world)`` starts ``world`` local CPU processes with a gloo group and returns each
rank's result: the tests use it, and ``torchrun`` users call ``init_from_environment`` instead.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ..mesh import AxisName, MeshSpec

__all__ = ["DistributedCommunicator", "init_from_environment", "spawn_gloo"]

_AXES_USED = ("tp", "dp", "ep", "etp", "edp", ("dp", "tp"), ("ep", "etp"))


def _key(axis: AxisName) -> tuple:
    return (axis,) if isinstance(axis, str) else tuple(axis)


class DistributedCommunicator:
    """This process's rank of ``mesh`` over an initialised default process group."""

    def __init__(self, mesh: MeshSpec, rank: int | None = None):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call init_from_environment() first")
        self.mesh = mesh
        self.rank = dist.get_rank() if rank is None else rank
        if dist.get_world_size() != mesh.world:
            raise ValueError(
                f"the process group has {dist.get_world_size()} ranks but the mesh {mesh} needs {mesh.world}"
            )
        self.backend = dist.get_backend()
        self._groups: dict[tuple, Any] = {}
        for axis in _AXES_USED:
            for members in mesh.groups(axis):
                group = dist.new_group(list(members)) if len(members) > 1 else None
                if self.rank in members:
                    self._groups[_key(axis)] = (members, group)

    def group(self, axis: AxisName) -> tuple[int, ...]:
        return self.mesh.group_of(axis, self.rank)

    def index(self, axis: AxisName) -> int:
        return self.mesh.index(axis, self.rank)

    def _process_group(self, axis):
        members, group = self._groups[_key(axis)]
        return members, group

    # The functional collectives return async tensors; wait() makes the value concrete before
    # ordinary eager code reads it.
    def all_reduce(self, tensor: torch.Tensor, axis: AxisName, op: str = "sum", tag: str = "") -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        members, group = self._process_group(axis)
        if group is None:
            return tensor.clone()
        reduce_op = {"sum": "sum", "avg": "sum", "max": "max"}[op]
        out = funcol.wait_tensor(funcol.all_reduce(tensor.contiguous(), reduce_op, group))
        return out / len(members) if op == "avg" else out

    def all_gather(self, tensor: torch.Tensor, axis: AxisName, dim: int = 0, sizes: Sequence[int] | None = None,
                   tag: str = "") -> torch.Tensor:
        """Pieces concatenated in group order. ``sizes`` gives every member's length along ``dim``
        where they differ (expert token counts); without it the pieces are equal, as every shard of
        a placement is, and nothing is read on the host."""
        from torch.distributed import _functional_collectives as funcol

        members, group = self._process_group(axis)
        if group is None:
            return tensor.clone()
        dim = dim % max(tensor.dim(), 1)
        moved = tensor.movedim(dim, 0).contiguous()
        if sizes is None:
            return funcol.wait_tensor(funcol.all_gather_tensor(moved, 0, group)).movedim(0, dim).contiguous()
        # Pad to the longest piece, gather, and cut the padding off again.
        lengths = [int(s) for s in sizes]
        longest = max(lengths)
        if moved.shape[0] < longest:
            pad = moved.new_zeros((longest - moved.shape[0],) + tuple(moved.shape[1:]))
            moved = torch.cat([moved, pad])
        gathered = funcol.wait_tensor(funcol.all_gather_tensor(moved, 0, group))
        pieces = [gathered[i * longest : i * longest + n] for i, n in enumerate(lengths)]
        return torch.cat(pieces).movedim(0, dim).contiguous()

    def reduce_scatter(self, tensor: torch.Tensor, axis: AxisName, dim: int = 0, op: str = "sum", tag: str = "") -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        members, group = self._process_group(axis)
        if group is None:
            return tensor.clone()
        n = len(members)
        moved = tensor.movedim(dim, 0).contiguous()
        if self.backend == "gloo":
            # gloo has no reduce-scatter: all-reduce, then keep this rank's block.
            total = funcol.wait_tensor(funcol.all_reduce(moved, "sum", group))
            block = total.shape[0] // n
            out = total[self.index(axis) * block : (self.index(axis) + 1) * block]
        else:
            out = funcol.wait_tensor(funcol.reduce_scatter_tensor(moved, "sum", 0, group))
        out = out / n if op == "avg" else out
        return out.movedim(0, dim).contiguous()

    def all_to_all(self, tensor: torch.Tensor, axis: AxisName, input_splits: Sequence[int], dim: int = 0,
                   output_splits: Sequence[int] | None = None, tag: str = "") -> torch.Tensor:
        """Rows ``input_splits[i]`` go to member ``i``. Without ``output_splits`` the receive sizes
        are exchanged first (one more small all-to-all and a host read)."""
        from torch.distributed import _functional_collectives as funcol

        members, group = self._process_group(axis)
        if group is None:
            return tensor.clone()
        input_splits = [int(s) for s in input_splits]
        moved = tensor.movedim(dim, 0).contiguous()
        if output_splits is None:
            counts = torch.tensor(input_splits, dtype=torch.long, device=tensor.device)
            output_splits = funcol.wait_tensor(
                funcol.all_to_all_single(counts, [1] * len(members), [1] * len(members), group)
            ).tolist()
        output_splits = [int(s) for s in output_splits]
        out = funcol.wait_tensor(funcol.all_to_all_single(moved, output_splits, input_splits, group))
        return out.movedim(0, dim).contiguous()

    def broadcast(self, tensor: torch.Tensor, axis: AxisName, source_index: int = 0, tag: str = "") -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        members, group = self._process_group(axis)
        if group is None:
            return tensor.clone()
        return funcol.wait_tensor(funcol.broadcast(tensor.contiguous(), members[source_index], group))


def init_from_environment(backend: str | None = None) -> None:
    """Initialise the default group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...)."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, *args)
        torch.save({"result": result}, path)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"error": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_gloo(fn: Callable[..., Any], world: int, *args) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``world`` local processes over gloo; return results by rank."""
    import torch.multiprocessing as mp

    port = _free_port()
    with tempfile.TemporaryDirectory() as result_dir:
        context = mp.start_processes(_worker, args=(world, port, fn, args, result_dir), nprocs=world,
                                     join=False, start_method="spawn")
        try:
            while not context.join(timeout=300):
                pass
        except Exception as error:
            messages = []
            for rank in range(world):
                path = os.path.join(result_dir, f"rank{rank}.pt")
                if os.path.exists(path):
                    record = torch.load(path, weights_only=False)
                    if "error" in record:
                        messages.append(f"rank {rank}:\n{record['error']}")
            raise RuntimeError("gloo ranks failed:\n" + "\n".join(messages)) from error
        results = []
        for rank in range(world):
            record = torch.load(os.path.join(result_dir, f"rank{rank}.pt"), weights_only=False)
            results.append(record["result"])
        return results
