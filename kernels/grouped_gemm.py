"""The host side of the Triton grouped GEMM: which kernel runs, on what, and how it is launched.

:func:`triton_grouped_mm` (forward, and dgrad with ``transpose_weight``) and
:func:`triton_grouped_mm_wgrad` launch the kernels of :mod:`kernels.grouped_gemm_kernels`, which
say what they compute. A call goes through four steps:

``path``      :func:`select_path` picks ``"tma"``, the Hopper kernels (sm_90+, bf16/fp16, operands
              a TMA descriptor can address), or ``"portable"`` (any dtype, any strides: what the
              CPU interpreter and older GPUs run). :mod:`kernels.grouped_gemm_paths` holds the
              layout rules.
``plan``      everything a launch derives from its operands' layout (path, kernel, compile-time
              arguments, strides, what the compiled kernel is specialized on) is worked out on
              the first call of a layout and kept (:class:`_Plan`); a later call reads only the
              row count M, which changes from call to call with routing.
``schedule``  the Hopper product has three schedules: Triton's software pipeline, the ping-pong
              kernel of :mod:`kernels.grouped_gemm_pingpong`, and torch's own grouped GEMM
              (``torch._grouped_mm``, CUTLASS; :mod:`kernels.grouped_gemm_vendor`); the Hopper
              wgrad has the first and the last. Under ``"auto"`` the first call of a problem
              times those that can run and keeps the fastest (:func:`use_schedule` fixes one), so
              a shape where CUTLASS is ahead never runs the slower kernel.
``launch``    the first call of a problem class runs the kernel's autotuner; later calls take its
              choice and launch the compiled kernel through
              :func:`kernels.triton_release.launcher`, skipping the autotuner's and the JIT's
              per-call work. Host time matters: a grouped GEMM of a small expert batch runs in
              tens of microseconds, about what the generic launch costs on a slow host.

What is remembered between calls is in one object, :data:`CACHES`, whose ``clear()`` forgets it.
:func:`use_config` forces a kernel's configuration (tests and benchmarks check each one), and
:data:`launch_counts` counts launches by kernel, so tests see which code ran.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from typing import NamedTuple

import torch
import triton

from . import grouped_gemm_pingpong as _pingpong
from . import grouped_gemm_vendor as _vendor
from .caches import CACHES, LAUNCH_LOCK, interpreter_guard, multiprocessors
from .grouped_gemm_configs import INTERPRETED, product_tma_config
from .grouped_gemm_kernels import (_grouped_product_kernel, _grouped_product_tma_kernel, _grouped_wgrad_kernel,
                                   _grouped_wgrad_sgd_kernel, _grouped_wgrad_sgd_tma_kernel, _grouped_wgrad_tma_kernel)
from .grouped_gemm_paths import PATHS, device_index, select_path, weight_rows
from .triton_release import launcher, tma_descriptor

# Two more names the benchmark scripts (benchmarks/grouped_gemm*.py) reach through this module.
from .grouped_gemm_configs import prune_product_tma as _prune_product_tma  # noqa: F401
from .grouped_gemm_paths import has_tma as _has_tma  # noqa: F401

__all__ = [
    "triton_grouped_mm",
    "triton_grouped_mm_wgrad",
    "triton_grouped_mm_wgrad_sgd_",
    "select_path",
    "use_config",
    "use_schedule",
    "SCHEDULES",
    "product_tma_config",
    "launch_counts",
    "CACHES",
    "INTERPRETED",
    "PATHS",
]

# Schedules of the Hopper grouped product: Triton's software pipeline (``_grouped_product_tma_kernel``),
# the warp-specialised ping-pong kernel of ``kernels.grouped_gemm_pingpong``, or torch's grouped
# GEMM (``kernels.grouped_gemm_vendor``); "auto" times those that can run once per problem and
# keeps the fastest. The Hopper wgrad chooses between its pipelined kernel and torch's the same way.
SCHEDULES = ("auto", "pipelined", "pingpong", "torch", "triton")

# Kernel launches per implementation, so tests and users can see which code really ran.
launch_counts: collections.Counter = collections.Counter()

# The compiled-kernel cache under the name benchmarks/grouped_gemm_host.py swaps its stand-in
# launchers in and out by (CACHES.clear() empties it in place, so the name stays valid).
_compiled = CACHES.compiled


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def _cdiv(numerator: int, denominator: int) -> int:
    # Plain integer arithmetic: triton.cdiv is a JIT-aware function, several times dearer per
    # call on the host, and the grid is computed on every launch.
    return -(-numerator // denominator)


# ----------------------------------------------------------------------------------------------
# Forced configurations and schedules
# ----------------------------------------------------------------------------------------------

_forced: dict = {}            # kernel -> the configuration use_config() forces
_forced_schedule: list = []   # innermost use_schedule() last


@contextlib.contextmanager
def use_config(kernel, config: triton.Config):
    """Launch ``kernel`` (one of the autotuned kernels of ``kernels.grouped_gemm_kernels``) with
    ``config`` inside the block, without tuning: tests and benchmarks use it to check every
    configuration."""
    _forced[kernel] = config
    try:
        yield
    finally:
        del _forced[kernel]


@contextlib.contextmanager
def use_schedule(schedule: str):
    """Run the Hopper grouped product and wgrad with ``schedule`` (one of :data:`SCHEDULES`) inside
    the block. ``"pingpong"`` raises where that kernel cannot run (another Triton release, a
    device other than sm_90, an untransposed weight whose reduction is not a multiple of its
    block), and the wgrad, which has no ping-pong kernel, runs pipelined; ``"torch"`` raises
    where ``torch._grouped_mm`` cannot take the operands. ``"triton"`` is "auto" among this
    package's Triton kernels only (what they reach without torch's)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown grouped product schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    _forced_schedule.append(schedule)
    try:
        yield
    finally:
        _forced_schedule.pop()


