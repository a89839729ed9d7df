"""The pre-training study's runs as Prefect flow runs: one deployment, `c2crs-study/run`, one flow run per (setting,
seed, arm), so a work pool of several machines (or GPUs) runs them side by side with no new code.

`python -m pipeline study run --workers N` (N > 1) uses it locally: the deployment on the process pool c2crs-local,
a worker that runs N flow runs at once, one flow run per run not done yet; `--pool NAME` only submits them to another
pool's workers. Every flow run trains in the workspace it is given (params.yaml and data/ there) and writes its
results to params.study.results_dir there, as `study run` in one process does; a flow run that was killed resumes
from its checkpoints when it is submitted again.
"""

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from prefect import flow, get_run_logger

from pipeline.config import load_params
from pipeline.paths import project_root
from pipeline.study_runs import Job, prerequisites, run_job
from stages.io.outputs import settle_workspace

FLOW_NAME = "c2crs-study"
DEPLOYMENT = f"{FLOW_NAME}/run"
ENTRYPOINT = "pipeline/study_flows.py:study_run"
LOCAL_POOL = "c2crs-local"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@flow(name=FLOW_NAME, description="One run of the pre-training study: an arm for a setting and a seed")
def study_run(setting: str, seed: int, arm: str, workspace: str, threads: int = 1) -> dict:
    """Train and score job (setting, seed, arm) in `workspace` with `threads` CPU threads; the runs it starts from
    (an extension's C2-CRS run) first when they are not done."""
    logger = get_run_logger()
    torch.set_num_threads(threads)
    logging.getLogger("stages").setLevel(logging.INFO)
    root = Path(workspace)
    params = load_params(root / "params.yaml")
    settle_workspace(root)  # a killed writer's half-made set, completed before this run reads the stage outputs
    job = Job(setting, seed, arm)
    for needed in [*prerequisites(params, job), job]:
        if needed.done(params, root):
            logger.info("%s: already done", needed)
            continue
        result = run_job(params, root, needed)
        logger.info("%s: done in %.0f s", needed, result["seconds"])
    return {"setting": setting, "seed": seed, "arm": arm}


def deploy_study(pool: str, api_url: str | None = None) -> str:
    """The study deployment on `pool` (made when missing), running this checkout's code."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipeline.deployments import ensure_pool

    with temporary_settings(updates={PREFECT_API_URL: api_url} if api_url else {}):
        ensure_pool(pool)
        study_run.from_source(source=str(project_root()), entrypoint=ENTRYPOINT).deploy(
            name="run",
            work_pool_name=pool,
            build=False,
            push=False,
            print_next_steps=False,
            ignore_warnings=True,
            tags=["study"],
        )
    return DEPLOYMENT


def submit(jobs: list[Job], workspace: Path, threads: int, api_url: str | None = None) -> list:
    """One scheduled flow run of the deployment per job, in order; returns their ids."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ids = []
    with temporary_settings(updates={PREFECT_API_URL: api_url} if api_url else {}):
        for job in jobs:
            flow_run = run_deployment(
                DEPLOYMENT,
                timeout=0,
                tags=[f"setting:{job.setting}", f"seed:{job.seed}", f"arm:{job.arm}"],
                parameters={
                    "setting": job.setting,
                    "seed": job.seed,
                    "arm": job.arm,
                    "workspace": str(workspace),
                    "threads": threads,
                },
            )
            ids.append(flow_run.id)
    return ids


def wait(ids: list, api_url: str | None = None, poll_seconds: float = 5.0) -> dict[str, str]:
    """Block until every flow run has a final state; {flow run id: state type}."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: api_url} if api_url else {}),
        get_client(sync_client=True) as client,
    ):
        while True:
            states = {str(i): client.read_flow_run(i).state.type.value for i in ids}
            if all(state in FINAL for state in states.values()):
                return states
            time.sleep(poll_seconds)


@contextlib.contextmanager
def prefect_api(api_url: str | None = None) -> Iterator[str]:
    """The Prefect API to use: api_url, else PREFECT_API_URL or this checkout's `make ui` server, else a temporary
    server for the duration."""
    from pipeline import servers

    url = api_url or servers.prefect_api()
    if url:
        yield url
        return
    server = servers.start_prefect(servers.free_port())
    try:
        server.wait_until_healthy()
        yield f"{server.url}/api"
    finally:
        server.stop()


def run_on_pool(jobs: list[Job], workspace: Path, workers: int, api_url: str) -> dict[str, str]:
    """The local fan-out: the deployment on the process pool, every job submitted, then a worker running `workers`
    flow runs at once (each with an equal share of the cores; started after the submissions, so its first poll sees
    them all) until every one has finished; the worker stops at the end."""
    from pipeline import servers

    deploy_study(LOCAL_POOL, api_url)
    ids = submit(jobs, workspace, max(1, torch.get_num_threads() // workers), api_url)
    worker = servers.start_worker(LOCAL_POOL, api_url, workers)
    try:
        return wait(ids, api_url)
    finally:
        worker.stop()
