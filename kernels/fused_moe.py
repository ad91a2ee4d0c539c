"""The fused MoE expert path: a gathered gate/up product with the gated activation in its
epilogue, the down product's dgrad with the activation's derivative in its epilogue, and the
gate/up weight gradient read through the same gather.

The unfused path of a lowered MoE layer (``passes/lower_moe.py``) copies the token rows into
expert order (``gather_copies``), multiplies them by ``w_gate_up`` into ``gate_up [rows, 2I]``,
runs the activation as a separate pass into ``h [rows, I]``, and in the backward runs the down
dgrad into ``dh [rows, I]`` and the activation's backward as another pass. The fused path::

    h, gate_up = gather_glu_grouped_mm(hidden, index, w_gate_up, offsets, act, interleaved, layout)
                 # row r of the grouped operand is hidden[index[r]], read in the kernel's loads
    down       = grouped_mm(h, w_down, offsets)                        (unchanged)
    ...
    d_gate_up  = glu_grouped_mm_dgrad(d_down, w_down, offsets, gate_up, act, interleaved, layout)
    dW_gate_up = gather_grouped_mm_wgrad(hidden, index, d_gate_up, offsets, experts, layout)
    d_rows     = grouped_mm_dgrad(d_gate_up, w_gate_up, offsets)       (unchanged; the gather's
                 adjoint is the lowering's deterministic gather-and-sum ``scatter_copies``)

The forward saves the pre-activation ``gate_up`` rather than recomputing it in the backward: at
Qwen3-30B-A3B's shapes (H = 2048, I = 768, 65536 token copies) it is 201 MB of bf16 written once
and read once (about 0.12 ms of H100 bandwidth), where recomputing it is a second gate/up product
of 412 GFLOP (about 0.6 ms at 700 TFLOP/s). ``h`` is the down product's input and its wgrad's
operand, so it is kept as the unfused path keeps it.

The three functions are custom ops (``torch.ops.shardgraph.*``) with fake kernels, so lowered
graphs and ``torch.compile`` keep each as one node. Each runs its Triton kernel
(``kernels/fused_moe_kernels.py``) where the Triton backend runs (``kernels.resolve_backend``: a
CUDA device, or the CPU under ``TRITON_INTERPRET=1``), and otherwise the unfused computation
(gather, grouped product, activation) through the selected grouped GEMM backend, so a graph that
holds them is right on every device.

Whether the lowering takes the fused path is :func:`fused_moe_refusal`'s answer, under the mode
set by :func:`set_fused_moe` / :func:`use_fused_moe` / ``SHARDGRAPH_FUSED_MOE`` (read at import):
``"off"`` (the default) never; ``"auto"`` fuses where the hidden states live on a CUDA device and
the grouped GEMM backend is ``auto`` or ``triton``; ``"on"`` wherever the Triton kernels run (the
CPU interpreter too: the tests). Off by default because it is not yet faster where it matters: on
one H100 at the Qwen3-30B-A3B block (8192 tokens) the fused forward and down dgrad beat the
unfused steps (0.85 against 1.00 ms, 0.72 against 1.46 ms) but the gathered wgrad loses (1.21
against 0.88 ms), and the block under inductor takes 6.25 ms fused against 5.21 ms unfused
(benchmarks/results/moe_block_fused_qwen3_h100.json, fused_moe_kernels_h100.json). Since then the
gathered wgrad on a GPU times itself against a gather followed by the plain grouped wgrad on a
problem's first call and keeps the faster (:func:`gather_wgrad_schedule`); on one H100 it took the
gather first, and the block under inductor took 5.58 ms fused against 5.25 unfused
(benchmarks/results/moe_block_qwen3_8192_fused_profile_h100.json: the fused products cost more
than the plain products plus the passes they absorb). Activations fused: ``silu`` (SwiGLU), ``gelu``, ``gelu_tanh``
(``act(gate) * up``), in the concatenated or the interleaved layout, with no expert biases;
anything else (GPT-OSS's clamped SwiGLU, biases) keeps the unfused path.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from . import op_bodies
from . import _dgrad, _forward, _triton_runs, _wgrad, current_backend, resolve_backend
from .validation import GroupedGemmError

__all__ = [
    "FUSED_ACTIVATIONS",
    "FUSED_MODES",
    "gather_glu_grouped_mm",
    "glu_grouped_mm_dgrad",
    "gather_grouped_mm_wgrad",
    "fused_moe_refusal",
    "set_fused_moe",
    "use_fused_moe",
    "fused_moe_mode",
]

FUSED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")  # the kernels' ACTIVATION codes 0, 1, 2
FUSED_MODES = ("auto", "on", "off")
_LAYOUTS = ("ekn", "enk")


def _checked_mode(mode, source: str) -> str:
    if mode not in FUSED_MODES:
        raise GroupedGemmError(f"{source}: unknown fused MoE mode {mode!r}; choose one of {', '.join(FUSED_MODES)}")
    return mode


_mode = _checked_mode(os.environ.get("SHARDGRAPH_FUSED_MOE", "off"), "SHARDGRAPH_FUSED_MOE")


def set_fused_moe(mode: str) -> None:
    """``"auto"``, ``"on"`` or ``"off"``: what the MoE lowering does from now on (graphs lowered
    already keep the path they took)."""
    global _mode
    _mode = _checked_mode(mode, "set_fused_moe")


def fused_moe_mode() -> str:
    return _mode


@contextlib.contextmanager
def use_fused_moe(mode: str):
    previous = _mode
    set_fused_moe(mode)
    try:
        yield
    finally:
        set_fused_moe(previous)


def fused_moe_refusal(hidden: torch.Tensor, activation: str, interleaved: bool, has_bias: bool) -> str | None:
    """Why an MoE layer whose token rows are like ``hidden`` (a real, fake or meta tensor) keeps
    the unfused path under the current mode, or None where it takes the fused one."""
    if _mode == "off":
        return "the fused MoE path is off (kernels.fused_moe.set_fused_moe)"
    if activation not in FUSED_ACTIVATIONS:
        return f"activation {activation!r} (fused: {', '.join(FUSED_ACTIVATIONS)})"
    if has_bias:
        return "expert biases"
    if not _triton_runs(hidden):
        return f"the Triton kernels do not run on {hidden.device} in {hidden.dtype}"
    if _mode == "auto":
        if hidden.device.type != "cuda":
            return f"mode 'auto' fuses on CUDA devices only, the tokens are on {hidden.device}"
        if current_backend() not in ("auto", "triton"):
            return f"the grouped GEMM backend is {current_backend()!r}"
    return None


# ----------------------------------------------------------------------------------------------
# Operand checks (metadata only: they run on fake tensors while tracing)
# ----------------------------------------------------------------------------------------------


def _check_common(op, activation, layout, offsets, w, dtype, device):
    if activation not in FUSED_ACTIVATIONS:
        raise GroupedGemmError(f"{op}: activation {activation!r} is not one of {', '.join(FUSED_ACTIVATIONS)}")
    if layout not in _LAYOUTS:
        raise GroupedGemmError(f"{op}: w_layout must be one of {', '.join(_LAYOUTS)}, got {layout!r}")
    _check_offsets(op, offsets, w.shape[0], device)
    if w.dim() != 3 or w.dtype != dtype or w.device != device:
        raise GroupedGemmError(f"{op}: the weight must be a 3-D {dtype} tensor on {device}, got "
                               f"{tuple(w.shape)} {w.dtype} on {w.device}")


def _check_offsets(op, offsets, groups, device):
    if offsets.dim() != 1 or offsets.dtype != torch.int32 or offsets.shape[0] != groups or offsets.device != device:
        raise GroupedGemmError(f"{op}: offsets must be int32 [{groups}] on {device}, got {offsets.dtype} "
                               f"{tuple(offsets.shape)} on {offsets.device}")


def _check_index(op, x, index):
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise GroupedGemmError(f"{op}: x must be a 2-D floating point tensor, got {tuple(x.shape)} {x.dtype}")
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64) or index.device != x.device:
        raise GroupedGemmError(f"{op}: index must be a 1-D int32/int64 tensor on {x.device}, got {index.dtype} "
                               f"{tuple(index.shape)} on {index.device}")


def _gate_up_shape(w, layout):
    """(2I, K) of a gate/up weight: ``enk`` stores ``[E, 2I, K]``, ``ekn`` ``[E, K, 2I]``."""
    return (w.shape[1], w.shape[2]) if layout == "enk" else (w.shape[2], w.shape[1])


def _check_gather_glu(x, index, w, offsets, activation, layout):
    op = "gather_glu_grouped_mm"
    _check_index(op, x, index)
    _check_common(op, activation, layout, offsets, w, x.dtype, x.device)
    two_i, k = _gate_up_shape(w, layout)
    if k != x.shape[1] or two_i % 2:
        raise GroupedGemmError(f"{op}: w_gate_up ({layout}) {tuple(w.shape)} must hold an even number of gate/up "
                               f"columns over the {x.shape[1]} columns of x")
    return two_i // 2, k


def _down_shape(w, layout):
    """(H, I) of a down weight: ``enk`` stores ``[E, H, I]``, ``ekn`` ``[E, I, H]``."""
    return (w.shape[1], w.shape[2]) if layout == "enk" else (w.shape[2], w.shape[1])


def _check_glu_dgrad(dout, w, offsets, gate_up, activation, layout):
    op = "glu_grouped_mm_dgrad"
    if dout.dim() != 2:
        raise GroupedGemmError(f"{op}: dout must be 2-D, got {tuple(dout.shape)}")
    _check_common(op, activation, layout, offsets, w, dout.dtype, dout.device)
    h, i = _down_shape(w, layout)
    if dout.shape[1] != h or tuple(gate_up.shape) != (dout.shape[0], 2 * i) or gate_up.dtype != dout.dtype:
        raise GroupedGemmError(f"{op}: dout {tuple(dout.shape)}, w_down ({layout}) {tuple(w.shape)} and gate_up "
                               f"{tuple(gate_up.shape)} {gate_up.dtype} do not fit: want dout [rows, {h}], gate_up "
                               f"[rows, {2 * i}] {dout.dtype}")
    return h, i


def _check_gather_wgrad(x, index, dout, offsets, num_groups, layout):
    op = "gather_grouped_mm_wgrad"
    _check_index(op, x, index)
    if layout not in _LAYOUTS:
        raise GroupedGemmError(f"{op}: w_layout must be one of {', '.join(_LAYOUTS)}, got {layout!r}")
    _check_offsets(op, offsets, num_groups, x.device)
    if dout.dim() != 2 or dout.shape[0] != index.shape[0] or dout.dtype != x.dtype or dout.device != x.device:
        raise GroupedGemmError(f"{op}: dout must be [{index.shape[0]}, N] {x.dtype} on {x.device} (one row per "
                               f"index), got {tuple(dout.shape)} {dout.dtype} on {dout.device}")


# ----------------------------------------------------------------------------------------------
# The unfused computations: where the Triton kernels do not run, and the tests' second opinion
# ----------------------------------------------------------------------------------------------


def _act(name, x):
    if name == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


def _act_derivative(name, x):
    # As shardgraph.ops.moe.activation_derivative (the kernels do not import the compiler).
    if name == "silu":
        sigmoid = torch.sigmoid(x)
        return sigmoid * (1 + x * (1 - sigmoid))
    if name == "gelu":
        return 0.5 * (1 + torch.erf(x * 0.7071067811865476)) + x * torch.exp(-0.5 * x * x) * 0.3989422804014327
    k = 0.7978845608028654
    tanh = torch.tanh(k * (x + 0.044715 * x.pow(3)))
    return 0.5 * (1 + tanh) + 0.5 * x * (1 - tanh * tanh) * k * (1 + 3 * 0.044715 * x * x)


def _split(gate_up, interleaved):
    return (gate_up[:, ::2], gate_up[:, 1::2]) if interleaved else gate_up.chunk(2, dim=-1)


def _join(gate, up, interleaved):
    return torch.stack([gate, up], dim=-1).flatten(-2) if interleaved else torch.cat([gate, up], dim=-1)


def composed_gather_glu(x, index, w, offsets, activation, interleaved, layout):
    gate_up = _forward(x.index_select(0, index), w, offsets, layout)
    gate, up = _split(gate_up, interleaved)
    return _act(activation, gate) * up, gate_up


def composed_glu_dgrad(dout, w, offsets, gate_up, activation, interleaved, layout):
    dh = _dgrad(dout, w, offsets, layout)
    gate, up = _split(gate_up, interleaved)
    return _join(dh * up * _act_derivative(activation, gate), dh * _act(activation, gate), interleaved)


def composed_gather_wgrad(x, index, dout, offsets, num_groups, layout):
    return _wgrad(x.index_select(0, index), dout, offsets, num_groups, layout)


# ----------------------------------------------------------------------------------------------
# The Triton launches
# ----------------------------------------------------------------------------------------------


def _launch_kernel(kernel, name, key, grid_of, args, constexprs):
    from .grouped_gemm import _launch, _no_descriptors, _specialization, launch_counts

    m, m_bucket = args[5], args[9]  # every kernel's runtime arguments: five tensors, then M ... M_BUCKET
    specialization = (m % 16 == 0, m == 1, m >> 31, m_bucket, *_specialization(args))
    launch_counts[name] += 1
    _launch(kernel, (*key, *constexprs.values()), grid_of, _no_descriptors, args, constexprs, specialization)


def _bits(dtype):
    from .grouped_gemm_configs import INTERPRETED

    return dict(IEEE=dtype == torch.float32, UPCAST=INTERPRETED and dtype != torch.float32)


def _e_pow2(experts: int) -> int:
    # As the grouped product: one compiled variant for every expert count up to 128.
    return max(128, 1 << max(0, (experts - 1).bit_length()))


def _triton_gather_glu(x, index, w, offsets, activation, interleaved, layout, i, k):
    from .fused_moe_kernels import _gathered_glu_product_kernel
    from .grouped_gemm import _cdiv, _next_power_of_two

    m, experts = index.shape[0], w.shape[0]
    h = torch.empty((m, i), dtype=x.dtype, device=x.device)
    gate_up = torch.empty((m, 2 * i), dtype=x.dtype, device=x.device)
    if m == 0 or i == 0:
        return h, gate_up
    if experts == 0 or k == 0:
        return h.zero_(), gate_up.zero_()
    stride_wn, stride_wk = (w.stride(1), w.stride(2)) if layout == "enk" else (w.stride(2), w.stride(1))
    m_bucket = _next_power_of_two(m)
    constexprs = dict(ACTIVATION=FUSED_ACTIVATIONS.index(activation), INTERLEAVED=bool(interleaved), SAVE_GATE_UP=True,
                      E_POW2=_e_pow2(experts), **_bits(x.dtype))

    def grid_of(meta):
        return ((_cdiv(m, meta["BLOCK_M"]) + experts) * _cdiv(i, meta["BLOCK_P"]),)

    _launch_kernel(_gathered_glu_product_kernel, "gather_glu_product", (i, k, experts, m_bucket, x.dtype), grid_of,
                   (x, index, w, h, gate_up, offsets, m, i, k, experts, m_bucket, x.stride(0), x.stride(1),
                    w.stride(0), stride_wn, stride_wk, h.stride(0), gate_up.stride(0)), constexprs)
    return h, gate_up


def _triton_glu_dgrad(dout, w, offsets, gate_up, activation, interleaved, layout, hidden, i):
    from .fused_moe_kernels import _glu_dgrad_kernel
    from .grouped_gemm import _cdiv, _next_power_of_two

    m, experts = dout.shape[0], w.shape[0]
    grad = torch.empty((m, 2 * i), dtype=dout.dtype, device=dout.device)
    if m == 0 or i == 0:
        return grad
    if experts == 0 or hidden == 0:
        return grad.zero_()
    stride_wk, stride_wi = (w.stride(1), w.stride(2)) if layout == "enk" else (w.stride(2), w.stride(1))
    m_bucket = _next_power_of_two(m)
    constexprs = dict(ACTIVATION=FUSED_ACTIVATIONS.index(activation), INTERLEAVED=bool(interleaved),
                      E_POW2=_e_pow2(experts), **_bits(dout.dtype))

    def grid_of(meta):
        return ((_cdiv(m, meta["BLOCK_M"]) + experts) * _cdiv(i, meta["BLOCK_P"]),)

    _launch_kernel(_glu_dgrad_kernel, "glu_dgrad", (i, hidden, experts, m_bucket, dout.dtype), grid_of,
                   (dout, w, gate_up, grad, offsets, m, i, hidden, experts, m_bucket, dout.stride(0), dout.stride(1),
                    w.stride(0), stride_wk, stride_wi, gate_up.stride(0), grad.stride(0)), constexprs)
    return grad


def _triton_gather_wgrad(x, index, dout, offsets, num_groups, layout):
    from .fused_moe_kernels import _gathered_wgrad_kernel
    from .grouped_gemm import _cdiv, _next_power_of_two

    m, n, k = index.shape[0], dout.shape[1], x.shape[1]
    shape = (num_groups, n, k) if layout == "enk" else (num_groups, k, n)
    dw = torch.empty(shape, dtype=x.dtype, device=x.device)
    if num_groups == 0 or n == 0 or k == 0:
        return dw
    if m == 0:
        return dw.zero_()
    stride_dn, stride_dk = (dw.stride(1), dw.stride(2)) if layout == "enk" else (dw.stride(2), dw.stride(1))
    m_bucket = _next_power_of_two(m)

    def grid_of(meta):
        return (_cdiv(n, meta["BLOCK_N"]) * _cdiv(k, meta["BLOCK_K"]), num_groups)

    _launch_kernel(_gathered_wgrad_kernel, "gather_wgrad", (n, k, num_groups, m_bucket, x.dtype), grid_of,
                   (dout, x, index, dw, offsets, m, n, k, num_groups, m_bucket, dout.stride(0), dout.stride(1),
                    x.stride(0), x.stride(1), dw.stride(0), stride_dn, stride_dk), _bits(x.dtype))
    return dw


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------

_library = torch.library.Library("shardgraph", "FRAGMENT")
_library.define("gather_glu_grouped_mm(Tensor x, Tensor index, Tensor w_gate_up, Tensor offsets, str activation, "
                "bool interleaved, str w_layout) -> (Tensor, Tensor)")
_library.define("glu_grouped_mm_dgrad(Tensor dout, Tensor w_down, Tensor offsets, Tensor gate_up, str activation, "
                "bool interleaved, str w_layout) -> Tensor")
_library.define("gather_grouped_mm_wgrad(Tensor x, Tensor index, Tensor dout, Tensor offsets, SymInt num_groups, "
                "str w_layout) -> Tensor")


def gather_glu_grouped_mm(x, index, w_gate_up, offsets, activation="silu", interleaved=False, w_layout="enk"):
    """``(h, gate_up)``: ``gate_up[r] = x[index[r]] @ W[g]`` for the rows ``r`` of group ``g``
    (``W[g]`` read as ``[K, 2I]`` from either layout) and ``h = act(gate) * up``, gate and up
    split in the activation's layout. Rows after ``offsets[-1]`` are zeros in both."""
    i, k = _check_gather_glu(x, index, w_gate_up, offsets, activation, w_layout)
    if resolve_backend(x, w_gate_up) == "triton":
        return _triton_gather_glu(x, index, w_gate_up, offsets, activation, interleaved, w_layout, i, k)
    return composed_gather_glu(x, index, w_gate_up, offsets, activation, interleaved, w_layout)


