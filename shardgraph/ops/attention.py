"""``shardgraph::attention``: scaled dot-product attention as one op, forward and backward.

    out       = softmax(query key^T * scale  [+ causal mask]) value
    logsumexp = log sum_j exp(query key_j^T * scale)   over the keys each query sees (natural log)

Operands are ``[batch, heads, seq, head_dim]``; with ``enable_gqa`` the key/value heads may be
fewer than the query heads (each serves ``heads / kv_heads`` consecutive query heads), as in
``F.scaled_dot_product_attention``. Causal masking is aligned top-left (query ``i`` sees keys
``0..i``), as there.

Keeping attention whole in the traced graph keeps the fused kernels: written as matmul + softmax
it would cost ``batch * heads * seq^2`` elements of memory and bandwidth in the compiled program.
Its placement rule (``passes/rules/attention.py``) lets batch and heads be sharded.

The forward returns ``(out, logsumexp)``: the fused kernels keep no ``[seq, seq]`` scores, only
the log-sum-exp of each row, and their backward needs it. Saving it (``[batch, heads, seq]``
float32, float64 for float64 operands; 1 MiB a layer at batch 2, 32 heads, seq 4096) spares the
backward a second attention forward. ``attention_backward(grad_out, query, key, value, out,
logsumexp, ...)`` takes it with the output. ``logsumexp`` is defined by the formula above, not by
the kernel that made it: every path below returns the same quantity in the same layout
(contiguous ``[batch, heads, seq]``), so the backward may use another kernel than the forward
did (the lowering may also have re-laid out or redistributed its inputs in between). It is not
differentiable (the loss never reads it).

Kernels, the first that takes the operands (``_kernels``), called directly as aten ops: a custom
op's kernel runs below the autograd dispatch keys, so autograd cannot run inside it, and
``torch.func.vjp`` there breaks under ``torch.compile``.

    cudnn      CUDA, Hopper (sm90), fp16/bf16, head_dim <= 128 and a multiple of 8, value head_dim
               the query's, torch's ``can_use_cudnn_attention`` says yes (it honours
               ``torch.backends.cuda.enable_cudnn_sdp``)
    flash      CUDA, fp16/bf16, head_dim <= 256 and a multiple of 8, value head_dim the query's,
               ``can_use_flash_attention`` says yes
    cpu_flash  CPU, value head_dim the query's
    math       anything else (float32 on a GPU, odd head dims, causal with fewer queries than keys
               on a GPU, empty operands): the textbook formulas in float32 (float64 for float64),
               which hold the ``[seq, seq]`` scores; right, not fast

The random-number state the CUDA kernels return and take is that of attention dropout, which this
op never applies (``dropout_p`` is always 0; the frontend refuses attention dropout), and the
kernels read it only when ``dropout_p > 0``: the backward passes tensors of the shape and dtype
the installed torch's forward returns (asked of its meta kernel), not the forward's. What a
fused kernel returns is checked (shapes, dtypes, the log-sum-exp's layout) before it is used;
where it is not what this op expects, or the kernel raises, a warning names it and the next
kernel runs.

Grouped key/value heads go to a fused CUDA kernel as they are where the kernel takes grouped heads
(torch's feasibility check asked with ``enable_gqa``): it reads each key/value head for its group
of query heads and returns the key/value gradients summed per group. Otherwise, and for every kernel
on the CPU, they are widened to the query heads (a copy) and the gradients of the copies summed
back per group. Each kernel is tried grouped before widened, so a kernel's place in the order
above never changes (at Qwen3-30B-A3B's 32 query / 4 key-value heads the widening costs four
copies of the query's size and two group sums per layer, forward and backward). Every
operand is handed to the CUDA kernels in one layout (``[batch, seq, heads, dim]`` in memory,
the one the projections around attention make): cuDNN caches its backward graph by the query,
key and value strides alone, so output and gradient strides that varied from call to call would
be read with another call's layout.
"""

from __future__ import annotations

import functools
import warnings

import torch

from kernels import op_bodies

