"""torch's distributed IR as a lowered program speaks it: group names, the ops, the local steps.

A lowered program's collectives are ``torch.ops._c10d_functional`` ops, each followed by an
explicit ``wait_tensor``, on process groups named by ``group_name(mesh, axis)``. The name does
not depend on the rank: every process registers *its own* group of each mesh axis under the
same name (``register_groups``), so the graph is the same on every rank, as ``torch.compile``
and the program fingerprint need. The simulator runs the same graph with
``SimulatedCollectives`` (a thread-local dispatch mode that hands each c10d op to the thread's
rank of the simulator), torch.distributed runs it directly (gloo or NCCL), and ``torch.compile``
traces it like any other op (inductor has lowerings for these ops and overlaps by their waits).

c10d's ops are dim-0 collectives with sum/max reductions. What a placement change needs beyond
that (a gather along another dim, an interleaved gather, a reduce-scatter along dim d, the
``Shard(i) -> Shard(j)`` all-to-all, pieces of different lengths, an average) is a c10d op
plus the pure local steps below, emitted as graph nodes around it (``passes/lower_collectives.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..mesh import AxisName, MeshSpec

__all__ = [
    "C10D",
    "ISSUE_OPS",
    "WAIT",
    "group_name",
    "axis_of_group",
    "is_issue",
    "is_wait",
    "register_groups",
    "SimulatedCollectives",
    "contiguous",
    "dim_to_front",
    "front_to_dim",
    "interleaved_from_front",
    "split_for_all_to_all",
    "join_after_all_to_all",
    "row_count",
    "HOST_LIST_STEPS",
    "host_list",
    "repeat_for_members",
    "piece_splits",
    "own_rows",
    "as_matrix",
]

C10D = torch.ops._c10d_functional
ALL_GATHER = C10D.all_gather_into_tensor.default
REDUCE_SCATTER = C10D.reduce_scatter_tensor.default
ALL_REDUCE = C10D.all_reduce.default
ALL_TO_ALL = C10D.all_to_all_single.default
WAIT = C10D.wait_tensor.default
ISSUE_OPS = frozenset({ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE, ALL_TO_ALL})

_PREFIX = "shardgraph"


def _label(axis: AxisName) -> str:
    return axis if isinstance(axis, str) else "*".join(axis)


def group_name(mesh: MeshSpec, axis: AxisName) -> str:
    """The one name every rank's group of ``axis`` is registered under, for this mesh.

    The mesh is part of the name so that two programs of different meshes in one process (a
    test, a re-shard) never resolve each other's groups."""
    shape = f"w{mesh.world}pp{mesh.pp}tp{mesh.tp}ep{mesh.ep}etp{mesh.etp}"
    return f"{_PREFIX}/{shape}/{_label(axis)}"


def axis_of_group(name: str) -> AxisName:
    """The mesh axis (or tuple of axes) a ``group_name`` names."""
    if not isinstance(name, str) or not name.startswith(_PREFIX + "/"):
        raise ValueError(f"{name!r} is not a shardgraph process-group name (group_name(mesh, axis))")
    label = name.rsplit("/", 1)[1]
    return label if "*" not in label else tuple(label.split("*"))


def is_issue(node) -> bool:
    return getattr(node, "op", None) == "call_function" and node.target in ISSUE_OPS


def is_wait(node) -> bool:
    return getattr(node, "op", None) == "call_function" and node.target is WAIT


def register_groups(mesh: MeshSpec, groups: dict) -> None:
    """Register this process's group of each axis under its ``group_name``.

    ``groups``: axis -> this rank's ``ProcessGroup`` of it (None for a group of one, which a
    lowered program never addresses: lowering leaves axes of size 1 out). A name registered
    before (a second communicator of the same mesh) is replaced by this one's group."""
    registry = torch._C._distributed_c10d
    for axis, group in groups.items():
        if group is None:
            continue
        name = group_name(mesh, axis)
        try:
            registry._unregister_process_group(name)
        except Exception:  # noqa: BLE001 - not registered yet
            pass
        registry._register_process_group(name, group)


