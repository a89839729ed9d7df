"""Prefect deployments: every stage (each variant of a foreach stage) and `all`, run from the Prefect UI or
`prefect deployment run 'c2crs/STAGE'` by a worker of a work pool.

A deployment's flow run does not call the stage itself: it runs it through DVC in the checkout the deployment names
(`dvc repro --single-item STAGE`; with params overrides `dvc exp run -s STAGE -S key=value`; `all`: `pipeline
repro`), so dvc.lock, the DVC cache and experiments stay right and the stage's own flow run and MLflow run are made
as for any `dvc repro`. The stage's flow run is tagged `triggered-by:<this flow run's id>`.
Local: `python -m pipeline worker` (deploys to the process pool c2crs-local, then polls it). GPU machines: a Docker
or Kubernetes work pool with a GPU request (deploy/README.md); `python -m pipeline deploy --pool gpu ...`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run

from pipeline.config import load_params
from pipeline.invocation import INVOCATION_ENV, TRIGGERED_BY_ENV, new_invocation
from pipeline.paths import project_root
from pipeline.servers import dvc_executable
from stages.io.graph import stage_instances

FLOW_NAME = "c2crs"
LOCAL_POOL = "c2crs-local"
ENTRYPOINT = "pipeline/deployments.py:run_dvc_stage"


def stage_command(stage: str, set_params: dict[str, Any], force: bool, python: str = sys.executable) -> list[str]:
    """The DVC command that runs `stage` (or every out-of-date stage: `all`) in a checkout."""
    overrides = [arg for key, value in set_params.items() for arg in ("-S", f"{key}={json.dumps(value)}")]
    dvc = dvc_executable()
    if stage == "all":
        if overrides:
            return [dvc, "exp", "run", *(["-f"] if force else []), *overrides]
        return [python, "-m", "pipeline", "repro", *(["-f"] if force else [])]
    if overrides:
        return [dvc, "exp", "run", "-s", stage, *(["-f"] if force else []), *overrides]
    return [dvc, "repro", "--single-item", *(["-f"] if force else []), stage]


@flow(name=FLOW_NAME, description="Run a stage of the c2crs pipeline (all: every out-of-date stage) through DVC")
def run_dvc_stage(
    stage: str = "all", set_params: dict[str, Any] | None = None, force: bool = False, checkout: str = ""
) -> int:
    """set_params: params overrides as `dvc exp run -S` keys ({"finetune_rec.lr": 0.0005, "device": "cuda"});
    force: run even when DVC says the stage is up to date; checkout: the project directory (default: this code's)."""
    logger = get_run_logger()
    root = Path(checkout) if checkout else project_root()
    known = ["all", *stage_instances(load_params(root / "params.yaml"))]
    if stage not in known:
        raise ValueError(f"unknown stage {stage!r}; the deployments of {root} are: {', '.join(known)}")
    command = stage_command(stage, set_params or {}, force)
    env = {**os.environ, TRIGGERED_BY_ENV: str(current_flow_run.id or "")}
    env[INVOCATION_ENV] = env.get(INVOCATION_ENV) or new_invocation()  # one MLflow parent run for this flow run
    logger.info("in %s: %s", root, " ".join(command))
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in process.stdout:
        logger.info("%s", line.rstrip())
        tail = (tail + [line.rstrip()])[-20:]
    if process.wait() != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}:\n" + "\n".join(tail))
    return process.returncode


def ensure_pool(pool: str, pool_type: str = "process") -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type))


def deploy(
    pool: str = LOCAL_POOL,
    checkout: Path | None = None,
    set_params: dict[str, Any] | None = None,
    job_variables: dict[str, Any] | None = None,
    pool_type: str = "process",
    api_url: str | None = None,
) -> list[str]:
    """One deployment per stage instance and `all` on `pool` (made when missing, of pool_type), each running in
    `checkout`; set_params are the deployments' default overrides (a GPU pool: {"device": "cuda"}). api_url: the
    Prefect API (default: the settings'; Prefect reads its settings once, at import). Returns the deployment names."""
    from prefect import deploy as deploy_all
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = (checkout or project_root()).resolve()
    stages = ["all", *stage_instances(load_params(root / "params.yaml"))]
    with temporary_settings(updates={PREFECT_API_URL: api_url} if api_url else {}):
        ensure_pool(pool, pool_type)
        source = run_dvc_stage.from_source(source=str(root), entrypoint=ENTRYPOINT)
        deployments = [
            source.to_deployment(
                name=stage,
                parameters={"stage": stage, "set_params": set_params or {}, "checkout": str(root)},
                job_variables=job_variables or {},
                tags=[f"stage:{stage}"],
                description=(
                    f"every out-of-date stage of {root}" if stage == "all" else f"`dvc repro` of {stage} in {root}"
                ),
            )
            for stage in stages
        ]
        deploy_all(
            *deployments,
            work_pool_name=pool,
            build=False,
            push=False,
            print_next_steps_message=False,
            ignore_warnings=True,
        )
    return [f"{FLOW_NAME}/{stage}" for stage in stages]
