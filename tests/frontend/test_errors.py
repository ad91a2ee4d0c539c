"""Untraceable models fail with a TraceError naming the module path and the source line."""

import pytest
import torch
from torch import nn

from examples import hf_models
from examples.hf_models import lm_loss
from examples.titan_model import TitanConfig, TitanMoE
from shardgraph.frontend import AdapterError, TraceError, trace

THIS_FILE = "test_errors.py"


def line_of(text: str) -> int:
    """The line in this file that contains ``text``."""
    with open(__file__, encoding="utf-8") as handle:
        return next(i for i, line in enumerate(handle, 1) if text in line and "line_of(" not in line)


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.block = inner

    def forward(self, x):
        return self.block(x)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        y = self.proj(x)
        if y.sum() > 0:  # branch on a value
            return y * 2
        return y


class ReadsANumber(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        scale = float(x.abs().max())  # a Python number from a tensor
        return self.proj(x) * scale


class LoopedExperts(nn.Module):
    """A routed-expert block no adapter knows: per-expert token lists have data-dependent sizes."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(4, 3, bias=False)
        self.weights = nn.Parameter(torch.randn(3, 4, 4))

    def forward(self, x):
        expert_of_token = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for expert in range(3):
            tokens = torch.nonzero(expert_of_token == expert).squeeze(-1)  # data-dependent length
            out = out.index_add(0, tokens, x[tokens] @ self.weights[expert])
        return out


def square_loss(out, x):
    return out.pow(2).sum()


def trace_error(model, *inputs, loss_fn=square_loss) -> str:
    with pytest.raises(TraceError) as info:
        trace(model, inputs or (torch.randn(2, 4),), loss_fn)
    return str(info.value)


def test_branch_on_a_tensor_value_names_module_file_and_line():
    message = trace_error(Wrapper(Branchy()))
    assert "module 'block'" in message
    assert f"{THIS_FILE}:{line_of('if y.sum() > 0:')}: if y.sum() > 0:" in message
    assert "depends on tensor values" in message


def test_python_number_read_from_a_tensor_names_module_file_and_line():
    message = trace_error(Wrapper(ReadsANumber()))
    assert "module 'block'" in message and f"{THIS_FILE}:{line_of('scale = float(x.abs().max())')}" in message


def test_unrecognised_expert_module_suggests_register_experts():
    message = trace_error(Wrapper(LoopedExperts()))
    assert "module 'block'" in message
    assert f"{THIS_FILE}:{line_of('tokens = torch.nonzero(')}" in message
    assert "LoopedExperts holds 3-d expert weights" in message and "register_experts" in message


def test_mutating_a_buffer_is_refused_naming_module_buffer_and_line():
    model = Wrapper(nn.BatchNorm1d(4))  # training mode counts batches in a buffer
    message = trace_error(model, torch.randn(3, 4))
    assert "module 'block'" in message and "buffer block.num_batches_tracked" in message
    # The innermost frame outside torch: where the model calls the module that mutates.
    assert f"{THIS_FILE}:{line_of('return self.block(x)')}: return self.block(x)" in message


def test_loss_must_be_a_scalar():
    message = trace_error(Wrapper(nn.Linear(4, 4)), loss_fn=lambda out, x: out)
    assert message == "loss_fn: loss_fn must return a floating-point scalar tensor, got (2, 4)"


def test_errors_inside_the_loss_function_name_it_and_its_line():
    def loss_fn(out, x):
        return out.sum() if out.max() > 0 else out.mean()

    message = trace_error(Wrapper(nn.Linear(4, 4)), loss_fn=loss_fn)
    assert message.startswith(f"cannot trace loss_fn at {__file__}:{line_of('if out.max() > 0 else')}")


def test_random_ops_in_training_mode_draw_from_a_seed_input_and_eval_mode_traces_without():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.dropout = nn.Dropout(0.1)

        def forward(self, x):
            return self.dropout(self.proj(x))

    model = Wrapper(Noisy())
    x = torch.randn(2, 4)
    traced = trace(model, (x,), square_loss)
    assert traced.takes_seed
    assert [n.name for n in traced.graph_module.graph.nodes if n.op == "placeholder"][-1] == "seed"
    torch.manual_seed(4)
    expected = square_loss(model(x), x)
    assert torch.equal(traced.run(model, x, seed=4)[0], expected.detach())
    assert not trace(model.eval(), (x,), square_loss).takes_seed


def test_attention_dropout_is_refused():
    class Attends(nn.Module):
        def forward(self, x):
            return nn.functional.scaled_dot_product_attention(x, x, x, dropout_p=0.1)

    class WithWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.attention = Attends()

        def forward(self, x):
            return self.attention(self.proj(x)[None])

    message = trace_error(WithWeight())
    assert "module 'attention'" in message and "attention dropout (p=0.1)" in message


def test_bad_arguments_are_refused_before_tracing():
    model = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="model must be an nn.Module, got function"):
        trace(lambda x: x, (torch.randn(2, 4),))
    with pytest.raises(TypeError, match="example input 1 is a int"):
        trace(model, (torch.randn(2, 4), 3))
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        trace(model, (torch.randn(2, 4),), "mean")
    with pytest.raises(TraceError, match=r"on several devices \['cpu', 'meta'\]"):
        trace(model, (torch.empty(2, 4, device="meta"),))
    with pytest.raises(TypeError, match="input_names"):
        trace(model, (torch.randn(2, 4),), input_names=["a", "b"])
    frozen = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(TraceError, match="no parameter requires grad"):
        trace(frozen, (torch.randn(2, 4),), square_loss)


def test_hf_experts_with_another_layout_are_refused_naming_the_attribute():
    model = hf_models.build("mixtral")
    model.model.layers[1].mlp.experts.is_transposed = True
    with pytest.raises(AdapterError, match=r"model\.layers\.1\.mlp\.experts: MixtralExperts\.is_transposed is True"):
        trace(model, (torch.zeros(2, 4, dtype=torch.long),), lm_loss)
    assert "forward" not in model.model.layers[0].mlp.experts.__dict__  # nothing was left patched


def test_hf_experts_with_an_unknown_activation_are_refused():
    from transformers.activations import ACT2FN

    model = hf_models.build("qwen2_moe")
    model.model.layers[0].mlp.experts.act_fn = ACT2FN["quick_gelu"]
    with pytest.raises(AdapterError, match=r"layers\.0\.mlp\.experts\.act_fn: activation QuickGELUActivation is none"):
        trace(model, (torch.zeros(2, 4, dtype=torch.long),), lm_loss)


def test_torchtitan_block_scoring_expert_inputs_is_refused():
    model = TitanMoE(TitanConfig(score_before_experts=True))
    with pytest.raises(AdapterError, match=r"layers\.0\.moe: score_before_experts=True"):
        trace(model, (torch.zeros(2, 4, dtype=torch.long),), lm_loss)


def test_grouped_experts_that_take_grouped_tokens_outside_a_block_are_refused():
    experts = TitanMoE(TitanConfig()).layers[0].moe.experts  # forward(x, num_tokens_per_expert)
    with pytest.raises(AdapterError, match=r"block: GroupedExperts\.forward takes 2 arguments"):
        trace(Wrapper(experts), (torch.randn(5, 32),), square_loss)
