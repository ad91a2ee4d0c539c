"""Coverage of transformers' MoE causal LMs: discover, compile on every mesh, compare with eager.

Every MoE causal LM of the installed transformers is discovered from its config (``discover``:
the causal LMs of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` whose default config has an expert
count, ``num_experts``, ``num_local_experts``, ``n_routed_experts`` or ``moe_num_experts``, at
its top level or in a text sub-config such as DBRX's ``ffn_config``), built from a tiny config
(``tiny_config``: hidden 32, 2 layers, 4 experts, top-2, vocabulary 64, COMMON's keys where the
config has them plus the model type's EXTRAS; nothing downloaded), compiled with
``shardgraph.compile`` for each mesh, run in the simulator, and compared with the unsharded model
run eagerly: loss, every gradient and the weights after one SGD step
(``shardgraph.check.parity_errors``). Each case ends in one of

* ``pass``: within 1e-5 relative error;
* ``refused``: compile raised a clear error before any step (its one-line reason is listed);
* ``not built``: the tiny model could not be built here (the reason is listed);
* ``FAIL``: an error after compile (the step crashed), or an error that is not a refusal;
* ``WRONG``: the step ran but the numbers differ (max relative error shown), or are not finite.

and whether the routed experts were recognised (``moe_experts`` in the graph) and sharded over ep
(every parameter they read their weights from carries a ``Shard`` on ep). A refusal is acceptable;
FAIL and WRONG are bugs. A model type whose causal LM is another discovered one's (a multimodal
wrapper, a config reusing another family's modeling code) is listed and run as that one.

Usage::

    PYTHONPATH=. python benchmarks/model_coverage.py                  # every discovered model type, four meshes
    PYTHONPATH=. python benchmarks/model_coverage.py --family jamba --mesh world=4,tp=2,ep=2
    PYTHONPATH=. python benchmarks/model_coverage.py --list           # what was discovered, and whether it builds
    PYTHONPATH=. python benchmarks/model_coverage.py --family phimoe --train   # train() mode: routers draw
                                                                      # random numbers from a seed

Writes a markdown page to stdout and to ``benchmarks/results/model_coverage.md``, and JSON to
``benchmarks/results/model_coverage.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import re
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MESHES = ["world=1", "world=4,tp=2,ep=2", "world=8,tp=2,ep=4", "world=8,tp=2,ep=2,etp=2"]
TOLERANCE = 1e-5
VOCAB = 64
HIDDEN = 32
EXPERTS = 4

# Config keys set wherever a config has them: a tiny model of any family. EXTRAS below add what a
# model type needs on top (which layers hold experts or attention, head dims that match).
# ``sliding_window``: None unless the default config has a window (then 4, in tiny_config).
COMMON = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "d_model": HIDDEN, "intermediate_size": 32,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "shared_intermediate_size": 16,
    "num_hidden_layers": 2, "n_layers": 2, "num_attention_heads": 4, "n_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "num_experts_per_tok": 2, "num_local_experts": EXPERTS, "num_experts": EXPERTS,
    "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS, "moe_k": 2, "moe_topk": 2, "top_k": 2,
    "max_position_embeddings": 64, "max_seq_len": 64, "first_k_dense_replace": 0, "decoder_sparse_step": 1,
    "n_group": 1, "topk_group": 1, "num_nextn_predict_layers": 0, "sliding_window": None,
    "tie_word_embeddings": False, "use_cache": False, "attn_implementation": "eager", "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2,
}

# Multi-head latent attention (DeepSeek V2/V3 and its descendants) and a sparse-attention indexer
# (DeepSeek V3.2's), tiny.
MLA = {"kv_lora_rank": 16, "num_key_value_heads": 4, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
       "v_head_dim": 8, "n_shared_experts": 1}
INDEXER = {"index_n_heads": 4, "index_head_dim": 16, "index_topk": 4}
INKLING = {"swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 8, "d_rel": 4, "rel_extent": 8,
           "layer_types": ["hybrid_sliding", "hybrid"], "n_shared_experts": 1,
           "unpadded_vocab_size": VOCAB}

# What a model type needs on top of COMMON to build a tiny model that exercises its MoE (which
# layers hold experts or attention, head dims that match, sub-configs). A discovered model type
# without an entry is built from COMMON alone.
EXTRAS: dict[str, dict] = {
    "qwen2_moe": {"mlp_only_layers": []},
    "qwen3_moe": {"mlp_only_layers": []},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"], "mamba_n_heads": 4, "mamba_d_head": 16,
                         "mamba_n_groups": 1, "mamba_d_state": 8, "mamba_chunk_size": 8},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0,
              "mamba_d_state": 4, "mamba_dt_rank": 4, "mamba_expand": 2, "use_mamba_kernels": False},
    "lfm2_moe": {"num_dense_layers": 0, "layer_types": ["conv", "full_attention"]},
    "deepseek_v2": {"kv_lora_rank": 16, "num_key_value_heads": 4, "q_lora_rank": 16, "qk_nope_head_dim": 8,
                    "qk_rope_head_dim": 8, "v_head_dim": 8, "n_shared_experts": 1, "topk_method": "greedy"},
    "deepseek_v3": {"kv_lora_rank": 16, "num_key_value_heads": 4, "q_lora_rank": 16, "qk_nope_head_dim": 8,
                    "qk_rope_head_dim": 8, "v_head_dim": 8, "n_shared_experts": 1},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"], "mlp_only_layers": [],
                   "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
                   "linear_num_value_heads": 4},
    # swiglu_limit: GPT-OSS's 7.0 is never reached by a tiny model's products; 0.5 clamps some.
    "gpt_oss": {"layer_types": ["sliding_attention", "full_attention"], "swiglu_limit": 0.5},
    "llama4_text": {"intermediate_size_mlp": 32, "interleave_moe_layer_step": 1, "num_experts_per_tok": 1,
                    "attention_chunk_size": 64, "no_rope_layer_interval": 2},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 16, "moe_num_experts": EXPERTS, "moe_top_k": 2}},
    "jetmoe": {"kv_channels": 8, "num_key_value_heads": 2},
    "ernie4_5_moe": {"moe_layer_start_index": 0, "moe_layer_end_index": 1, "moe_num_shared_experts": 1},
    "dots1": {"n_shared_experts": 1},
    "glm4_moe": {"n_shared_experts": 1},
    "minimax": {"layer_types": ["linear_attention", "full_attention"], "block_size": 4},
    "exaone_moe": {"n_shared_experts": 1},
    "afmoe": {"num_dense_layers": 0, "layer_types": ["sliding_attention", "full_attention"]},
    "longcat_flash": {"kv_lora_rank": 16, "num_key_value_heads": 4, "q_lora_rank": 16, "qk_nope_head_dim": 8,
                      "qk_rope_head_dim": 8, "v_head_dim": 8, "num_layers": 1, "zero_expert_num": 0},
    "glm4_moe_lite": {"kv_lora_rank": 16, "num_key_value_heads": 4, "q_lora_rank": 16, "qk_nope_head_dim": 8,
                      "qk_rope_head_dim": 8, "v_head_dim": 8, "n_shared_experts": 1},
    "solar_open": {"n_shared_experts": 1},
    "qwen3_5_moe_text": {"layer_types": ["linear_attention", "full_attention"], "linear_key_head_dim": 8,
                         "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4},
    "axk1": {**MLA},
    "axk2": {**MLA, **INDEXER},
    "deepseek_v32": {**MLA, **INDEXER},
    "glm_moe_dsa": {**MLA, **INDEXER},
    # swiglu_limit: the clamps of the experts' gate and up (10.0, 7.0 by default) cut some of a tiny
    # model's products (|gate|, |up| up to 0.4 in DeepSeek-V4's, 0.1 in HunYuan-V4's).
    "hy_v4": {**MLA, **INDEXER, "swiglu_limit": 0.04},
    "kimi_linear": {**MLA, "q_lora_rank": None, "linear_head_dim": 8, "linear_num_heads": 4, "num_experts_per_token": 2},
    "nemotron_h": {"layers_block_type": ["full_attention", "moe"], "moe_shared_expert_intermediate_size": 16,
                   "mamba_num_heads": 4, "mamba_head_dim": 8, "ssm_state_size": 8, "n_groups": 1, "chunk_size": 8,
                   # its default, grouped_mm, takes bfloat16 only on CPU: the eager model could not run
                   "experts_implementation": "eager"},
    "qwen4_exp_text": {"layer_types": ["linear_attention", "indexed_attention"], "linear_key_head_dim": 8,
                       "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "hc_lowrank": 8,
                       "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 4,
                       "indexer_compress_ratio": 2},
    "deepseek_v4": {"q_lora_rank": 16, "o_lora_rank": 16, "o_groups": 2, "qk_rope_head_dim": 8, **INDEXER,
                    "swiglu_limit": 0.15},
    "zaya": {"num_experts_per_tok": 1, "router_hidden_size": 16},
    "gemma4_text": {"enable_moe_block": True, "top_k_experts": 2, "hidden_size_per_layer_input": 8,
                    "vocab_size_per_layer_input": VOCAB, "per_layer_config": {}},
    "flint": {"mlp_only_layers": []},
    "laguna": {"num_attention_heads_per_layer": [4, 4]},
    "mimo_v2_flash": {"v_head_dim": 8},
    "beam": {"mlp_layer_types": ["dense", "sparse"]},
    "minimax_m3_vl_text": {"swiglu_limit": 0.5},  # as GPT-OSS: clamps that a tiny model reaches
    "doge": {"is_moe": True},
    "dots3_note_text": {**MLA, **INDEXER, "num_key_value_heads": 4, "shared_experts_intermediate_size": 16,
                        # its sliding-window layers' own latent attention
                        "swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "swa_q_lora_rank": 16,
                        "swa_kv_lora_rank": 16, "swa_head_dim": 16, "swa_qk_nope_head_dim": 8, "swa_v_head_dim": 8},
    "bailing_hybrid": {"kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
                       "num_key_value_heads": 4},
    "lara_mini": {"linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
                  "linear_num_value_heads": 4},
    # The soft caps of the experts' gate and up (4.0, 25.0 by default) bend a tiny model's products
    # (|gate|, |up| up to 0.4): tanh(0.4 / 0.1) is far from linear.
    "inkling_text": INKLING, "inkling2_text": {**INKLING, "mlp_gate_softcap": 0.1, "mlp_up_softcap": 0.2},
    "inkling2_loop_text": {**INKLING, "mlp_gate_softcap": 0.1, "mlp_up_softcap": 0.2},
}

# Config keys that count a model's routed experts; a causal LM whose default config has one (at
# its top level or in a sub-config of its text, such as DBRX's ffn_config or a multimodal
# model's text_config) is a MoE model. The value may be None or 1 by default (Dots1, Gemma 4,
# HunYuan: experts optional or set by the checkpoint): the key says the code has experts.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# Sub-configs of another modality: experts of a vision or audio tower are not the causal LM's.
OTHER_MODALITIES = ("vision_config", "audio_config")


@dataclasses.dataclass
class Discovered:
    """A MoE causal LM of the installed transformers."""

    model_type: str
    class_name: str
    expert_fields: dict  # the expert-count keys of its default config (dotted for sub-configs) and values
    runs_as: str | None = None  # another discovered model type that builds the same causal LM
    note: str = ""  # why it runs as that one, or why its default config could not be read


def _expert_fields(defaults: dict) -> dict:
    found = {key: defaults[key] for key in EXPERT_COUNT_KEYS if key in defaults}
    for name, sub in defaults.items():
        if isinstance(sub, dict) and name not in OTHER_MODALITIES:
            found.update({f"{name}.{key}": sub[key] for key in EXPERT_COUNT_KEYS if key in sub})
    # An expert count of 0 is a dense configuration of a config class shared with dense models.
    return found if any(value != 0 for value in found.values()) else {}


def _quiet():
    """transformers warns about default token ids and rope parameters of default configs."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    import transformers
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    stack.callback(transformers.logging.set_verbosity, verbosity)
    return stack


