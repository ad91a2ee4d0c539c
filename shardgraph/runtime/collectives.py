"""The communication and layout steps of a redistribution, on any communicator.

Every function takes the rank's communicator first: a ``Communicator``
(``shardgraph/runtime/communicator.py``), the simulator's or ``DistributedCommunicator`` over
torch.distributed. Lowering emits these as fx ``call_function`` nodes with the communicator as a
graph input; the collectives among them (``COLLECTIVE_FUNCTIONS``) are an intermediate form:
``passes/lower_collectives.py`` rewrites each into torch's ``_c10d_functional`` op, its
``wait_tensor`` and the local steps around it (``runtime/c10d.py``), so the finished program
speaks torch's distributed IR. The local steps (slices, zero-pads, scales) stay as they are: they
read only this rank's position in a group. Run directly, these functions compute the same values
as their lowered form (the tests of each pass run them in the simulator).
"""

from __future__ import annotations

import torch

from .communicator import Communicator

__all__ = [
    "all_gather",
    "interleaved_all_gather",
    "reduce_scatter",
    "all_reduce",
    "all_to_all",
    "shard_to_shard",
    "local_slice",
    "local_interleaved_slice",
    "keep_on_first",
    "pad_to_partial",
    "scale",
    "COLLECTIVE_FUNCTIONS",
]


def all_gather(comm: Communicator, tensor: torch.Tensor, axis, dim: int) -> torch.Tensor:
    """Shard(dim) -> Replicate over ``axis``: pieces concatenated in group order."""
    return comm.all_gather(tensor.contiguous(), axis, dim=dim)


def interleaved_all_gather(comm: Communicator, tensor: torch.Tensor, axis, dim: int, stripes: int) -> torch.Tensor:
    """InterleavedShard(dim, stripes) -> Replicate: gather, then put each stripe's parts together.

    After a plain gather the dim reads [rank0: s0 s1 ..][rank1: s0 s1 ..]; the logical order is
    [s0: rank0 rank1 ..][s1: ...], a transpose of the (rank, stripe) grid.
    """
    gathered = comm.all_gather(tensor.contiguous(), axis, dim=dim)
    n = comm.mesh.size(axis)
    dim = dim % gathered.dim()
    size = gathered.shape[dim]
    part = size // (n * stripes)
    shape = list(gathered.shape)
    grid = gathered.reshape(shape[:dim] + [n, stripes, part] + shape[dim + 1 :])
    return grid.transpose(dim, dim + 1).reshape(shape).contiguous()


def reduce_scatter(comm: Communicator, tensor: torch.Tensor, axis, dim: int, op: str) -> torch.Tensor:
    """Partial(op) -> Shard(dim) over ``axis``."""
    return comm.reduce_scatter(tensor.contiguous(), axis, dim=dim, op=op)


def all_reduce(comm: Communicator, tensor: torch.Tensor, axis, op: str) -> torch.Tensor:
    """Partial(op) -> Replicate over ``axis``."""
    return comm.all_reduce(tensor.contiguous(), axis, op=op)


def all_to_all(comm: Communicator, tensor: torch.Tensor, axis, input_splits, dim: int = 0, output_splits=None) -> torch.Tensor:
    return comm.all_to_all(tensor.contiguous(), axis, input_splits, dim=dim, output_splits=output_splits)


def shard_to_shard(comm: Communicator, tensor: torch.Tensor, axis, source_dim: int, dim: int) -> torch.Tensor:
    """Shard(source_dim) -> Shard(dim) over ``axis`` as one all-to-all: block k of the piece
    along ``dim`` goes to member k, the blocks received are joined along ``source_dim``."""
    n = comm.mesh.size(axis)
    blocks = torch.stack(tensor.chunk(n, dim=dim), dim=0)
    received = comm.all_to_all(blocks, axis, [1] * n, dim=0, output_splits=[1] * n)
    return torch.cat(received.unbind(0), dim=source_dim)


def local_slice(comm: Communicator, tensor: torch.Tensor, axis, dim: int) -> torch.Tensor:
    """Replicate -> Shard(dim): this rank's block, no communication."""
    n = comm.mesh.size(axis)
    block = tensor.shape[dim] // n
    return tensor.narrow(dim, comm.index(axis) * block, block).contiguous()


def local_interleaved_slice(comm: Communicator, tensor: torch.Tensor, axis, dim: int, stripes: int) -> torch.Tensor:
    """Replicate -> InterleavedShard(dim, stripes): this rank's part of every stripe."""
    n = comm.mesh.size(axis)
    dim = dim % tensor.dim()
    shape = list(tensor.shape)
    part = shape[dim] // (stripes * n)
    grid = tensor.reshape(shape[:dim] + [stripes, n, part] + shape[dim + 1 :])
    piece = grid.select(dim + 1, comm.index(axis))
    return piece.reshape(shape[:dim] + [stripes * part] + shape[dim + 1 :]).contiguous()


def keep_on_first(comm: Communicator, tensor: torch.Tensor, axis) -> torch.Tensor:
    """Replicate -> Partial("sum"): the first rank of the group keeps the value, others hold zeros."""
    return tensor if comm.index(axis) == 0 else torch.zeros_like(tensor)


def pad_to_partial(comm: Communicator, tensor: torch.Tensor, axis, dim: int) -> torch.Tensor:
    """Shard(dim) -> Partial("sum"): the block in place, zeros elsewhere; no communication."""
    n = comm.mesh.size(axis)
    shape = list(tensor.shape)
    block = shape[dim]
    shape[dim] = block * n
    out = tensor.new_zeros(shape)
    out.narrow(dim, comm.index(axis) * block, block).copy_(tensor)
    return out


def scale(comm: Communicator, tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """Partial(sum) <-> Partial(avg): the pieces' values change, the logical value does not."""
    return tensor * factor


COLLECTIVE_FUNCTIONS = {all_gather, interleaved_all_gather, reduce_scatter, all_reduce, all_to_all, shard_to_shard}
