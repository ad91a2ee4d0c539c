"""The device code of the fused MoE expert path: three grouped kernels that take the place of a
copy or an elementwise pass of the unfused path (``kernels/fused_moe.py`` launches them and says
where each is used).

Every kernel walks the rows of a grouped layout, group ``g`` spanning rows
``offsets[g-1]:offsets[g]`` (int32 cumulative end offsets, read on the device only, clamped to
``[0, M]`` where they are read), with the row tiles found as the grouped product's are
(``_locate_row_tile`` of :mod:`kernels.grouped_gemm_kernels`):

* ``_gathered_glu_product_kernel``: ``h[r] = act(x[index[r]] @ Wg[g].T) * (x[index[r]] @ Wu[g].T)``
  for the rows ``r`` of group ``g``. The A operand's rows are gathered from ``x`` through the index
  vector as they are loaded, so the hidden states are never copied into expert order; each
  program computes the gate and the up tile of the same output columns (two accumulators, the
  matching gate rows and up rows of ``w_gate_up``) and writes the activated tile, and, for the
  backward, the pre-activation gate and up tiles into ``gate_up`` in the activation's layout.
* ``_glu_dgrad_kernel``: the down product's dgrad ``dh = dout @ W_down[g]`` with the gated
  activation's derivative in its epilogue: it loads the saved gate and up tiles of its output
  columns and writes ``d gate_up`` (``dh * up * act'(gate)`` and ``dh * act(gate)``), so ``dh``
  never reaches memory.
* ``_gathered_wgrad_kernel``: ``dW[g] = dout[rows of g].T @ x[index[rows of g]]``, the gate/up
  weight gradient read from the token rows through the same index vector.

Rows after ``offsets[-1]`` come out as zeros; a weight gradient of an empty group is zeros. The
loads are masked ``tl.load`` of pointers, since a gathered row cannot be a TMA box on Hopper
(the bulk tensor gather is sm_100's), so these kernels run on any CUDA GPU and under the CPU
interpreter alike. Activations: ``ACTIVATION`` 0 silu (SwiGLU), 1 gelu (erf), 2 gelu with the tanh
approximation; ``INTERLEAVED`` puts gate in the even columns and up in the odd ones, else gate
columns come first (the concatenated layout).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .grouped_gemm_configs import glu_dgrad_configs, glu_product_configs, gathered_wgrad_configs, prune_glu
from .grouped_gemm_kernels import _dot, _group_bounds, _group_sizes, _locate_row_tile

# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    """``act(x)`` in float32 (the formulas of ``shardgraph.ops.moe.activation_function``)."""
    if ACTIVATION == 0:
        return x * tl.sigmoid(x)
    elif ACTIVATION == 1:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(z) = 2 sigmoid(2z) - 1


@triton.jit
def _activation_derivative(x, ACTIVATION: tl.constexpr):
    """``act'(x)`` in float32 (``shardgraph.ops.moe.activation_derivative``)."""
    if ACTIVATION == 0:
        sigmoid = tl.sigmoid(x)
        return sigmoid * (1.0 + x * (1.0 - sigmoid))
    elif ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        return cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    else:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        tanh = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        return (0.5 * (1.0 + tanh)
                + 0.5 * x * (1.0 - tanh * tanh) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x))


@triton.jit
def _gate_up_columns(cols, I, INTERLEAVED: tl.constexpr):
    """The gate and the up column (of a ``[.., 2I]`` gate/up matrix) of each output column."""
    if INTERLEAVED:
        return 2 * cols, 2 * cols + 1
    return cols, cols + I


