import json
import os
import subprocess
import sys


def interpreted_rows(script: str) -> list[dict]:
    """Run ``script`` (beside this file) in a subprocess under ``TRITON_INTERPRET=1`` and return the
    JSON rows it prints: the interpreter must be chosen before Triton compiles anything, and the
    rest of the suite must not run interpreted kernels."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    environment = dict(os.environ, TRITON_INTERPRET="1")
    completed = subprocess.run([sys.executable, path], capture_output=True, text=True, env=environment, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]


def write_rows_where_asked(rows: list[dict], device: str) -> None:
    """The script side: with ``--out PATH`` on its command line (a GPU run from
    ``benchmarks/one_gpu_runs.sh``), the rows it printed, written as one JSON file."""
    if "--out" not in sys.argv:
        return
    import torch

    with open(sys.argv[sys.argv.index("--out") + 1], "w") as handle:
        json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else device, "torch": torch.__version__,
                   "rows": rows}, handle, indent=1)
