"""The steps of expert-parallel dispatch, as functions a lowered graph calls one by one.

Forward on one rank, whose tokens are its own (already split over dp and tp)::

    order, tokens_per_expert = sort_by_expert(topk_ids, num_experts)
    received_counts          = all_to_all(counts over ep)            # [ep, local experts]
    send_sizes, recv_sizes   = split_sizes(tokens_per_expert, received_counts)   # host sync
    copies                   = gather_copies(hidden, order, top_k)
    received                 = all_to_all(copies over ep, send_sizes)
    (etp > 1: received, counts gathered over etp, so every etp rank sees the expert's tokens)
    grouped, permutation, offsets = group_by_local_expert(received, counts)
    gate_up  = grouped_mm(grouped, w_gate_up)                        # [n, 2I/etp]
    (gate_up bias: add_expert_bias(gate_up, gate_up_bias, offsets))
    act      = glu(gate_up, activation)                              # [n, I/etp]
    down     = grouped_mm(act, w_down)                               # [n, H], partial over etp
    (etp > 1: partial sums over etp reduced, each rank keeps its own tokens)
    (down bias: add_expert_bias, once per row: after the etp reduction, on the reduced rows)
    returned = all_to_all(ungroup(down, permutation) over ep, recv_sizes)
    out      = combine(returned, order, topk_weights)

With every expert on the rank (ep = etp = 1) there is nothing to exchange: the copies stay in
expert order, ``expert_offsets(tokens_per_expert)`` gives the grouped GEMMs their offsets on the
device, and no step reads a value on the host::

    order, tokens_per_expert = sort_by_expert(topk_ids, num_experts)
    offsets  = expert_offsets(tokens_per_expert)
    grouped  = gather_copies(hidden, order, top_k)
    down     = grouped_mm(glu(grouped_mm(grouped, w_gate_up), activation), w_down)
    out      = combine(down, order, topk_weights)

On the fused path (``kernels.fused_moe``) the gather, the gate/up product and the activation are
one kernel that reads the rows through an index vector, and nothing is copied into expert order::

    h, gate_up = gather_glu_grouped_mm(hidden, token_of_copies(order, top_k), w_gate_up, offsets, ...)
    (dispatched: gather_glu_grouped_mm(received, permutation, ...), local_expert_order giving both)

The backward mirrors it with the same splits and permutation. Nothing here knows about the
graph: the MoE lowering pass emits these calls as nodes so a dump shows every step. On a GPU the
row steps (``gather_copies``, ``ungroup``, ``combine``, ``combine_backward``, ``scatter_copies``)
run as the Triton row kernels of ``kernels.moe_rows``; elsewhere as the aten ops written here,
which define them.
"""

from __future__ import annotations

import torch

from kernels import moe_rows

from ..ops.moe import GatedActivation

__all__ = [
    "sort_by_expert",
    "expert_offsets",
    "exchange_counts",
    "split_sizes",
    "gather_copies",
    "token_of_copies",
    "group_by_local_expert",
    "local_expert_order",
    "ungroup",
    "inverse_permutation",
    "glu",
    "glu_backward",
    "group_ends",
    "add_expert_bias",
    "expert_bias_gradient",
    "combine",
    "combine_backward",
    "scatter_copies",
    "etp_gather",
    "etp_reduce_own",
    "etp_sizes",
]


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """Token copies (token, slot) sorted by expert id, and how many each expert gets.

    ``order[i]`` is the flat copy index ``token * top_k + slot`` of the i-th copy in expert order;
    a stable sort keeps each expert's copies in token order, which keeps results deterministic.
    Nothing here reads a value on the host: the counts come from a scatter-add (``bincount``
    reads the maximum id back to size its output), and on a GPU (or under torch.compile) the id
    range is checked by a device-side assertion rather than a host comparison that would stall
    the stream every layer.
    """
    flat = topk_ids.reshape(-1)
    # Under torch.compile the host comparison would break the graph in two, and the split sizes
    # that cross such a break are Python ints the later graph is specialised on.
    if flat.is_cuda or torch.compiler.is_compiling():
        if flat.numel():
            torch._assert_async(((flat >= 0) & (flat < num_experts)).all(),
                                f"topk_ids hold expert ids outside 0..{num_experts - 1}")
    elif flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(
            f"topk_ids hold expert ids outside 0..{num_experts - 1} (min {int(flat.min())}, max {int(flat.max())})"
        )
    order = torch.sort(flat, stable=True).indices
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    tokens_per_expert.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.long))
    return order, tokens_per_expert


