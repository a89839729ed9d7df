"""MLflow bookkeeping for stage runs.

The default store is an SQLite file in the project (absolute URI, so `dvc exp run --temp` logs into the same one)
with artifacts beside it: no server is needed, and `make ui` serves the same store. MLFLOW_TRACKING_URI overrides.
Each stage run is a child of one parent run per pipeline invocation, so one `dvc repro` groups in the UI.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.invocation import current_invocation
from stages.io.outputs import content_hash
from pipeline.paths import git_commit, project_root

EXPERIMENT = "c2crs"
INVOCATION_TAG = "c2crs.invocation"
MODEL_REQUIREMENTS = ["torch==2.13.0", "torch-geometric==2.8.1"]


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlruns.db'}"


def artifact_root() -> str:
    return (project_root() / "mlartifacts").as_uri()


def experiment_id() -> str:
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_root())


def parent_run(invocation: str) -> str:
    """The MLflow run that groups one pipeline invocation's stage runs, made on first use."""
    exp_id = experiment_id()  # first: it points MLflow at the project's store, which the client then opens
    client = MlflowClient()
    found = client.search_runs([exp_id], filter_string=f"tags.`{INVOCATION_TAG}` = '{invocation}'", max_results=1)
    if found:
        return found[0].info.run_id
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    run = client.create_run(exp_id, run_name=f"pipeline {started}",
                            tags={INVOCATION_TAG: invocation, "git_commit": git_commit()})
    return run.info.run_id


def flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class StageRun:
    """What a stage logs: its inputs' hashes, its metrics (numbers as metrics, the rest as tags), per-epoch
    metrics while it trains, and its trained models (stages.io.stage_log.StageLog is the interface)."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_inputs(self, inputs: dict[str, Path]) -> dict[str, str]:
        hashes = {name: content_hash(path) for name, path in inputs.items()}
        mlflow.log_params({f"input_sha256.{name}": digest for name, digest in hashes.items()})
        mlflow.log_dict({name: {"path": str(inputs[name]), "sha256": h} for name, h in hashes.items()}, "inputs.json")
        return hashes

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Nested keys are joined with dots; '@' (recall@10) becomes '_at_', which MLflow names allow."""
        flat = {k.replace("@", "_at_"): v for k, v in flatten(metrics).items()}
        numbers = {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow.log_metrics(numbers, step=step)
        others = {k: str(v) for k, v in flat.items() if k not in numbers}
        if others:
            mlflow.set_tags(others)

    def epoch(self, epoch: int, metrics: dict) -> None:
        self.log_metrics(metrics, step=epoch)

    def model(self, name: str, model) -> None:
        """The trained torch module, pickled (graph models do not export to pt2) with pinned requirements, so
        loading it does not start an inference of the environment (about 8 s)."""
        import mlflow.pytorch

        mlflow.pytorch.log_model(model, name=name, serialization_format="pickle",
                                 pip_requirements=MODEL_REQUIREMENTS)


@contextmanager
def stage_run(stage: str, params: dict) -> Iterator[StageRun]:
    """An MLflow run for one stage execution, under the parent run of the current pipeline invocation."""
    exp_id = experiment_id()
    client = MlflowClient()
    invocation = current_invocation()
    parent_id = parent_run(invocation) if invocation else None
    tags = {"stage": stage, "git_commit": git_commit()}
    status = "FAILED"
    try:
        with mlflow.start_run(experiment_id=exp_id, run_name=stage, parent_run_id=parent_id, tags=tags) as run:
            mlflow.log_params(flatten(params))
            yield StageRun(run.info.run_id)
        status = "FINISHED"
    finally:
        if parent_id:
            client.set_terminated(parent_id, status=status)