class SimulatedCollectives(TorchDispatchMode):
    """Runs c10d ops against one simulated rank: ``with SimulatedCollectives(comm): gm(...)``.

    The simulator runs each rank in its own thread; dispatch modes are thread-local, so each
    thread's c10d ops go to its own rank's communicator, which records the bytes as before.
    A collective completes when issued (the simulator's rendezvous), so ``wait_tensor`` returns
    its input. Every other op runs as it would."""

    def __init__(self, comm):
        super().__init__()
        self.comm = comm

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "_c10d_functional":
            return func(*args, **kwargs)
        if func is WAIT:
            return args[0]
        comm = self.comm
        if func is ALL_GATHER:
            tensor, _size, name = args
            return comm.all_gather(tensor, axis_of_group(name), dim=0)
        if func is REDUCE_SCATTER:
            tensor, op, _size, name = args
            return comm.reduce_scatter(tensor, axis_of_group(name), dim=0, op=op)
        if func is ALL_REDUCE:
            tensor, op, name = args
            return comm.all_reduce(tensor, axis_of_group(name), op=op)
        if func is ALL_TO_ALL:
            tensor, output_splits, input_splits, name = args
            return comm.all_to_all(tensor, axis_of_group(name), list(input_splits), dim=0,
                                   output_splits=list(output_splits))
        raise NotImplementedError(f"the simulator does not run {func} (lowered programs emit "
                                  f"{', '.join(str(op) for op in sorted(ISSUE_OPS, key=str))} and wait_tensor)")


# The local steps that return host lists of row counts (here and in ``runtime/moe.py``): no
# tensor of their own to size (the report) and no device work to price (the prediction).
HOST_LIST_STEPS = ("split_sizes", "host_list", "piece_splits")


# ---------------------------------------------------------------------------------- local steps
# Pure functions of tensors (and, where a step needs this rank's position, the communicator):
# the layout work around a dim-0 collective.
def contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in one dense block, as a collective's buffer must be."""
    return tensor.contiguous()


def dim_to_front(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """``dim`` moved to the front, contiguous: the layout a dim-0 collective reads."""
    return tensor.movedim(dim, 0).contiguous() if dim % max(tensor.dim(), 1) else tensor.contiguous()


def front_to_dim(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of ``dim_to_front``."""
    return tensor.movedim(0, dim).contiguous() if dim % max(tensor.dim(), 1) else tensor


def interleaved_from_front(gathered: torch.Tensor, dim: int, group_size: int, stripes: int) -> torch.Tensor:
    """An all-gather of ``InterleavedShard(dim, stripes)`` pieces (gathered along dim 0 after
    ``dim_to_front``) put back in logical order: after a plain gather the dim reads
    [rank0: s0 s1 ..][rank1: s0 s1 ..]; the logical order is [s0: rank0 rank1 ..][s1: ...], a
    transpose of the (rank, stripe) grid."""
    gathered = front_to_dim(gathered, dim)
    dim = dim % gathered.dim()
    shape = list(gathered.shape)
    part = shape[dim] // (group_size * stripes)
    grid = gathered.reshape(shape[:dim] + [group_size, stripes, part] + shape[dim + 1:])
    return grid.transpose(dim, dim + 1).reshape(shape).contiguous()


def split_for_all_to_all(tensor: torch.Tensor, dim: int, group_size: int) -> torch.Tensor:
    """``Shard(i) -> Shard(dim)``, before the exchange: the piece cut into ``group_size`` blocks
    along ``dim``, stacked on a new dim 0 (block k goes to member k)."""
    return torch.stack(tensor.chunk(group_size, dim=dim), dim=0)


def join_after_all_to_all(received: torch.Tensor, source_dim: int) -> torch.Tensor:
    """``Shard(source_dim) -> Shard(j)``, after the exchange: the blocks received from the members
    (dim 0, in group order) put together along ``source_dim``."""
    return torch.cat(received.unbind(0), dim=source_dim)


def row_count(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's row count as a one-element tensor on the tensor's device (what a GPU
    communicator gathers)."""
    return torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)


def host_list(tensor: torch.Tensor) -> list[int]:
    """Row counts read on the host (the sizes the next collectives are cut by)."""
    return [int(v) for v in tensor.tolist()]


def repeat_for_members(tensor: torch.Tensor, group_size: int) -> torch.Tensor:
    """This rank's piece once per member, in one block: the input of an all-to-all that sends the
    whole piece to every member, which is an all-gather of pieces of different lengths. The
    receiver's output splits are the members' lengths, so nothing is padded, no maximum is taken
    on the host, and a compiled graph keeps the lengths symbolic instead of specialising on them."""
    return tensor.contiguous().repeat((group_size,) + (1,) * (tensor.dim() - 1))


def piece_splits(tensor: torch.Tensor, group_size: int) -> list:
    """The input splits of ``repeat_for_members``' all-to-all: the piece's length, per member."""
    return [tensor.shape[0]] * group_size


def own_rows(comm, total: torch.Tensor, axis: AxisName, sizes: Sequence[int]) -> torch.Tensor:
    """This rank's segment of rows that every member of ``axis`` holds in group order."""
    position = comm.index(axis)
    # The sizes stay as given (host ints eagerly, unbacked sizes under torch.compile): int() of
    # one would specialise the compiled graph on this step's counts.
    return total.narrow(0, sum(sizes[:position]), sizes[position])


def as_matrix(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    return tensor.reshape(rows, -1)
