"""MLflow bookkeeping against a temporary SQLite store."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.invocation import new_invocation


def runs(store):
    client = MlflowClient(store)
    return client.search_runs([client.get_experiment_by_name("c2crs").experiment_id], order_by=["start_time ASC"])


def test_stage_run_logs_params_metrics_inputs_and_commit(mlflow_store, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("hello")
    with tracking.stage_run("demo", {"demo": {"lr": 0.1, "layers": [1, 2]}}) as run:
        hashes = run.log_inputs({"text": source})
        run.log_metrics({"test": {"recall@10": 0.5, "n": 3}, "rule": "fraction"})
    [logged] = runs(mlflow_store)
    assert logged.data.params["demo.lr"] == "0.1"
    assert logged.data.params["input_sha256.text"] == hashes["text"]
    assert hashes["text"] == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert logged.data.metrics == {"test.recall_at_10": 0.5, "test.n": 3.0}
    assert logged.data.tags["rule"] == "fraction"
    assert logged.data.tags["stage"] == "demo"
    assert "mlflow.parentRunId" not in logged.data.tags  # no invocation: a top-level run


def test_runs_of_one_invocation_share_a_parent(mlflow_store):
    new_invocation()
    for stage in ("first", "second"):
        with tracking.stage_run(stage, {}):
            pass
    new_invocation()
    with tracking.stage_run("third", {}):
        pass
    all_runs = runs(mlflow_store)
    by_name = {r.info.run_name: r for r in all_runs}
    parents = [r for r in all_runs if "c2crs.invocation" in r.data.tags]
    assert len(parents) == 2
    assert by_name["first"].data.tags["mlflow.parentRunId"] == by_name["second"].data.tags["mlflow.parentRunId"]
    assert by_name["third"].data.tags["mlflow.parentRunId"] != by_name["first"].data.tags["mlflow.parentRunId"]


def test_a_failed_stage_fails_its_parent(mlflow_store):
    new_invocation()
    with pytest.raises(RuntimeError):
        with tracking.stage_run("broken", {}):
            raise RuntimeError("boom")
    statuses = {r.info.run_name: r.info.status for r in runs(mlflow_store)}
    assert statuses["broken"] == "FAILED"
    assert [s for name, s in statuses.items() if name.startswith("pipeline ")] == ["FAILED"]


def test_the_default_store_is_an_absolute_sqlite_file_in_the_project(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri()
    assert uri.startswith("sqlite:////") and uri.endswith("/mlruns.db")
    assert mlflow.get_tracking_uri() != "" and tracking.artifact_root().startswith("file:///")


def test_stages_started_by_one_plain_dvc_process_share_an_invocation(tmp_path, monkeypatch):
    """`dvc repro` runs each stage in its own process; they find the same invocation through the dvc process."""
    import subprocess
    import sys

    from tests.conftest import PROJECT

    monkeypatch.delenv("C2CRS_INVOCATION", raising=False)
    probe = f"{sys.executable} -c 'from pipeline.invocation import current_invocation; print(current_invocation())'"
    fake_dvc = tmp_path / "dvc"
    fake_dvc.write_text(f"#!/bin/sh\n{probe}\n{probe}\n")
    fake_dvc.chmod(0o755)
    first = subprocess.run([str(fake_dvc)], cwd=PROJECT, capture_output=True, text=True, check=True).stdout.split()
    second = subprocess.run([str(fake_dvc)], cwd=PROJECT, capture_output=True, text=True, check=True).stdout.split()
    assert first[0] == first[1] and first[0].startswith("dvc-")
    assert second[0] == second[1] and second[0] != first[0]


def test_the_parent_run_lands_in_the_project_store_when_no_tracking_uri_is_set(tmp_path, monkeypatch):
    """`pipeline repro` makes the invocation's parent run before any stage starts, in the project's store (not in
    MLflow's default ./mlflow.db)."""
    from pipeline import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "project_root", lambda: tmp_path)
    monkeypatch.chdir(tmp_path)
    run_id = tracking.parent_run("run-parent-test")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert client.get_run(run_id).data.tags[tracking.INVOCATION_TAG] == "run-parent-test"
    assert tracking.parent_run("run-parent-test") == run_id  # found again, not made twice
    assert not (tmp_path / "mlflow.db").exists()
    mlflow.set_tracking_uri(None)


def test_a_run_is_dirty_for_changed_code_not_for_what_the_stages_write(tmp_path):
    """DVC deletes a stage's git-tracked metrics before running it: that must not tag every run `-dirty`."""
    import subprocess

    from pipeline.paths import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "metrics" / "ablations").mkdir(parents=True)
    files = ["code.py", "metrics/ingest.json", "metrics/ablations/wo_ch.json", "reports/rec.md", "dvc.lock"]
    (tmp_path / "reports").mkdir()
    for name in files:
        (tmp_path / name).write_text("1")
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", "--allow-empty")
    git("add", *files)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "files")
    for name in files[1:]:
        (tmp_path / name).unlink()  # what DVC does before a stage runs
    (tmp_path / "dvc.lock").write_text("2")
    git_commit.cache_clear()
    assert not git_commit(tmp_path).endswith("-dirty")
    (tmp_path / "code.py").write_text("2")
    git_commit.cache_clear()
    assert git_commit(tmp_path).endswith("-dirty")
    git_commit.cache_clear()


def test_an_interrupted_stage_run_ends_killed(mlflow_store):
    with pytest.raises(KeyboardInterrupt):
        with tracking.stage_run("demo", {}):
            raise KeyboardInterrupt
    [logged] = runs(mlflow_store)
    assert logged.info.status == "KILLED"


def test_a_sigterm_ends_the_stage_run_killed(mlflow_store, tmp_path):
    """`kill PID` on a stage process: its MLflow run must not stay RUNNING."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    from tests.conftest import PROJECT

    started = tmp_path / "started"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(PROJECT)!r})
        from pipeline import tracking
        tracking.interrupt_on_sigterm()
        with tracking.stage_run("slow", {{}}):
            open({str(started)!r}, "w").close()
            time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_store})
    for _ in range(300):
        if started.exists():
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    [logged] = runs(mlflow_store)
    assert logged.info.status == "KILLED"


def test_a_run_left_running_by_a_dead_process_is_closed_at_the_next_start(mlflow_store):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client = MlflowClient(mlflow_store)
    exp_id = tracking.experiment_id()
    abandoned = client.create_run(
        exp_id,
        run_name="killed -9",
        tags={**tracking.process_tags(), tracking.PID_TAG: str(dead.pid), tracking.PROCESS_START_TAG: "1"},
    ).info.run_id
    alive = client.create_run(exp_id, run_name="still running", tags=tracking.process_tags()).info.run_id
    elsewhere = client.create_run(
        exp_id,
        run_name="other host",
        tags={tracking.HOST_TAG: "another-machine", tracking.PID_TAG: "1", tracking.PROCESS_START_TAG: "1"},
    ).info.run_id
    assert tracking.close_abandoned_runs(client, exp_id) == [abandoned]
    assert client.get_run(abandoned).info.status == "KILLED"
    assert client.get_run(alive).info.status == "RUNNING" and client.get_run(elsewhere).info.status == "RUNNING"
    with tracking.stage_run("next", {}):  # a new stage start does the same
        pass
    assert client.get_run(alive).info.status == "RUNNING"