def discover() -> list[Discovered]:
    """Every MoE causal LM of the installed transformers, by its config's expert-count fields.

    Reads ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (model type -> causal LM class) and instantiates
    each model type's config class with its defaults (no weights, nothing downloaded). A model
    type whose causal LM is another discovered model type's (a multimodal wrapper whose causal LM
    is its text model, a config class reusing another family's modeling code) is kept with
    ``runs_as`` naming that one; a config whose defaults cannot be built is kept if its
    signature names an expert count, with the error as ``note``.
    """
    import inspect

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found: dict[str, Discovered] = {}
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if model_type not in CONFIG_MAPPING:
            continue
        config_class = CONFIG_MAPPING[model_type]
        try:
            with _quiet():
                defaults = config_class().to_dict()
        except Exception as error:  # noqa: BLE001 - a config that needs arguments
            parameters = inspect.signature(config_class).parameters
            named = {key: parameters[key].default for key in EXPERT_COUNT_KEYS if key in parameters}
            if named:
                found[model_type] = Discovered(model_type, class_name, named,
                                               note=f"default config not built: {_one_line(error, 150)}")
            continue
        fields = _expert_fields(defaults)
        if fields:
            found[model_type] = Discovered(model_type, class_name, fields)
    for entry in found.values():
        text_type = None
        text_config = getattr(CONFIG_MAPPING[entry.model_type], "sub_configs", {}).get("text_config")
        if text_config is not None:
            text_type = getattr(text_config, "model_type", None)
        if text_type in found and text_type != entry.model_type:
            entry.runs_as, entry.note = text_type, f"multimodal: its language model is {text_type}'s"
            continue
        sharing = [other for other in found.values() if other.class_name == entry.class_name and other is not entry]
        if sharing:
            with _quiet():
                own_type = getattr(getattr(transformers, entry.class_name).config_class, "model_type", None)
            if own_type != entry.model_type and own_type in found:
                entry.runs_as, entry.note = own_type, f"its causal LM is {entry.class_name}, built with {own_type}'s config"
    return sorted(found.values(), key=lambda entry: entry.model_type)


