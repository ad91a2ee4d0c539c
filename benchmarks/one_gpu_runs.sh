#!/usr/bin/env bash
# Issue #23's one-GPU measurements, in one go, each ratio against its baseline timed in the same
# process:
#   moe_rows      the MoE row kernels (dispatch gather, combine, its backward, SwiGLU) against
#                 float64 and against the aten ops they replace, compiled for the GPU (the tests
#                 run them interpreted)
#   rms_norm_check, rms_norm  the RMSNorm kernels the same way; then the op's forward + backward
#                 against HF's module eager and under torch.compile
#   rotary_check  the rotary embedding kernels against the aten form, bit for bit, and both timed
#                 at Qwen3-30B-A3B's q and k
#   wgrad_sgd     the grouped wgrad with the SGD step in its epilogue against the wgrad and then
#                 the step, at Qwen3-30B-A3B's and a Mixtral-like expert shape (agreement first)
#   grouped_gemm  ours (the timed schedule callers get), the Triton kernels alone and
#                 torch._grouped_mm on the large-K and wide-N expert shapes, after the
#                 correctness sweep (the forced torch schedule against float64 among it)
#   moe_block     the Qwen3-30B-A3B block at 8192 tokens: ours plain and under inductor, each with
#                 the row kernels and with the row steps as aten ops (both inductor columns
#                 profiled), HF's block eager and compiled, and its grouped GEMMs alone (the ceiling)
#   train_step    HF Qwen3-MoE's train step (eager, torch.compile) against the program (plain and
#                 under inductor; SGD outside it, and inside it with the expert steps fused into
#                 their wgrad and without, the plain program with its norms or its rotary
#                 embedding as aten ops, the plain step replayed as a CUDA graph; both SGD
#                 programs profiled), the issue's
#                 4 layers x 2 x 4096
#   fused_loss    the fused output projection + loss alone against the unfused ops, at the
#                 default chunk budget and two smaller ones
#   predict       the example model's program with AdamW under inductor, beside its predicted step
# Each writes benchmarks/results/one_gpu_<run>.json (or under $OUT) and its log beside it.
#
#   benchmarks/one_gpu_runs.sh                        # every run
#   benchmarks/one_gpu_runs.sh --runs moe_block,predict
#   benchmarks/one_gpu_runs.sh --dry-run              # print the commands, run nothing
#
# Settings (environment): OUT (where JSON and logs go), RUN_TIMEOUT (seconds per run, 420).
set -u -o pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dry_run=0
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --runs) only="$2"; shift ;;
        --runs=*) only="${1#--runs=}" ;;
        -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "one_gpu_runs.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

out=${OUT:-$here/results}
run_timeout=${RUN_TIMEOUT:-420}
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# name|script|arguments (the JSON path is added)
runs=(
    "moe_rows|../tests/kernels/moe_rows_interpreted.py|--device cuda"
    "rms_norm_check|../tests/kernels/rms_norm_interpreted.py|--device cuda"
    "rms_norm|rms_norm.py|"
    "rotary_check|../tests/kernels/rotary_interpreted.py|--device cuda"
    "wgrad_sgd|wgrad_sgd.py|"
    "grouped_gemm|grouped_gemm.py|--shapes large --distributions 8x2048 --rounds 3"
    "moe_block|moe_block.py|--shapes qwen3_30b_a3b --tokens 8192 --routing balanced --columns ours,ours_inductor,ours_aten_rows,ours_aten_rows_inductor,hf,hf_compiled,grouped_gemm_only --skip-check --profile ours_inductor,ours_aten_rows_inductor"
    "train_step|train_step.py|--models qwen3_moe --variants eager,torch_compile,shardgraph,shardgraph_compile,shardgraph_sgd,shardgraph_sgd_compile,shardgraph_sgd_compile_unfused,shardgraph_sgd_aten_norms,shardgraph_sgd_aten_rotary,shardgraph_sgd_cudagraph --steps 10 --profile --profile-variants shardgraph_sgd,shardgraph_sgd_compile"
    "fused_loss|fused_loss.py|--skip-train --budgets-mib 512 1024"
    "predict|train_step.py|--models ours --variants shardgraph_adamw_compile --steps 10 --predict"
)

[ "$dry_run" = 1 ] || mkdir -p "$out"
failed=0
for entry in "${runs[@]}"; do
    IFS='|' read -r name script arguments <<< "$entry"
    if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then
        continue
    fi
    command="timeout --kill-after=30 $run_timeout python3 $here/$script $arguments --out $out/one_gpu_$name.json"
    echo "# run $name"
    echo "$command"
    [ "$dry_run" = 1 ] && continue
    started=$(date +%s)
    $command </dev/null > "$out/one_gpu_$name.log" 2>&1
    status=$?
    tail -n 25 "$out/one_gpu_$name.log"
    echo "# run $name: exit $status after $(( $(date +%s) - started )) s"
    [ $status -ne 0 ] && failed=$((failed + 1))
done
exit $failed
