"""The command line: the demo's output, the mesh tables, meta-device compiles, one-line errors with
hints, help texts and the progress bar."""

import argparse
import io
import resource
import subprocess
import sys
import time

import pytest

from examples.moe_model import shardgraph_entry
from passes.plan import STYLE_DESCRIPTIONS, STYLES
from shardgraph import MeshSpec, cli
from shardgraph.cli import build_parser, main
from shardgraph.progress import Stages


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


# ------------------------------------------------------------------ building on meta, sizing up --check
def test_compile_without_check_builds_the_model_on_meta(capsys):
    assert main(["compile", "examples/moe_model.py", "--mesh", "world=2,ep=2"]) == 0
    out = capsys.readouterr().out
    assert "(tiny, built on meta: no weights allocated)" in out and "communication per rank per step" in out


@pytest.mark.slow
def test_qwen3_30b_report_compiles_on_meta_without_building_weights():
    # The command: it used to build 122 GB of real weights and be killed for memory.
    command = [sys.executable, "-m", "shardgraph", "compile", "examples/moe_model.py", "--config", "qwen3_30b_a3b",
               "--mesh", "world=8,tp=2,ep=4"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "(qwen3_30b_a3b, built on meta: no weights allocated)" in result.stdout
    assert "per rank: parameters" in result.stdout and result.stderr == ""
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    assert peak_kib < 2 * 1024 * 1024  # real weights would take 122 GB


def test_check_of_a_config_too_large_for_memory_is_refused_with_the_estimate(capsys):
    status = main(["compile", "examples/moe_model.py", "--config", "qwen3_30b_a3b", "--mesh", "world=8,tp=2,ep=4",
                   "--check"])
    err = capsys.readouterr().err
    assert status == 2 and "--check of qwen3_30b_a3b on cpu needs about" in err and "GiB is available" in err
    assert "hint: drop --check" in err and "Traceback" not in err


def test_check_is_refused_when_the_estimate_exceeds_available_memory(capsys, monkeypatch):
    monkeypatch.setattr(cli, "available_memory_bytes", lambda device: 1024)
    assert main(["compile", "examples/moe_model.py", "--mesh", "world=2,ep=2", "--check"]) == 2
    err = capsys.readouterr().err
    assert "--check of tiny on cpu needs about" in err and "1.00 KiB is available" in err


def test_check_memory_estimate_counts_weights_and_the_ranks_pieces():
    model, _, _ = shardgraph_entry("tiny", device="meta")
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert cli.check_memory_estimate(model, MeshSpec(1), None) == (5 * weights, weights, weights)
    # world=2 over ep=2: the experts are split, everything else is held by both ranks.
    experts = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    total, _, pieces = cli.check_memory_estimate(model, MeshSpec(2, ep=2), None)
    assert pieces == 2 * weights - experts and total == 3 * weights + 2 * pieces


def test_check_on_the_meta_device_is_refused(capsys):
    assert main(["compile", "examples/moe_model.py", "--mesh", "world=2", "--check", "--device", "meta"]) == 2
    assert "needs real weights" in capsys.readouterr().err


# ------------------------------------------------------------------ commands and defaults
def test_dump_command_writes_the_program_and_report_reads_the_directory(capsys, tmp_path):
    directory = tmp_path / "dumped"
    assert main(["dump", "examples/moe_model.py", str(directory), "--mesh", "world=2,ep=2"]) == 0
    out = capsys.readouterr().out
    assert f"to {directory}: graph.html, lowered.py, memory_communication.png, placed.py, report.json, traced.py" in out
    assert (directory / "lowered_rank1.txt").exists()
    assert main(["report", str(directory), "--max-values", "3"]) == 0
    assert "collectives" in capsys.readouterr().out


def test_default_config_is_the_model_files_own(capsys):
    assert main(["compile", "examples/hf_models.py", "--mesh", "world=2,ep=2"]) == 0
    assert "(mixtral, built on meta" in capsys.readouterr().out


def test_replicate_fallback_lists_the_replicated_ops(capsys, tmp_path):
    model_file = _unruled_model(tmp_path)
    assert main(["compile", model_file, "--mesh", "world=2"]) == 2
    err = capsys.readouterr().err
    assert "2 op(s) have no placement rule" in err and "hint: --replicate-fallback" in err
    assert len(err.splitlines()) == 2
    assert main(["compile", model_file, "--mesh", "world=2", "--replicate-fallback", "--check"]) == 0
    out = capsys.readouterr().out
    assert "-> OK" in out and "replicated for lack of a placement rule: 2 op(s): roll, roll_1" in out


def test_replicate_fallback_says_none_were_needed(capsys):
    assert main(["compile", "examples/moe_model.py", "--mesh", "world=2", "--replicate-fallback"]) == 0
    assert "replicated for lack of a placement rule: none" in capsys.readouterr().out


# ------------------------------------------------------------------ one-line errors
def _assert_one_line_error(capsys, argv, expected):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("shardgraph: error: ") and lines[1].startswith("hint: "), lines
    assert expected in lines[0], lines
    return lines


def test_pipeline_parallel_mesh_is_refused_in_one_line(capsys):
    _assert_one_line_error(capsys, ["compile", "examples/moe_model.py", "--mesh", "world=8,tp=2,ep=2,pp=2"],
                           "pipeline parallelism is not compiled yet")


def test_json_given_a_directory_is_refused_before_compiling(capsys, tmp_path):
    lines = _assert_one_line_error(capsys, ["compile", "examples/moe_model.py", "--mesh", "world=2",
                                            "--json", str(tmp_path)], "is a directory")
    assert str(tmp_path / "report.json") in lines[1]


@pytest.mark.parametrize("content, expected", [
    ("[1, 2]", "holds a JSON list, not a report object"),
    ('{"schema_version": 1, "mesh": {}}', "lacks values, collectives, totals, layers"),
    ('{"schema_version": 1, "mesh": {}, "values": [], "collectives": [], "totals": {}, "layers": {}}',
     "lacks the field 'world'"),
    ("not json", "is not JSON"),
], ids=["json-list", "missing-fields", "missing-nested-field", "not-json"])
def test_report_of_a_file_that_is_no_report_is_one_line(capsys, tmp_path, content, expected):
    path = tmp_path / "report.json"
    path.write_text(content)
    _assert_one_line_error(capsys, ["report", str(path)], expected)


def test_report_of_a_directory_without_a_report_is_one_line(capsys, tmp_path):
    _assert_one_line_error(capsys, ["report", str(tmp_path)], "is a directory without a report.json")


def test_report_of_a_missing_file_is_one_line(capsys, tmp_path):
    _assert_one_line_error(capsys, ["report", str(tmp_path / "missing.json")], "does not exist")


def test_unknown_config_lists_the_known_ones(capsys):
    lines = _assert_one_line_error(capsys, ["compile", "examples/hf_models.py", "--mesh", "world=2", "--config",
                                            "tiny"], "unknown config 'tiny'; known: mixtral, qwen2_moe")
    assert "--config" in lines[1]


def test_model_file_without_an_entry_is_one_line(capsys, tmp_path):
    model_file = tmp_path / "no_entry.py"
    model_file.write_text("import torch\n")
    _assert_one_line_error(capsys, ["compile", str(model_file), "--mesh", "world=2"], "defines no shardgraph_entry()")


def test_flag_the_entry_does_not_take_is_one_line(capsys, tmp_path):
    _assert_one_line_error(capsys, ["compile", _unruled_model(tmp_path), "--mesh", "world=2", "--seq-len", "4"],
                           "takes no 'seq_len' argument")


def test_plan_file_that_is_not_an_object_is_one_line(capsys, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('["colwise"]')
    _assert_one_line_error(capsys, ["compile", "examples/moe_model.py", "--mesh", "world=2", "--plan", str(plan)],
                           "not an object of pattern -> style strings")


def test_usage_errors_are_one_line_with_a_hint(capsys):
    lines = _assert_one_line_error(capsys, ["compile", "examples/moe_model.py"], "required: --mesh")
    assert "shardgraph compile --help" in lines[1]


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(cli, "command_mesh", broken)
    _assert_one_line_error(capsys, ["mesh", "world=2"], "internal error: RuntimeError: something inside broke; second")
    with pytest.raises(RuntimeError, match="something inside broke"):
        main(["mesh", "world=2", "--debug"])
    with pytest.raises(RuntimeError):
        main(["--debug", "mesh", "world=2"])


def test_module_entry_point_prints_errors_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "shardgraph", "compile", "examples/moe_model.py", "--mesh",
                             "world=8,pp=2"], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 2


# ------------------------------------------------------------------ help
def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_flag_and_argument_is_described_in_help():
    undescribed = [(parser.prog, action.dest) for parser in _parsers(build_parser()) for action in parser._actions
                   if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert undescribed == []


def test_compile_help_lists_every_plan_style_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compile", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for style, description in STYLE_DESCRIPTIONS.items():
        assert any(line.split() == [style, *description.split()] for line in out.splitlines()), style
    assert set(STYLE_DESCRIPTIONS) == set(STYLES)


# ------------------------------------------------------------------ progress
def test_progress_bar_is_off_when_stderr_is_not_a_terminal(capsys):
    assert main(["compile", "examples/moe_model.py", "--mesh", "world=2"]) == 0
    assert capsys.readouterr().err == ""
    assert not Stages(["a"], stream=io.StringIO()).enabled


def test_progress_bar_names_each_stage_on_a_terminal(capsys):
    stream = io.StringIO()
    with Stages(["build model", "trace+compile"], "shardgraph compile", enabled=True, stream=stream, delay=0,
                redraw_every=0.01) as stages:
        stages.start("build model")
        time.sleep(0.25)
        stages.echo("a line of output")
        stages.start("trace+compile")
        time.sleep(0.25)
    shown = stream.getvalue()
    assert "shardgraph compile: build model: 0/2 stages" in shown
    assert "shardgraph compile: trace+compile: 1/2 stages" in shown
    assert capsys.readouterr().out == "a line of output\n"


def _unruled_model(directory) -> str:
    """A model file whose torch.roll has no placement rule (forward and backward)."""
    path = directory / "roll_model.py"
    path.write_text(
        "import torch\n\n\n"
        "def shardgraph_entry(device='cpu'):\n"
        "    with torch.device(device):\n"
        "        model = torch.nn.Linear(8, 8, bias=False)\n"
        "        inputs = (torch.ones(4, 8),) if device != 'meta' else (torch.empty(4, 8),)\n"
        "    return torch.nn.Sequential(model, Flip()), inputs, lambda out, x: out.pow(2).mean()\n\n\n"
        "class Flip(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.roll(x, 1, dims=1)\n"
    )
    return str(path)


def test_compile_of_a_training_step_reports_its_split_optimizer_state(capsys, tmp_path):
    report = tmp_path / "report.json"
    arguments = ["compile", "examples/moe_model.py", "--mesh", "world=4,tp=2,ep=2", "--no-progress",
                 "--optimizer", "adamw", "--json", str(report)]
    assert main(arguments + ["--zero", "1", "--recompute", "selective", "--compute-dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "optimizer state" in out
    import json

    split = json.loads(report.read_text())["totals"]["optimizer_state_bytes_per_rank"]
    assert main(arguments) == 0
    whole = json.loads(report.read_text())["totals"]["optimizer_state_bytes_per_rank"]
    assert 0 < split < whole


def test_zero_without_an_optimizer_and_check_of_a_step_are_one_line_errors(capsys):
    _assert_one_line_error(capsys, ["compile", "examples/moe_model.py", "--mesh", "world=4,tp=2,ep=2", "--zero", "1"],
                           "there is none without --optimizer")
    _assert_one_line_error(capsys, ["compile", "examples/moe_model.py", "--mesh", "world=4,tp=2,ep=2", "--check",
                                    "--optimizer", "sgd"], "not a compiled optimizer step")


def test_zero3_compiles_from_the_cli_checks_against_the_unsharded_model_and_reports_parameter_gathers(capsys,
                                                                                                   tmp_path):
    report = tmp_path / "report.json"
    arguments = ["compile", "examples/moe_model.py", "--mesh", "world=4,tp=2,ep=2", "--no-progress", "--zero", "3"]
    assert main(arguments + ["--check", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "parameter gather" in out
    import json

    families = json.loads(report.read_text())["totals"]["communication_bytes_per_rank_by_family"]
    assert families["parameter gather"] > 0
    _assert_one_line_error(capsys, ["compile", "examples/moe_model.py", "--mesh", "world=4,tp=2,ep=2",
                                    "--keep-gathered"], "--keep-gathered is about parameters gathered by --zero 3")