# Families whose zero-initialised parameters are drawn at random after building: GPT-OSS's expert
# and attention biases (a bias that is zero cannot show that it is added once, split right or
# given the right gradient); Doge's dynamic-mask scale ``self_attn.A`` (at zero the mask is
# exp(0) = 1 everywhere: ``dt_proj`` gets no gradient, and A's own gradient is a sum that
# cancels to 1e-5 of its terms, where float32 rounding alone moves it by 1e-5 relative);
# DeepSeek-V4's attention sinks, compressor position biases and hyper-connection biases (with
# ``hc_head.hc_base`` at zero every stream weight is sigmoid(~0) = 0.5 and the gradient of
# ``hc_head.hc_scale`` is a sum of mean-zero terms: float32 rounding moves it by 1e-4 relative,
# HF's own batched_mm experts in float32 are 3.5e-4 from float64).
NONZERO_PARAMETERS = {"gpt_oss", "doge", "deepseek_v4"}


LAYER_LIST_SUFFIXES = ("layer_types", "_layers", "layers_block_type")


def _two_layer_kinds(kinds: list[str]) -> list[str]:
    """A default config's per-layer kinds cut to two layers: the first and the first that differs
    from it, so that two layers still hold both kinds (a sliding and a full attention layer, a
    dense and a sparse MLP) where the default's first two are alike."""
    return [kinds[0], next((kind for kind in kinds if kind != kinds[0]), kinds[0])]


