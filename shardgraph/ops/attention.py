"""``shardgraph::attention``: scaled dot-product attention as one op, forward and backward.

    out = softmax(query key^T * scale  [+ causal mask]) value

Operands are ``[batch, heads, seq, head_dim]``; with ``enable_gqa`` the key/value heads may be
fewer than the query heads (each serves ``heads / kv_heads`` consecutive query heads), as in
``F.scaled_dot_product_attention``, which is what the forward calls: on a GPU that is a fused
(flash or memory-efficient) kernel that never materialises the ``[seq, seq]`` scores.

Keeping attention whole in the traced graph keeps those kernels: written as matmul + softmax it
would cost ``batch * heads * seq^2`` elements of memory and bandwidth in the compiled program.
Its placement rule (``passes/rules/attention.py``) lets batch and heads be sharded.

The backward, ``attention_backward``, recomputes the forward and differentiates it. The fused
kernels keep no ``[seq, seq]`` scores, only one log-sum-exp per row, so their backward needs
the forward run again: one extra attention forward (about a quarter of attention's forward +
backward time). In exchange no kernel-specific state (log-sum-exp layout, random-number state)
crosses the graph, the forward op stays one tensor out, and lowering may feed the backward
inputs it re-laid out or redistributed. The recompute calls the aten fused kernels directly
(flash on a GPU for half precision, the CPU flash kernel on a CPU) rather than running autograd
inside the op: a custom op's kernel runs below the autograd dispatch keys, so
``torch.autograd.grad`` there sees tensors without history, and ``torch.func.vjp`` (which does
work eagerly) fails under ``torch.compile`` ("Cannot access storage of TensorWrapper"). Where no
fused kernel takes the operands (float32 on a GPU, value head_dim unlike the query's) the
textbook backward runs: the same numbers, with the ``[seq, seq]`` probabilities held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention", "attention_backward"]


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _check(op: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool) -> None:
    """Shapes and dtypes of the operands; runs in the fake kernels too, so at trace time."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D [batch, heads, seq, head_dim], got shape {_shape(tensor)}")
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be floating point, got {tensor.dtype}")
    if not key.dtype == value.dtype == query.dtype:
        raise TypeError(f"{op}: query {query.dtype}, key {key.dtype} and value {value.dtype} must share a dtype")
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        raise ValueError(f"{op}: query {_shape(query)}, key {_shape(key)} and value {_shape(value)} must share "
                         f"the batch size (dim 0)")
    if key.shape[1] != value.shape[1] or key.shape[2] != value.shape[2]:
        raise ValueError(f"{op}: key {_shape(key)} and value {_shape(value)} must share heads (dim 1) and "
                         f"sequence length (dim 2)")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"{op}: query head_dim {query.shape[-1]} differs from key head_dim {key.shape[-1]}")
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads and not (enable_gqa and kv_heads > 0 and heads % kv_heads == 0):
        raise ValueError(f"{op}: query has {heads} heads and key/value {kv_heads}; they must be equal, or "
                         f"enable_gqa set with key/value heads dividing query heads")


def _check_grad_out(grad_out: torch.Tensor, query: torch.Tensor, value: torch.Tensor) -> None:
    expected = (*query.shape[:3], value.shape[-1])
    if _shape(grad_out) != expected or grad_out.dtype != query.dtype:
        raise ValueError(f"shardgraph.attention_backward: grad_out {_shape(grad_out)} {grad_out.dtype} must have "
                         f"the output's shape [batch, heads, seq, value head_dim] = {expected} and dtype {query.dtype}")


@torch.library.custom_op("shardgraph::attention", mutates_args=())
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool, scale: float,
              enable_gqa: bool) -> torch.Tensor:
    _check("shardgraph.attention", query, key, value, enable_gqa)
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    return _sequence_major(F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale,
                                                          **kwargs))


def _sequence_major_empty(like: torch.Tensor, last: int | None = None) -> torch.Tensor:
    """An empty ``[batch, heads, seq, dim]`` tensor stored as ``[batch, seq, heads, dim]``.

    A traced graph bakes in the strides its fake values had (a ``view`` where they allowed one,
    a copy where not), and the lowered program feeds the ops inputs whose strides may differ
    from the traced ones (a collective returns contiguous tensors). So every output of these ops
    has one fixed layout, whatever the inputs' strides: the one the fused kernels produce and the
    one the projections around attention (``view(batch, seq, heads, dim).transpose(1, 2)`` and
    back) read without a copy.
    """
    batch, heads, seq, dim = like.shape
    return like.new_empty((batch, seq, heads, dim if last is None else last)).transpose(1, 2)


