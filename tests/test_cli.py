"""The command line: the demo's output, the mesh tables, one-line errors with hints."""

import subprocess
import sys

from shardgraph.cli import main


def test_demo_shards_and_rebuilds_bit_exact(capsys):
    assert main(["demo", "--mesh", "world=4,tp=2,ep=2,etp=2"]) == 0
    out = capsys.readouterr().out
    assert "Sharding(ep=Shard(0), etp=InterleavedShard(1, stripes=2))" in out
    assert "rank 1: dim0 [0:2)  dim1 [4:8) [12:16)" in out
    assert out.count("unshard(pieces) == ") == 2 and "False" not in out
    assert "bit-exact: True" in out


def test_mesh_command_prints_group_tables(capsys):
    assert main(["mesh", "world=4,tp=2,ep=4"]) == 0
    out = capsys.readouterr().out
    assert "ep groups      {0,1,2,3}" in out and "dp groups      {0,2} {1,3}" in out


def test_bad_mesh_is_one_line_with_a_hint(capsys):
    assert main(["mesh", "world=8,ep=3"]) == 2
    err = capsys.readouterr().err
    assert "stage % (ep*etp) != 0" in err and "hint:" in err and "Traceback" not in err


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "shardgraph", "mesh", "world=2,tp=2"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "tp groups      {0,1}" in result.stdout


def test_compile_checks_parity_and_prints_the_summary(capsys, tmp_path):
    dump = tmp_path / "out"
    status = main(["compile", "examples/moe_model.py", "--mesh", "world=4,tp=2,ep=2", "--check", "--dump", str(dump)])
    out = capsys.readouterr().out
    assert status == 0
    assert "-> OK" in out and "communication per rank per step" in out and "gradient sync" in out
    assert (dump / "report.json").exists() and (dump / "lowered.py").exists()
    assert main(["report", str(dump / "report.json"), "--max-values", "5"]) == 0
    assert "collectives" in capsys.readouterr().out


def test_compile_errors_are_one_line_with_a_hint(capsys, tmp_path):
    assert main(["compile", "examples/no_such_model.py", "--mesh", "world=2,ep=2"]) == 2
    err = capsys.readouterr().err
    assert "model file 'examples/no_such_model.py' does not exist" in err and "hint:" in err
    assert main(["compile", "examples/moe_model.py", "--mesh", "world=8,ep=3"]) == 2
    assert "stage % (ep*etp) != 0" in capsys.readouterr().err
    plan = tmp_path / "plan.json"
    plan.write_text('{"layers.*.mlp.nothing_here": "colwise"}')
    assert main(["compile", "examples/moe_model.py", "--mesh", "world=2,tp=2", "--plan", str(plan)]) == 2
    err = capsys.readouterr().err
    assert "plan patterns match no parameter: 'layers.*.mlp.nothing_here'" in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
