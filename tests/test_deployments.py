"""Prefect deployments: one per stage, run by a process worker through DVC in a checkout, end to end on fixtures."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.deployments import run_deployment

from pipeline.deployments import deploy, stage_command
from tests.conftest import PROJECT

pytestmark = pytest.mark.usefixtures("prefect_harness")

CODE = ("pipeline", "stages", "models", "bin", "dvc.yaml", ".dvc/config")


def make_checkout(tmp_path: Path, params_file: Path) -> Path:
    """A git checkout of the project's code and dvc.yaml with the fixture params, as a user's clone would be."""
    root = tmp_path / "checkout"
    for item in CODE:
        source, target = PROJECT / item, root / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    shutil.copy(params_file, root / "params.yaml")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], cwd=root, check=True)
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", "checkout"], cwd=root, check=True)
    return root


def test_stage_commands_keep_dvc_in_charge():
    python = "/venv/bin/python"
    assert stage_command("ingest", {}, False, python)[1:] == ["repro", "--single-item", "ingest"]
    assert stage_command("ablations@wo_ch", {"finetune_rec.lr": 0.001}, True, python)[1:] == [
        "exp",
        "run",
        "-s",
        "ablations@wo_ch",
        "-f",
        "-S",
        "finetune_rec.lr=0.001",
    ]
    assert stage_command("all", {}, False, python) == [python, "-m", "pipeline", "repro"]
    assert stage_command("all", {"device": "cuda"}, False, python)[1:] == ["exp", "run", "-S", 'device="cuda"']


def test_a_deployment_run_executes_the_stage_through_dvc_on_a_process_worker(tmp_path, params_file, mlflow_store):
    from prefect.settings import PREFECT_API_URL

    root = make_checkout(tmp_path, params_file)
    names = deploy("test-pool", root)
    assert {"c2crs/all", "c2crs/ingest", "c2crs/finetune_rec", "c2crs/ablations@wo_ch"} <= set(names)

    flow_run = run_deployment("c2crs/ingest", timeout=0)  # scheduled; the worker below picks it up
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "MLFLOW_TRACKING_URI": mlflow_store,
        "C2CRS_PYTHON": sys.executable,
    }
    worker = subprocess.run(
        [
            str(Path(sys.executable).parent / "prefect"),
            "worker",
            "start",
            "--pool",
            "test-pool",
            "--type",
            "process",
            "--run-once",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    with get_client(sync_client=True) as client:
        finished = client.read_flow_run(flow_run.id)
        assert finished.state.is_completed(), worker.stdout[-3000:] + worker.stderr[-3000:]
        [stage_run] = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"triggered-by:{flow_run.id}"]))
        )
    assert "stage:ingest" in stage_run.tags and stage_run.state.is_completed()

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert list(lock["stages"]) == ["ingest"]  # DVC ran it, and only it
    assert json.loads((root / "metrics/ingest.json").read_text())["test"]["conversations"] == 2
    client = MlflowClient(mlflow_store)  # this test's store (MLflow's global URI may be an earlier test's)
    [run] = client.search_runs([client.get_experiment_by_name("c2crs").experiment_id], "tags.stage = 'ingest'")
    assert run.info.status == "FINISHED"