__all__ = ["attention", "attention_backward", "attention_kernel"]

_HALF = (torch.float16, torch.bfloat16)
aten = torch.ops.aten


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _logsumexp_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 (the fused kernels' accumulation type), float64 for float64 operands."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _check_backward_inputs(grad_out: torch.Tensor, query: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
                           logsumexp: torch.Tensor) -> None:
    expected = (*query.shape[:3], value.shape[-1])
    for name, tensor in (("grad_out", grad_out), ("out", out)):
        if _shape(tensor) != expected or tensor.dtype != query.dtype:
            raise ValueError(f"shardgraph.attention_backward: {name} {_shape(tensor)} {tensor.dtype} must have the "
                             f"output's shape [batch, heads, seq, value head_dim] = {expected} and dtype "
                             f"{query.dtype}")
    rows, dtype = tuple(query.shape[:3]), _logsumexp_dtype(query.dtype)
    if _shape(logsumexp) != rows or logsumexp.dtype != dtype:
        raise ValueError(f"shardgraph.attention_backward: logsumexp {_shape(logsumexp)} {logsumexp.dtype} must be "
                         f"the forward's [batch, heads, seq] = {rows} {dtype}")


def _sequence_major_empty(like: torch.Tensor, last: int | None = None) -> torch.Tensor:
    """An empty ``[batch, heads, seq, dim]`` tensor stored as ``[batch, seq, heads, dim]``.

    A traced graph bakes in the strides its fake values had (a ``view`` where they allowed one,
    a copy where not), and the lowered program feeds the ops inputs whose strides may differ
    from the traced ones (a collective returns contiguous tensors). So every output of these ops
    has one fixed layout, whatever the inputs' strides: the one the fused kernels produce and the
    one the projections around attention (``view(batch, seq, heads, dim).transpose(1, 2)`` and
    back) read without a copy. The log-sum-exp is contiguous ``[batch, heads, seq]``.
    """
    batch, heads, seq, dim = like.shape
    return like.new_empty((batch, seq, heads, dim if last is None else last)).transpose(1, 2)


