"""The README's snippets run as written: its Python blocks as one script, its CLI lines parse."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from shardgraph.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_python_snippets_run_as_one_script(tmp_path):
    blocks = _blocks("python")
    assert len(blocks) >= 2
    script = tmp_path / "readme_snippets.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    # As if saved at the repository root and run there, but with out/ written under tmp_path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "report.json").exists() and (tmp_path / "out" / "lowered.py").exists()
    assert "communication per rank per step" in result.stdout


def test_readme_command_lines_parse_and_name_existing_files():
    commands = [shlex.split(line, comments=True) for block in _blocks("bash") for line in block.splitlines()
                if line.startswith("python -m shardgraph")]
    assert len(commands) >= 6
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(command[3:])
        model = getattr(args, "model", None)
        assert model is None or (ROOT / model).is_file(), command
