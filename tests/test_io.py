"""Outputs are replaced all at once or not at all, even when the writing process is killed, concurrent writers
never mix their sets, and a stage cannot run twice at once."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import polars as pl
import pytest

from stages.io.outputs import (
    COMMIT_LOCK,
    OutputsBusyError,
    content_hash,
    finish_interrupted_commits,
    stage_lock,
    write_outputs,
)
from tests.conftest import PROJECT


def files_in(folder) -> list[str]:
    """The folder's files but the commit lock (which stays, as every lock file)."""
    return sorted(p.name for p in folder.iterdir() if p.name != COMMIT_LOCK)


def _started_until_ready(script: str, tmp_path) -> subprocess.Popen:
    """Run a Python script in a child process until it touches tmp_path/ready (the point the test acts at)."""
    child = subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert child.poll() is None and time.monotonic() < deadline, "the child ended before it was ready"
        time.sleep(0.05)
    (tmp_path / "ready").unlink()
    return child


def _kill(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.wait()


def test_outputs_are_written(tmp_path):
    write_outputs({tmp_path / "a/t.parquet": pl.DataFrame({"x": [1, 2]}), tmp_path / "m.json": {"n": 2}})
    assert pl.read_parquet(tmp_path / "a/t.parquet")["x"].to_list() == [1, 2]
    assert (tmp_path / "m.json").read_text() == '{\n  "n": 2\n}\n'


def test_an_error_midway_keeps_the_previous_outputs_and_no_temporary_files(tmp_path, monkeypatch):
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    write_outputs({first: pl.DataFrame({"x": [1]}), second: pl.DataFrame({"x": [1]})})
    (tmp_path / COMMIT_LOCK).touch()
    before = content_hash(tmp_path)
    original = pl.DataFrame.write_parquet
    calls = []

    def failing_write(self, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        original(self, path, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_outputs({first: pl.DataFrame({"x": [2]}), second: pl.DataFrame({"x": [2]})})
    assert content_hash(tmp_path) == before
    assert files_in(tmp_path) == ["first.parquet", "second.parquet"]


def test_a_kill_midway_keeps_the_previous_outputs(tmp_path):
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    write_outputs({first: pl.DataFrame({"x": [1]}), second: pl.DataFrame({"x": [1]})})
    # A writer that hangs on its second table: the first new table is on disk (as a temporary file) when killed.
    script = textwrap.dedent(f"""
        import time, polars as pl
        from pathlib import Path
        from stages.io.outputs import write_outputs
        original, calls = pl.DataFrame.write_parquet, []
        def slow_write(self, path, **kwargs):
            calls.append(path)
            original(self, path, **kwargs)
            if len(calls) == 2:
                Path({str(tmp_path / "ready")!r}).touch()
                time.sleep(60)
        pl.DataFrame.write_parquet = slow_write
        write_outputs({{Path({str(first)!r}): pl.DataFrame({{"x": [2]}}),
                        Path({str(second)!r}): pl.DataFrame({{"x": [2]}})}})
    """)
    writer = _started_until_ready(script, tmp_path)
    _kill(writer)
    assert pl.read_parquet(first)["x"].to_list() == [1]
    assert pl.read_parquet(second)["x"].to_list() == [1]
    leftovers = [name for name in files_in(tmp_path) if name.startswith(".")]
    assert leftovers == [f".first.parquet.{writer.pid}.tmp", f".second.parquet.{writer.pid}.tmp"]

    # The next run clears what the killed one left behind.
    write_outputs({first: pl.DataFrame({"x": [3]}), second: pl.DataFrame({"x": [3]})})
    assert files_in(tmp_path) == ["first.parquet", "second.parquet"]
    assert pl.read_parquet(second)["x"].to_list() == [3]


def _writer_killed_between_renames(tmp_path, targets) -> int:
    """Run write_outputs of value 2 into targets in another process and kill it after its first rename (the
    journal written); returns its pid."""
    script = textwrap.dedent(f"""
        import os, time, polars as pl
        from pathlib import Path
        from stages.io import outputs
        original, renames = Path.replace, []
        def replace(self, target):
            result = original(self, target)
            if Path(target).suffix == ".parquet":
                renames.append(target)
                if len(renames) == 1:  # the first output is in place, the second not yet
                    Path({str(tmp_path / "ready")!r}).touch()
                    time.sleep(60)
            return result
        Path.replace = replace
        outputs.write_outputs({{Path(t): pl.DataFrame({{"x": [2]}}) for t in {[str(t) for t in targets]!r}}})
    """)
    writer = _started_until_ready(script, tmp_path)
    _kill(writer)
    return writer.pid


def test_a_kill_between_the_renames_is_completed_before_anyone_reads(tmp_path):
    first, second = tmp_path / "data" / "first.parquet", tmp_path / "metrics" / "second.parquet"
    write_outputs({first: pl.DataFrame({"x": [1]}), second: pl.DataFrame({"x": [1]})})
    pid = _writer_killed_between_renames(tmp_path, [first, second])
    # The mixed set a reader would see now: the new first table with the old second one, and the journal.
    assert pl.read_parquet(first)["x"].to_list() == [2] and pl.read_parquet(second)["x"].to_list() == [1]
    assert (tmp_path / f".outputs-commit.{pid}.json").exists()
    assert finish_interrupted_commits(tmp_path) == [second]  # what the stage runner does before any stage
    assert pl.read_parquet(first)["x"].to_list() == [2] and pl.read_parquet(second)["x"].to_list() == [2]
    assert files_in(tmp_path) == ["data", "metrics"]
    assert files_in(tmp_path / "data") == ["first.parquet"] and files_in(tmp_path / "metrics") == ["second.parquet"]


def test_concurrent_writers_never_mix_their_sets(tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from stages.io.outputs import write_outputs
        for i in range(40):
            write_outputs({{Path({str(first)!r}): {{"writer": sys.argv[1], "i": i}},
                           Path({str(second)!r}): {{"writer": sys.argv[1], "i": i}}}})
    """)
    writers = [subprocess.Popen([sys.executable, "-c", script, name], cwd=PROJECT) for name in ("a", "b")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    assert first.read_text() == second.read_text()  # one writer's last set, whole
    assert files_in(tmp_path) == ["first.json", "second.json"]


def test_a_stage_runs_once_at_a_time_and_says_who_runs_it(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from stages.io.outputs import stage_lock
        with stage_lock(Path({str(tmp_path)!r}), "ingest"):
            Path({str(tmp_path / "ready")!r}).touch()
            time.sleep(60)
    """)
    holder = _started_until_ready(script, tmp_path)
    with pytest.raises(OutputsBusyError, match=f"stage ingest is already running in .* \\(pid {holder.pid}\\)"):
        with stage_lock(tmp_path, "ingest"):
            pass
    with stage_lock(tmp_path, "kg"):  # another stage is free to run
        pass
    _kill(holder)
    with stage_lock(tmp_path, "ingest"):  # a killed holder's lock is gone with it
        pass


def test_repeated_skip_warnings_are_shown_a_few_times_then_counted(caplog):
    import logging

    from stages.io.stage_log import WarningTally

    logger = logging.getLogger("tally-test")
    tally = WarningTally(logger, shown=3)
    with caplog.at_level(logging.WARNING, logger="tally-test"):
        for i in range(18):
            tally.warn("empty review text", f"review {i}: empty review text")
        tally.warn("bad json", "line 7: bad json")
        tally.summary()
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "skipped: review 0: empty review text",
        "skipped: review 1: empty review text",
        "skipped: review 2: empty review text",
        "skipped: line 7: bad json",
        "skipped 18 records of kind 'empty review text' in all (15 not shown above)",
    ]
    assert tally.counts == {"empty review text": 18, "bad json": 1}


def _killed_mid_commit(tmp_path):
    """The workspace's last commit killed between its renames, and a temporary of a writer killed before its
    journal; returns the two targets (the first holds the new table, the second still the old one)."""
    first, second = tmp_path / "data" / "ingest" / "first.parquet", tmp_path / "metrics" / "second.parquet"
    write_outputs({first: pl.DataFrame({"x": [1]}), second: pl.DataFrame({"x": [1]})})
    pid = _writer_killed_between_renames(tmp_path, [first, second])
    (first.parent / f".third.parquet.{pid}.tmp").write_bytes(b"half written")
    assert pl.read_parquet(first)["x"].to_list() == [2] and pl.read_parquet(second)["x"].to_list() == [1]
    return first, second


def _pipeline(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(PROJECT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"},
    )


@pytest.mark.parametrize("reader", ["models list", "score", "study report", "serve"])
def test_every_reader_sees_the_complete_set_after_a_kill_between_renames(params_file, reader):
    """A real SIGKILL between the renames of a commit; then a command that reads the workspace (which may fail for
    its own reasons here: there are no models) finds the new set whole and no temporaries left."""
    tmp_path = params_file.parent
    first, second = _killed_mid_commit(tmp_path)
    if reader == "serve":  # what `pipeline serve` and a TestClient build first
        from pipeline.config import load_params
        from pipeline.serve import Models

        with pytest.raises(ValueError, match="c2crs_rec.pt is missing"):
            Models(load_params(params_file), tmp_path, "workspace")
    else:
        extra = ["--data", "nowhere.jsonl"] if reader == "score" else []
        _pipeline(tmp_path, *reader.split(), *extra)
    assert pl.read_parquet(first)["x"].to_list() == [2] and pl.read_parquet(second)["x"].to_list() == [2]
    left = [p.name for folder in (tmp_path, first.parent, second.parent) for p in folder.glob(".*")]
    assert sorted(set(left) - {COMMIT_LOCK}) == []