def _sequence_major(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.transpose(1, 2).is_contiguous():
        return tensor
    return _sequence_major_empty(tensor).copy_(tensor)


@attention.register_fake
def _(query, key, value, is_causal, scale, enable_gqa):
    _check("shardgraph.attention", query, key, value, enable_gqa)
    return _sequence_major_empty(query, value.shape[-1])


@torch.library.custom_op("shardgraph::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       is_causal: bool, scale: float, enable_gqa: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    _check("shardgraph.attention_backward", query, key, value, enable_gqa)
    _check_grad_out(grad_out, query, value)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        # The fused backward kernels take equal head counts: widen key/value to the query heads
        # (each serves `groups` consecutive ones) and sum their gradients back per group.
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    grad_query, grad_key, grad_value = _fused_backward(grad_out, query, key, value, is_causal, scale)
    if groups > 1:
        batch, heads, seq, dim = grad_key.shape
        grad_key = grad_key.reshape(batch, heads // groups, groups, seq, dim).sum(dim=2)
        grad_value = grad_value.reshape(batch, heads // groups, groups, seq, grad_value.shape[-1]).sum(dim=2)
    return _sequence_major(grad_query), _sequence_major(grad_key), _sequence_major(grad_value)


def _flash_fits_gpu(query, key, value, is_causal: bool) -> bool:
    """Whether the CUDA flash kernel takes these operands when called directly.

    ``F.scaled_dot_product_attention`` pads head_dim to a multiple of 8 before calling it; a
    direct call does not, so that is asked here, as are the kernel's dtypes, its head_dim limit
    and the GPU generation (``can_use_flash_attention``)."""
    dim = query.shape[-1]
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)):
        return False
    if key.shape[-1] != dim or value.shape[-1] != dim or dim % 8 or dim > 256:
        return False
    return torch.backends.cuda.can_use_flash_attention(
        torch.backends.cuda.SDPAParams(query, key, value, None, 0.0, is_causal, False))


def _fused_backward(grad_out, query, key, value, is_causal: bool, scale: float):
    """Recompute the forward's log-sum-exp with the fused kernel, then run its backward.

    The aten kernels are called directly (not through autograd): a custom op's kernel runs below
    the autograd dispatch key, and under ``torch.compile`` below functorch's too.
    """
    aten = torch.ops.aten
    if _flash_fits_gpu(query, key, value, is_causal):
        out, logsumexp, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, is_causal, False, scale=scale)
        return aten._scaled_dot_product_flash_attention_backward(
            grad_out, query, key, value, out, logsumexp, cum_q, cum_k, max_q, max_k, 0.0, is_causal, seed, offset,
            scale=scale)
    if query.device.type == "cpu" and value.shape[-1] == query.shape[-1]:  # the CPU kernel wants one head_dim
        out, logsumexp = aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal,
                                                                           scale=scale)
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, query, key, value, out, logsumexp, 0.0, is_causal, scale=scale)
    return _math_backward(grad_out, query, key, value, is_causal, scale)


def _math_backward(grad_out, query, key, value, is_causal: bool, scale: float):
    """The textbook backward, where no fused kernel takes the operands (float32 on a GPU, value
    head_dim unlike the query's): it holds the [seq, seq] probabilities, so it is right but not fast."""
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        seq_q, seq_k = scores.shape[-2:]
        future = torch.ones(seq_q, seq_k, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    probabilities = scores.softmax(dim=-1)
    grad_value = probabilities.transpose(-2, -1) @ grad_out
    grad_probabilities = grad_out @ value.transpose(-2, -1)
    grad_scores = probabilities * (grad_probabilities - (grad_probabilities * probabilities).sum(-1, keepdim=True))
    grad_query = (grad_scores @ key) * scale
    grad_key = (grad_scores.transpose(-2, -1) @ query) * scale
    return grad_query, grad_key, grad_value


@attention_backward.register_fake
def _(grad_out, query, key, value, is_causal, scale, enable_gqa):
    _check("shardgraph.attention_backward", query, key, value, enable_gqa)
    _check_grad_out(grad_out, query, value)
    return _sequence_major_empty(query), _sequence_major_empty(key), _sequence_major_empty(value)


def _setup_context(ctx, inputs, output):
    query, key, value, is_causal, scale, enable_gqa = inputs
    ctx.save_for_backward(query, key, value)
    ctx.options = (is_causal, scale, enable_gqa)


def _backward(ctx, grad_out):
    query, key, value = ctx.saved_tensors
    grads = torch.ops.shardgraph.attention_backward(grad_out, query, key, value, *ctx.options)
    return (*grads, None, None, None)


attention.register_autograd(_backward, setup_context=_setup_context)