def glu_grouped_mm_dgrad(dout, w_down, offsets, gate_up, activation="silu", interleaved=False, w_layout="enk"):
    """The gradient of ``gate_up`` through ``h = act(gate) * up`` and ``down = h @ W_down[g]``,
    given the gradient ``dout`` of ``down`` (rows in expert order) and the saved ``gate_up``."""
    hidden, i = _check_glu_dgrad(dout, w_down, offsets, gate_up, activation, w_layout)
    if resolve_backend(dout, w_down) == "triton":
        return _triton_glu_dgrad(dout, w_down, offsets, gate_up, activation, interleaved, w_layout, hidden, i)
    return composed_glu_dgrad(dout, w_down, offsets, gate_up, activation, interleaved, w_layout)


def gather_grouped_mm_wgrad(x, index, dout, offsets, num_groups, w_layout="enk"):
    """``dW[g] = x[index[rows of g]].T @ dout[rows of g]`` in the weight's storage layout (empty
    groups: zeros)."""
    _check_gather_wgrad(x, index, dout, offsets, num_groups, w_layout)
    if resolve_backend(x, dout) == "triton":
        def gathered():
            return _triton_gather_wgrad(x, index, dout, offsets, num_groups, w_layout)

        def gather_first():
            return composed_gather_wgrad(x, index, dout, offsets, num_groups, w_layout)

        key = ("gather_wgrad", dout.shape[1], x.shape[1], num_groups, index.shape[0].bit_length(), w_layout, x.dtype)
        chosen = gather_wgrad_schedule(key, gathered, gather_first, x.is_cuda)
        return gather_first() if chosen == "gather_first" else gathered()
    return composed_gather_wgrad(x, index, dout, offsets, num_groups, w_layout)


