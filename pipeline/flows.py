"""Prefect flows: one per stage, and `all`, which runs every stage as a subflow of one parent flow.

A stage flow loads params, opens an MLflow run, calls the stage's plain functions (stages/), writes the outputs
atomically and logs params, input hashes and metrics. Downloads are Prefect tasks with retries and backoff.
"""

from pathlib import Path

import httpx
from prefect import flow, tags, task
from prefect.tasks import exponential_backoff

from pipeline.config import ConfigError, DataConfig, Params, load_params
from pipeline.io import write_outputs
from pipeline.paths import git_commit
from pipeline.registry import STAGES, stage_names
from pipeline.tracking import new_invocation, stage_run
from stages import ingest

TRANSIENT_HTTP_STATUS = {408, 425, 429, 500, 502, 503, 504}


def is_transient(exc: BaseException) -> bool:
    """Network hiccups and server-side errors are worth a retry; a 404 or a checksum mismatch is not."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in TRANSIENT_HTTP_STATUS
    return isinstance(exc, httpx.TransportError)


def _retry_if_transient(task, task_run, state) -> bool:
    return is_transient(state.result(raise_on_failure=False))


def redial_raw_files(data: DataConfig, workspace: Path) -> ingest.RawRedialFiles:
    """The raw ReDial files: from the mirror, or downloaded (each file a task retried with backoff) and cached."""
    files = data.files.model_dump()
    if data.resolved_source() == "mirror":
        mirror = data.resolved_mirror_dir(workspace)
        if mirror is None:
            raise ConfigError("params.yaml: data.source is mirror but neither C2CRS_DATA_DIR nor data.mirror_dir is set")
        return ingest.locate_mirror_files(mirror, **files)

    download = task(ingest.download_file, name="download", retries=data.retries,
                    retry_delay_seconds=exponential_backoff(backoff_factor=data.retry_backoff_seconds),
                    retry_jitter_factor=0.5, retry_condition_fn=_retry_if_transient)
    cache = workspace / data.cache_dir
    zipped = data.downloads.redial_zip
    archive = download(zipped.url, cache / "redial_dataset.zip", zipped.sha256, data.timeout_seconds)
    extracted = {name: ingest.extract_member(archive, getattr(zipped, name), cache / getattr(zipped, name))
                 for name in ("redial_train", "redial_test", "movies")}
    fetched = {name: download(getattr(data.downloads, name).url, cache / files[name].rsplit("/", 1)[-1],
                              getattr(data.downloads, name).sha256, data.timeout_seconds)
               for name in ("movies_imdb", "movies_dbpedia")}
    return ingest.RawRedialFiles(**extracted, **fetched)


def _params_sections(params: Params, stage: str) -> dict:
    return {key: params.model_dump()[key] for key in STAGES[stage].params}


@flow(name="ingest")
def ingest_flow(params_file: str = "params.yaml") -> dict:
    params = load_params(params_file)
    root = Path(params_file).resolve().parent  # paths in params are relative to the params file's directory
    with stage_run("ingest", _params_sections(params, "ingest")) as run:
        raw = redial_raw_files(params.data, root)
        run.log_inputs(dict(raw.items()))
        result = ingest.ingest(raw, seed=params.seed, **params.ingest.model_dump())
        outs = [root / out for out in STAGES["ingest"].outs]
        write_outputs({
            outs[0]: result.conversations,
            outs[1]: result.utterances,
            outs[2]: result.movies,
            root / STAGES["ingest"].metrics[0]: result.metrics,
        })
        run.log_metrics(result.metrics)
    return result.metrics


STAGE_FLOWS = {"ingest": ingest_flow}


@flow(name="all")
def all_flow(params_file: str = "params.yaml") -> dict:
    """Every stage in order, each a subflow of this one, all MLflow runs under one parent run."""
    return {name: run_stage_flow(name, params_file) for name in stage_names()}


def run_stage_flow(stage: str, params_file: str = "params.yaml") -> dict:
    """Run one stage (or `all`) as a flow, tagged with the stage name and the git commit."""
    if stage == "all":
        new_invocation()
        with tags("stage:all", f"git:{git_commit()}"):
            return all_flow(params_file)
    with tags(f"stage:{stage}", f"git:{git_commit()}"):
        return STAGE_FLOWS[stage](params_file)
