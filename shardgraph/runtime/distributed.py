"""The torch.distributed runtime: one process per rank, gloo on CPU or NCCL on GPU.

A lowered program's collectives are ``torch.ops._c10d_functional`` ops on groups named by
``c10d.group_name(mesh, axis)``; ``DistributedCommunicator`` creates the groups and registers
this rank's group of each axis under that name, so the program runs here as it is (eagerly or
under ``torch.compile``). It also has the simulator communicator's methods, for the local steps
that read this rank's position and for code that calls collectives directly. Collectives go through torch's functional collectives
(``torch.distributed._functional_collectives``), each on the process group of one mesh group.
Every group of every axis is created up front, in the same order on every rank, as
``torch.distributed.new_group`` requires.

``spawn_gloo(fn, world)`` starts ``world`` local CPU processes with a gloo group and returns each
rank's result: the tests use it, and ``torchrun`` users call ``init_from_environment`` instead.

Both take a ``timeout`` (seconds or a ``timedelta``) for the process group and every group made
from it: a rank that stops answering then turns into an error after that long instead of a hang.
A collective that fails is re-raised as ``CollectiveFailure`` naming its kind, axis, group and
the members that never reached it (``guards.collective_failure``); before any group is created
the ranks check that they were all given the same mesh (``docs/runtime.md``).
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import functools
import gc
import os
import signal
import tempfile
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ..mesh import AxisName, MeshSpec
from .c10d import register_groups
from .guards import CollectiveFailure, ProgramMismatchError, collective_failure, fingerprint_mismatch

__all__ = ["DistributedCommunicator", "gather_objects", "init_from_environment", "spawn_gloo", "with_named_failures"]

# Every axis, and every product of two or more axes of one view: a value partial over several
# axes is all-reduced once over their product group (lower_redistribute).
_AXES_USED = ("tp", "dp", "ep", "etp", "edp", ("dp", "tp"), ("ep", "etp"), ("edp", "ep"), ("edp", "etp"),
              ("edp", "ep", "etp"))
# The timeout given to init_from_environment / spawn_gloo in this process: torch's new_group
# does not inherit the default group's timeout, so every group made here is given it again.
_timeout: datetime.timedelta | None = None


def _key(axis: AxisName) -> tuple:
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _as_timedelta(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds or a timedelta, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def _seconds(timeout: datetime.timedelta | None) -> float | None:
    return timeout.total_seconds() if timeout is not None else None


@contextlib.contextmanager
def _gloo_groups_with_one_worker():
    """While inside, ``dist.new_group`` gives a gloo group one worker thread instead of two.

    Why: a gloo group runs its queued collectives on a pool of worker threads (two per device by
    default), so two collectives of one group run at once whenever the program issues the next
    before waiting on the previous, which the schedule does to overlap communication. With two
    collectives of one group in flight the gloo ranks corrupted their heap (SIGSEGV, or glibc's
    "malloc(): unaligned tcache chunk detected") in about 5 of 8 runs of 300 ZeRO-3 AdamW steps
    on 4 processes; with one worker thread per group none of 12 such runs did. One worker
    keeps each group's collectives in issue order, as NCCL runs a communicator's collectives on
    one stream, while they still run behind the rank's compute. torch's ``new_group`` passes no
    options to gloo, so the class it constructs is swapped for the time of the call.
    """
    module = dist.distributed_c10d
    original = getattr(module, "ProcessGroupGloo", None)
    if original is None or not hasattr(original, "_Options"):
        yield
        return

    class OneWorkerGloo(original):
        def __init__(self, store, rank, size, timeout=datetime.timedelta(minutes=30), *args, **kwargs):
            if args or kwargs or not isinstance(timeout, datetime.timedelta):
                super().__init__(store, rank, size, timeout, *args, **kwargs)
                return
            options = original._Options()
            options._timeout = timeout
            # The devices torch's own constructor would make: GLOO_SOCKET_IFNAME's interfaces, if set.
            interfaces = [name for name in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if name]
            options._devices = ([original.create_device(interface=name) for name in interfaces]
                                or [original.create_default_device()])
            options._threads = 1
            super().__init__(store, rank, size, options)

    module.ProcessGroupGloo = OneWorkerGloo
    try:
        yield
    finally:
        module.ProcessGroupGloo = original


def _all_gather_single(funcol):
    # all_gather_single is all_gather_tensor's newer name (torch 2.9+), which warns on the old one.
    return getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def gather_objects(obj: Any, what: str, timeout: datetime.timedelta | None = None) -> list[Any]:
    """``all_gather_object`` over every rank; a failure or timeout names ``what`` and the ranks missing."""
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered: list[Any] = [None] * world
    try:
        dist.all_gather_object(gathered, obj)
    except RuntimeError as error:
        raise collective_failure(f"{what} (all_gather_object over all {world} ranks)", rank, range(world), error,
                                 _seconds(timeout or _timeout)) from error
    return gathered


def _named_failures(kind: str):
    """Re-raise a backend error from the collective as a ``CollectiveFailure`` naming it.

    The happy path costs a counter increment: the call number tells apart the n-th all-reduce
    of a group from the next one when ranks disagree on where they are.
    """

    def wrap(method):
        @functools.wraps(method)
        def guarded(self, tensor, axis, *args, **kwargs):
            key = _key(axis)
            self._calls[key] = self._calls.get(key, 0) + 1
            try:
                return method(self, tensor, axis, *args, **kwargs)
            except CollectiveFailure:
                raise
            except RuntimeError as error:
                members = self._groups[key][0] if key in self._groups else ()
                label = axis if isinstance(axis, str) else "*".join(axis)
                what = f"{kind} over {label} group {tuple(members)} (call #{self._calls[key]} on that group)"
                raise collective_failure(what, self.rank, members, error, _seconds(self.timeout)) from error

        return guarded

    return wrap


class DistributedCommunicator:
    """This process's rank of ``mesh`` over an initialised default process group.

    ``timeout`` (seconds or timedelta) bounds every collective of its groups; by default the one
    given to ``init_from_environment`` / ``spawn_gloo``, else torch's default (30 minutes).
    """

    def __init__(self, mesh: MeshSpec, rank: int | None = None, timeout: float | datetime.timedelta | None = None):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call init_from_environment() first")
        self.mesh = mesh
        self.rank = dist.get_rank() if rank is None else rank
        if dist.get_world_size() != mesh.world:
            raise ValueError(
                f"rank {self.rank}: the process group has {dist.get_world_size()} ranks but the mesh {mesh} needs "
                f"{mesh.world}"
            )
        self.timeout = _as_timedelta(timeout) or _timeout
        self.backend = dist.get_backend()
        self._calls: dict[tuple, int] = {}
        self._in_flight: dict[int, tuple] = {}  # a c10d op's result -> (kind, axis, call number)
        # Ranks given different meshes would create different groups below, in a different
        # order, and hang inside new_group: agree on the mesh first.
        meshes = gather_objects(str(mesh), "the mesh check before creating process groups", self.timeout)
        if len(set(meshes)) > 1:
            raise ProgramMismatchError(f"rank {self.rank}: " + fingerprint_mismatch([{"mesh": m} for m in meshes]))
        self._groups: dict[tuple, Any] = {}
        with _gloo_groups_with_one_worker():
            for axis in _AXES_USED:
                for members in mesh.groups(axis):
                    group = dist.new_group(list(members), timeout=self.timeout) if len(members) > 1 else None
                    if self.rank in members:
                        self._groups[_key(axis)] = (members, group)
        # The lowered program's c10d ops name their groups by axis, the same name on every rank:
        # each rank registers its own group of each axis under it.
        register_groups(mesh, {axis: self._groups[_key(axis)][1] for axis in _AXES_USED})

    def group(self, axis: AxisName) -> tuple[int, ...]:
        return self.mesh.group_of(axis, self.rank)

    def _failure(self, kind: str, axis, call: int, error: BaseException) -> CollectiveFailure:
        members = self._groups[_key(axis)][0] if _key(axis) in self._groups else ()
        label = axis if isinstance(axis, str) else "*".join(axis)
        what = f"{kind} over {label} group {tuple(members)} (call #{call} on that group)"
        return collective_failure(what, self.rank, members, error, _seconds(self.timeout))

    def index(self, axis: AxisName) -> int:
        return self.mesh.index(axis, self.rank)

    def _process_group(self, axis):
        members, group = self._groups[_key(axis)]
        return members, group

    # The functional collectives return async tensors; wait() makes the value concrete before
    # ordinary eager code reads it.
    @_named_failures("all_reduce")
    def all_reduce(self, tensor: torch.Tensor, axis: AxisName, op: str = "sum", tag: str = "") -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        members, group = self._process_group(axis)
        if group is None:
            return tensor.clone()
        reduce_op = {"sum": "sum", "avg": "sum", "max": "max"}[op]
        out = funcol.wait_tensor(funcol.all_reduce(tensor.contiguous(), reduce_op, group))
        return out / len(members) if op == "avg" else out

    @_named_failures("all_gather")
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
            return funcol.wait_tensor(_all_gather_single(funcol)(moved, 0, group)).movedim(0, dim).contiguous()
        # Pad to the longest piece, gather, and cut the padding off again.
        lengths = [int(s) for s in sizes]
        longest = max(lengths)
        if moved.shape[0] < longest:
            pad = moved.new_zeros((longest - moved.shape[0],) + tuple(moved.shape[1:]))
            moved = torch.cat([moved, pad])
        gathered = funcol.wait_tensor(_all_gather_single(funcol)(moved, 0, group))
        pieces = [gathered[i * longest : i * longest + n] for i, n in enumerate(lengths)]
        return torch.cat(pieces).movedim(0, dim).contiguous()

    @_named_failures("reduce_scatter")
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

    @_named_failures("all_to_all")
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

    @_named_failures("broadcast")
    def broadcast(self, tensor: torch.Tensor, axis: AxisName, source_index: int = 0, tag: str = "") -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        members, group = self._process_group(axis)
        if group is None:
            return tensor.clone()
        return funcol.wait_tensor(funcol.broadcast(tensor.contiguous(), members[source_index], group))


def init_from_environment(backend: str | None = None, timeout: float | datetime.timedelta | None = None) -> None:
    """Initialise the default group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...).

    ``timeout`` (seconds or timedelta) is how long a collective waits for the other ranks before
    it fails; a rank that stops answering is then reported by name instead of hanging the job.
    The groups a ``DistributedCommunicator`` creates in this process get the same timeout.
    """
    global _timeout
    timeout = _as_timedelta(timeout)
    if dist.is_initialized():
        _timeout = timeout or _timeout
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    _timeout = timeout
    if timeout is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, timeout=timeout)


def _worker(rank: int, world: int, fn, args, result_dir: str, timeout) -> None:
    global _timeout
    # A native crash (a signal in the backend) prints every thread's Python stack to stderr,
    # which the parent's test output keeps: without it such a rank dies with no trace at all.
    faulthandler.enable(all_threads=True)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    path = os.path.join(result_dir, f"rank{rank}.pt")
    # A file in this run's own directory as the rendezvous: a free TCP port picked by the parent
    # can be taken by another process on a busy machine before rank 0 binds it.
    rendezvous = f"file://{os.path.join(result_dir, 'rendezvous')}"
    try:
        _timeout = timeout
        if timeout is None:
            dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
        else:
            dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world, timeout=timeout)
        result = fn(rank, *args)
        torch.save({"result": result}, path)
        # Every rank done with every collective before any closes its connections: a rank that
        # tears down while a peer is still reading from it is the backend's least tested path.
        dist.barrier()
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"error": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            # The axis groups a communicator registered by name (runtime/c10d.py) are dropped
            # first, so no group outlives the default one into the interpreter's shutdown.
            torch._C._distributed_c10d._unregister_all_process_groups()
            dist.destroy_process_group()
            # Groups that Python objects still hold (a communicator cached by a program) are
            # freed now, while the interpreter is whole, not during its shutdown.
            gc.collect()


def _rank_failures(context, result_dir: str, world: int) -> list[str]:
    """One line (or a traceback) per rank that did not end cleanly: its Python error, or the
    signal or exit code it died with and whether that came before or after its result was saved
    (a crash in the backend's teardown leaves a result behind)."""
    messages = []
    for rank in range(world):
        path = os.path.join(result_dir, f"rank{rank}.pt")
        try:
            record = torch.load(path, weights_only=False) if os.path.exists(path) else None
        except Exception:  # noqa: BLE001 - a rank that died while writing it
            record = None
        if record is not None and "error" in record:
            messages.append(f"rank {rank}:\n{record['error']}")
            continue
        exitcode = context.processes[rank].exitcode
        if exitcode in (0, None):
            continue
        if exitcode == -signal.SIGTERM:
            messages.append(f"rank {rank}: stopped by the parent once another rank had failed")
            continue
        try:
            how = f"signal {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exit code {exitcode}"
        except ValueError:
            how = f"signal {-exitcode}"
        when = "after saving its result (in teardown)" if record is not None else "before finishing"
        messages.append(f"rank {rank}: died with {how} {when}")
    return messages


def spawn_gloo(fn: Callable[..., Any], world: int, *args, timeout: float | datetime.timedelta | None = None) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``world`` local processes over gloo; return results by rank.

    ``timeout`` is the process groups' timeout (see ``init_from_environment``).
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as result_dir:
        context = mp.start_processes(_worker, args=(world, fn, args, result_dir, _as_timedelta(timeout)),
                                     nprocs=world, join=False, start_method="spawn")
        try:
            while not context.join(timeout=300):
                pass
        except Exception as error:
            raise RuntimeError("gloo ranks failed:\n" + "\n".join(_rank_failures(context, result_dir, world))) from error
        results = []
        for rank in range(world):
            record = torch.load(os.path.join(result_dir, f"rank{rank}.pt"), weights_only=False)
            results.append(record["result"])
        return results


# ---------------------------------------------------------------------------------- named failures
def _guarded_issue(op, comm: "DistributedCommunicator", kind: str, axis, *args):
    """A c10d op of the program, counted per group; a backend error names the collective."""
    key = _key(axis)
    comm._calls[key] = comm._calls.get(key, 0) + 1
    try:
        out = op(*args)
    except RuntimeError as error:
        raise comm._failure(kind, axis, comm._calls[key], error) from error
    comm._in_flight[id(out)] = (kind, axis, comm._calls[key])
    return out


def _guarded_wait(tensor, comm: "DistributedCommunicator"):
    """The wait of a c10d op; a timeout or backend error names the collective it waited for."""
    kind, axis, call = comm._in_flight.pop(id(tensor), ("collective", "?", 0))
    try:
        return torch.ops._c10d_functional.wait_tensor.default(tensor)
    except RuntimeError as error:
        raise comm._failure(kind, axis, call, error) from error


def with_named_failures(gm):
    """A copy of a lowered program whose c10d ops and waits name the collective when they fail
    (``CollectiveFailure``: kind, axis, group, call number, ranks missing), for eager runs under
    torch.distributed. The ops are the same; each costs one Python call more. Programs run under
    ``torch.compile`` run the plain graph (inductor owns the calls there)."""
    from torch.fx import GraphModule

    from .. import meta
    from . import c10d

    graph = torch.fx.Graph()
    mapping: dict = {}
    output = graph.graph_copy(gm.graph, mapping, return_output_node=True)
    graph.output(output[0] if isinstance(output, tuple) else output)
    comm = meta.communicator_node(graph)
    for node in list(graph.nodes):
        if c10d.is_issue(node):
            record = meta.collective(node)
            node.args = (node.target, comm, record.kind.value, record.axis, *node.args)
            node.target = _guarded_issue
        elif c10d.is_wait(node):
            node.args = (node.args[0], comm)
            node.target = _guarded_wait
    result = GraphModule(gm, graph)
    result.recompile()
    return result
