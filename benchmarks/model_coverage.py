"""Coverage of HF transformers MoE causal LMs: compile, run on every mesh, compare with eager.

Every MoE causal LM of the installed transformers that can be built offline is built from a
tiny config (hidden 32, 2 layers, 4 experts, top-2, vocabulary 64; nothing downloaded), compiled
with ``shardgraph.compile`` for each mesh, run in the simulator, and compared with the unsharded
model run eagerly: loss, every gradient and the weights after one SGD step
(``shardgraph.check.parity_errors``). Each case ends in one of

* ``pass``: within 1e-5 relative error;
* ``refused``: compile raised a clear error before any step (its one-line reason is listed);
* ``FAIL``: an error after compile (the step crashed), or an error that is not a refusal;
* ``WRONG``: the step ran but the numbers differ (max relative error shown), or are not finite.

and whether the routed experts were recognised (``moe_experts`` in the graph) and sharded over ep
(every parameter they read their weights from carries a ``Shard`` on ep). A refusal is acceptable; FAIL and WRONG are bugs.

Usage::

    PYTHONPATH=. python benchmarks/hf_coverage.py                  # every family, four meshes
    PYTHONPATH=. python benchmarks/hf_coverage.py --family jamba --mesh world=4,tp=2,ep=2
    PYTHONPATH=. python benchmarks/hf_coverage.py --list           # families and whether they build
    PYTHONPATH=. python benchmarks/hf_coverage.py --family phimoe --train   # train() mode: routers draw
                                                                   # random numbers from a seed

Writes a markdown table to stdout and JSON to ``benchmarks/results/hf_coverage.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
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

# Config keys set wherever a config has them: a tiny model of any family. Family entries below
# add what a family needs on top (which layers hold experts or attention, head dims that match).
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

# family -> (transformers model type, causal LM class, extra config keys)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "mixtral": ("mixtral", "MixtralForCausalLM", {}),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM", {"mlp_only_layers": []}),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM", {"mlp_only_layers": []}),
    "olmoe": ("olmoe", "OlmoeForCausalLM", {}),
    "granitemoe": ("granitemoe", "GraniteMoeForCausalLM", {}),
    "granitemoeshared": ("granitemoeshared", "GraniteMoeSharedForCausalLM", {}),
    "granitemoehybrid": ("granitemoehybrid", "GraniteMoeHybridForCausalLM",
                         {"layer_types": ["mamba", "attention"], "mamba_n_heads": 4, "mamba_d_head": 16,
                          "mamba_n_groups": 1, "mamba_d_state": 8, "mamba_chunk_size": 8}),
    "jamba": ("jamba", "JambaForCausalLM",
              {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0,
               "mamba_d_state": 4, "mamba_dt_rank": 4, "mamba_expand": 2, "use_mamba_kernels": False}),
    "lfm2_moe": ("lfm2_moe", "Lfm2MoeForCausalLM", {"num_dense_layers": 0, "layer_types": ["conv", "full_attention"]}),
    "phimoe": ("phimoe", "PhimoeForCausalLM", {}),
    "deepseek_v2": ("deepseek_v2", "DeepseekV2ForCausalLM",
                    {"kv_lora_rank": 16, "num_key_value_heads": 4, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                     "v_head_dim": 8, "n_shared_experts": 1, "topk_method": "greedy"}),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3ForCausalLM",
                    {"kv_lora_rank": 16, "num_key_value_heads": 4, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                     "v_head_dim": 8, "n_shared_experts": 1}),
    "qwen3_next": ("qwen3_next", "Qwen3NextForCausalLM",
                   {"layer_types": ["linear_attention", "full_attention"], "mlp_only_layers": [],
                    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
                    "linear_num_value_heads": 4}),
    # swiglu_limit: GPT-OSS's 7.0 is never reached by a tiny model's products; 0.5 clamps some.
    "gpt_oss": ("gpt_oss", "GptOssForCausalLM", {"layer_types": ["sliding_attention", "full_attention"],
                                                  "sliding_window": 4, "swiglu_limit": 0.5}),
    "llama4_text": ("llama4_text", "Llama4ForCausalLM",
                    {"intermediate_size_mlp": 32, "interleave_moe_layer_step": 1, "num_experts_per_tok": 1,
                     "attention_chunk_size": 64, "no_rope_layer_interval": 2}),
    "dbrx": ("dbrx", "DbrxForCausalLM",
             {"attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0}, "ffn_config": {"ffn_hidden_size": 16, "moe_num_experts": EXPERTS,
                                                               "moe_top_k": 2}}),
    "jetmoe": ("jetmoe", "JetMoeForCausalLM", {"kv_channels": 8, "num_key_value_heads": 2}),
    "ernie4_5_moe": ("ernie4_5_moe", "Ernie4_5_MoeForCausalLM",
                     {"moe_layer_start_index": 0, "moe_layer_end_index": 1, "moe_num_shared_experts": 1}),
    "hunyuan_v1_moe": ("hunyuan_v1_moe", "HunYuanMoEV1ForCausalLM", {}),
    "dots1": ("dots1", "Dots1ForCausalLM", {"n_shared_experts": 1}),
    "glm4_moe": ("glm4_moe", "Glm4MoeForCausalLM", {"n_shared_experts": 1}),
    "minimax": ("minimax", "MiniMaxForCausalLM", {"layer_types": ["linear_attention", "full_attention"],
                                                  "block_size": 4}),
    "minimax_m2": ("minimax_m2", "MiniMaxM2ForCausalLM", {}),
    "flex_olmo": ("flex_olmo", "FlexOlmoForCausalLM", {}),
    "exaone_moe": ("exaone_moe", "ExaoneMoeForCausalLM", {"n_shared_experts": 1, "sliding_window": 64}),
    "afmoe": ("afmoe", "AfmoeForCausalLM", {"num_dense_layers": 0, "sliding_window": 4, "layer_types": ["sliding_attention",
                                                                                  "full_attention"]}),
    "cohere2_moe": ("cohere2_moe", "Cohere2MoeForCausalLM", {"sliding_window": 4}),
    "longcat_flash": ("longcat_flash", "LongcatFlashForCausalLM",
                      {"kv_lora_rank": 16, "num_key_value_heads": 4, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                       "v_head_dim": 8, "num_layers": 1, "zero_expert_num": 0}),
    "glm4_moe_lite": ("glm4_moe_lite", "Glm4MoeLiteForCausalLM",
                      {"kv_lora_rank": 16, "num_key_value_heads": 4, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                       "v_head_dim": 8, "n_shared_experts": 1}),
    "bailing_hybrid": ("bailing_hybrid", "BailingHybridForCausalLM", {}),
    "solar_open": ("solar_open", "SolarOpenForCausalLM", {"n_shared_experts": 1}),
    "qwen3_5_moe_text": ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM",
                         {"layer_types": ["linear_attention", "full_attention"], "linear_key_head_dim": 8,
                          "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4}),
}


# Families whose zero-initialised parameters (GPT-OSS's expert and attention biases) are drawn at
# random after building: a bias that is zero cannot show that it is added once, split right or
# given the right gradient.
NONZERO_BIASES = {"gpt_oss"}


def _trim_layer_lists(config) -> None:
    """Per-layer lists of a default config are as long as its default depth: keep two entries."""
    layers = getattr(config, "num_hidden_layers", 2)
    for key, value in list(config.to_dict().items()):
        if isinstance(value, list) and len(value) > layers and key.endswith(("layer_types", "_layers", "layers_block_type")):
            with contextlib.suppress(Exception):
                setattr(config, key, value[:layers])


def build(family: str, seed: int = 0):
    """The tiny model of ``family`` (float32, CPU, eager attention), or raise."""
    import transformers
    from transformers import CONFIG_MAPPING

    model_type, class_name, extra = FAMILIES[family]
    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class().to_dict()
    settings = {k: v for k, v in COMMON.items() if k in defaults or k in getattr(config_class, "attribute_map", {})}
    settings["attn_implementation"] = "eager"
    settings.update(extra)
    config = config_class(**settings)
    _trim_layer_lists(config)
    if model_type == "dbrx" and not hasattr(config.attn_config, "rope_theta"):
        # transformers 5.24's DbrxAttention reads attn_config.rope_theta, which its config lacks.
        config.attn_config.rope_theta = 10000.0
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).float().eval()
    if family in NONZERO_BIASES:
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
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


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


def run_case(family: str, mesh_text: str, batch: int = 8, seq: int = 8, race: bool = False,
             train: bool = False) -> dict:
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
    if not race:
        # The lowered module generates its code on its first call; the simulator makes that call
        # from every rank's thread at once, and concurrent code generation of one fx graph can
        # mix up value names (UnboundLocalError in the generated forward). Generating it here,
        # once, keeps that race out of the table; --race leaves it in.
        real_recompile = getattr(program.graph_module, "real_recompile", None)
        if real_recompile is not None:
            real_recompile()
    try:
        errors, _ = parity_errors(program, model, (ids,), lm_loss)
    except Exception as error:  # noqa: BLE001
        row.update(status="FAIL", detail=_one_line(error), seconds=time.perf_counter() - started,
                   traceback=traceback.format_exc(limit=-4))
        return row
    worst = max(errors.loss, errors.gradients, errors.weights)
    row["max_rel_error"] = worst
    if math.isfinite(worst) and worst < TOLERANCE:
        row["status"] = "pass"
    else:
        row.update(status="WRONG", detail=f"max rel error {worst:.3g} (loss {errors.loss:.3g}, gradients "
                                          f"{errors.gradients:.3g} worst {errors.worst_gradient}, weights "
                                          f"{errors.weights:.3g})")
    row["seconds"] = time.perf_counter() - started
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | mesh | status | experts sharded | detail |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        sharded = {None: "-", True: "yes", False: "no"}[row["experts_sharded"]]
        if row["experts_recognised"] is False:
            sharded = "not recognised"
        elif row["mesh"] == "world=1" and row["experts_recognised"]:
            sharded = "n/a (ep=1)"
        detail = row["detail"].replace("|", "\\|")
        lines.append(f"| {row['model']} | {row['mesh']} | {row['status']} | {sharded} | {detail} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--mesh", nargs="+", default=MESHES)
    parser.add_argument("--race", action="store_true",
                        help="leave the lowered module's code generation to the simulator's rank threads")
    parser.add_argument("--list", action="store_true", help="only build each family and say whether it builds")
    parser.add_argument("--train", action="store_true",
                        help="run the models in train() mode (random routers draw from the program's seed)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "hf_coverage.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.list:
        for family in args.family:
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    model = build(family)
                print(f"{family}: {type(model).__name__}, {sum(p.numel() for p in model.parameters())} parameters")
            except Exception as error:  # noqa: BLE001
                print(f"{family}: not built ({_one_line(error)})")
        return
    rows = []
    for family in args.family:
        for mesh_text in args.mesh:
            row = run_case(family, mesh_text, race=args.race, train=args.train)
            rows.append(row)
            print(f"{family:18} {mesh_text:24} {row['status']:9} {row['seconds']:6.1f}s {row['detail'][:150]}",
                  file=sys.stderr, flush=True)
            if row["status"] == "not built":
                break
    print(markdown(rows))
    import transformers

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    with open(args.out, "w") as handle:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "machine": platform.machine(), "tolerance": TOLERANCE, "counts": counts, "rows": rows},
                  handle, indent=1)
    print(f"\n{counts}; wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
