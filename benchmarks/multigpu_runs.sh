#!/usr/bin/env bash
# Issue #27's real multi-GPU runs, in one go: for the GPUs this machine has (N from nvidia-smi),
# every mesh the issue names, each one torchrun of benchmarks/multigpu.py that runs
#   - parity (float32, tiny config, zero=3 where the run is zero=3) against one GPU,
#   - our compiled training step (AdamW in the program, bf16 compute, fp32 master weights, under
#     torch.compile), its throughput, MFU, profiler breakdown, predicted step beside the measured
#     one, and the all-to-all bandwidth it achieves against NCCL's own all_to_all_single,
#   - torchtitan the package's own Qwen3 MoE training at the same shapes (--titan).
# Each writes benchmarks/results/multigpu_<nccl|gloo>_n<N>_<run>.json (or under $OUT), then a summary
# table of them all (multigpu_<nccl|gloo>_n<N>.md beside them).
#
#   benchmarks/multigpu_runs.sh                 # every run for this machine's N (2, 4 or 8)
#   benchmarks/multigpu_runs.sh --runs tp2_ep4,tp1_ep8   # some of them (names: --dry-run lists them)
#   benchmarks/multigpu_runs.sh --dry-run       # print the commands, run nothing
#   benchmarks/multigpu_runs.sh --gloo          # 4 CPU processes, tiny shapes: the whole path, here
#
# Settings (environment): LAYERS (2), SEQ (4096), BATCH_PER_GPU (1: the global batch is N x this
# many sequences, so every mesh of one N moves the same tokens per GPU), STEPS (10), WARMUP (3:
# the compiled step is traced once with its host-read split sizes symbolic, so a new routing does
# not recompile; graphs_compiled_in_timed_steps in the JSON says whether anything did),
# STEP_TIMEOUT (seconds per run, 480), WHEELS (the torchtitan wheels, ../.whl from here),
# TITAN_SITE (where they are installed, /tmp/titan_site), OUT (where JSON goes), GPUS (N, instead
# of nvidia-smi's count), EXTRA (more arguments for every multigpu.py run).
set -u -o pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
dry_run=0
gloo=0
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --gloo) gloo=1 ;;
        --runs) only="$2"; shift ;;
        --runs=*) only="${1#--runs=}" ;;
        -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "multigpu_runs.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# NVLink multicast stays off (KINDS.md: it can put a shared host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1

layers=${LAYERS:-2}
seq=${SEQ:-4096}
per_gpu=${BATCH_PER_GPU:-1}
steps=${STEPS:-10}
warmup=${WARMUP:-3}
step_timeout=${STEP_TIMEOUT:-480}
wheels=${WHEELS:-$root/.whl}
titan_site=${TITAN_SITE:-/tmp/titan_site}
out=${OUT:-$root/benchmarks/results}
extra=${EXTRA:-}

if [ "$gloo" = 1 ]; then
    gpus=4
    kind=gloo
else
    if [ -n "${GPUS:-}" ]; then
        gpus=$GPUS
    elif command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
    else
        gpus=0
    fi
    kind=nccl
fi

# The runs of N GPUs, one a line: name|mesh|extra multigpu.py arguments.
plan() {
    case "$kind:$1" in
        nccl:8) printf '%s\n' "tp2_ep4|world=8,tp=2,ep=4|" "tp1_ep8|world=8,tp=1,ep=8|" \
                    "tp2_ep2_etp2|world=8,tp=2,ep=2,etp=2|" "tp2_ep4_zero3|world=8,tp=2,ep=4|--zero 3" ;;
        nccl:4) printf '%s\n' "tp2_ep4|world=4,tp=2,ep=4|" ;;
        nccl:2) printf '%s\n' "ep2|world=2,ep=2|" "tp2|world=2,tp=2|" ;;
        gloo:4) printf '%s\n' "tp2_ep4|world=4,tp=2,ep=4|" "tp1_ep4|world=4,tp=1,ep=4|" \
                    "tp2_ep2_etp2|world=4,tp=2,ep=2,etp=2|" "tp2_ep4_zero3|world=4,tp=2,ep=4|--zero 3" ;;
    esac
}

if [ "$kind" = gloo ]; then
    sizes=(4)
elif [ "$gpus" = 2 ] || [ "$gpus" = 4 ] || [ "$gpus" = 8 ]; then
    sizes=("$gpus")
elif [ "$dry_run" = 1 ]; then
    sizes=(2 4 8)  # no GPUs here: show what each machine would run
    echo "# no 2, 4 or 8 GPUs here ($gpus): the commands for each"
else
    echo "multigpu_runs.sh: the issue's runs are for 2, 4 or 8 GPUs; this machine has $gpus" \
         "(set GPUS, or --gloo for the CPU path, or --dry-run)" >&2
    exit 2
fi

install="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $titan_site $wheels/*.whl"
echo "# JSON to $out; NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST=$TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS=$NVSHMEM_DISABLE_NVLS"
if [ "$dry_run" = 1 ]; then
    echo "$install"
elif [ -d "$titan_site/torchtitan" ]; then
    echo "# torchtitan already installed in $titan_site"
elif ls "$wheels"/*.whl >/dev/null 2>&1; then
    $install || echo "# installing the torchtitan wheels failed: the torchtitan parts will record an error" >&2
else
    echo "# no wheels in $wheels: the torchtitan parts will record that torchtitan is not importable" >&2
fi
export PYTHONPATH="$root:$titan_site${PYTHONPATH:+:$PYTHONPATH}"
[ "$dry_run" = 1 ] || mkdir -p "$out"

failed=0
written=()
for n in "${sizes[@]}"; do
    if [ "$kind" = gloo ]; then
        # Tiny shapes on 4 CPU processes: every part of the path, in seconds a run.
        common="--backend gloo --config tiny --dtype float32 --layers 2 --batch 8 --seq 16 --steps 2"
        common="$common --optimizer adamw --profile --all-to-all --titan --titan-no-compile"
        launcher="env OMP_NUM_THREADS=1 python3 -m torch.distributed.run --nproc-per-node 4"
    else
        common="--backend nccl --config qwen3_30b_a3b --dtype bfloat16 --layers $layers --seq $seq"
        common="$common --batch $((n * per_gpu)) --steps $steps --warmup $warmup --optimizer adamw --compile inductor --profile"
        common="$common --all-to-all --titan --no-baseline"
        launcher="python3 -m torch.distributed.run --nproc-per-node $n"
    fi
    while IFS='|' read -r name mesh more; do
        if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then
            continue
        fi
        json="$out/multigpu_${kind}_n${n}_${name}.json"
        command="timeout --kill-after=30 $step_timeout $launcher $root/benchmarks/multigpu.py --mesh $mesh $common"
        command="$command $more $extra --out $json"
        echo "# run $name (N=$n)"
        echo "$command"
        [ "$dry_run" = 1 ] && continue
        started=$(date +%s)
        $command </dev/null
        status=$?
        echo "# run $name: exit $status after $(( $(date +%s) - started )) s"
        [ $status -ne 0 ] && failed=$((failed + 1))
        [ -f "$json" ] && written+=("$json")
    done < <(plan "$n")
done

if [ "$dry_run" = 0 ] && [ ${#written[@]} -gt 0 ]; then
    python3 "$root/benchmarks/multigpu.py" --summarize "${written[@]}" --out "$out/multigpu_runs_${kind}_n${sizes[0]}.md"
fi
[ "$failed" = 0 ]