def _trim_layer_lists(config) -> None:
    """Per-layer lists still as long as the default depth after building: keep two entries."""
    layers = getattr(config, "num_hidden_layers", 2)
    for key, value in list(config.to_dict().items()):
        if isinstance(value, list) and len(value) > layers and key.endswith(LAYER_LIST_SUFFIXES):
            with contextlib.suppress(Exception):
                setattr(config, key, value[:layers])


def tiny_config(model_type: str):
    """The tiny config of ``model_type``: COMMON where its config has the key, then EXTRAS."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    with _quiet():
        defaults = config_class().to_dict()
    aliases = getattr(config_class, "attribute_map", {})  # a common name -> the config's own
    settings = {k: v for k, v in COMMON.items() if k in defaults or k in aliases}
    settings["attn_implementation"] = "eager"
    window = defaults.get(aliases.get("sliding_window", "sliding_window"))
    if isinstance(window, int) and not isinstance(window, bool) and window > 0:
        # A sliding window shorter than the tiny batch's 8 tokens, so that it masks something.
        settings["sliding_window"] = 4
    # Lists of layer kinds are cut before building: a config that derives them from its depth
    # (every sixth layer full attention) would give two layers of one kind.
    for key, value in defaults.items():
        if (key.endswith(LAYER_LIST_SUFFIXES) and isinstance(value, list) and len(value) > COMMON["num_hidden_layers"]
                and all(isinstance(kind, str) for kind in value)):
            settings[key] = _two_layer_kinds(value)
    settings.update(EXTRAS.get(model_type, {}))
    with _quiet():
        config = config_class(**settings)
    _trim_layer_lists(config)
    if model_type == "dbrx" and not hasattr(config.attn_config, "rope_theta"):
        # transformers 5.24's DbrxAttention reads attn_config.rope_theta, which its config lacks.
        config.attn_config.rope_theta = 10000.0
    return config


def build(family: str, seed: int = 0):
    """The tiny model of model type ``family`` (float32, CPU, eager attention), or raise."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = tiny_config(family)
    torch.manual_seed(seed)
    with _quiet():
        model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])(config).float().eval()
    for name, table in model.named_buffers():
        if name.endswith("tid2eid"):
            # DeepSeek-V4's hash routing reads its experts from a token -> experts table that HF
            # starts at zero (set by the checkpoint): every token's slots would all pick expert 0,
            # and their weights s / (s + s) would give the router no gradient. Distinct experts per
            # token instead, drawn at random.
            generator = torch.Generator().manual_seed(seed + 2)
            rows = [torch.randperm(EXPERTS, generator=generator)[:table.shape[1]] for _ in range(table.shape[0])]
            table.copy_(torch.stack(rows))
    if family in NONZERO_PARAMETERS:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for parameter in model.parameters():
                if not parameter.any():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    # Routers that add noise or drop tokens in training mode would differ run to run; eval keeps
    # dropout off while autograd still runs.
    return model


