"""MLflow bookkeeping for stage runs.

The default store is an SQLite file in the project (absolute URI, so `dvc exp run --temp` logs into the same one)
with artifacts beside it: no server is needed, and `make ui` serves the same store. MLFLOW_TRACKING_URI overrides.
Each stage run is a child of one parent run per pipeline invocation, so one `dvc repro` groups in the UI.
"""

import hashlib
import json
import logging
import os
import signal
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient
from prefect.exceptions import TerminationSignal

from pipeline import registry
from pipeline.invocation import current_invocation
from pipeline.paths import git_commit, project_root
from stages.io.outputs import content_hash

logger = logging.getLogger(__name__)

EXPERIMENT = "c2crs"
EXPERIMENT_KIND, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"
INVOCATION_TAG = "c2crs.invocation"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlruns.db'}"


def artifact_root() -> str:
    return (project_root() / "mlartifacts").as_uri()


def experiment_id() -> str:
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(
        EXPERIMENT, artifact_location=artifact_root(), tags={EXPERIMENT_KIND: MODEL_DEVELOPMENT}
    )


def mark_model_development(client: MlflowClient, exp_id: str) -> None:
    """The UI opens a classic model-development experiment on its training runs, not on the GenAI views (stores made
    before the tag existed get it here)."""
    if client.get_experiment(exp_id).tags.get(EXPERIMENT_KIND) != MODEL_DEVELOPMENT:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND, MODEL_DEVELOPMENT)


def parent_run(invocation: str) -> str:
    """The MLflow run that groups one pipeline invocation's stage runs, made on first use."""
    exp_id = experiment_id()  # first: it points MLflow at the project's store, which the client then opens
    client = MlflowClient()
    found = client.search_runs([exp_id], filter_string=f"tags.`{INVOCATION_TAG}` = '{invocation}'", max_results=1)
    if found:
        return found[0].info.run_id
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    run = client.create_run(
        exp_id,
        run_name=f"pipeline {started}",
        tags={INVOCATION_TAG: invocation, "git_commit": git_commit(), **process_tags()},
    )
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
    """What a stage logs: its inputs (hashes, and as MLflow datasets), its metrics (numbers as metrics, the rest as
    tags), per-epoch metrics while it trains, its trained models as registry versions (pipeline/registry.py), test
    metrics and champion decisions, and its reports (stages.io.stage_log.StageLog is the interface)."""

    def __init__(self, run_id: str, stage: str = "", params_hash: str = ""):
        self.run_id, self.stage, self.params_hash = run_id, stage, params_hash
        self.versions = []  # registered by this run; tagged with the input hashes once the stage says what it read

    def log_inputs(self, inputs: dict[str, Path]) -> dict[str, str]:
        hashes = {name: content_hash(path) for name, path in inputs.items()}
        mlflow.log_params({f"input_sha256.{name}": digest for name, digest in hashes.items()})
        mlflow.log_dict({name: {"path": str(inputs[name]), "sha256": h} for name, h in hashes.items()}, "inputs.json")
        with warnings.catch_warnings():  # a local path matches two registered source types; both mean a local file
            warnings.simplefilter("ignore")
            for name, digest in hashes.items():
                mlflow.log_input(
                    MetaDataset(resolve_dataset_source(str(inputs[name].resolve())), name=name, digest=digest[:16]),
                    context="input",
                )
        client = MlflowClient()
        for version in self.versions:
            for name, digest in hashes.items():
                client.set_model_version_tag(version.name, version.version, f"{registry.DATA_TAG}{name}", digest)
        return hashes

    def log_reports(self, paths: list[Path]) -> None:
        for path in paths:
            if path.is_file():
                mlflow.log_artifact(str(path), artifact_path="reports")

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

    def model(self, name: str | None, model, file: Path, validation: dict | None = None) -> None:
        """The trained module as a registry version (pinned requirements, so loading it does not start an inference
        of the environment, about 8 s)."""
        version = registry.register(
            name,
            model,
            file,
            validation or {},
            {registry.GIT_TAG: git_commit(), registry.PARAMS_TAG: self.params_hash, registry.STAGE_TAG: self.stage},
        )
        if version is not None:
            self.versions.append(version)

    def evaluated(self, name: str, file: Path, test: dict, champion_metric, min_improvement: float) -> None:
        client = MlflowClient()
        version = registry.version_of_file(client, name, file)
        if version is None:
            logger.warning(
                "%s: no registered version holds the weights of %s (trained outside the pipeline's "
                "flows?): its test metrics are not in the registry",
                name,
                file,
            )
            return
        registry.log_test_metrics(version, test)
        decision = registry.promote(client, name, version, champion_metric, min_improvement)
        logger.info("%s", decision)
        mlflow.set_tag(f"champion.{name}", decision)


