"""The link model: what a redistribution between two placements costs, in bytes and seconds.

Costs are per rank and per step, for the bandwidth-optimal collective that realises the change on
one axis of ``n`` ranks, where ``b`` is the byte size of the rank's piece *before* the change:

==============================  ======================  ===================
from -> to                      collective              bytes sent per rank
==============================  ======================  ===================
equal                           none                    0
Replicate -> Shard              local slice             0
Replicate -> Partial            keep on one rank        0
Partial(sum) <-> Partial(avg)   local scale             0
Shard -> Replicate              all_gather              b * (n - 1)
Shard(i) -> Shard(j)            all_to_all              b * (n - 1) / n
Partial -> Replicate            all_reduce              2 * b * (n - 1) / n
Partial -> Shard                reduce_scatter          b * (n - 1) / n
Partial -> InterleavedShard     all_reduce + slice      2 * b * (n - 1) / n
Shard -> Partial("sum")         local zero-pad          0 (the piece grows n-fold)
other Shard -> Partial          all_gather              b * (n - 1)
InterleavedShard <-> Shard      all_gather + slice      b * (n - 1)
==============================  ======================  ===================

These are the bytes of the steps ``lower_redistribute.plan_redistribution`` emits for the same
change on one axis (``tests/passes/test_cost.py`` checks every pair), so propagation chooses by
what will run.

Time (alpha-beta). A collective on a group of ``n`` ranks takes ``steps * alpha + sent / bandwidth``,
where ``sent`` is the bytes one rank sends (the column above, and ``meta.Collective.bytes``) and
``steps`` the messages of the bandwidth-optimal (ring / pairwise) algorithm. With ``B`` the
buffer a rank holds (the whole reduced tensor, or the gathered result):

==================  ================================  =========
collective          seconds                           steps
==================  ================================  =========
all_reduce          2 (n-1)/n * B / bw + 2 (n-1) a    2 (n-1)
reduce_scatter      (n-1)/n * B / bw + (n-1) a        n - 1
all_gather          (n-1)/n * B / bw + (n-1) a        n - 1
all_to_all          (n-1)/n * B / bw + (n-1) a        n - 1
==================  ================================  =========

``bw`` is the *bus* bandwidth of the link (what nccl-tests reports as busbw: per GPU, per
direction), so the same formula holds for every kind. ``Link`` is one kind of link (NVLink
within a node, InfiniBand across nodes, gloo over TCP) with its latency per step and its
bandwidth; ``Hardware`` bundles the links with the compute rates (``ComputeRates``: FLOP/s per
dtype for matrix products, memory bandwidth) of one machine type, ``HARDWARE`` holds presets.
``link_model(mesh, hardware)`` gives each mesh axis the link its groups use: ranks are
TP-lane-major, ``gpus_per_node`` consecutive ranks share a node, and an axis with a group that
spans two nodes runs at the inter-node link's rate. ``calibrate_link_model`` measures the real
process group instead (all-reduces at a few sizes per axis, fitted by ``fit_alpha_beta``).

Propagation prices with ``LinkModel.seconds(axis, bytes)`` (one latency per collective, the
default ``LinkModel()``: NVLink-class bandwidth on every axis); its choices do not change with
the presets. The report's predicted step time (``shardgraph/predict.py``) prices each lowered
collective by kind with ``LinkModel.seconds(axis, bytes, kind, group_size)``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from shardgraph.mesh import AxisName, MeshSpec
from shardgraph.placement import InterleavedShard, Partial, Placement, Replicate, Shard

__all__ = ["LinkModel", "redistribution", "Redistribution", "Link", "ComputeRates", "Hardware", "HARDWARE",
           "NVLINK4", "INFINIBAND_NDR", "GLOO_LOOPBACK", "collective_steps", "all_reduce_seconds",
           "all_gather_seconds", "reduce_scatter_seconds", "all_to_all_seconds", "axis_label", "axis_crosses_nodes",
           "link_model", "fit_alpha_beta", "calibrate_link_model", "calibrate_compute"]


def axis_label(axis: AxisName) -> str:
    """``"tp"`` or ``"dp*tp"``: the key of an axis (or tuple of axes) in a ``LinkModel``."""
    return axis if isinstance(axis, str) else "*".join(axis)


# ---------------------------------------------------------------------------------- links
@dataclass(frozen=True)
class Link:
    """One kind of link: seconds per message of a collective (alpha) and bytes per second
    (beta's inverse) per rank, per direction, as a collective's bus bandwidth sees it."""

    name: str
    alpha: float  # seconds per step (one message hop of a ring or pairwise exchange)
    peak_bandwidth: float  # bytes/s per rank per direction, from the datasheet
    efficiency: float = 1.0  # the fraction of it large collectives achieve

    @property
    def bandwidth(self) -> float:
        return self.peak_bandwidth * self.efficiency


# NVLink 4 (H100 / H200 SXM, through NVSwitch): 18 links x 25 GB/s = 450 GB/s per direction per
# GPU (NVIDIA's datasheet: 900 GB/s bidirectional). nccl-tests' all_reduce bus bandwidth on an
# 8-GPU HGX H100 reaches roughly 80% of that without NVLink SHARP: efficiency 0.8 is that
# assumption, not a measurement here. alpha: about 1 us per ring step (small all-reduces over 8
# GPUs take some 10-20 us in NCCL); calibrate on the machine for real numbers.
NVLINK4 = Link("nvlink4", alpha=1e-6, peak_bandwidth=450e9, efficiency=0.8)
# InfiniBand NDR: one 400 Gb/s ConnectX-7 NIC per GPU = 50 GB/s per direction. Efficiency 0.8
# and 5 us per step (a network hop plus the proxy thread) are assumptions of the same kind.
INFINIBAND_NDR = Link("infiniband-ndr-400", alpha=5e-6, peak_bandwidth=50e9, efficiency=0.8)
# gloo between processes of one host over TCP loopback: calibrate_link_model on 2 processes of
# a shared 2-core container fitted about 0.2 ms per step and 0.5-1.1 GB/s (all-reduces of 4 KiB
# - 4 MiB); a larger host does better, so calibrate there.
GLOO_LOOPBACK = Link("gloo-loopback", alpha=200e-6, peak_bandwidth=0.8e9)
# gloo between hosts over 10 Gb/s Ethernet (assumed).
GLOO_ETHERNET = Link("gloo-ethernet-10g", alpha=50e-6, peak_bandwidth=1.25e9, efficiency=0.8)


def collective_steps(kind, group_size: int) -> int:
    """Messages each rank sends in a ring all-reduce (2 (n-1)), or a ring all-gather,
    reduce-scatter or pairwise all-to-all (n-1)."""
    kind = getattr(kind, "value", kind)
    n = group_size
    if n <= 1 or kind not in ("all_reduce", "reduce_scatter", "all_gather", "interleaved_all_gather",
                              "all_to_all"):
        return 0
    return 2 * (n - 1) if kind == "all_reduce" else n - 1


def all_reduce_seconds(buffer_bytes: float, n: int, link: Link) -> float:
    """Ring all-reduce of a ``buffer_bytes`` tensor on ``n`` ranks."""
    return 2 * (n - 1) / n * buffer_bytes / link.bandwidth + 2 * (n - 1) * link.alpha if n > 1 else 0.0


def all_gather_seconds(output_bytes: float, n: int, link: Link) -> float:
    """Ring all-gather whose result (every rank's piece) is ``output_bytes``."""
    return (n - 1) / n * output_bytes / link.bandwidth + (n - 1) * link.alpha if n > 1 else 0.0


def reduce_scatter_seconds(input_bytes: float, n: int, link: Link) -> float:
    """Ring reduce-scatter of an ``input_bytes`` tensor (each rank keeps 1/n)."""
    return (n - 1) / n * input_bytes / link.bandwidth + (n - 1) * link.alpha if n > 1 else 0.0


def all_to_all_seconds(input_bytes: float, n: int, link: Link) -> float:
    """Pairwise all-to-all of ``input_bytes`` per rank, 1/n of it to each rank (1/n stays)."""
    return (n - 1) / n * input_bytes / link.bandwidth + (n - 1) * link.alpha if n > 1 else 0.0


@dataclass(frozen=True)
class LinkModel:
    """Per-axis bandwidth in bytes per second (uni-directional, per rank) and latency in seconds.

    ``seconds(axis, bytes)`` is propagation's price: one ``latency`` plus the bytes over the
    bandwidth. ``seconds(axis, bytes, kind, group_size)`` is a collective's time by the formulas
    of the module docstring: ``latency`` is then alpha, paid once per step of the algorithm.
    Axes are keyed by ``axis_label`` (``"dp*tp"`` for a group of two axes); one missing from
    ``axis_bandwidth`` gets 50 GB/s, from ``axis_latency`` the common ``latency``.
    """

    axis_bandwidth: dict = field(
        default_factory=lambda: {"tp": 450e9, "etp": 450e9, "dp": 450e9, "ep": 450e9, "edp": 450e9}
    )
    latency: float = 5e-6
    axis_latency: dict = field(default_factory=dict)
    # Which link each axis uses ("nvlink4", ...), for the report; empty for a hand-made model.
    axis_link: dict = field(default_factory=dict)

    def bandwidth(self, axis: AxisName) -> float:
        return self.axis_bandwidth.get(axis_label(axis), 50e9)

    def alpha(self, axis: AxisName) -> float:
        return self.axis_latency.get(axis_label(axis), self.latency)

    def seconds(self, axis: AxisName, nbytes: float, kind=None, group_size: int | None = None) -> float:
        if kind is None:
            if nbytes == 0:
                return 0.0
            return self.latency + nbytes / self.bandwidth(axis)
        steps = collective_steps(kind, group_size or 1)
        if steps == 0:
            return 0.0
        return steps * self.alpha(axis) + nbytes / self.bandwidth(axis)


# ---------------------------------------------------------------------------------- compute
@dataclass(frozen=True)
class ComputeRates:
    """What one device computes per second: dense matrix-product FLOP/s by dtype (the peak, and
    the fraction GEMMs achieve), FLOP/s of everything else, and memory bandwidth (the peak and
    the fraction streaming kernels achieve). An op takes max(FLOPs / rate, bytes / bandwidth).

    ``kind_efficiency``: the fraction of the matrix-product peak that a kind of FLOP-bound op
    (``grouped_mm``, ``attention``, ``loss``) reaches, where it differs from ``matmul_efficiency``.
    ``indexing_efficiency``: the fraction of the memory bandwidth that ops moving rows by index
    (gathers, scatters, sorts) reach. ``launch_seconds``: the host's time to issue one kernel;
    a device that runs kernels faster than the host issues them waits for it."""

    name: str
    matmul_flops: dict  # torch.dtype -> peak FLOP/s of a dense matrix product
    matmul_efficiency: float
    vector_flops: float  # elementwise and reductions (no tensor cores)
    memory_bandwidth: float  # bytes/s
    memory_efficiency: float
    kind_efficiency: dict = field(default_factory=dict)
    indexing_efficiency: float = 1.0
    launch_seconds: float = 0.0

    def matmul_rate(self, dtype: torch.dtype | None, kind: str = "matmul") -> float:
        peak = self.matmul_flops.get(dtype) or self.matmul_flops.get(torch.float32) or min(self.matmul_flops.values())
        return peak * self.kind_efficiency.get(kind, self.matmul_efficiency)

    def seconds(self, flops: float, nbytes: float, dtype: torch.dtype | None = None, matmul: bool = False,
                kind: str | None = None) -> float:
        rate = self.matmul_rate(dtype, kind or "matmul") if matmul else self.vector_flops
        efficiency = self.indexing_efficiency if kind == "indexing" else self.memory_efficiency
        return max(flops / rate, nbytes / (self.memory_bandwidth * efficiency))


# H100 SXM5 (NVIDIA datasheet, dense, no sparsity): BF16/FP16 tensor cores 989 TFLOP/s, FP32 67
# TFLOP/s (torch's float32 matmul does not use TF32 unless asked), HBM3 3.35 TB/s. H200 SXM: the
# same compute, HBM3e 4.8 TB/s. The achieved fractions were measured on one H100 by
# ``benchmarks/train_step.py --predict`` (``calibrate_compute`` and ``calibrate_kernels`` on the
# 4-layer Qwen3-30B-A3B-shaped program, batch 2 x 4096, bf16;
# benchmarks/results/train_step_predict_final_h100.json, three variants): its dense products
# reach 0.59-0.64 of the bf16 peak, grouped GEMMs 0.54-0.55, attention forward and backward
# 0.32-0.33 (cuDNN's kernels; FLOPs as counted here), the fused output projection + loss 0.59-0.60;
# streaming kernels 2.90-2.92 TB/s (0.87 of HBM), row gathers and scatters 0.57-0.58 of that; the
# host issues a kernel in 7-7.5 us. The H200 takes the same fractions (the same SMs) of its own
# bandwidth: an assumption until calibrated there.
_HOPPER_FLOPS = {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}
_HOPPER_KINDS = {"grouped_mm": 0.54, "attention": 0.33, "loss": 0.6}
H100_COMPUTE = ComputeRates("h100-sxm", _HOPPER_FLOPS, 0.62, 67e12, 3.35e12, 0.87, kind_efficiency=_HOPPER_KINDS,
                            indexing_efficiency=0.58, launch_seconds=7e-6)
H200_COMPUTE = ComputeRates("h200-sxm", _HOPPER_FLOPS, 0.62, 67e12, 4.8e12, 0.87, kind_efficiency=_HOPPER_KINDS,
                            indexing_efficiency=0.58, launch_seconds=7e-6)
# A small CPU host (the CI container: 2 cores): float32 matmul ~100 GFLOP/s, bf16 slower without
# AMX, ~10 GB/s of memory. Rough; calibrate_compute measures the real one.
CPU_COMPUTE = ComputeRates("cpu", {torch.float32: 100e9, torch.bfloat16: 50e9, torch.float16: 20e9}, 1.0, 20e9,
                           10e9, 1.0)


@dataclass(frozen=True)
class Hardware:
    """One machine type: its compute, its link within a node and across nodes, and how many
    ranks a node holds."""

    name: str
    compute: ComputeRates
    intra_node: Link
    inter_node: Link
    gpus_per_node: int = 8


HARDWARE = {
    "h100": Hardware("h100", H100_COMPUTE, NVLINK4, INFINIBAND_NDR, 8),
    "h200": Hardware("h200", H200_COMPUTE, NVLINK4, INFINIBAND_NDR, 8),
    "cpu": Hardware("cpu", CPU_COMPUTE, GLOO_LOOPBACK, GLOO_ETHERNET, 64),
}

# The axes (and products) a lowered program's collectives name.
_AXES = ("tp", "dp", "ep", "etp", "edp", "pp", ("dp", "tp"), ("ep", "etp"))


def axis_crosses_nodes(mesh: MeshSpec, axis: AxisName, gpus_per_node: int, rank: int | None = None) -> bool:
    """Whether a group of ``axis`` (``rank``'s, or any) holds ranks of two nodes, where node
    ``r // gpus_per_node`` holds rank ``r`` (the TP-lane-major order puts a TP group on one node
    whenever tp divides ``gpus_per_node``)."""
    groups = [mesh.group_of(axis, rank)] if rank is not None else mesh.groups(axis)
    return any(len({member // gpus_per_node for member in group}) > 1 for group in groups)


def link_model(mesh: MeshSpec, hardware: Hardware | str = "h100", gpus_per_node: int | None = None,
               rank: int | None = None) -> LinkModel:
    """The ``LinkModel`` of ``mesh`` on ``hardware``: each axis on the intra-node link, or on the
    inter-node one where a group of it (``rank``'s, or any: the slowest group sets the pace of a
    step every rank takes part in) spans nodes."""
    hardware = HARDWARE[hardware] if isinstance(hardware, str) else hardware
    per_node = gpus_per_node or hardware.gpus_per_node
    links = {}
    for axis in _AXES:
        links[axis_label(axis)] = (hardware.inter_node if axis_crosses_nodes(mesh, axis, per_node, rank)
                                   else hardware.intra_node)
    return LinkModel(axis_bandwidth={a: link.bandwidth for a, link in links.items()},
                     latency=hardware.intra_node.alpha,
                     axis_latency={a: link.alpha for a, link in links.items()},
                     axis_link={a: link.name for a, link in links.items()})


# ---------------------------------------------------------------------------------- calibration
def fit_alpha_beta(sent_bytes: list[float], seconds: list[float], steps: int) -> tuple[float, float]:
    """``(alpha, bandwidth)`` of the least-squares line ``seconds = steps * alpha + sent / bandwidth``.

    A fit on noisy timings can come out with a negative intercept or slope: alpha is then 0 and
    the bandwidth the one the largest size gives."""
    n = len(sent_bytes)
    if n < 2 or len(seconds) != n:
        raise ValueError(f"fit_alpha_beta needs two sizes or more with a time each (got {n} sizes, "
                         f"{len(seconds)} times)")
    mean_x, mean_y = sum(sent_bytes) / n, sum(seconds) / n
    spread = sum((x - mean_x) ** 2 for x in sent_bytes)
    if spread == 0:
        raise ValueError("fit_alpha_beta needs at least two different sizes")
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sent_bytes, seconds)) / spread
    intercept = mean_y - slope * mean_x
    largest = max(range(n), key=sent_bytes.__getitem__)
    if slope <= 0:
        return max(intercept, 0.0) / max(steps, 1), sent_bytes[largest] / seconds[largest]
    if intercept < 0:
        return 0.0, sent_bytes[largest] / seconds[largest]
    return intercept / max(steps, 1), 1.0 / slope


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate_link_model(mesh: MeshSpec, axes=None, sizes=(2**12, 2**16, 2**20, 2**22), repeats: int = 5,
                         warmup: int = 2, device=None) -> LinkModel:
    """Measure every axis of ``mesh`` on the real process groups and fit alpha and bandwidth.

    Call it on every rank at once (under torchrun, or ``runtime.distributed.spawn_gloo``) after
    a ``DistributedCommunicator(mesh)`` registered the groups. Per axis of size > 1, per size (in
    bytes of float32), the median of ``repeats`` all-reduces (the c10d op and its wait, as the
    lowered program issues them); every rank's medians are reduced to their maximum on the
    default group, so all ranks fit the same numbers. Returns the ``LinkModel`` to give
    ``predict_step`` or ``compile(link=...)``."""
    import torch.distributed as dist

    from shardgraph.runtime import c10d

    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu"))
    names = [a for a in (axes or ("tp", "dp", "ep", "etp", "edp")) if mesh.size(a) > 1]
    timings: list[float] = []
    for axis in names:
        group = c10d.group_name(mesh, axis)
        for size in sizes:
            tensor = torch.ones(max(size // 4, 1), dtype=torch.float32, device=device)
            samples = []
            for index in range(warmup + repeats):
                _synchronize(device)
                start = time.perf_counter()
                c10d.WAIT(c10d.ALL_REDUCE(tensor, "sum", group))
                _synchronize(device)
                if index >= warmup:
                    samples.append(time.perf_counter() - start)
            timings.append(statistics.median(samples))
    agreed = torch.tensor(timings, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1 and agreed.numel():
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    agreed = agreed.tolist()
    bandwidth, latency = {}, {}
    for i, axis in enumerate(names):
        n = mesh.size(axis)
        measured = agreed[i * len(sizes):(i + 1) * len(sizes)]
        sent = [2 * (n - 1) / n * (max(size // 4, 1) * 4) for size in sizes]
        latency[axis], bandwidth[axis] = fit_alpha_beta(sent, measured, collective_steps("all_reduce", n))
    # The products of axes (a gradient bucket over dp*tp) get the slowest of their axes.
    for product in (("dp", "tp"), ("ep", "etp")):
        measured_axes = [a for a in product if a in bandwidth]
        if measured_axes:
            bandwidth[axis_label(product)] = min(bandwidth[a] for a in measured_axes)
            latency[axis_label(product)] = max(latency[a] for a in measured_axes)
    common = statistics.median(latency.values()) if latency else 0.0
    return LinkModel(axis_bandwidth=bandwidth, latency=common, axis_latency=latency,
                     axis_link={a: "calibrated" for a in bandwidth})


def calibrate_compute(device="cpu", dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5,
                      name: str = "calibrated", rows: int = 65536, width: int = 2048) -> ComputeRates:
    """``ComputeRates`` measured on ``device``.

    * a ``size`` x ``size`` matrix product in ``dtype``: achieved FLOP/s (so the efficiency is 1);
    * ``out = x + y`` over 64 Mi float32 elements: achieved bytes/s of a streaming kernel;
    * ``index_select`` of ``rows`` rows of ``width`` (``dtype``) in a shuffled order, and
      ``index_copy_`` of them back to their places: the fraction of the streaming bandwidth that
      moving whole rows by index reaches (``indexing_efficiency``; the program's gathers and
      scatters move rows of the hidden size, each to one place);
    * 200 back-to-back kernels on a one-element tensor: the time to issue one (``launch_seconds``),
      where the device's own time is far below the host's.
    FLOP-bound kinds other than the dense product keep its rate (``kind_efficiency`` empty):
    ``shardgraph.predict.calibrate_kernels`` measures a program's own products, grouped GEMMs,
    attention and loss instead."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    elements = 64 * 2**20 if device.type == "cuda" else 4 * 2**20
    x, y = torch.ones(elements, device=device), torch.ones(elements, device=device)
    total = torch.empty_like(x)
    table = torch.randn(rows, width, device=device).to(dtype)
    order = torch.randperm(rows, device=device)
    gathered = torch.empty_like(table)
    tiny = torch.zeros(1, device=device)

    def best(run) -> float:
        times = []
        for _ in range(repeats + 1):
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times[1:])

    def launches():
        for _ in range(200):
            tiny.add_(1.0)

    matmul = 2 * size**3 / best(lambda: torch.mm(a, b))
    stream = 3 * elements * 4 / best(lambda: torch.add(x, y, out=total))
    # Each reads and writes one [rows, width] block, rows in a shuffled order on one side.
    moved = 2 * rows * width * dtype.itemsize
    indexed = 2 * moved / (best(lambda: torch.index_select(table, 0, order, out=gathered))
                           + best(lambda: table.index_copy_(0, order, gathered)))
    return ComputeRates(name, {dtype: matmul}, 1.0, matmul / 16, stream, 1.0,
                        indexing_efficiency=min(indexed / stream, 1.0), launch_seconds=best(launches) / 200)


@dataclass(frozen=True)
class Redistribution:
    kind: str  # none | slice | zero | scale | pad | all_gather | all_to_all | all_reduce | reduce_scatter
    bytes: float


def redistribution(source: Placement, target: Placement, piece_bytes: float, group_size: int) -> Redistribution:
    """The collective that turns ``source`` into ``target`` on one axis, and its bytes per rank."""
    n = group_size
    if source == target or n == 1:
        return Redistribution("none", 0.0)
    if isinstance(source, Replicate):
        if isinstance(target, (Shard, InterleavedShard)):
            return Redistribution("slice", 0.0)
        return Redistribution("zero", 0.0)  # Replicate -> Partial
    if isinstance(source, Partial):
        if isinstance(target, Partial):
            return Redistribution("scale", 0.0)
        if type(target) is Shard:
            return Redistribution("reduce_scatter", piece_bytes * (n - 1) / n)
        # Replicate, or an interleaved shard: reduce whole (then cut locally).
        return Redistribution("all_reduce", 2 * piece_bytes * (n - 1) / n)
    # source is a Shard or InterleavedShard
    if type(source) is Shard and target == Partial("sum"):
        return Redistribution("pad", 0.0)
    if type(source) is Shard and type(target) is Shard:
        # Another dim of a plain shard: one all-to-all (each rank keeps 1/n of its piece).
        return Redistribution("all_to_all", piece_bytes * (n - 1) / n)
    # Any other change (interleaved <-> blocked, a shard to a partial) is what lowering emits:
    # gather whole, then cut locally.
    return Redistribution("all_gather", piece_bytes * (n - 1))
