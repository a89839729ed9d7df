"""The command line: listing stages, and failing fast with a clear message on bad input."""

import os
import subprocess
import sys

import pytest
import yaml

from stages.io.graph import STAGES
from tests.conftest import PROJECT


def cli(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_stages_lists_each_stage_with_inputs_and_outputs():
    done = cli("stages")
    assert done.returncode == 0
    for spec in STAGES.values():
        assert f"{spec.name}: {spec.summary}" in done.stdout
        for out in spec.outs + spec.metrics + spec.reports:
            assert out in done.stdout


def test_unknown_stage_names_the_choices():
    done = cli("run", "trian")
    assert done.returncode == 2
    assert "unknown stage 'trian'; choose one of: ingest" in done.stderr
    assert done.stderr.rstrip().endswith(", all")


def test_bad_params_fail_before_any_flow_starts(tmp_path):
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["ingest"]["on_bad_record"] = "ignore"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    done = cli("run", "ingest", "--params", str(path))
    assert done.returncode == 2
    assert "ingest.on_bad_record: Input should be 'error' or 'skip' (got 'ignore')" in done.stderr
    assert "Starting temporary server" not in done.stderr


def test_no_argument_prints_usage():
    done = cli()
    assert done.returncode == 2
    assert "usage: python -m pipeline" in done.stderr


def test_repro_passes_options_through_to_dvc(monkeypatch):
    from pipeline import cli

    seen = {}
    monkeypatch.setattr(cli, "_repro", lambda args: seen.setdefault("args", args.dvc_args) and 0)
    assert cli.main(["repro", "-f", "triples"]) == 0
    assert seen["args"] == ["-f", "triples"]


def test_unknown_options_of_other_commands_are_refused():
    done = cli("stages", "--verbose")
    assert done.returncode == 2
    assert "unrecognized arguments: --verbose" in done.stderr


def test_stage_logging_shows_our_progress_and_quiets_chatty_libraries():
    import logging

    from pipeline.cli import stage_logging

    stage_logging()
    assert logging.getLogger("stages.training.loop").getEffectiveLevel() == logging.INFO
    assert logging.getLogger("bm25s").getEffectiveLevel() >= logging.WARNING


def test_a_finished_stage_survives_losing_the_prefect_api(params_file, monkeypatch, capsys):
    """The stage wrote its outputs and ended its MLflow run, then the Prefect server went away: the stage still
    succeeds (DVC records it) instead of failing on the lost bookkeeping; a stage that did not finish still fails."""
    import httpx

    from pipeline import cli, flows

    def finished_then_lost(stage, params_file):
        flows.FINISHED[stage] = {"test": {"conversations": 2}}
        try:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        except httpx.ConnectError as exc:
            raise RuntimeError("could not report the final state") from exc

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(flows, "run_stage_flow", finished_then_lost)
    monkeypatch.setattr(cli, "exit_now", exit_now)
    monkeypatch.setattr(flows, "FINISHED", {})
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "ingest", "--params", str(params_file)])
    assert exited.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("ingest: done in ") and "Prefect API was lost" in captured.err

    def lost_before_finishing(stage, params_file):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(flows, "run_stage_flow", lost_before_finishing)
    monkeypatch.setattr(flows, "FINISHED", {})
    assert cli.main(["run", "ingest", "--params", str(params_file)]) == 2  # not finished: the stage fails
    assert capsys.readouterr().err == "error: ConnectError: [Errno 111] Connection refused\n"


def run_ingest(params_file):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "ingest", "--params", str(params_file)],
        cwd=params_file.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
    )


def test_a_data_error_inside_a_stage_is_one_error_line_without_tracebacks(params_file, mirror):
    train = mirror / "redial" / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[2] = '{"conversationId": 5, "messages": 3}'
    train.write_text("\n".join(lines) + "\n")
    done = run_ingest(params_file)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {params_file}: data.files.redial_train: {train}, line 3: record lacks required key(s) "
        "initiatorWorkerId, respondentWorkerId, "
        "movieMentions [missing_keys]. Set ingest.on_bad_record: skip to drop such records and count "
        "them."
    ]