def lm_loss(output, input_ids):
    logits = getattr(output, "logits", output)
    # At least float32 (a bf16 model's loss as HF computes it); a float64 model keeps float64.
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}" + ("..." if len(text) > limit else "")


# Errors that compile raises on purpose: a clear refusal before any work. Anything else raised by
# compile (an AttributeError inside a pass, a KeyError) is a crash, not a refusal.
def _refusal_types():
    from passes.pipeline import PassContractError
    from passes.plan import PlanError
    from passes.propagate import PropagationError
    from shardgraph.frontend.errors import AdapterError
    from shardgraph.placement import ShardingError

    found = [AdapterError, PlanError, PropagationError, ShardingError, NotImplementedError]
    with contextlib.suppress(ImportError):
        from shardgraph.frontend.errors import TraceError
        found.append(TraceError)
    return tuple(t for t in found if t is not PassContractError)


def _is_refusal(error: BaseException) -> bool:
    # compile's own up-front checks raise ValueError with a message that starts "compile:".
    return isinstance(error, _refusal_types()) or (type(error) is ValueError and str(error).startswith("compile:"))


def _experts_state(program) -> tuple[bool, bool]:
    """(recognised: a moe_experts op in the graph, sharded: every parameter it reads its expert
    weights from is split over ep)."""
    from passes.plan import expert_parameters

    experts = expert_parameters(program.traced.graph_module)
    recognised = any(str(node.target).startswith("shardgraph.moe_experts.")
                     for node in program.traced.graph_module.graph.nodes)
    if not recognised or program.mesh.ep == 1:
        return recognised, False
    sharded = bool(experts) and all(program.parameter_sharding(name).placement("ep").is_shard() for name in experts)
    return recognised, sharded