@contextmanager
def stage_run(stage: str, params: dict, flow_run_id: str | None = None) -> Iterator[StageRun]:
    """An MLflow run for one stage execution, under the parent run of the current pipeline invocation.

    An interrupted stage (Ctrl-C, or SIGTERM through interrupt_on_sigterm) ends as KILLED, a failed one as FAILED;
    runs that a kill -9 left RUNNING are closed as KILLED when the next stage starts (close_abandoned_runs).
    """
    exp_id = experiment_id()
    client = MlflowClient()
    mark_model_development(client, exp_id)
    close_abandoned_runs(client, exp_id)
    invocation = current_invocation()
    parent_id = parent_run(invocation) if invocation else None
    tags = {"stage": stage, "git_commit": git_commit(), **process_tags()}
    if flow_run_id:
        tags[FLOW_RUN_TAG] = flow_run_id
    status = "FAILED"
    try:
        with mlflow.start_run(experiment_id=exp_id, run_name=stage, parent_run_id=parent_id, tags=tags) as run:
            mlflow.log_params(flatten(params))
            params_hash = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
            try:
                yield StageRun(run.info.run_id, stage, params_hash)
            except (KeyboardInterrupt, TerminationSignal):  # Ctrl-C; SIGTERM (Prefect's flow turns it into the latter)
                status = "KILLED"
                mlflow.end_run(status)
                raise
        status = "FINISHED"
    finally:
        if parent_id:
            client.set_terminated(parent_id, status=status)


# Which process made a run, so that a run it left RUNNING (killed with -9, machine lost) can be told apart from one
# that still runs: host, pid and the process's start time (a pid is reused; its start time is not).
HOST_TAG, PID_TAG, PROCESS_START_TAG = "c2crs.host", "c2crs.pid", "c2crs.process_start"
FLOW_RUN_TAG = "prefect.flow_run_id"


def _process_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_tags() -> dict[str, str]:
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        PROCESS_START_TAG: _process_start(os.getpid()) or "",
    }


def close_abandoned_runs(client: MlflowClient, exp_id: str) -> list[str]:
    """End as KILLED every RUNNING run of the experiment whose process on this host is gone, and mark its Prefect
    flow run crashed when the Prefect API answers. Returns the runs closed."""
    closed = []
    for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
            continue
        if _process_start(int(tags[PID_TAG])) == tags.get(PROCESS_START_TAG):
            continue  # its process still runs
        client.set_tag(run.info.run_id, "c2crs.ended_by", "its process was gone when a later stage started")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
        if tags.get(FLOW_RUN_TAG):
            _crash_flow_run(tags[FLOW_RUN_TAG])
    return closed


def _crash_flow_run(flow_run_id: str) -> None:
    """Best effort: the Prefect server of that run may be gone too (an ephemeral one always is)."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as prefect:
            run = prefect.read_flow_run(flow_run_id)
            if run.state is not None and not run.state.is_final():
                prefect.set_flow_run_state(flow_run_id, Crashed(message="its process was gone"), force=True)
    except Exception:  # noqa: BLE001 - the API may be unreachable or the run unknown to it: nothing to mark
        pass


def interrupt_on_sigterm() -> None:
    """SIGTERM (`kill`, a scheduler stopping a stage) unwinds like Ctrl-C, so the runs end as KILLED."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def model_sources(wanted: dict[str, Path], workspace: Path, models_from: str) -> dict[str, Path]:
    """Registered name (-> the workspace's file) -> the file to load: the registry's champion, or the workspace's
    file (models_from "workspace", or no champion trained on this data); says which, one line per model."""
    if models_from == "workspace":
        return wanted
    from mlflow.tracking import MlflowClient

    from stages.training.runs import TRAINING_INPUTS

    experiment_id()
    files, notes = registry.registry_files(
        MlflowClient(tracking_uri()), wanted, {name: workspace / path for name, path in TRAINING_INPUTS.items()}
    )
    for note in notes:
        print(f"model {note}", flush=True)
    return files