def expert_offsets(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """The int32 end offset of each expert's rows, as grouped GEMMs read them (on the device)."""
    return torch.cumsum(tokens_per_expert, dim=0).to(torch.int32)


def exchange_counts(comm, tokens_per_expert: torch.Tensor, ep_axis) -> torch.Tensor:
    """Every rank learns how many copies each EP peer sends to each of its local experts."""
    ep = comm.mesh.size(ep_axis)
    local_experts = tokens_per_expert.numel() // ep
    received = comm.all_to_all(tokens_per_expert.contiguous(), ep_axis, [local_experts] * ep, dim=0)
    return received.reshape(ep, local_experts)


def split_sizes(tokens_per_expert: torch.Tensor, received_counts: torch.Tensor):
    """Rows to send to / receive from each EP peer (reads the counts on the host)."""
    ep = received_counts.shape[0]
    send = tokens_per_expert.reshape(ep, -1).sum(dim=1).tolist()
    receive = received_counts.sum(dim=1).tolist()
    return send, receive


def gather_copies(hidden: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    if moe_rows.runs(hidden):
        return torch.ops.shardgraph.gather_rows(hidden, order, top_k)
    return hidden.index_select(0, token_of_copies(order, top_k))


def token_of_copies(order: torch.Tensor, top_k: int) -> torch.Tensor:
    """The token (row of ``hidden``) of each copy in expert order: the index vector through which
    the fused gate/up product reads its rows in place of ``gather_copies``' copy."""
    return order // top_k


def etp_sizes(comm, rows, etp_axis):
    """Rows each etp rank of the group holds (an all-gather of one number). ``rows``: this rank's
    row count, or the tensor whose rows are counted (the count then travels on its device, as a
    GPU communicator needs)."""
    device = rows.device if isinstance(rows, torch.Tensor) else "cpu"
    own = rows.shape[0] if isinstance(rows, torch.Tensor) else int(rows)
    sizes = comm.all_gather(torch.tensor([own], dtype=torch.long, device=device), etp_axis, dim=0)
    return sizes.tolist()


def etp_gather(comm, tensor: torch.Tensor, etp_axis, sizes=None) -> torch.Tensor:
    """Concatenate the etp group's tensors in group order; ``sizes`` (from ``etp_sizes``) where
    the row counts differ."""
    return comm.all_gather(tensor.contiguous(), etp_axis, dim=0, sizes=sizes)


def etp_reduce_own(comm, tensor: torch.Tensor, etp_axis, sizes) -> torch.Tensor:
    """Sum the etp group's partial rows, keep this rank's own segment.

    Segments differ in length between ranks, so this is an all-reduce followed by a slice; the
    bytes are those of an all-reduce of the gathered rows.
    """
    total = comm.all_reduce(tensor.contiguous(), etp_axis, op="sum")
    position = comm.index(etp_axis)
    start = sum(sizes[:position])
    return total.narrow(0, start, sizes[position])


def group_by_local_expert(received: torch.Tensor, counts: torch.Tensor):
    """Rows ordered (source, local expert) regrouped to (local expert, source).

    ``counts[s, e]`` rows from source ``s`` for local expert ``e``. Returns the grouped rows, the
    permutation applied (``grouped = received[permutation]``) and the int32 end offset of each
    local expert's group, the layout grouped GEMMs read.
    """
    permutation, offsets = local_expert_order(received, counts)
    return received.index_select(0, permutation), permutation, offsets


def local_expert_order(received: torch.Tensor, counts: torch.Tensor):
    """``group_by_local_expert`` without the copy: the permutation (row ``r`` of the grouped
    layout is ``received[permutation[r]]``) and the int32 group end offsets."""
    sources, local_experts = counts.shape
    flat = counts.reshape(-1)
    expert_of_row = torch.arange(local_experts, device=received.device).repeat(sources)
    expert_of_row = torch.repeat_interleave(expert_of_row, flat)
    permutation = torch.sort(expert_of_row, stable=True).indices
    offsets = torch.cumsum(counts.sum(dim=0), dim=0).to(torch.int32)
    return permutation, offsets


def inverse_permutation(permutation: torch.Tensor) -> torch.Tensor:
    """``inverse[permutation[i]] = i``: where each row of the permuted layout came from, so that
    undoing a permutation is a gather (``rows.index_select(0, inverse)``). A gather lets the op
    that reads its result (a weighted sum over slots, a product with the output gradient) fuse
    with it under a compiler; writing rows through ``index_copy_`` is a scatter whose whole
    result must be stored first. The index vector is one integer per row, far smaller than the rows."""
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(permutation.numel(), device=permutation.device, dtype=permutation.dtype)
    return inverse


def ungroup(grouped: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Rows in grouped order back to the order before ``grouped = rows[permutation]``."""
    if moe_rows.runs(grouped):
        return torch.ops.shardgraph.gather_rows(grouped, inverse_permutation(permutation))
    return grouped.index_select(0, inverse_permutation(permutation))


def _row_kernel_step() -> bool:
    # Under torch.compile the aten form is what inductor fuses into the products' neighbours;
    # an opaque kernel would cost a Python call per launch there (docs/performance.md).
    return not torch.compiler.is_compiling()


def glu(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation spec's gated activation (``ops.moe.GatedActivation``): ``[n, 2J] -> [n, J]``.
    Columns are gate/up pairs in the spec's layout; a piece split over etp keeps its pairs whole.
    Plain SwiGLU (``silu``, gated, nothing clamped) runs as ``kernels.moe_rows``' ``swiglu`` where
    the row kernels run."""
    act = GatedActivation.parse(activation)
    # For ``silu`` the aten form reads only ``limit`` of the settings (alpha and the caps belong to
    # the other gated activations).
    if act.name == "silu" and act.gated and act.limit is None and _row_kernel_step() and moe_rows.runs(gate_up):
        return torch.ops.shardgraph.swiglu(gate_up, act.interleaved)
    return act(gate_up)


def glu_backward(grad: torch.Tensor, gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    act = GatedActivation.parse(activation)
    # A gradient in another dtype than the product is promoted by the aten form: kept there.
    if (act.name == "silu" and act.gated and act.limit is None and grad.dtype == gate_up.dtype
            and _row_kernel_step() and moe_rows.runs(grad, gate_up)):
        return torch.ops.shardgraph.swiglu_backward(grad, gate_up, act.interleaved)
    return act.backward(grad, gate_up)


def group_ends(counts: torch.Tensor) -> torch.Tensor:
    """Cumulative end offsets of row groups counted by ``counts`` (any shape, read row-major)."""
    return torch.cumsum(counts.reshape(-1), dim=0)


def _expert_of_rows(ends: torch.Tensor, rows: int, experts: int) -> torch.Tensor:
    """The expert of each row, where row group ``g`` (ending at ``ends[g]``) belongs to expert
    ``g % experts``: groups come expert-major (grouped layout, ``ends`` the grouped GEMM
    offsets) or source-major then expert (the layout an EP rank receives). On the device: no host read."""
    positions = torch.arange(rows, device=ends.device, dtype=ends.dtype)
    return torch.searchsorted(ends, positions, right=True) % experts


def add_expert_bias(rows: torch.Tensor, bias: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Each row plus its expert's bias row (``bias [local experts, n]``)."""
    return rows + bias.index_select(0, _expert_of_rows(ends, rows.shape[0], bias.shape[0])).to(rows.dtype)


def expert_bias_gradient(grad_rows: torch.Tensor, ends: torch.Tensor, experts: int) -> torch.Tensor:
    """The gradient of ``add_expert_bias``'s bias: each expert's rows summed (``[experts, n]``)."""
    where = _expert_of_rows(ends, grad_rows.shape[0], experts)
    total = grad_rows.new_zeros(experts, grad_rows.shape[1])
    return total.index_add_(0, where, grad_rows)


def combine(returned: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Put expert outputs back in (token, slot) order and take the weighted sum over slots."""
    tokens, top_k = topk_weights.shape
    if moe_rows.runs(returned, topk_weights):
        return torch.ops.shardgraph.gather_sum(returned, inverse_permutation(order), top_k, topk_weights)
    copies = ungroup(returned, order).reshape(tokens, top_k, -1)
    return (copies * topk_weights.unsqueeze(-1).to(copies.dtype)).sum(dim=1)


def combine_backward(grad_out: torch.Tensor, returned: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor):
    """Gradients of ``combine``: per expert-ordered copy, and per router weight.

    Copy ``i`` (expert order) is slot ``order[i]`` of token ``order[i] // top_k``: its gradient
    is that token's output gradient times that slot's weight, gathered straight into expert
    order rather than formed in (token, slot) order and then permuted (one pass over the copies,
    not three)."""
    if moe_rows.runs(grad_out, returned, topk_weights):
        return torch.ops.shardgraph.combine_backward(grad_out, returned, order, topk_weights)
    tokens, top_k = topk_weights.shape
    copies = ungroup(returned, order).reshape(tokens, top_k, -1)
    grad_weights = (copies * grad_out.unsqueeze(1)).sum(dim=-1).to(topk_weights.dtype)
    weight_of_copies = topk_weights.reshape(-1).index_select(0, order).to(grad_out.dtype)
    grad_copies = grad_out.index_select(0, token_of_copies(order, top_k)) * weight_of_copies.unsqueeze(-1)
    return grad_copies, grad_weights


def scatter_copies(grad_copies: torch.Tensor, order: torch.Tensor, top_k: int, tokens: int) -> torch.Tensor:
    """Sum the gradients of each token's copies back onto the token (rows in expert order).

    Every token has exactly ``top_k`` copies, so the copies are gathered back into (token, slot)
    order and summed over the slot: a gather and a reduction, where scattering with
    ``index_add`` would need atomic adds (slow in 16-bit floats, and order-dependent).
    """
    if moe_rows.runs(grad_copies):
        return torch.ops.shardgraph.gather_sum(grad_copies, inverse_permutation(order), top_k)
    return ungroup(grad_copies, order).reshape(tokens, top_k, -1).sum(dim=1)

