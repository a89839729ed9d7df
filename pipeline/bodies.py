"""Stage bodies: what each stage does, from validated params to outputs on disk, without Prefect flows or MLflow.

A body calls the stage's plain functions (stages/) and writes the outputs atomically. pipeline/flows.py wraps each
body in a flow and an MLflow run; benchmarks call the bodies directly to measure what orchestration adds. Prefect
is imported only where a download needs its task retries.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from pipeline.config import ConfigError, DataConfig, Params
from pipeline.io import write_outputs
from pipeline.registry import STAGES
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

    from prefect import task
    from prefect.tasks import exponential_backoff

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


@dataclass
class StageOutcome:
    inputs: dict[str, Path]  # what the stage read, hashed into its MLflow run
    metrics: dict


def ingest_stage(params: Params, workspace: Path) -> StageOutcome:
    raw = redial_raw_files(params.data, workspace)
    result = ingest.ingest(raw, seed=params.seed, **params.ingest.model_dump())
    spec = STAGES["ingest"]
    conversations, utterances, movies = (workspace / out for out in spec.outs)
    write_outputs({
        conversations: result.conversations,
        utterances: result.utterances,
        movies: result.movies,
        workspace / spec.metrics[0]: result.metrics,
    })
    return StageOutcome(dict(raw.items()), result.metrics)


STAGE_BODIES: dict[str, Callable[[Params, Path], StageOutcome]] = {"ingest": ingest_stage}