def gather_wgrad_schedule(key, gathered, gather_first, timeable: bool) -> str:
    """How the gathered wgrad runs: ``"gathered"`` (the Triton kernel reading rows through the
    index) or ``"gather_first"`` (the rows copied into expert order, then the grouped wgrad on
    whichever schedule it picks).

    The gathered kernel saves the copy (rows x K written and read once) but loads its rows
    scattered, and on Hopper it has none of the plain wgrad's other schedules (torch's kernel
    among them), so neither wins everywhere. On a GPU the two are timed on a problem's first call,
    after checking that they agree, and the faster is kept for the problem (``key``); elsewhere
    (the interpreter), and while a grouped GEMM schedule or configuration is forced, the gathered
    kernel runs, so tests and forced runs see the kernel they ask about."""
    from .grouped_gemm import _choose_schedule, _forced, _forced_schedule

    if not timeable or _forced_schedule or _forced:
        return "gathered"
    # The timed choice names its reference "pipelined": the gathered kernel is that here.
    chosen = _choose_schedule("gathered wgrad", {"pipelined": True, "gather_first": True}, key,
                              {"pipelined": gathered, "gather_first": gather_first}, False, True)
    return "gathered" if chosen == "pipelined" else chosen


op_bodies.impl(_library, "gather_glu_grouped_mm", gather_glu_grouped_mm)
op_bodies.impl(_library, "glu_grouped_mm_dgrad", glu_grouped_mm_dgrad)
op_bodies.impl(_library, "gather_grouped_mm_wgrad", gather_grouped_mm_wgrad)


@torch.library.register_fake("shardgraph::gather_glu_grouped_mm", lib=_library)
def _(x, index, w_gate_up, offsets, activation, interleaved, w_layout):
    i, _ = _check_gather_glu(x, index, w_gate_up, offsets, activation, w_layout)
    return x.new_empty((index.shape[0], i)), x.new_empty((index.shape[0], 2 * i))


@torch.library.register_fake("shardgraph::glu_grouped_mm_dgrad", lib=_library)
def _(dout, w_down, offsets, gate_up, activation, interleaved, w_layout):
    _, i = _check_glu_dgrad(dout, w_down, offsets, gate_up, activation, w_layout)
    return dout.new_empty((dout.shape[0], 2 * i))


@torch.library.register_fake("shardgraph::gather_grouped_mm_wgrad", lib=_library)
def _(x, index, dout, offsets, num_groups, w_layout):
    _check_gather_wgrad(x, index, dout, offsets, num_groups, w_layout)
    n, k = dout.shape[1], x.shape[1]
    return x.new_empty((num_groups, n, k) if w_layout == "enk" else (num_groups, k, n))
