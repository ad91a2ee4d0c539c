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