@triton.jit
def _output_tile(offsets_ptr, M, E, P, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, E_POW2: tl.constexpr):
    """(valid, group, rows, row mask, columns, column mask, padding) of this program's output tile.
    Programs are numbered column tile fastest, so those running together read the same gathered
    rows; the grid covers any split of M into E groups (each group adds at most one partial tile),
    so launching needs no host read of the group sizes, and programs past the tiles do nothing."""
    row_tiles = (_group_sizes(offsets_ptr, M, E, E_POW2) + BLOCK_M - 1) // BLOCK_M
    used_rows = tl.minimum(tl.maximum(tl.load(offsets_ptr + E - 1), 0), M)
    padding_tiles = (M - used_rows + BLOCK_M - 1) // BLOCK_M
    tiles_p = (P + BLOCK_P - 1) // BLOCK_P
    row_tile = tl.program_id(0) // tiles_p
    valid = row_tile < tl.sum(row_tiles, 0) + padding_tiles
    group, row_start, row_end, padding = _locate_row_tile(offsets_ptr, row_tile, row_tiles, used_rows, M, E,
                                                          BLOCK_M, E_POW2)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % tiles_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    return valid, group, rows, rows < row_end, cols, cols < P, padding


# ----------------------------------------------------------------------------------------------
# Forward: gathered rows, gate and up products, activation in the epilogue
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=glu_product_configs(), key=["I", "K", "E", "M_BUCKET"],
                 prune_configs_by={"early_config_prune": prune_glu})
