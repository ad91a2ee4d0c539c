"""benchmarks/one_gpu_runs.sh: issue #23's device measurements in one call, each command one that its
script's own argument parser accepts."""

import os
import shlex
import subprocess
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCHMARKS)


def dry_run(*arguments, out="/tmp/one_gpu_out"):
    run = subprocess.run(["bash", os.path.join(BENCHMARKS, "one_gpu_runs.sh"), "--dry-run", *arguments],
                         env={**os.environ, "OUT": out}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return [shlex.split(line) for line in run.stdout.splitlines() if not line.startswith("#")]


def script_arguments(command):
    script = next(i for i, word in enumerate(command) if word.endswith(".py"))
    return os.path.basename(command[script]), command[script + 1:]


def test_a_dry_run_lists_every_run_with_its_json_under_out_and_arguments_its_script_accepts():
    import fused_loss
    import moe_block
    import train_step

    commands = dry_run()
    names = [script_arguments(c)[0] for c in commands]
    assert names == ["moe_rows_interpreted.py", "rms_norm_interpreted.py", "rms_norm.py", "rotary_interpreted.py", "wgrad_sgd.py", "grouped_gemm.py", "moe_block.py", "train_step.py",
                     "fused_loss.py", "train_step.py"]
    for command in commands:
        script, arguments = script_arguments(command)
        assert command[0] == "timeout" and arguments[-2] == "--out"
        assert arguments[-1].startswith("/tmp/one_gpu_out/one_gpu_") and arguments[-1].endswith(".json")
        if script == "moe_block.py":
            args = moe_block.parse_args(arguments)
            assert "grouped_gemm_only" in args.columns and "hf" in args.columns
            assert set(args.profile) <= set(args.columns)
        elif script == "fused_loss.py":
            args = fused_loss.parse_args(arguments)
            assert args.skip_train and args.budgets_mib
        elif script == "train_step.py":
            args = train_step.parse_args(arguments)  # an unknown model or variant exits here
            assert args.models in (["qwen3_moe"], ["ours"])
        elif script == "wgrad_sgd.py":
            import wgrad_sgd

            assert wgrad_sgd.parse_args(arguments).device == "cuda"
        elif script == "rms_norm.py":
            import rms_norm

            assert rms_norm.parse_args(arguments).device == "cuda"
        elif script in ("moe_rows_interpreted.py", "rms_norm_interpreted.py", "rotary_interpreted.py"):
            # The kernel checks compiled for the GPU (the tests run the same script interpreted).
            assert arguments[:2] == ["--device", "cuda"]
        else:
            assert arguments[arguments.index("--shapes") + 1] == "large"


def test_runs_picks_some_and_an_unknown_argument_is_refused():
    picked = dry_run("--runs", "moe_block,predict")
    assert [script_arguments(c)[0] for c in picked] == ["moe_block.py", "train_step.py"]
    assert "--predict" in picked[1]
    run = subprocess.run(["bash", os.path.join(BENCHMARKS, "one_gpu_runs.sh"), "--bogus"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "unknown argument --bogus" in run.stderr