def run_case(family: str, mesh_text: str, batch: int = 8, seq: int = 8, train: bool = False) -> dict:
    import shardgraph as sg
    from shardgraph.check import parity_errors

    row = {"model": family, "mesh": mesh_text, "status": "", "detail": "", "experts_recognised": None,
           "experts_sharded": None, "seconds": 0.0}
    started = time.perf_counter()
    try:
        model = build(family)
    except Exception as error:  # noqa: BLE001 - a family that cannot be built here is listed, not fatal
        row.update(status="not built", detail=_one_line(error))
        return row
    if train:
        # Routers that add noise or sample experts draw from the program's seed; parity_errors
        # runs the eager model after torch.manual_seed of the same seed.
        model.train()
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(3))
    try:
        # A tiny config the model's own code cannot run (head counts its attention does not
        # repeat, a kernel that takes bfloat16 only) is the table's problem, not a refusal.
        with torch.no_grad(), _quiet():
            model(ids)
    except Exception as error:  # noqa: BLE001
        row.update(status="not built", detail="the eager model fails: " + _one_line(error),
                   seconds=time.perf_counter() - started)
        return row
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = sg.compile(model, sg.MeshSpec.parse(mesh_text), (ids,), lm_loss)
    except Exception as error:  # noqa: BLE001
        if not _is_refusal(error):
            row.update(status="FAIL", detail="compile crashed: " + _one_line(error),
                       seconds=time.perf_counter() - started, traceback=traceback.format_exc(limit=-4))
            return row
        row.update(status="refused", detail=_one_line(error), seconds=time.perf_counter() - started)
        return row
    recognised, sharded = _experts_state(program)
    row.update(experts_recognised=recognised, experts_sharded=sharded)
    try:
        errors, result = parity_errors(program, model, (ids,), lm_loss)
    except Exception as error:  # noqa: BLE001
        row.update(status="FAIL", detail=_one_line(error), seconds=time.perf_counter() - started,
                   traceback=traceback.format_exc(limit=-4))
        return row
    worst = max(errors.loss, errors.gradients, errors.weights)
    row["max_rel_error"] = worst
    referee = (float64_referee(program, model, ids, result, focus=errors.worst_gradient)
               if math.isfinite(worst) and worst >= TOLERANCE else None)
    if referee is not None:
        row["float64_referee"] = referee
    if math.isfinite(worst) and worst < TOLERANCE:
        row["status"] = "pass"
    elif referee is not None and referee["no_further_than_eager"]:
        focus = referee["focus"]
        row.update(status="pass", detail=(
            f"float32 comparison {worst:.3g} ({errors.worst_gradient}); against float64 the program is "
            + (f"{focus['program_error']:.3g} off there and float32 eager up to {focus['eager_error']:.3g} "
               f"over {referee['eager_draws']} draws; closest margin " if focus else "")
            + f"{referee['program_error']:.3g} against {referee['eager_error']:.3g} ({referee['worst_parameter']})"))
    else:
        row.update(status="WRONG", detail=f"max rel error {worst:.3g} (loss {errors.loss:.3g}, gradients "
                                          f"{errors.gradients:.3g} worst {errors.worst_gradient}, weights "
                                          f"{errors.weights:.3g})")
        if referee is not None:
            row["detail"] += (f"; against float64: program {referee['program_error']:.3g}, float32 eager "
                              f"{referee['eager_error']:.3g} ({referee['worst_parameter']})")
    row["seconds"] = time.perf_counter() - started
    return row


def float64_referee(program, model, ids, result, ratio: float = 1.5, perturbations: int = 4,
                    focus: str | None = None) -> dict | None:
    """Where the program and the float32 eager model differ by more than the tolerance: how far
    each is from the same model run in float64. A gradient that is a sum of nearly cancelling
    terms is ill-conditioned, and float32 eager is itself that far from the exact value; the
    program then counts as right when, for every parameter, it is no further from float64 than
    float32 eager is (within ``ratio``, the bf16 criterion one precision up).

    How far float32 eager is depends on where its roundings happen to fall: one draw can be
    lucky. So eager's distance is the largest over the model as given and ``perturbations``
    copies of it whose float32 parameters are moved by one rounding (a relative 2^-24, signs
    drawn from a fixed seed), each measured against its own float64 run. ``focus``: a parameter
    whose two distances are reported as well (the one the float32 comparison found worst). None
    where the model cannot run in float64."""
    import copy

    names = list(program.gradient_names)

    def gradients_of(run) -> dict:
        if getattr(program, "takes_seed", False):
            torch.manual_seed(0)
        parameters = dict(run.named_parameters())
        loss = lm_loss(run(ids), ids)
        reached = torch.autograd.grad(loss, [parameters[n] for n in names], allow_unused=True)
        return {n: torch.zeros_like(parameters[n]) if g is None else g for n, g in zip(names, reached)}

    def in_float64(run):
        exact = copy.deepcopy(run).double()
        if getattr(exact, "_can_set_experts_implementation", lambda: False)():
            exact.set_experts_implementation("eager")  # torch._grouped_mm takes no float64
        return exact

    def off(value, truth):
        truth = truth.double()
        return ((value.double() - truth).norm() / truth.norm().clamp_min(1e-300)).item()

    def perturbed(generator):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for parameter in moved.parameters():
                if parameter.dtype == torch.float32:
                    signs = torch.randint(0, 2, parameter.shape, generator=generator).mul_(2).sub_(1)
                    parameter.mul_(1 + signs.to(parameter.dtype) * 2.0**-24)
        return moved

    try:
        reference = gradients_of(in_float64(model))
        eager = gradients_of(model)
        eager_error = {n: off(eager[n], reference[n]) for n in names}
        generator = torch.Generator().manual_seed(0)
        for _ in range(perturbations):
            moved = perturbed(generator)
            moved_eager, moved_reference = gradients_of(moved), gradients_of(in_float64(moved))
            for n in names:
                eager_error[n] = max(eager_error[n], off(moved_eager[n], moved_reference[n]))
    except Exception:  # noqa: BLE001 - a model that cannot run in float64 gets no referee
        return None
    program_error = {n: off(result.gradients[n], reference[n]) for n in names}
    # A parameter float32 eager gets exactly right to rounding (1e-7) may be a few ulps off in
    # the program with no fault: the absolute floor below.
    worst = max(names, key=lambda n: program_error[n] - ratio * eager_error[n])
    return {"program_error": program_error[worst], "eager_error": eager_error[worst], "worst_parameter": worst,
            "eager_draws": 1 + perturbations,
            "focus": ({"parameter": focus, "program_error": program_error[focus], "eager_error": eager_error[focus]}
                      if focus in program_error else None),
            "no_further_than_eager": all(program_error[n] <= ratio * eager_error[n] + 1e-6 for n in names)}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | mesh | status | experts sharded | detail |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        sharded = {None: "-", True: "yes", False: "no"}[row["experts_sharded"]]
        if row["experts_recognised"] is False:
            sharded = "not recognised"
        elif row["mesh"] == "world=1" and row["experts_recognised"]:
            sharded = "n/a (ep=1)"
        lines.append(f"| {row['model']} | {row['mesh']} | {row['status']} | {sharded} | {_short(row['detail'], 400)} |")
    return "\n".join(lines)