def _sequence_major(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.transpose(1, 2).is_contiguous():
        return tensor
    return _sequence_major_empty(tensor).copy_(tensor)


def _widen(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """Key or value ``[batch, kv_heads, seq, dim]`` as ``[batch, kv_heads * groups, seq, dim]``
    (each head repeated for the ``groups`` consecutive query heads it serves), sequence-major,
    in one copy; with ``groups == 1`` the tensor itself."""
    if groups == 1:
        return tensor
    batch, kv_heads, seq, dim = tensor.shape
    rows = tensor.transpose(1, 2).unsqueeze(3).expand(batch, seq, kv_heads, groups, dim)
    return rows.reshape(batch, seq, kv_heads * groups, dim).transpose(1, 2)


def _sum_groups(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradient of a widened key or value summed back over each group of query heads."""
    if groups == 1:
        return grad
    batch, heads, seq, dim = grad.shape
    return grad.reshape(batch, heads // groups, groups, seq, dim).sum(dim=2)


# ----------------------------------------------------------------------------- the ops
@op_bodies.custom_op("shardgraph::attention", mutates_args=())
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool, scale: float,
              enable_gqa: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check("shardgraph.attention", query, key, value, enable_gqa)
    out, logsumexp = _forward(query, key, value, is_causal, scale, query.shape[1] // key.shape[1])
    return _sequence_major(out), logsumexp.contiguous()


@attention.register_fake
def _(query, key, value, is_causal, scale, enable_gqa):
    _check("shardgraph.attention", query, key, value, enable_gqa)
    return (_sequence_major_empty(query, value.shape[-1]),
            query.new_empty(query.shape[:3], dtype=_logsumexp_dtype(query.dtype)))


@op_bodies.custom_op("shardgraph::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       out: torch.Tensor, logsumexp: torch.Tensor, is_causal: bool, scale: float,
                       enable_gqa: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check("shardgraph.attention_backward", query, key, value, enable_gqa)
    _check_backward_inputs(grad_out, query, value, out, logsumexp)
    grad_query, grad_key, grad_value = _backward(grad_out, query, key, value, out, logsumexp, is_causal, scale,
                                                 query.shape[1] // key.shape[1])
    return _sequence_major(grad_query), _sequence_major(grad_key), _sequence_major(grad_value)


@attention_backward.register_fake
def _(grad_out, query, key, value, out, logsumexp, is_causal, scale, enable_gqa):
    _check("shardgraph.attention_backward", query, key, value, enable_gqa)
    _check_backward_inputs(grad_out, query, value, out, logsumexp)
    return _sequence_major_empty(query), _sequence_major_empty(key), _sequence_major_empty(value)


def _setup_context(ctx, inputs, output):
    query, key, value, is_causal, scale, enable_gqa = inputs
    out, logsumexp = output
    ctx.mark_non_differentiable(logsumexp)
    ctx.save_for_backward(query, key, value, out, logsumexp)
    ctx.options = (is_causal, scale, enable_gqa)


def _autograd_backward(ctx, grad_out, _grad_logsumexp):
    # logsumexp is marked non-differentiable: its gradient is never anything but zero.
    grads = torch.ops.shardgraph.attention_backward(grad_out, *ctx.saved_tensors, *ctx.options)
    return (*grads, None, None, None)


attention.register_autograd(_autograd_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- kernel choice
def _trained(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as one that requires grad, so that torch's feasibility checks answer for the
    backward kernel too, whatever autograd state the op's kernel was called in."""
    if tensor.requires_grad:
        return tensor
    try:
        return tensor.detach().requires_grad_()
    except RuntimeError:  # an inference-mode tensor: ask with it as it is
        return tensor


def _kernels(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool,
             enable_gqa: bool = False) -> list[str]:
    """The kernels that take these operands, best first; the last is always ``math``. Key and
    value have the query's heads unless ``enable_gqa`` (then the fused kernels are asked whether
    they take grouped heads as they are)."""
    dim = query.shape[-1]
    empty = any(t.numel() == 0 for t in (query, key, value))
    if query.device.type == "cpu":
        return ["cpu_flash", "math"] if value.shape[-1] == dim and not empty else ["math"]
    if query.device.type != "cuda" or query.dtype not in _HALF or empty:
        return ["math"]
    if key.shape[-1] != dim or value.shape[-1] != dim or dim % 8:
        return ["math"]
    # Causal with unequal lengths: this op aligns the mask top-left (as F.sdpa does); CUDA flash
    # aligns it bottom-right, and the kernels' alignment is not asked of them here.
    if is_causal and query.shape[2] != key.shape[2]:
        return ["math"]
    params = torch.backends.cuda.SDPAParams(_trained(query), _trained(key), _trained(value), None, 0.0, is_causal,
                                            enable_gqa)
    fused = []
    can_use_cudnn = getattr(torch.backends.cuda, "can_use_cudnn_attention", None)
    if (can_use_cudnn is not None and dim <= 128 and torch.cuda.get_device_capability(query.device)[0] == 9
            and can_use_cudnn(params)):
        fused.append("cudnn")
    if dim <= 256 and torch.backends.cuda.can_use_flash_attention(params):
        fused.append("flash")
    return fused + ["math"]


def _widened_like(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """An empty tensor of the widened key's or value's shape and layout (what ``_kernels`` asks
    about, without the copy)."""
    if groups == 1:
        return tensor
    batch, kv_heads, seq, dim = tensor.shape
    return tensor.new_empty((batch, seq, kv_heads * groups, dim)).transpose(1, 2)


# Devices whose fused kernels may take grouped key/value heads as they are (torch's feasibility
# checks answer for CUDA; the CPU flash kernel is always given widened heads).
_GROUPED_DEVICES = ("cuda",)


def _plans(query, key, value, is_causal: bool, groups: int):
    """``(kernel, key, value, widened)`` in the order to try them: each kernel that takes these
    operands (``_kernels``' order), with the grouped key and value as they are where it takes
    grouped heads, then widened. The widening copy is made only when a widened plan is reached."""
    if groups == 1:
        for kernel in _kernels(query, key, value, is_causal):
            yield kernel, key, value, False
        return
    grouped = set()
    if query.device.type in _GROUPED_DEVICES:
        grouped = set(_kernels(query, key, value, is_causal, enable_gqa=True)) - {"math"}
    wide = None
    for kernel in _kernels(query, _widened_like(key, groups), _widened_like(value, groups), is_causal):
        if kernel in grouped:
            yield kernel, key, value, False
        if wide is None:
            wide = (_widen(key, groups), _widen(value, groups))
        yield kernel, *wide, True


def attention_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False,
                     enable_gqa: bool = False) -> str:
    """The kernel ``shardgraph.attention`` runs first for these operands (``cudnn``, ``flash``,
    ``cpu_flash`` or ``math``, with `` (grouped)`` where it reads grouped key/value heads as they
    are); it falls back along ``_plans`` where one fails its checks."""
    _check("shardgraph.attention_kernel", query, key, value, enable_gqa)
    groups = query.shape[1] // key.shape[1]
    kernel, _, _, widened = next(_plans(query, key, value, is_causal, groups))
    return kernel if widened or groups == 1 else f"{kernel} (grouped)"


_TensorSpec = tuple[tuple[int, ...], torch.dtype]


@functools.cache
def _forward_extras(kernel: str) -> tuple[int, _TensorSpec, _TensorSpec]:
    """What the installed torch's ``kernel`` forward returns besides the output, asked of its
    meta kernel: the log-sum-exp's rank (cuDNN's is ``[batch, heads, seq, 1]`` in some versions)
    and the shape and dtype of its two random-number-state tensors."""
    probe = torch.empty(1, 1, 8, 8, dtype=torch.bfloat16, device="meta")
    if kernel == "cudnn":
        result = aten._scaled_dot_product_cudnn_attention.default(probe, probe, probe, None, True, 0.0, False, False)
    else:
        result = aten._scaled_dot_product_flash_attention.default(probe, probe, probe, 0.0, False, False)
    return result[1].dim(), (tuple(result[6].shape), result[6].dtype), (tuple(result[7].shape), result[7].dtype)


def _unused_random_state(kernel: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Read by the kernels only where dropout_p > 0, which it never is here (module docstring).
    _, seed, offset = _forward_extras(kernel)
    return (torch.empty(seed[0], dtype=seed[1], device=device), torch.empty(offset[0], dtype=offset[1], device=device))


class _Unexpected(Exception):
    """A fused kernel returned something this op does not expect: fall back to the next."""


def _expect(kernel: str, tensor: torch.Tensor, what: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if not isinstance(tensor, torch.Tensor) or _shape(tensor) != shape or tensor.dtype != dtype:
        got = f"{_shape(tensor)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else repr(tensor)
        raise _Unexpected(f"{kernel} attention returned {what} {got}, expected {shape} {dtype}")


def _fall_back(kernel: str, reason: object) -> None:
    warnings.warn(f"shardgraph.attention: {kernel} kernel not used ({reason}); falling back to the next kernel",
                  RuntimeWarning, stacklevel=3)


def _forward(query, key, value, is_causal: bool, scale: float, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, logsumexp)`` from the first plan that runs (``_plans``)."""
    if query.is_cuda:  # the one layout the CUDA kernels are asked about and given (module docstring)
        query, key, value = (_sequence_major(t) for t in (query, key, value))
    def fused(kernel, key, value):
        out, logsumexp = _FUSED_FORWARD[kernel](query, key, value, is_causal, scale)
        _expect(kernel, out, "output", (*query.shape[:3], value.shape[-1]), query.dtype)
        _expect(kernel, logsumexp, "logsumexp", tuple(query.shape[:3]), _logsumexp_dtype(query.dtype))
        return out, logsumexp

    result, _ = _first_that_runs(query, key, value, is_causal, groups, fused,
                                 lambda key, value: _math_forward(query, key, value, is_causal, scale))
    return result


def _backward(grad_out, query, key, value, out, logsumexp, is_causal: bool, scale: float, groups: int):
    """``(grad_query, grad_key, grad_value)`` from the first plan that runs, the key and value
    gradients in the key's and value's own heads."""
    if query.is_cuda:
        query, key, value, out, grad_out = (_sequence_major(t) for t in (query, key, value, out, grad_out))
        logsumexp = logsumexp.contiguous()  # some cuDNN kernels read it packed whatever its strides
    def fused(kernel, key, value):
        grads = _FUSED_BACKWARD[kernel](grad_out, query, key, value, out, logsumexp, is_causal, scale)
        for name, grad, like in zip(("grad_query", "grad_key", "grad_value"), grads, (query, key, value)):
            _expect(kernel, grad, name, _shape(like), like.dtype)
        return grads

    (grad_query, grad_key, grad_value), widened = _first_that_runs(
        query, key, value, is_causal, groups, fused,
        lambda key, value: _math_backward(grad_out, query, key, value, out, logsumexp, is_causal, scale))
    if widened:
        grad_key, grad_value = _sum_groups(grad_key, groups), _sum_groups(grad_value, groups)
    return grad_query, grad_key, grad_value


def _first_that_runs(query, key, value, is_causal: bool, groups: int, fused, math):
    """``(fused(kernel, key, value), widened)`` of the first plan (``_plans``) whose fused kernel
    runs and returns what it should; a kernel that raises or returns something unexpected is
    named in a warning and the next plan runs, down to ``math(key, value)`` (widened). Out of
    memory is not a reason to fall back: it is raised."""
    for kernel, plan_key, plan_value, widened in _plans(query, key, value, is_causal, groups):
        if kernel == "math":
            return math(plan_key, plan_value), widened
        label = kernel if widened or groups == 1 else f"{kernel} (grouped)"
        try:
            return fused(kernel, plan_key, plan_value), widened
        except _Unexpected as reason:
            _fall_back(label, reason)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:
            _fall_back(label, error)
    raise AssertionError("unreachable: _plans always ends with math")


# ----------------------------------------------------------------------------- the kernels
def _cudnn_forward(query, key, value, is_causal: bool, scale: float):
    query, key, value = (_sequence_major(t) for t in (query, key, value))
    batch, heads, seq, _ = query.shape
    result = aten._scaled_dot_product_cudnn_attention.default(query, key, value, None, True, 0.0, is_causal, False,
                                                              scale=scale)
    out, logsumexp = result[0], result[1]
    _expect("cudnn", out, "output", (batch, heads, seq, value.shape[-1]), query.dtype)
    rank = _forward_extras("cudnn")[0]
    _expect("cudnn", logsumexp, "logsumexp", (batch, heads, seq, 1)[:rank], torch.float32)
    return out, logsumexp.reshape(batch, heads, seq).contiguous()


def _cudnn_backward(grad_out, query, key, value, out, logsumexp, is_causal: bool, scale: float):
    query, key, value, out, grad_out = (_sequence_major(t) for t in (query, key, value, out, grad_out))
    batch, heads, seq_q, _ = query.shape
    rank = _forward_extras("cudnn")[0]
    logsumexp = logsumexp.contiguous().reshape((batch, heads, seq_q, 1)[:rank])
    seed, offset = _unused_random_state("cudnn", query.device)
    return aten._scaled_dot_product_cudnn_attention_backward.default(
        grad_out, query, key, value, out, logsumexp, seed, offset, None, None, None, seq_q, key.shape[2], 0.0,
        is_causal, scale=scale)


def _flash_forward(query, key, value, is_causal: bool, scale: float):
    query, key, value = (_sequence_major(t) for t in (query, key, value))
    batch, heads, seq, _ = query.shape
    result = aten._scaled_dot_product_flash_attention.default(query, key, value, 0.0, is_causal, False, scale=scale)
    out, logsumexp = result[0], result[1]
    _expect("flash", out, "output", (batch, heads, seq, value.shape[-1]), query.dtype)
    _expect("flash", logsumexp, "logsumexp", (batch, heads, seq), torch.float32)
    return out, logsumexp.contiguous()


def _flash_backward(grad_out, query, key, value, out, logsumexp, is_causal: bool, scale: float):
    query, key, value, out, grad_out = (_sequence_major(t) for t in (query, key, value, out, grad_out))
    seed, offset = _unused_random_state("flash", query.device)
    # cum_seq_q / cum_seq_k undefined: dense (not varlen) operands.
    return aten._scaled_dot_product_flash_attention_backward.default(
        grad_out, query, key, value, out, logsumexp.contiguous(), None, None, query.shape[2], key.shape[2], 0.0,
        is_causal, seed, offset, scale=scale)


def _cpu_flash_forward(query, key, value, is_causal: bool, scale: float):
    batch, heads, seq, _ = query.shape
    out, logsumexp = aten._scaled_dot_product_flash_attention_for_cpu.default(query, key, value, 0.0, is_causal,
                                                                              scale=scale)
    _expect("cpu_flash", out, "output", (batch, heads, seq, value.shape[-1]), query.dtype)
    _expect("cpu_flash", logsumexp, "logsumexp", (batch, heads, seq), _logsumexp_dtype(query.dtype))
    return out, logsumexp.contiguous()


def _cpu_flash_backward(grad_out, query, key, value, out, logsumexp, is_causal: bool, scale: float):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
        grad_out, query, key, value, out, logsumexp, 0.0, is_causal, scale=scale)


_FUSED_FORWARD = {"cudnn": _cudnn_forward, "flash": _flash_forward, "cpu_flash": _cpu_flash_forward}
_FUSED_BACKWARD = {"cudnn": _cudnn_backward, "flash": _flash_backward, "cpu_flash": _cpu_flash_backward}


def _scores(query, key, is_causal: bool, scale: float) -> torch.Tensor:
    """``query key^T * scale`` with the causal mask (top-left) as ``-inf``, in the log-sum-exp's dtype."""
    dtype = _logsumexp_dtype(query.dtype)
    scores = (query.to(dtype) @ key.to(dtype).transpose(-2, -1)) * scale
    if is_causal:
        seq_q, seq_k = scores.shape[-2:]
        future = torch.ones(seq_q, seq_k, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores


def _math_forward(query, key, value, is_causal: bool, scale: float):
    """The textbook forward, where no fused kernel takes the operands: it holds the ``[seq, seq]``
    scores. Computed in float32 (float64 for float64 operands), the output cast back."""
    scores = _scores(query, key, is_causal, scale)
    logsumexp = scores.logsumexp(dim=-1)
    probabilities = (scores - logsumexp.unsqueeze(-1)).exp()
    return (probabilities @ value.to(scores.dtype)).to(query.dtype), logsumexp


def _math_backward(grad_out, query, key, value, out, logsumexp, is_causal: bool, scale: float):
    """The textbook backward from the forward's log-sum-exp (the probabilities are
    ``exp(scores - logsumexp)``), where no fused kernel takes the operands: it holds the
    ``[seq, seq]`` probabilities, so it is right but not fast. ``out`` is not read (the fused
    kernels take it; here the row sums it would give are computed from the probabilities)."""
    scores = _scores(query, key, is_causal, scale)
    dtype, original = scores.dtype, query.dtype
    probabilities = (scores - logsumexp.to(dtype).unsqueeze(-1)).exp()
    grad_out, query, key, value = (t.to(dtype) for t in (grad_out, query, key, value))
    grad_value = probabilities.transpose(-2, -1) @ grad_out
    grad_probabilities = grad_out @ value.transpose(-2, -1)
    grad_scores = probabilities * (grad_probabilities - (grad_probabilities * probabilities).sum(-1, keepdim=True))
    grad_query = (grad_scores @ key) * scale
    grad_key = (grad_scores.transpose(-2, -1) @ query) * scale
    return grad_query.to(original), grad_key.to(original), grad_value.to(original)
