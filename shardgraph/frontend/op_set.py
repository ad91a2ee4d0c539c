"""The ops that the traced joint graphs of the supported model families contain, by family.

Measured with ``op_histogram`` on the example model (``examples/moe_model.py``), the
torchtitan-style model (``examples/titan_model.py``, shared experts and expert bias on), and HF
transformers 5.x ``MixtralForCausalLM`` (eager and SDPA attention) and ``Qwen2MoeForCausalLM``
(``examples/hf_models.py``); ``docs/frontend.md`` lists the counts. A placement rule table that
covers every op here covers those graphs; a model that brings another op needs one more rule.
"""

from __future__ import annotations

__all__ = ["OP_FAMILIES", "JOINT_GRAPH_OPS"]

OP_FAMILIES: dict[str, tuple[str, ...]] = {
    "matmul": ("aten.mm.default", "aten.bmm.default", "aten.addmm.default"),
    "view": ("aten.view.default", "aten._unsafe_view.default", "aten.t.default", "aten.transpose.int",
             "aten.expand.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.clone.default"),
    "slice": ("aten.slice.Tensor", "aten.slice_backward.default", "aten.cat.default", "getitem"),
    "pointwise": ("aten.add.Tensor", "aten.add.Scalar", "aten.mul.Tensor", "aten.mul.Scalar",
                  "aten.div.Tensor", "aten.div.Scalar", "aten.neg.default", "aten.pow.Tensor_Scalar",
                  "aten.rsqrt.default", "aten.sin.default", "aten.cos.default", "aten.silu.default",
                  "aten.silu_backward.default", "aten.sigmoid.default", "aten.sigmoid_backward.default",
                  "aten._to_copy.default", "aten.where.self", "aten.le.Tensor"),
    "reduction": ("aten.sum.dim_IntList", "aten.mean.dim"),
    "softmax": ("aten._softmax.default", "aten._softmax_backward_data.default", "aten._log_softmax.default",
                "aten._log_softmax_backward_data.default"),
    "routing": ("aten.topk.default", "aten.gather.default", "aten.scatter.src", "aten.scatter_add.default"),
    "embedding": ("aten.embedding.default", "aten.embedding_dense_backward.default"),
    "loss": ("aten.nll_loss_forward.default", "aten.nll_loss_backward.default"),
    "factory": ("aten.zeros.default", "aten.arange.default", "aten.scalar_tensor.default",
                "aten.ones_like.default", "aten.new_zeros.default"),
    "moe": ("shardgraph.moe_experts.default", "shardgraph.moe_experts_backward.default"),
    "attention": ("shardgraph.attention.default", "shardgraph.attention_backward.default"),
}

JOINT_GRAPH_OPS = frozenset(op for ops in OP_FAMILIES.values() for op in ops)