def family_summary(rows: list[dict]) -> dict[str, str]:
    """Per model type: ``pass`` (every mesh run passed), ``refused``, ``not built``, or the worst
    status among ``FAIL``, ``WRONG`` and a mix (``pass/refused``: refused on some meshes)."""
    by_family: dict[str, list[str]] = {}
    for row in rows:
        by_family.setdefault(row["model"], []).append(row["status"])
    summary = {}
    for family, statuses in by_family.items():
        bad = [status for status in ("FAIL", "WRONG") if status in statuses]
        summary[family] = bad[0] if bad else "/".join(sorted(set(statuses), key=["pass", "refused", "not built"].index))
    return summary


def _short(text: str, limit: int = 160) -> str:
    # Source paths from transformers' package on: the install prefix says nothing.
    text = re.sub(r"\S*/site-packages/", "", text).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + "..."


def matrix(rows: list[dict], meshes: list[str]) -> str:
    """Model type x mesh: each cell ``pass``, ``refused``, ``not built``, ``FAIL`` or ``WRONG`` with
    its error; then whether the experts were sharded over ep and the first reason given."""
    by_family: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_family.setdefault(row["model"], {})[row["mesh"]] = row
    lines = ["| model type | " + " | ".join(meshes) + " | experts sharded | reason |",
             "| --- | " + " | ".join("---" for _ in meshes) + " | --- | --- |"]
    for family, cells in by_family.items():
        not_built = any(row["status"] == "not built" for row in cells.values())
        statuses = []
        for mesh in meshes:
            row = cells.get(mesh)
            if not_built or row is None:
                statuses.append("not built" if not_built else "-")
            elif row["status"] == "WRONG":
                statuses.append(f"WRONG ({row.get('max_rel_error', float('nan')):.2g})")
            else:
                statuses.append(row["status"])
        split = [row["experts_sharded"] for mesh, row in cells.items() if mesh != "world=1" and row["experts_sharded"] is not None]
        if any(row["experts_recognised"] is False for row in cells.values()):
            sharded = "not recognised"
        elif split:
            sharded = "yes" if all(split) else "no"
        else:
            sharded = "-"
        reason = next((row["detail"] for row in cells.values() if row["detail"]), "")
        lines.append(f"| {family} | " + " | ".join(statuses) + f" | {sharded} | {_short(reason)} |")
    return "\n".join(lines)


