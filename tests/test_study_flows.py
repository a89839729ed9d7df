"""The study's runs as flow runs of the Prefect deployment c2crs-study/run on the local process pool: two at a time,
and a run killed with its worker resumes when submitted again (fixture mirror, the session's Prefect harness)."""

import os
import signal
import time

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

from pipeline import servers, study, study_flows, study_runs
from pipeline.config import load_params
from stages.io.graph import stage_body

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _workspace(params_file, coarse_epochs: int = 2):
    raw = yaml.safe_load(params_file.read_text())
    raw["study"].update(
        seeds=[1, 2],
        workers=2,
        probe_epochs=1,
        extensions={},
        learning_curve=None,
        settings={"base": {"model.rec_pooling": "graph"}},
    )
    raw["pretrain_coarse"]["epochs"] = coarse_epochs
    raw["finetune_rec"]["epochs"] = 1
    params_file.write_text(yaml.safe_dump(raw))
    params = load_params(params_file)
    for stage in ("ingest", "reviews", "kg", "triples"):
        stage_body(stage)(params, params_file.parent)
    return params, params_file.parent


def _api() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _flow_runs(tag: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))


def test_two_runs_go_through_the_process_pool_side_by_side(params_file, mlflow_store):
    params, workspace = _workspace(params_file, coarse_epochs=30)  # long enough to see two at a time
    done = study.run_study(params, workspace, arms=["c2crs"], workers=2, api_url=_api())
    assert sorted((r["setting"], r["seed"], r["arm"]) for r in done) == [("base", 1, "c2crs"), ("base", 2, "c2crs")]
    runs = [run for run in _flow_runs("arm:c2crs") if run.parameters.get("workspace") == str(workspace)]
    assert len(runs) == 2 and all(run.state.is_completed() for run in runs)
    with get_client(sync_client=True) as client:  # two at a time: the worker took both before either finished
        taken = [
            min(s.timestamp for s in client.read_flow_run_states(run.id) if s.type.value == "PENDING") for run in runs
        ]
    assert max(taken) < min(run.end_time for run in runs)
    assert all(job.done(params, workspace) for job in study_runs.jobs(params, arms=["c2crs"]))


def test_a_run_killed_with_its_worker_resumes_when_submitted_again(params_file, mlflow_store):
    params, workspace = _workspace(params_file, coarse_epochs=40)
    job = study_runs.Job("base", 1, "c2crs")
    clock = job.models(params, workspace) / "c2crs.clock.json"
    study_flows.deploy_study(study_flows.LOCAL_POOL, _api())
    worker = servers.start_worker(study_flows.LOCAL_POOL, _api(), 1)
    try:
        study_flows.submit([job], workspace, 1, _api())
        deadline = time.monotonic() + 300
        while not clock.is_file() and time.monotonic() < deadline:  # written after the first epoch
            time.sleep(0.05)
        assert clock.is_file(), worker.log_path.read_text()[-3000:]
    finally:
        os.killpg(worker.process.pid, signal.SIGKILL)  # the worker and the flow run it started
        worker.process.wait()
    time.sleep(2)
    assert not job.done(params, workspace)

    [result] = study.run_study(
        params, workspace, settings=["base"], seeds=[1], arms=["c2crs"], workers=2, api_url=_api()
    )
    assert result["provenance"]["processes"] == 2  # the killed process's seconds are counted too
    assert [row["epoch"] for row in result["curves"]["pretrain_coarse"]] == list(range(1, 41))
