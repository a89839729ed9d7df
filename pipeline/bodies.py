"""Stage bodies: what each stage does, from validated params to outputs on disk, without Prefect flows or MLflow.

A body calls the stage's plain functions (stages/) and writes the outputs atomically. pipeline/flows.py wraps each
body in a flow and an MLflow run; benchmarks call the bodies directly to measure what orchestration adds. Prefect
is imported only where a download needs its task retries.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import polars as pl

from pipeline.config import ConfigError, DataConfig, Params
from pipeline.io import write_outputs
from pipeline.registry import STAGES
from stages import fetch, ingest, reviews

TRANSIENT_HTTP_STATUS = {408, 425, 429, 500, 502, 503, 504}


def is_transient(exc: BaseException) -> bool:
    """Network hiccups and server-side errors are worth a retry; a 404 or a checksum mismatch is not."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in TRANSIENT_HTTP_STATUS
    return isinstance(exc, httpx.TransportError)


def _retry_if_transient(task, task_run, state) -> bool:
    return is_transient(state.result(raise_on_failure=False))


def _downloader(data: DataConfig):
    """download_file as a Prefect task: transient failures are retried with exponential backoff."""
    from prefect import task
    from prefect.tasks import exponential_backoff

    return task(fetch.download_file, name="download", retries=data.retries,
                retry_delay_seconds=exponential_backoff(backoff_factor=data.retry_backoff_seconds),
                retry_jitter_factor=0.5, retry_condition_fn=_retry_if_transient)


def _mirror(data: DataConfig, workspace: Path) -> Path:
    mirror = data.resolved_mirror_dir(workspace)
    if mirror is None:
        raise ConfigError("params.yaml: data.source is mirror but neither C2CRS_DATA_DIR nor data.mirror_dir is set")
    return mirror


def raw_files(data: DataConfig, workspace: Path, *names: str) -> dict[str, Path]:
    """Raw files by their data.files key: from the mirror, or downloaded (checksum-checked, cached) without one."""
    if data.resolved_source() == "mirror":
        mirror = _mirror(data, workspace)
        paths = {name: mirror / getattr(data.files, name) for name in names}
        fetch.missing_mirror_files(mirror, paths)
        return paths
    download = _downloader(data)
    cache = workspace / data.cache_dir
    paths = {}
    for name in names:
        source = getattr(data.downloads, name)
        paths[name] = download(source.url, cache / source.url.rsplit("/", 1)[-1], source.sha256,
                               data.timeout_seconds, md5=source.md5)
    return paths


def redial_raw_files(data: DataConfig, workspace: Path) -> ingest.RawRedialFiles:
    """The raw ReDial files; without a mirror the conversations come from the official zip."""
    if data.resolved_source() == "mirror":
        return ingest.locate_mirror_files(_mirror(data, workspace), **data.files.model_dump(
            include={"redial_train", "redial_test", "movies", "movies_imdb", "movies_dbpedia"}))
    cache = workspace / data.cache_dir
    zipped = data.downloads.redial_zip
    archive = _downloader(data)(zipped.url, cache / "redial_dataset.zip", zipped.sha256, data.timeout_seconds)
    extracted = {name: fetch.extract_member(archive, getattr(zipped, name), cache / getattr(zipped, name))
                 for name in ("redial_train", "redial_test", "movies")}
    return ingest.RawRedialFiles(**extracted, **raw_files(data, workspace, "movies_imdb", "movies_dbpedia"))


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


def reviews_stage(params: Params, workspace: Path) -> StageOutcome:
    cfg = params.reviews
    spec = STAGES["reviews"]
    movies_path, conversations_path, utterances_path = (workspace / dep for dep in spec.deps)
    movies = pl.read_parquet(movies_path)
    test_movies = set(
        pl.read_parquet(utterances_path)
        .join(pl.read_parquet(conversations_path).filter(pl.col("split") == "test"), on="conv_id")
        .select(pl.col("movie_ids").explode()).drop_nulls()["movie_ids"])
    local = {"aclimdb": "aclimdb_reviews", "revcore": "revcore_reviews"}
    files = raw_files(params.data, workspace, "movie_info", *(local[s] for s in cfg.sources if s in local))
    movie_info = reviews.read_movie_info(files["movie_info"])
    imdb_to_movies = reviews.movie_imdb_ids(movies, movie_info)
    movie_ids = set(movies["movie_id"])
    bad = reviews.BadReviews(cfg.on_bad_record)
    tables, scraper_stats = [], None
    for source in cfg.sources:
        if source == "aclimdb":
            tables.append(reviews.aclimdb_reviews(files["aclimdb_reviews"], imdb_to_movies, bad))
        elif source == "revcore":
            tables.append(reviews.revcore_reviews(files["revcore_reviews"], movie_ids, bad))
        elif source == "plots":
            tables.append(reviews.plot_reviews(movie_info, movie_ids, files["movie_info"], bad))
        else:
            scraped, scraper_stats = _scrape_imdb(cfg.scraper, sorted(imdb_to_movies), workspace)
            tables.append(reviews.scraped_reviews(scraped, imdb_to_movies, bad))
    review_table = pl.concat(tables)
    sentences = reviews.split_sentences(review_table, cfg.sources, cfg.min_sentence_tokens,
                                        cfg.max_sentence_tokens, cfg.max_sentences_per_movie)
    metrics = {
        "coverage": reviews.coverage(sentences, movie_ids, test_movies, cfg.sources),
        "reviews": dict(review_table.group_by("source").len().iter_rows()),
        "sentences": dict(sentences.group_by("source").len().iter_rows()),
        "movies_with_sentences": sentences["movie_id"].n_unique(),
        "bad_records": bad.count,
    }
    if scraper_stats:
        metrics["scraper"] = scraper_stats
    reviews_out, sentences_out = (workspace / out for out in spec.outs)
    write_outputs({reviews_out: review_table, sentences_out: sentences, workspace / spec.metrics[0]: metrics})
    return StageOutcome({**files, **{Path(d).name: workspace / d for d in spec.deps}}, metrics)


def _scrape_imdb(cfg, imdb_ids: list[str], workspace: Path):
    from stages.imdb_scraper import ImdbReviewScraper

    ids = imdb_ids[: cfg.max_movies] if cfg.max_movies else imdb_ids
    with ImdbReviewScraper(workspace / cfg.cache_dir, user_agent=cfg.user_agent,
                           requests_per_second=cfg.requests_per_second, max_retries=cfg.max_retries,
                           max_pages=cfg.max_pages_per_movie, allowed_hosts=cfg.allowed_hosts,
                           timeout=cfg.timeout_seconds) as scraper:
        scraped = list(scraper.scrape(ids))
        return scraped, scraper.stats.as_dict()


STAGE_BODIES: dict[str, Callable[[Params, Path], StageOutcome]] = {"ingest": ingest_stage, "reviews": reviews_stage}