@pytest.mark.parametrize("key", ["movies", "redial_train"])
def test_a_raw_file_that_is_not_what_its_key_expects_names_the_key_and_the_params_file(params_file, mirror, key):
    """data.files.movies pointing at a JSONL file, data.files.redial_train at a directory: the one error line says
    which key of which params file to fix."""
    raw = yaml.safe_load(params_file.read_text())
    if key == "movies":
        (mirror / "redial" / "movies.jsonl").write_text('{"movieId": 1}\n')
        raw["data"]["files"]["movies"] = "redial/movies.jsonl"
    else:
        (mirror / "redial" / "a_directory").mkdir()
        raw["data"]["files"]["redial_train"] = "redial/a_directory"
    params_file.write_text(yaml.safe_dump(raw))
    done = run_ingest(params_file)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {params_file}: data.files.{key}: "), done.stderr
    expected = "expected a CSV file with columns" if key == "movies" else "a directory, not a file"
    assert expected in errors[0]


def test_project_errors_exit_2_with_one_line_bugs_exit_1_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    import httpx

    from pipeline import cli as cli_module

    assert cli_module.main(["run", "ingest", "--params", str(tmp_path)]) == 2  # a directory, not a params file
    assert capsys.readouterr().err == f"error: {tmp_path}: Is a directory\n"

    request = httpx.Request("GET", "https://example.org/redial_dataset.zip")
    failures = iter([httpx.ConnectError("no route to host", request=request), RuntimeError("a bug")])

    def failing(*args):
        raise next(failures)

    monkeypatch.setattr(cli_module, "_stages", failing)
    assert cli_module.main(["stages"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download https://example.org/redial_dataset.zip: ConnectError: no route")
    assert len(err.splitlines()) == 1
    assert cli_module.main(["stages"]) == 1
    assert "error: RuntimeError: a bug (an unexpected error: rerun with --debug" in capsys.readouterr().err
    monkeypatch.setattr(cli_module, "_stages", lambda args: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(ValueError, match="bad"):
        cli_module.main(["--debug", "stages"])


def documented_commands() -> list[str]:
    """Every `python -m pipeline ...` command line written in README.md and docs/*.md (comments cut off)."""
    import re

    texts = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
    found = set()
    for path in texts:
        text = path.read_text()
        spans = re.findall(r"`python -m pipeline ([^`]*)`", text)  # inline code, which may wrap a line
        blocks = re.findall(r"^python -m pipeline (.*)$", text, flags=re.MULTILINE)  # lines of code blocks
        for line in spans + blocks:
            line = " ".join(line.split("  #")[0].split())
            if line and not line.endswith("..."):  # "study ...": a family of commands, not one
                found.add(line.rstrip(".,;:"))
    return sorted(found)


def command_variants(line: str) -> list[list[str]]:
    """The line without its optional [...] parts, and with them filled in; placeholders filled (N -> 2, others x)."""
    import re
    import shlex

    def filled(text: str) -> list[str]:
        tokens = [t for t in shlex.split(text) if t != "..."]
        return ["2" if t == "N" else "x" if t.isupper() and t.isalpha() else t for t in tokens]

    return [filled(re.sub(r"\[[^\]]*\]", " ", line)), filled(line.replace("[", " ").replace("]", " "))]


def test_every_documented_command_line_parses():
    from pipeline.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    lines = [line for line in documented_commands() if line.split()[0] in commands]  # not prose such as "serve:"
    assert any(line.startswith("score --data") and "--models" in line for line in lines), lines
    for line in lines:
        for argv in command_variants(line):
            try:
                args, unknown = build_parser().parse_known_args(argv)
            except SystemExit:
                pytest.fail(f"documented command does not parse: python -m pipeline {' '.join(argv)}")
            assert args.command == "repro" or not unknown, f"python -m pipeline {' '.join(argv)}: unknown {unknown}"
