"""Outputs are replaced all at once or not at all, even when the writing process is killed."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import polars as pl
import pytest

from stages.io.outputs import content_hash, write_outputs
from tests.conftest import PROJECT


def test_outputs_are_written(tmp_path):
    write_outputs({tmp_path / "a/t.parquet": pl.DataFrame({"x": [1, 2]}), tmp_path / "m.json": {"n": 2}})
    assert pl.read_parquet(tmp_path / "a/t.parquet")["x"].to_list() == [1, 2]
    assert (tmp_path / "m.json").read_text() == '{\n  "n": 2\n}\n'


def test_an_error_midway_keeps_the_previous_outputs_and_no_temporary_files(tmp_path, monkeypatch):
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    write_outputs({first: pl.DataFrame({"x": [1]}), second: pl.DataFrame({"x": [1]})})
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.parquet", "second.parquet"]


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
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert writer.poll() is None and time.monotonic() < deadline, "writer ended before reaching the kill point"
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    (tmp_path / "ready").unlink()
    assert pl.read_parquet(first)["x"].to_list() == [1]
    assert pl.read_parquet(second)["x"].to_list() == [1]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert leftovers == [f".first.parquet.{writer.pid}.tmp", f".second.parquet.{writer.pid}.tmp"]

    # The next run clears what the killed one left behind.
    write_outputs({first: pl.DataFrame({"x": [3]}), second: pl.DataFrame({"x": [3]})})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.parquet", "second.parquet"]
    assert pl.read_parquet(second)["x"].to_list() == [3]


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
    assert lines == ["skipped: review 0: empty review text", "skipped: review 1: empty review text",
                     "skipped: review 2: empty review text", "skipped: line 7: bad json",
                     "skipped 18 records of kind 'empty review text' in all (15 not shown above)"]
    assert tally.counts == {"empty review text": 18, "bad json": 1}