# ----------------------------------------------------------------------------------------------
# Launch plans
# ----------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """What a launch derives from its operands' layout (strides, widths, groups, dtype, device,
    16-byte alignment), computed once per layout: the kernel and path, the compile-time
    arguments, the runtime integers after the row count and its bucket, and the part of the
    compiled kernel's specialization they fix. The row count M (which varies from call to call
    with routing) stays out of it."""

    path: str
    kernel: object
    constexprs: dict
    trailing_ints: tuple
    specialization: tuple
    weight_rows: tuple | None = None  # TMA product: (shape, strides, stored transposed) of the weight matrix
    slots: int = 0                    # TMA product: persistent programs per configuration's PROGRAMS_PER_SM
    pingpong: bool = False            # TMA product: the ping-pong schedule can run these operands
    vendor: bool = False              # TMA product or wgrad: torch._grouped_mm can take these operands


def _specialization(args) -> tuple:
    """Everything about the runtime arguments a compiled kernel may have been specialized on
    (a superset of what Triton's JIT looks at: dtypes, 16-byte alignment, integers equal to one
    or divisible by 16, integer width), and the tensors' device, on which a compiled kernel is
    loaded; so a compiled kernel is reused only where it is valid."""
    key = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            key.append((arg.dtype, arg.device, arg.data_ptr() % 16 == 0))
        elif isinstance(arg, bool) or arg is None:
            key.append(arg)
        elif isinstance(arg, int):
            key.append((arg % 16 == 0, arg == 1, -(2**31) <= arg < 2**31))
        else:
            key.append(arg)
    return tuple(key)


def _logical_weight(w, r, p, stride_r, stride_p) -> torch.Tensor:
    """The weight as ``[groups, R, P]`` (each ``B_g`` the product's right operand): a view."""
    return w.as_strided((w.shape[0], r, p), (w.stride(0), stride_r, stride_p), w.storage_offset())


def _product_plan(x, w, out, offsets, r, p, stride_r, stride_p, experts, requested) -> _Plan:
    chosen = select_path("product", (x, w, out, r, p, stride_r, stride_p), requested)
    # One compiled variant serves every expert count up to 128 (a 128-lane vector costs what a
    # 64-lane one does at 4+ warps).
    e_pow2 = max(128, _next_power_of_two(experts))
    upcast = INTERPRETED and x.dtype != torch.float32
    if chosen == "tma":
        rows = weight_rows(w, r, p, stride_r, stride_p)
        # The interpreter gets a few slots, to exercise the persistent programs' striding.
        slots = multiprocessors(device_index(x)) if x.is_cuda else 4
        # The ping-pong kernel's untransposed weight blocks are BLOCK_R rows deep, as the pipelined kernel's are.
        pingpong = x.is_cuda and _pingpong.available(device_index(x)) and (rows[2] or r % _pingpong.BLOCK_R == 0)
        # The tuning key fixes P, R, E, the bucket and the layout; select_path checked the
        # alignment of x, w and out. What is left: M, the row stride of x, the alignment of
        # offsets, and the device (a compiled kernel is loaded on one).
        vendor = _vendor.runs(x, _logical_weight(w, r, p, stride_r, stride_p))
        return _Plan("tma", _grouped_product_tma_kernel,
                     dict(B_TRANSPOSED=rows[2], E_POW2=e_pow2, UPCAST=upcast), (out.stride(0),),
                     (x.stride(0) % 16, rows[1][0] % 16, offsets.data_ptr() % 16, x.device), rows, slots, pingpong,
                     vendor)
    runtime_ints = (x.stride(0), x.stride(1), w.stride(0), stride_r, stride_p, out.stride(0), out.stride(1))
    return _Plan("portable", _grouped_product_kernel,
                 dict(B_TRANSPOSED=stride_r == 1, E_POW2=e_pow2, IEEE=x.dtype == torch.float32, UPCAST=upcast),
                 runtime_ints, _specialization((x, w, out, offsets, p, r, experts, *runtime_ints)))


def _wgrad_plan(left, right, dw, offsets, num_groups, requested) -> _Plan:
    chosen = select_path("wgrad", (left, right, dw), requested)
    upcast = INTERPRETED and left.dtype != torch.float32
    vendor = False
    if chosen == "tma":
        runtime_ints = (left.stride(0), right.stride(0), dw.stride(0), dw.stride(1))
        kernel, constexprs = _grouped_wgrad_tma_kernel, dict(UPCAST=upcast)
        vendor = _vendor.runs(left, right)
    else:
        runtime_ints = (left.stride(0), left.stride(1), right.stride(0), right.stride(1), *dw.stride())
        kernel, constexprs = _grouped_wgrad_kernel, dict(IEEE=left.dtype == torch.float32, UPCAST=upcast)
    return _Plan(chosen, kernel, constexprs, runtime_ints,
                 _specialization((left, right, dw, offsets, left.shape[1], right.shape[1], num_groups, *runtime_ints)),
                 vendor=vendor)


# ----------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------


def _remembered_wgrad_plan(left, right, dw, shape, offsets, num_groups, path) -> _Plan:
    """The wgrad launch plan for these operands and output ``dw`` (None: one this package
    allocates, contiguous and aligned, of ``shape``), made once per layout."""
    # As for the product: a weight gradient this package allocates is contiguous and aligned.
    contiguous = (shape[1] * shape[2], shape[2], 1)
    dw_stride, dw_alignment = (dw.stride(), dw.data_ptr() % 16) if dw is not None else (contiguous, 0)
    plan_key = ("wgrad", left.stride(), right.stride(), dw_stride, left.shape[1], right.shape[1], num_groups,
                left.dtype, left.device, path, left.data_ptr() % 16, right.data_ptr() % 16, dw_alignment,
                offsets.data_ptr() % 16)
    plan = CACHES.plans.get(plan_key)
    if plan is None:
        planned = dw if dw is not None else torch.empty(shape, dtype=left.dtype, device=left.device)
        plan = CACHES.remember_plan(plan_key, _wgrad_plan(left, right, planned, offsets, num_groups, path))
    return plan


def _launch(kernel, key, grid_of, make_descriptors, args, constexprs, specialization):
    """Launch ``kernel`` for problem ``key``. ``specialization`` holds every argument property the
    compiled kernel may depend on that ``key`` does not already fix: the row count's, and those
    of the launch plan, worked out once per operand layout."""
    config = _forced.get(kernel) or CACHES.tuned.get((kernel, key))
    if config is None:
        # First call for this key: autotune, the configurations' pre-hooks sizing the descriptors.
        # Triton's autotuner keeps per-call state on the kernel object, so callers on several
        # threads (the simulator runs one per rank) tune one at a time.
        with LAUNCH_LOCK:
            kernel[lambda meta: grid_of(meta)](*make_descriptors(None), *args, **constexprs)
            CACHES.tuned[(kernel, key)] = kernel.best_config
        return
    blocks = config.kwargs
    descriptors = make_descriptors(blocks)
    runtime_args = (*descriptors, *args)
    grid = (*grid_of(blocks), 1, 1)[:3]
    if INTERPRETED:
        # The interpreter patches triton.language's module state while a kernel runs, so the
        # simulator's rank threads interpret one kernel at a time.
        with LAUNCH_LOCK:
            kernel.fn.run(*runtime_args, grid=grid, warmup=False, **constexprs, **config.all_kwargs())
        return
    # One compiled kernel per (kernel, problem, specialization), valid for the configuration it
    # was compiled with: comparing that configuration by identity costs nothing, where hashing
    # a triton.Config on every call costs more than the rest of this function.
    compiled_key = (kernel, key, specialization)
    cached = CACHES.compiled.get(compiled_key)
    if cached is None or cached[0] is not config:
        with LAUNCH_LOCK:
            compiled = kernel.fn.run(*runtime_args, grid=grid, warmup=False, **constexprs, **config.all_kwargs())
        # The compiled kernel takes every parameter in signature order, constexprs included (as
        # the JIT passes them): runtime arguments, then the constexprs, then the configuration's.
        trailing = (*constexprs.values(), *blocks.values())
        names = kernel.fn.arg_names
        if list(names[len(runtime_args):]) == [*constexprs, *blocks]:
            device = next(arg for arg in args if isinstance(arg, torch.Tensor)).device.index
            CACHES.compiled[compiled_key] = (config, launcher(compiled, len(descriptors), device), trailing)
        return
    _, launch, trailing = cached
    launch(grid, (*runtime_args, *trailing))


def _no_descriptors(blocks):
    return ()


_SCHEDULE_NEEDS = {
    "pingpong": ("the ping-pong schedule cannot run here (it needs Triton "
                 f"{_pingpong.TRITON_RELEASE}x, an sm_90 device, M < 2**31, and a transposed weight "
                 f"or a reduction that is a multiple of {_pingpong.BLOCK_R})"),
    "torch": ("the torch schedule cannot run here (torch._grouped_mm takes bfloat16 operands on an sm_90+ "
              "device, float32/bfloat16/float16 on the CPU, with 16-byte aligned rows)"),
}


def _choose_schedule(kind: str, can_run: dict, tune_key, runs: dict, forced_config: bool, timeable: bool) -> str:
    """The schedule of a Hopper launch: a forced one (refused, naming what it needs, where it
    cannot run), else under "auto" the fastest of those that can run, timed on the problem's
    first launch (after the pipelined kernel has tuned its configuration) and remembered.
    ``can_run``: schedule -> whether it can take these operands; ``runs``: schedule -> a launch."""
    requested = _forced_schedule[-1] if _forced_schedule else "auto"
    if requested == "pingpong" and "pingpong" not in can_run:
        requested = "pipelined"  # a kernel with no ping-pong variant (the wgrad)
    if requested == "triton":
        can_run, tune_key, requested = {**can_run, "torch": False}, ("triton", tune_key), "auto"
    if requested != "auto":
        if not can_run.get(requested, False):
            raise ValueError(f"grouped {kind}: {_SCHEDULE_NEEDS[requested]}")
        return requested
    # A configuration forced through use_config is one of the pipelined kernel's.
    candidates = [name for name, ok in can_run.items() if ok]
    if forced_config or not timeable or len(candidates) == 1:
        return "pipelined"
    chosen = CACHES.schedules.get(tune_key)
    if chosen is None:
        from triton.testing import do_bench

        candidates = _agreeing(kind, tune_key, candidates, runs)
        times = {name: do_bench(runs[name]) for name in candidates}
        chosen = CACHES.schedules[tune_key] = min(times, key=times.get)
    return chosen


def _agreeing(kind: str, tune_key, candidates: list, runs: dict) -> list:
    """The candidates whose result on this problem's first call matches the pipelined kernel's
    (which runs first, tuning its configuration). Another schedule that raises or disagrees
    (relative error over 1e-2: both accumulate in fp32, so they differ by rounding only) is left
    out with a warning rather than timed: a release of torch or Triton that breaks a kernel on
    some layout then costs speed, never a wrong result. Launches that return nothing (tests'
    stand-ins) are not compared."""
    reference = runs["pipelined"]()
    reference = reference.clone() if isinstance(reference, torch.Tensor) else None
    kept = ["pipelined"]
    for name in candidates:
        if name == "pipelined":
            continue
        try:
            result = runs[name]()
        except Exception as error:  # noqa: BLE001 - any failure of an optional schedule leaves it out
            warnings.warn(f"grouped {kind} {tune_key}: the {name} schedule failed ({type(error).__name__}: {error}); "
                          "it is left out", RuntimeWarning, stacklevel=2)
            continue
        if reference is not None and isinstance(result, torch.Tensor):
            error = ((result.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30)).item()
            if not error < 1e-2:
                warnings.warn(f"grouped {kind} {tune_key}: the {name} schedule's result is {error:.3g} from the "
                              "pipelined kernel's; it is left out", RuntimeWarning, stacklevel=2)
                continue
        kept.append(name)
    return kept


def _remembered_schedule(tune_key, kernel) -> str | None:
    """The schedule "auto" timed for this problem on an earlier call, so that later calls only
    look it up; None where none was timed yet, or where a schedule or a configuration is forced
    (:func:`_choose_schedule` works those out)."""
    if _forced_schedule or kernel in _forced:
        return None
    return CACHES.schedules.get(tune_key)


def _from_torch(counter: str, result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """torch's kernel's result, in the caller's ``out`` where one was given."""
    launch_counts[counter] += 1
    return result if out is None else out.copy_(result)


def _product_schedule(plan: _Plan, tune_key, m: int, run_pipelined, run_pingpong, run_torch=None,
                      on_gpu: bool | None = None) -> str:
    """The schedule of this TMA product launch (:func:`_choose_schedule`); torch's kernel is a
    candidate where ``run_torch`` is given and the plan says torch can take the operands.
    ``on_gpu``: whether the operands are on a GPU, where "auto" can time (the interpreter runs a
    forced schedule or the pipelined one); by default, where the ping-pong kernel can run."""
    can_run = {"pipelined": True, "pingpong": plan.pingpong and m < 2**31,
               "torch": plan.vendor and run_torch is not None}
    runs = {"pipelined": run_pipelined, "pingpong": run_pingpong, "torch": run_torch}
    timeable = plan.pingpong if on_gpu is None else on_gpu
    return _choose_schedule("product", can_run, tune_key, runs, plan.kernel in _forced, timeable)


def _launch_tma_product(plan: _Plan, x, w, out, offsets, m, r, p, experts, m_bucket, specialization,
                        stride_r, stride_p) -> torch.Tensor:
    """The TMA grouped product of a planned call, on the schedule :func:`_product_schedule` picks.
    ``out``: the caller's output, or None to allocate one (not at all where torch's kernel runs:
    it returns its own)."""
    weight_shape, weight_strides, transposed = plan.weight_rows
    slots, x_row_stride = plan.slots, x.stride(0)
    output = [out]

    def out_tensor():
        if output[0] is None:
            output[0] = torch.empty((m, p), dtype=x.dtype, device=x.device)
        return output[0]

    def make_descriptors(blocks):
        if blocks is None:  # sized by the configuration's pre-hook
            block_m = block_p = block_r = 16
            split = 1
        else:
            block_m, block_p, block_r = blocks["BLOCK_M"], blocks["BLOCK_P"], blocks["BLOCK_R"]
            split = blocks["EPILOGUE_SPLIT"]
        weight_block = [block_p, block_r] if transposed else [block_r, block_p]
        return (tma_descriptor(x, [m, r], [x_row_stride, 1], [block_m, block_r]),
                tma_descriptor(w, weight_shape, weight_strides, weight_block),
                tma_descriptor(out_tensor(), [m, p], [p, 1], [block_m, block_p // split]))

    def grid_of(meta):
        upper = (_cdiv(m, meta["BLOCK_M"]) + experts) * _cdiv(p, meta["BLOCK_P"])
        return (max(1, min(slots * meta["PROGRAMS_PER_SM"], upper)),)

    tune_key = (p, r, experts, m_bucket, transposed, x.dtype)

    def pipelined_args():
        return (out_tensor(), offsets, m, p, r, experts, m_bucket, *plan.trailing_ints)

    # Only where another schedule can run (or one is forced) is there a choice: elsewhere the
    # launch costs the host what it did before the other schedules existed.
    if plan.pingpong or plan.vendor or _forced_schedule:
        def run_pipelined():
            _launch(plan.kernel, tune_key, grid_of, make_descriptors, pipelined_args(), plan.constexprs,
                    specialization)
            return out_tensor()

        def run_pingpong():
            _pingpong.grouped_product(make_descriptors, grid_of, out_tensor(), offsets, m, r, p, experts, transposed,
                                      (p, r, experts, transposed, specialization))
            return out_tensor()

        def run_torch():
            return _vendor.product(x, _logical_weight(w, r, p, stride_r, stride_p), offsets)

        schedule = _remembered_schedule(tune_key, plan.kernel)
        if schedule is None:
            schedule = _product_schedule(plan, tune_key, m, run_pipelined, run_pingpong, run_torch, on_gpu=x.is_cuda)
        if schedule == "torch":
            return _from_torch("product_tma_torch", run_torch(), out)
        if schedule == "pingpong":
            launch_counts["product_tma_pingpong"] += 1
            run_pingpong()
            return out_tensor()
    _launch(plan.kernel, tune_key, grid_of, make_descriptors, pipelined_args(), plan.constexprs, specialization)
    return out_tensor()


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def triton_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, w_layout: str = "ekn",
                      transpose_weight: bool = False, out: torch.Tensor | None = None,
                      path: str = "auto") -> torch.Tensor:
    """``x @ W[g]`` per group (``W[g]`` read as ``[K, N]`` from either layout), or ``x @ W[g].T``
    with ``transpose_weight`` (dgrad). Rows after ``offsets[-1]`` are zeros.

    ``out`` may be given (``[M, P]``); tests pass it filled with NaN to prove every element is
    written.
    """
    # B_g is the logical [R, P] operand: R reduced over, P the output width.
    experts, rows_w, cols_w = w.shape
    w_strides = w.stride()
    if w_layout == "ekn":
        r, p, stride_r, stride_p = rows_w, cols_w, w_strides[1], w_strides[2]
    else:
        r, p, stride_r, stride_p = cols_w, rows_w, w_strides[2], w_strides[1]
    if transpose_weight:
        r, p, stride_r, stride_p = p, r, stride_p, stride_r
    m = x.shape[0]
    if m == 0 or p == 0 or experts == 0 or r == 0:
        out = torch.empty((m, p), dtype=x.dtype, device=x.device) if out is None else out
        return out if m == 0 or p == 0 else out.zero_()
    # An output this function allocates is contiguous and aligned: the plan of a call without
    # one is keyed as if it had it, so that nothing is allocated before the schedule is known.
    out_stride, out_alignment = (out.stride(), out.data_ptr() % 16) if out is not None else ((p, 1), 0)
    plan_key = ("product", x.stride(), w_strides, out_stride, r, p, stride_r, stride_p, experts, x.dtype, x.device,
                path, x.data_ptr() % 16, w.data_ptr() % 16, out_alignment, offsets.data_ptr() % 16)
    plan = CACHES.plans.get(plan_key)
    if plan is None:
        planned_out = out if out is not None else torch.empty((m, p), dtype=x.dtype, device=x.device)
        plan = CACHES.remember_plan(
            plan_key, _product_plan(x, w, planned_out, offsets, r, p, stride_r, stride_p, experts, path))
    launch_counts[f"product_{plan.path}"] += 1
    m_bucket = _next_power_of_two(m)
    specialization = (m % 16 == 0, m == 1, m >> 31, m_bucket, *plan.specialization)
    if plan.path == "tma":
        return _launch_tma_product(plan, x, w, out, offsets, m, r, p, experts, m_bucket, specialization,
                                   stride_r, stride_p)
    if out is None:
        out = torch.empty((m, p), dtype=x.dtype, device=x.device)

    def portable_grid(meta):
        return (_cdiv(m, meta["BLOCK_M"]) + experts, _cdiv(p, meta["BLOCK_P"]))

    _launch(plan.kernel, (p, r, experts, m_bucket, stride_r == 1, x.dtype), portable_grid, _no_descriptors,
            (x, w, out, offsets, m, p, r, experts, m_bucket, *plan.trailing_ints), plan.constexprs, specialization)
    return out


def triton_grouped_mm_wgrad(x: torch.Tensor, dout: torch.Tensor, offsets: torch.Tensor, num_groups: int,
                            w_layout: str = "ekn", out: torch.Tensor | None = None,
                            path: str = "auto") -> torch.Tensor:
    """``dW[g] = x_g.T @ dout_g`` written in the weight's storage layout (empty groups: zeros)."""
    m, k = x.shape
    n = dout.shape[1]
    shape = (num_groups, k, n) if w_layout == "ekn" else (num_groups, n, k)
    if num_groups == 0 or k == 0 or n == 0 or m == 0:
        dw = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
        return dw if m else dw.zero_()
    # Each dW[g] is written as left.T @ right: its rows come from `left`, its columns from `right`.
    left, right = (x, dout) if w_layout == "ekn" else (dout, x)
    p1, p2 = left.shape[1], right.shape[1]
    left_strides, right_strides = left.stride(), right.stride()
    plan = _remembered_wgrad_plan(left, right, out, shape, offsets, num_groups, path)
    launch_counts[f"wgrad_{plan.path}"] += 1
    m_bucket = _next_power_of_two(m)
    specialization = (m % 16 == 0, m == 1, m >> 31, m_bucket, *plan.specialization)
    output = [out]

    def dw_tensor():
        if output[0] is None:
            output[0] = torch.empty(shape, dtype=x.dtype, device=x.device)
        return output[0]

    def grid_of(meta):
        return (_cdiv(p1, meta["BLOCK_P1"]) * _cdiv(p2, meta["BLOCK_P2"]), num_groups)

    def tma_descriptors(blocks):
        block_m, block_1, block_2 = (16, 16, 16) if blocks is None else (
            blocks["BLOCK_M"], blocks["BLOCK_P1"], blocks["BLOCK_P2"])
        return (tma_descriptor(left, [m, p1], [left_strides[0], 1], [block_m, block_1]),
                tma_descriptor(right, [m, p2], [right_strides[0], 1], [block_m, block_2]))

    make_descriptors = tma_descriptors if plan.path == "tma" else _no_descriptors
    tune_key = (p1, p2, num_groups, m_bucket, x.dtype)

    def run_pipelined():
        _launch(plan.kernel, tune_key, grid_of, make_descriptors,
                (left, right, dw_tensor(), offsets, m, p1, p2, num_groups, m_bucket, *plan.trailing_ints),
                plan.constexprs, specialization)
        return dw_tensor()

    if plan.vendor or (_forced_schedule and plan.path == "tma"):
        def run_torch():
            return _vendor.wgrad(left, right, offsets)

        schedule_key = ("wgrad", *tune_key)
        schedule = _remembered_schedule(schedule_key, plan.kernel)
        if schedule is None:
            schedule = _choose_schedule("wgrad", {"pipelined": True, "torch": plan.vendor}, schedule_key,
                                        {"pipelined": run_pipelined, "torch": run_torch}, plan.kernel in _forced,
                                        x.is_cuda)
        if schedule == "torch":
            return _from_torch("wgrad_tma_torch", run_torch(), out)
    run_pipelined()
    return dw_tensor()


# The SGD-epilogue twin of each wgrad kernel: same operands and tiles, the parameter in place of dW.
_SGD_KERNELS = {_grouped_wgrad_tma_kernel: _grouped_wgrad_sgd_tma_kernel,
                _grouped_wgrad_kernel: _grouped_wgrad_sgd_kernel}


def triton_grouped_mm_wgrad_sgd_(param: torch.Tensor, x: torch.Tensor, dout: torch.Tensor, offsets: torch.Tensor,
                                 lr: torch.Tensor, num_groups: int, w_layout: str = "ekn",
                                 path: str = "auto") -> torch.Tensor:
    """``param -= lr * dW`` in place, ``dW`` the grouped wgrad of ``x`` and ``dout`` in the
    parameter's layout (never written: each tile of it updates its tile of ``param``), and
    ``sum(float32(dW) ** 2)`` returned (the gradient norm's term). ``lr`` is a 0-dim
    tensor in ``param``'s dtype.

    The kernel runs with the configuration tuned for the plain wgrad of the same problem (tuned
    first, on a scratch output, where there is none yet: tuning the in-place kernel would apply
    the step once per trial)."""
    m, k = x.shape
    n = dout.shape[1]
    if num_groups == 0 or k == 0 or n == 0 or m == 0:
        return torch.zeros((), dtype=torch.float32, device=param.device)
    left, right = (x, dout) if w_layout == "ekn" else (dout, x)
    p1, p2 = left.shape[1], right.shape[1]
    plan = _remembered_wgrad_plan(left, right, param, param.shape, offsets, num_groups, path)
    m_bucket = _next_power_of_two(m)
    tune_key = (p1, p2, num_groups, m_bucket, x.dtype)
    config = _forced.get(plan.kernel) or CACHES.tuned.get((plan.kernel, tune_key))
    if config is None:
        with use_schedule("triton"):
            triton_grouped_mm_wgrad(x, dout, offsets, num_groups, w_layout, path=path)
        config = CACHES.tuned[(plan.kernel, tune_key)]
    blocks = config.kwargs
    launch_counts[f"wgrad_sgd_{plan.path}"] += 1
    grid = (_cdiv(p1, blocks["BLOCK_P1"]) * _cdiv(p2, blocks["BLOCK_P2"]), num_groups)
    partials = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=param.device)
    if plan.path == "tma":
        descriptors = (tma_descriptor(left, [m, p1], [left.stride(0), 1], [blocks["BLOCK_M"], blocks["BLOCK_P1"]]),
                       tma_descriptor(right, [m, p2], [right.stride(0), 1], [blocks["BLOCK_M"], blocks["BLOCK_P2"]]))
        arguments = (*descriptors, left, right, param, lr, partials, offsets, m, p1, p2, num_groups, m_bucket,
                     left.stride(0), right.stride(0), param.stride(0), param.stride(1))
    else:
        arguments = (left, right, param, lr, partials, offsets, m, p1, p2, num_groups, m_bucket, *left.stride(),
                     *right.stride(), *param.stride())
    # No floating-point contraction in the epilogue: an FMA would skip the rounding of
    # ``grad * lr`` and the step would differ from the unfused ops' in the last bit.
    with interpreter_guard(INTERPRETED):
        _SGD_KERNELS[plan.kernel][grid](*arguments, **plan.constexprs,
                                        **{**config.all_kwargs(), "enable_fp_fusion": False})
    return partials.sum()