def report(rows: list[dict], discovered: list[Discovered], meshes: list[str], train: bool, versions: str) -> str:
    """The markdown page: what was discovered, counts per model type, the model x mesh table, and
    every case with its full reason."""
    summary = family_summary(rows)
    totals: dict[str, int] = {}
    for status in summary.values():
        totals[status] = totals.get(status, 0) + 1
    runs = [entry for entry in discovered if entry.runs_as is None]
    lines = [f"{versions}; meshes {', '.join(meshes)}; {'train' if train else 'eval'} mode; parity tolerance "
             f"{TOLERANCE:g} (loss, gradients, weights after one SGD step).",
             "",
             f"Discovered {len(discovered)} MoE causal LM model types; {len(runs)} build their own causal LM, "
             f"{len(summary)} run here. Per model type: "
             + ", ".join(f"{count} {status}" for status, count in sorted(totals.items())) + ".", ""]
    aliases = [entry for entry in discovered if entry.runs_as is not None]
    if aliases:
        lines += ["Run as another model type (same causal LM class): "
                  + ", ".join(f"{entry.model_type} as {entry.runs_as}" for entry in aliases) + ".", ""]
    lines += [matrix(rows, meshes), "", "Every case:", "", markdown(rows)]
    return "\n".join(lines) + "\n"


def print_discovered(discovered: list[Discovered]) -> None:
    for entry in discovered:
        fields = ", ".join(f"{key}={value}" for key, value in entry.expert_fields.items())
        if entry.runs_as is not None:
            print(f"{entry.model_type}: {entry.class_name} ({fields}); runs as {entry.runs_as}: {entry.note}")
            continue
        try:
            model = build(entry.model_type)
            built = f"builds, {sum(p.numel() for p in model.parameters())} parameters"
        except Exception as error:  # noqa: BLE001 - listed, not fatal
            built = f"not built ({_one_line(error, 200)})"
        print(f"{entry.model_type}: {entry.class_name} ({fields}); {built}"
              + ("" if entry.model_type in EXTRAS else "; COMMON only"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", metavar="MODEL_TYPE",
                        help="model types to run (default: every discovered one; --list shows them)")
    parser.add_argument("--mesh", nargs="+", default=MESHES)
    parser.add_argument("--list", action="store_true",
                        help="only discover: each MoE model type, its expert fields and whether its tiny model builds")
    parser.add_argument("--train", action="store_true",
                        help="run the models in train() mode (random routers draw from the program's seed)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "model_coverage.json"),
                        help="the JSON results; the markdown goes next to it (.md)")
    parser.add_argument("--markdown-from", metavar="JSON",
                        help="only write the markdown page (next to JSON) from a results file of an earlier run")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.markdown_from:
        # The page again from a results file (a new layout without running the table again).
        with open(args.markdown_from) as handle:
            results = json.load(handle)
        page = report(results["rows"], [Discovered(**entry) for entry in results["discovered"]], results["meshes"],
                      results["train"], f"transformers {results['transformers']}, torch {results['torch']}")
        with open(os.path.splitext(args.markdown_from)[0] + ".md", "w") as handle:
            handle.write(page)
        print(page)
        return
    discovered = discover()
    if args.list:
        print_discovered(discovered)
        return
    runnable = [entry.model_type for entry in discovered if entry.runs_as is None]
    unknown = sorted(set(args.family or []) - set(runnable))
    if unknown:
        parser.error(f"not a discovered MoE model type that builds its own causal LM: {', '.join(unknown)} "
                     f"(--list shows them)")
    rows = []
    for family in args.family or runnable:
        for mesh_text in args.mesh:
            row = run_case(family, mesh_text, train=args.train)
            rows.append(row)
            print(f"{family:18} {mesh_text:24} {row['status']:9} {row['seconds']:6.1f}s {row['detail'][:150]}",
                  file=sys.stderr, flush=True)
            if row["status"] == "not built":
                break
    import transformers

    page = report(rows, discovered, args.mesh, args.train, f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(page)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    with open(args.out, "w") as handle:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "machine": platform.machine(), "tolerance": TOLERANCE, "meshes": args.mesh, "train": args.train,
                   "counts": counts, "families": family_summary(rows),
                   "discovered": [dataclasses.asdict(entry) for entry in discovered], "rows": rows},
                  handle, indent=1, default=str)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as handle:
        handle.write(page)
    print(f"\n{counts}; wrote {args.out} and its .md", file=sys.stderr)


if __name__ == "__main__":
    main()