@triton.jit
def _gathered_glu_product_kernel(
    x_ptr, index_ptr, w_ptr, h_ptr, gate_up_ptr, offsets_ptr,
    M, I, K, E, M_BUCKET,
    stride_xm, stride_xk, stride_wg, stride_wn, stride_wk, stride_hm, stride_gm,
    ACTIVATION: tl.constexpr, INTERLEAVED: tl.constexpr, SAVE_GATE_UP: tl.constexpr,
    E_POW2: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    valid, group, rows, row_mask, cols, col_mask, padding = _output_tile(offsets_ptr, M, E, I, BLOCK_M, BLOCK_P,
                                                                         E_POW2)
    if valid:
        # The gather: row r of the grouped operand is row index[r] of x. Masked rows read row 0,
        # and their loads are masked anyway.
        sources = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        gate_cols, up_cols = _gate_up_columns(cols, I, INTERLEAVED)
        ks = tl.arange(0, BLOCK_R)
        a_tile = x_ptr + sources[:, None] * stride_xm + ks[None, :] * stride_xk
        w_group = w_ptr + group.to(tl.int64) * stride_wg
        gate_tile = w_group + gate_cols[None, :] * stride_wn + ks[:, None] * stride_wk
        up_tile = w_group + up_cols[None, :] * stride_wn + ks[:, None] * stride_wk
        acc_gate = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        steps = tl.cdiv(K, BLOCK_R)
        if padding:  # rows after the last group: no products, zeros stored
            steps = 0
        for step in range(0, steps):
            k_mask = ks < K - step * BLOCK_R
            a = tl.load(a_tile, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & col_mask[None, :]
            acc_gate = _dot(a, tl.load(gate_tile, mask=w_mask, other=0.0), acc_gate, IEEE, UPCAST)
            acc_up = _dot(a, tl.load(up_tile, mask=w_mask, other=0.0), acc_up, IEEE, UPCAST)
            a_tile += BLOCK_R * stride_xk
            gate_tile += BLOCK_R * stride_wk
            up_tile += BLOCK_R * stride_wk
        mask = row_mask[:, None] & col_mask[None, :]
        row_offsets = rows[:, None].to(tl.int64)
        h = _activation(acc_gate, ACTIVATION) * acc_up
        tl.store(h_ptr + row_offsets * stride_hm + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
        if SAVE_GATE_UP:
            saved = gate_up_ptr + row_offsets * stride_gm
            tl.store(saved + gate_cols[None, :], acc_gate.to(gate_up_ptr.dtype.element_ty), mask=mask)
            tl.store(saved + up_cols[None, :], acc_up.to(gate_up_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Backward: the down product's dgrad, the activation's derivative in the epilogue
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=glu_dgrad_configs(), key=["I", "K", "E", "M_BUCKET"],
                 prune_configs_by={"early_config_prune": prune_glu})
@triton.jit
def _glu_dgrad_kernel(
    dout_ptr, w_ptr, gate_up_ptr, grad_ptr, offsets_ptr,
    M, I, K, E, M_BUCKET,
    stride_dm, stride_dk, stride_wg, stride_wk, stride_wi, stride_gm, stride_om,
    ACTIVATION: tl.constexpr, INTERLEAVED: tl.constexpr,
    E_POW2: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # dh[r, i] = sum_k dout[r, k] * W_down[g][k, i]   (K: the hidden size, I: the intermediate)
    valid, group, rows, row_mask, cols, col_mask, padding = _output_tile(offsets_ptr, M, E, I, BLOCK_M, BLOCK_P,
                                                                         E_POW2)
    if valid:
        row_offsets = rows[:, None].to(tl.int64)
        ks = tl.arange(0, BLOCK_R)
        a_tile = dout_ptr + row_offsets * stride_dm + ks[None, :] * stride_dk
        b_tile = w_ptr + group.to(tl.int64) * stride_wg + ks[:, None] * stride_wk + cols[None, :] * stride_wi
        acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        steps = tl.cdiv(K, BLOCK_R)
        if padding:
            steps = 0
        for step in range(0, steps):
            k_mask = ks < K - step * BLOCK_R
            a = tl.load(a_tile, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_tile, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = _dot(a, b, acc, IEEE, UPCAST)
            a_tile += BLOCK_R * stride_dk
            b_tile += BLOCK_R * stride_wk
        # dh stays in float32: it is never stored (the unfused path rounds it to the operands'
        # dtype before the activation's backward reads it).
        dh = acc
        mask = row_mask[:, None] & col_mask[None, :]
        gate_cols, up_cols = _gate_up_columns(cols, I, INTERLEAVED)
        saved = gate_up_ptr + row_offsets * stride_gm
        gate = tl.load(saved + gate_cols[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(saved + up_cols[None, :], mask=mask, other=0.0).to(tl.float32)
        grad = grad_ptr + row_offsets * stride_om
        tl.store(grad + gate_cols[None, :], (dh * up * _activation_derivative(gate, ACTIVATION)).to(
            grad_ptr.dtype.element_ty), mask=mask)
        tl.store(grad + up_cols[None, :], (dh * _activation(gate, ACTIVATION)).to(grad_ptr.dtype.element_ty),
                 mask=mask)


# ----------------------------------------------------------------------------------------------
# Backward: the gate/up weight gradient from gathered rows
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=gathered_wgrad_configs(), key=["N", "K", "E", "M_BUCKET"])
@triton.jit
def _gathered_wgrad_kernel(
    dout_ptr, x_ptr, index_ptr, dw_ptr, offsets_ptr,
    M, N, K, E, M_BUCKET,
    stride_om, stride_on, stride_xm, stride_xk, stride_dg, stride_dn, stride_dk,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # dW[g][n, k] = sum over the rows r of g of dout[r, n] * x[index[r], k]. Tile index fastest,
    # group slowest: programs running together share one group's rows.
    tiles_k = tl.cdiv(K, BLOCK_K)
    group = tl.program_id(1)
    ns = (tl.program_id(0) // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = (tl.program_id(0) % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = ns < N
    k_mask = ks < K
    row_start, row_end = _group_bounds(offsets_ptr, group, M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    ms = tl.arange(0, BLOCK_M)
    for m in range(row_start, row_end, BLOCK_M):
        rows = m + ms
        row_mask = rows < row_end
        sources = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        d = tl.load(dout_ptr + rows[None, :].to(tl.int64) * stride_om + ns[:, None] * stride_on,
                    mask=n_mask[:, None] & row_mask[None, :], other=0.0)
        x = tl.load(x_ptr + sources[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _dot(d, x, acc, IEEE, UPCAST)
    tl.store(dw_ptr + group.to(tl.int64) * stride_dg + ns[:, None] * stride_dn + ks[None, :] * stride_dk,
             acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])
