"""Stage bodies: what each stage does, from validated params to outputs on disk, without Prefect flows or MLflow.

Over 400 lines for now: every stage's body is here; issue 11 moves each into its stage module (stages/<stage>.py
with run(params, workspace)), which is the split this file is waiting for.

A body calls the stage's plain functions (stages/) and writes the outputs atomically. pipeline/flows.py wraps each
body in a flow and an MLflow run; benchmarks call the bodies directly to measure what orchestration adds. Prefect
is imported only where a download needs its task retries.
"""

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from models.baselines import TextCNNRecommender, popularity_scores
from models.c2crs import C2CRS, C2CRSConfig
from models.generator import ConversationModel, GeneratorConfig, ResponseGenerator
from pipeline.config import ConfigError, DataConfig, LinkingConfig, Params, resolve_device
from pipeline.io import write_outputs
from pipeline.registry import STAGES
from stages import (c2crs_data, c2crs_train, conv_evaluate, conv_train, evaluate, fetch, ingest, kg, linking, reviews,
                    triples)
from stages import training as c2crs_training

logger = logging.getLogger(__name__)

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


class StageLog:
    """Where a body reports progress while it runs: per-epoch metrics and trained models. This default drops
    them (benchmarks, direct calls); the flows log them to MLflow (pipeline.tracking.StageRun)."""

    def epoch(self, epoch: int, metrics: dict) -> None:
        pass

    def model(self, name: str, model) -> None:
        pass


NO_LOG = StageLog()


@dataclass
class StageOutcome:
    inputs: dict[str, Path]  # what the stage read, hashed into its MLflow run
    metrics: dict


def ingest_stage(params: Params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
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


def reviews_stage(params: Params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
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


def _entity_linker(labels: dict[int, list[str]], degree: dict[int, int], stopwords: Path,
                   cfg: LinkingConfig) -> linking.EntityLinker:
    return linking.EntityLinker.build(labels, linking.read_stopwords(stopwords), degree=degree,
                                      min_label_chars=cfg.min_label_chars, dominance_ratio=cfg.dominance_ratio,
                                      min_dominant_degree=cfg.min_dominant_degree, use_variants=cfg.use_variants,
                                      add_chat_stopwords=cfg.add_chat_stopwords)


def kg_entity_linker(entities: pl.DataFrame, edges: pl.DataFrame, stopwords: Path,
                     cfg: LinkingConfig) -> linking.EntityLinker:
    """The linker over the kg stage's non-item entities, degrees from its edges (self loops aside)."""
    others = entities.filter(~pl.col("is_item"))
    degree = dict(edges.filter(pl.col("src") != pl.col("dst"))["src"].value_counts().iter_rows())
    return _entity_linker(linking.entity_labels(dict(zip(others["entity_id"], others["uri"]))), degree, stopwords, cfg)


def kg_stage(params: Params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    cfg = params.kg
    spec = STAGES["kg"]
    movies_path, utterances_path = (workspace / dep for dep in spec.deps)
    movies = pl.read_parquet(movies_path)
    metadata = ("metadata_kg", "metadata_entity_ids", "metadata_relation_ids", "metadata_item_ids",
                "metadata_entity_types", "movie_info")
    files = raw_files(params.data, workspace, "dbpedia_subkg", "dbpedia_entity_ids", "stopwords",
                      *(metadata if cfg.merge_metadata_kg else ()))
    sources = [kg.load_kgsf_kg(files["dbpedia_subkg"], files["dbpedia_entity_ids"])]
    if cfg.merge_metadata_kg:
        sources.append(kg.load_movie_metadata_kg(
            movies, files["metadata_kg"], files["metadata_entity_ids"], files["metadata_relation_ids"],
            files["movie_info"], files["metadata_item_ids"], files["metadata_entity_types"]))
    source = kg.merge_sources(*sources)
    seeds: set[str] = set()
    if cfg.link_seeds:
        # Seeds are entities named in the conversations, found by linking against the whole input graph.
        uris = sorted(source.entity_uris - set(movies["dbpedia_uri"].drop_nulls()))
        ends = pl.concat([source.triples["head_uri"], source.triples["tail_uri"]])
        degree_by_uri = dict(ends.value_counts().iter_rows())
        linker = _entity_linker(linking.entity_labels(dict(enumerate(uris))),
                                {i: degree_by_uri.get(uri, 0) for i, uri in enumerate(uris)},
                                files["stopwords"], params.linking)
        texts = pl.read_parquet(utterances_path)["text"]
        seeds = {uris[m.entity_id] for text in tqdm(texts, desc="linking seeds", unit=" utt", disable=None)
                 for m in linker.link(text)}
    result = kg.build_kg(source.triples, movies, seed_uris=sorted(seeds), min_relation_edges=cfg.min_relation_edges,
                         hops=cfg.hops, add_inverse=cfg.add_inverse, add_self_loops=cfg.add_self_loops)
    metrics = {**result.metrics, "linked_seeds": len(seeds)}
    entities_out, relations_out, edges_out = (workspace / out for out in spec.outs)
    write_outputs({entities_out: result.entities, relations_out: result.relations, edges_out: result.edges,
                   workspace / spec.metrics[0]: metrics})
    return StageOutcome({**files, **{Path(d).name: workspace / d for d in spec.deps}}, metrics)


def sentence_chooser(cfg, entities: pl.DataFrame, edges: pl.DataFrame, movies: pl.DataFrame,
                     sentences: pl.DataFrame, review_table: pl.DataFrame) -> triples.SentenceChooser:
    """The triples stage's rule for the review sentence of a mentioned entity (params.triples)."""
    popularity = entities.join(movies.select("movie_id", pl.col("mentions_ingested").alias("mentions")),
                               on="movie_id", how="left").with_columns(pl.col("mentions").fill_null(0))
    candidates = triples.candidate_sentences(popularity, edges, sentences, cfg.max_movies_per_entity)
    ratings = (sentences.join(review_table.select("movie_id", "source", "review_id", "rating"),
                              on=["movie_id", "source", "review_id"], how="left")
               .sort("sentence_id")["rating"].cast(pl.Float64).fill_null(float("nan")).to_numpy())
    return triples.SentenceChooser(cfg.sentence_rule, sentences, ratings,
                                   dict(zip(entities["entity_id"], entities["label"])), candidates)


def triples_stage(params: Params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    cfg = params.triples
    spec = STAGES["triples"]
    dep = {Path(d).name: workspace / d for d in spec.deps}
    files = raw_files(params.data, workspace, "stopwords", "linking_gold")
    entities, edges = pl.read_parquet(dep["entities.parquet"]), pl.read_parquet(dep["edges.parquet"])
    movies = pl.read_parquet(dep["movies.parquet"])
    sentences = pl.read_parquet(dep["review_sentences.parquet"])
    utterances = (pl.read_parquet(dep["utterances.parquet"])
                  .join(pl.read_parquet(dep["conversations.parquet"]).select("conv_id", "split"), on="conv_id")
                  .sort("conv_id", "turn_idx"))

    items = entities.filter(pl.col("is_item"))
    item_entity = dict(zip(items["movie_id"], items["entity_id"]))
    linker = kg_entity_linker(entities, edges, files["stopwords"], params.linking)
    linked = triples.link_all(utterances, linker, item_entity)

    train_rows = (utterances["split"] == "train").to_list()
    vocabulary = triples.build_vocabulary((u.tokens for u, train in zip(linked, train_rows) if train),
                                          cfg.min_token_frequency)
    samples, context_mentions = triples.build_samples(utterances, linked, vocabulary, item_entity,
                                                      cfg.context_max_tokens, cfg.response_max_tokens)
    chooser = sentence_chooser(cfg, entities, edges, movies, sentences, pl.read_parquet(dep["reviews.parquet"]))
    triple_table = triples.build_triples(context_mentions, linked, utterances, chooser)

    bracketed = {f"<{uri}>": entity_id for entity_id, uri in zip(entities["entity_id"], entities["uri"])}
    evaluation = linking.evaluate_linker(linker, files["linking_gold"], bracketed,
                                         {f"<{uri}>" for uri in items["uri"]}, sample_size=params.linking.report_samples,
                                         seed=params.seed)
    metrics = {**triples.triple_metrics(samples, triple_table, linked), "vocabulary": vocabulary.height,
               "linker": {k: round(evaluation[k], 4) for k in ("precision", "recall", "f1", "macro_f1", "f1_mapped")},
               "linker_counts": evaluation["counts"]}
    vocab_out, samples_out, triples_out = (workspace / out for out in spec.outs)
    report = linking.evaluation_report(evaluation, dict(zip(entities["entity_id"], entities["label"])))
    write_outputs({vocab_out: vocabulary, samples_out: samples, triples_out: triple_table,
                   workspace / spec.metrics[0]: metrics, workspace / spec.reports[0]: report})
    return StageOutcome({**files, **dep}, metrics)


STAGE_BODIES: dict[str, Callable[..., StageOutcome]] = {
    "ingest": ingest_stage, "reviews": reviews_stage, "kg": kg_stage, "triples": triples_stage}


# ---------------------------------------------------------------- model stages


def _device(params: Params) -> torch.device:
    return torch.device(resolve_device(params.device))


def _training_run(params: Params, workspace: Path) -> tuple[c2crs_train.Run, C2CRSConfig, dict[str, Path]]:
    """Everything a C2-CRS training stage reads, as tensors and tables, and the model's configuration."""
    inputs = {name: workspace / path for name, path in TRAINING_INPUTS.items()}
    samples, triple_table = pl.read_parquet(inputs["samples"]), pl.read_parquet(inputs["triples"])
    vocabulary = pl.read_parquet(inputs["vocab"])
    cfg = params.model
    edges = pl.read_parquet(inputs["edges"])
    if not cfg.kg_edges:
        edges = edges.filter(pl.col("src") == pl.col("dst"))
    graph = c2crs_data.load_graph(pl.read_parquet(inputs["entities"]), pl.read_parquet(inputs["relations"]), edges)
    sentence_tokens = c2crs_data.sentence_token_ids(pl.read_parquet(inputs["review_sentences"]), vocabulary,
                                                    cfg.max_sentence_tokens)
    run = c2crs_train.Run(
        graph=graph,
        train=c2crs_data.sample_table(samples, triple_table, "train"),
        valid=c2crs_data.sample_table(samples, triple_table, "valid"),
        sentence_tokens=sentence_tokens, pad_id=0, max_context_entities=cfg.max_context_entities,
        max_review_sentences=cfg.max_review_sentences, device=_device(params), seed=params.seed,
        views=frozenset(cfg.views))
    model_config = C2CRSConfig(
        vocab_size=vocabulary.height, n_entities=graph.n_entities, n_relations=graph.n_relations,
        n_items=graph.n_items, token_dim=cfg.token_dim, kg_dim=cfg.kg_dim, n_layers=cfg.n_layers,
        n_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim, dropout=cfg.dropout, num_bases=cfg.num_bases,
        projection_dim=cfg.projection_dim, item_bias=cfg.item_bias, kg_encoder=cfg.kg_encoder,
        rec_pooling=cfg.rec_pooling, projection_heads=cfg.projection_heads, contrastive_loss=cfg.contrastive_loss,
        max_positions=max(int(samples["context_token_ids"].list.len().max()), cfg.max_sentence_tokens))
    return run, model_config, inputs


TRAINING_INPUTS = {
    "samples": "data/triples/samples.parquet", "triples": "data/triples/triples.parquet",
    "vocab": "data/triples/vocab.parquet", "review_sentences": "data/reviews/review_sentences.parquet",
    "entities": "data/kg/entities.parquet", "relations": "data/kg/relations.parquet", "edges": "data/kg/edges.parquet",
}


def _checkpoint_dir(workspace: Path, stage: str, params: Params, inputs: dict[str, Path]) -> Path:
    """Checkpoints of a run live outside DVC's outputs (DVC deletes those before a stage runs), under a key of the
    stage's params and inputs, so a rerun resumes only the very same training."""
    from pipeline.io import content_hash

    key = json.dumps({"params": {k: params.model_dump()[k] for k in STAGES[stage].params},
                      "inputs": {n: content_hash(p) for n, p in sorted(inputs.items())}}, sort_keys=True)
    return workspace / "data" / "checkpoints" / f"{stage}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _save_model(path: Path, model: torch.nn.Module, config) -> None:
    """Weights and the config that builds the module again, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save({"config": dataclasses.asdict(config), "state_dict": model.state_dict()}, temporary)
    temporary.replace(path)


def _load_saved(path: Path) -> dict:
    """A file written by _save_model: weights and a config of plain values, loaded without unpickling code (a model
    file may come from someone else)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_c2crs(path: Path) -> C2CRS:
    saved = _load_saved(path)
    model = C2CRS(C2CRSConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    return model


def _training_outcome(state) -> dict:
    """How many epochs ran, and the metrics of the kept (best) epoch."""
    best = next((h for h in state.history if h["epoch"] == state.best_epoch), state.history[-1] if state.history
                else {})
    return {"epochs_run": state.epoch, "best_epoch": state.best_epoch,
            **{k: v for k, v in best.items() if k != "epoch"}}


# The recommendation path: (stage, the stage whose model it starts from, its training function).
REC_PATH = {"pretrain_coarse": (None, c2crs_train.pretrain_coarse),
            "pretrain_fine": ("pretrain_coarse", c2crs_train.pretrain_fine),
            "finetune_rec": ("pretrain_fine", c2crs_train.finetune_recommender)}


def _train_c2crs(stage: str, params: Params, workspace: Path, log: StageLog, start_from: Path | None,
                 out: Path, loaded=None) -> tuple[C2CRS, dict, dict[str, Path]]:
    """One step of the recommendation path: train from `start_from` (None: fresh weights), keep the best epoch,
    save it to `out`. Returns the model, the training outcome and the inputs read."""
    run, model_config, inputs = loaded or _training_run(params, workspace)  # loaded: _training_run's, reused
    inputs = dict(inputs)
    c2crs_training.seed_everything(params.seed, params.deterministic)
    if start_from is not None:
        inputs["start_from"] = start_from
        model = load_c2crs(start_from)
    else:
        model = C2CRS(model_config)
    model.to(run.device)
    _, train_fn = REC_PATH[stage]
    checkpoints = _checkpoint_dir(workspace, stage, params, inputs)
    state = train_fn(model, run, getattr(params, stage), checkpoints, on_epoch=log.epoch)
    if (checkpoints / "best.pt").is_file():
        c2crs_training.load_checkpoint(checkpoints / "best.pt", model)
    _save_model(out, model, model.cfg)
    return model, _training_outcome(state), inputs


def _rec_path_stage(stage: str, params: Params, workspace: Path, log: StageLog) -> StageOutcome:
    spec = STAGES[stage]
    previous, _ = REC_PATH[stage]
    start_from = workspace / STAGES[previous].outs[0] if previous else None
    model, metrics, inputs = _train_c2crs(stage, params, workspace, log, start_from, workspace / spec.outs[0])
    write_outputs({workspace / spec.metrics[0]: metrics})
    log.model(stage, model)
    return StageOutcome(inputs, metrics)


def pretrain_coarse_stage(params: Params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    return _rec_path_stage("pretrain_coarse", params, workspace, log)


def pretrain_fine_stage(params: Params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    return _rec_path_stage("pretrain_fine", params, workspace, log)


def finetune_rec_stage(params: Params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    return _rec_path_stage("finetune_rec", params, workspace, log)


STAGE_BODIES.update({"pretrain_coarse": pretrain_coarse_stage, "pretrain_fine": pretrain_fine_stage,
                     "finetune_rec": finetune_rec_stage})


class _PrefixedLog(StageLog):
    """Per-epoch metrics of one ablation variant and step, named '<variant>.<stage>.<metric>' in the stage's run."""

    def __init__(self, log: StageLog, prefix: str):
        self.log, self.prefix = log, prefix

    def epoch(self, epoch: int, metrics: dict) -> None:
        self.log.epoch(epoch, {f"{self.prefix}.{k}": v for k, v in metrics.items()})


def ablation_model_path(workspace: Path, variant: str, stage: str = "finetune_rec") -> Path:
    return workspace / STAGES["ablations"].outs[0] / variant / f"{stage}.pt"


def _train_ablation(params: Params, workspace: Path, variant: str, log: StageLog) -> tuple[dict, dict[str, Path]]:
    """One ablation variant's whole recommendation path; returns its outcome per stage and the inputs it read."""
    variant_params = params.variant(variant)
    start_from, outcome, inputs = None, {"overrides": params.ablations.variants[variant]}, {}
    loaded = _training_run(variant_params, workspace)  # read once for the variant's three steps
    for stage in REC_PATH:
        out = ablation_model_path(workspace, variant, stage)
        _, outcome[stage], read = _train_c2crs(stage, variant_params, workspace,
                                               _PrefixedLog(log, f"{variant}.{stage}"), start_from, out, loaded)
        inputs.update({name: path for name, path in read.items() if name != "start_from"})
        start_from = out
    return outcome, inputs


class _RecordingLog(StageLog):
    """Keeps a worker process's per-epoch metrics; the stage's own process logs them when the variant is done."""

    def __init__(self):
        self.epochs: list[tuple[int, dict]] = []

    def epoch(self, epoch: int, metrics: dict) -> None:
        self.epochs.append((epoch, metrics))


def _train_variant_in_worker(kind: str, params_json: str, workspace: str, variant: str, threads: int):
    torch.set_num_threads(threads)
    log = _RecordingLog()
    outcome, inputs = VARIANT_TRAINERS[kind](Params.model_validate_json(params_json), Path(workspace), variant, log)
    return outcome, inputs, log.epochs


def _train_variants(kind: str, params: Params, workspace: Path, log: StageLog) -> dict[str, tuple[dict, dict]]:
    """Every variant of params.<kind> (ablations or conv_baselines): {variant: (outcome, inputs read)}.

    With <kind>.workers > 1 the variants train in that many processes at once, each with an equal share of the
    CPU threads: on a small CPU two single-threaded trainings get more done than one using both cores.
    """
    section = getattr(params, kind)
    variants = list(section.variants)
    workers = min(section.workers, len(variants))
    done: dict[str, tuple[dict, dict[str, Path]]] = {}
    if workers <= 1:
        for variant in variants:
            done[variant] = VARIANT_TRAINERS[kind](params, workspace, variant, log)
        return done
    threads = max(1, torch.get_num_threads() // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_variant_in_worker, kind, params.model_dump_json(), str(workspace), variant,
                               threads): variant for variant in variants}
        for future in as_completed(futures):
            outcome, inputs, epochs = future.result()
            for epoch, metrics in epochs:
                log.epoch(epoch, metrics)
            done[futures[future]] = outcome, inputs
            logger.info("%s %s trained: %s", kind, futures[future], outcome)
    return {variant: done[variant] for variant in variants}


def ablations_stage(params: Params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    """The paper's Table 4: every variant in params.ablations.variants trains the whole recommendation path with its
    overrides. A step whose params and inputs equal the main run's (e.g. w/o Fine's coarse stage) resumes the main
    run's finished checkpoint instead of training again; a killed stage resumes each variant where it stopped.
    """
    spec = STAGES["ablations"]
    done = _train_variants("ablations", params, workspace, log)
    for variant in done:
        log.model(f"ablation_{variant}", load_c2crs(ablation_model_path(workspace, variant)))
    (workspace / spec.outs[0]).mkdir(parents=True, exist_ok=True)
    metrics = {variant: outcome for variant, (outcome, _) in done.items()}
    write_outputs({workspace / spec.metrics[0]: metrics})
    return StageOutcome({name: path for _, inputs in done.values() for name, path in inputs.items()}, metrics)


STAGE_BODIES["ablations"] = ablations_stage


@dataclass
class TextCNNConfig:
    vocab_size: int
    n_items: int
    embed_dim: int
    n_filters: int
    dropout: float


def baselines_stage(params: Params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    """TextCNN over the context words, and the KBRD-style recommender (C2-CRS's recommender, no pre-training)."""
    spec = STAGES["baselines"]
    run, model_config, inputs = _training_run(params, workspace)
    textcnn_out, kbrd_out = (workspace / out for out in spec.outs)

    c2crs_training.seed_everything(params.seed, params.deterministic)
    cfg = params.baselines.textcnn
    textcnn_config = TextCNNConfig(vocab_size=model_config.vocab_size, n_items=model_config.n_items,
                                   embed_dim=cfg.embed_dim, n_filters=cfg.n_filters, dropout=cfg.dropout)
    textcnn = TextCNNRecommender(**dataclasses.asdict(textcnn_config)).to(run.device)
    checkpoints = _checkpoint_dir(workspace, "baselines", params, inputs) / "textcnn"
    textcnn_state = c2crs_train.train_textcnn(textcnn, run, cfg, checkpoints,
                                              on_epoch=lambda e, m: log.epoch(e, {f"textcnn.{k}": v
                                                                                  for k, v in m.items()}))
    c2crs_training.load_checkpoint(checkpoints / "best.pt", textcnn)
    _save_model(textcnn_out, textcnn, textcnn_config)

    c2crs_training.seed_everything(params.seed, params.deterministic)
    kbrd = C2CRS(model_config).to(run.device)
    checkpoints = _checkpoint_dir(workspace, "baselines", params, inputs) / "kbrd"
    kbrd_state = c2crs_train.finetune_recommender(kbrd, run, params.finetune_rec, checkpoints,
                                                  on_epoch=lambda e, m: log.epoch(e, {f"kbrd.{k}": v
                                                                                      for k, v in m.items()}))
    c2crs_training.load_checkpoint(checkpoints / "best.pt", kbrd)
    _save_model(kbrd_out, kbrd, kbrd.cfg)

    metrics = {"textcnn": _training_outcome(textcnn_state),
               "kbrd": _training_outcome(kbrd_state)}
    write_outputs({workspace / spec.metrics[0]: metrics})
    log.model("textcnn", textcnn)
    log.model("kbrd", kbrd)
    return StageOutcome(inputs, metrics)


def load_textcnn(path: Path) -> TextCNNRecommender:
    saved = _load_saved(path)
    model = TextCNNRecommender(**saved["config"])
    model.load_state_dict(saved["state_dict"])
    return model


# ---------------------------------------------------------------- response generation

# Where a generator's encoders start (params.finetune_conv.pretrained), and which recommender fills its movie
# placeholder when its responses are shown: the one trained from the same representations.
CONV_ENCODERS = {"c2crs": "data/models/pretrain_fine.pt", "kbrd": "data/models/kbrd_rec.pt", "none": None}
CONV_RECOMMENDER = {"c2crs": "c2crs", "kbrd": "kbrd", "none": "textcnn"}


@dataclass
class ConvModelConfig:
    """What builds a ConversationModel again: the encoders' and the generator's configs and the vocabulary facts."""

    encoders: dict
    generator: dict
    movie_token_ids: list[int]
    uncopyable_ids: list[int]
    frozen: list[str]
    pretrained: str


def _conversation_model(config: ConvModelConfig, encoders: C2CRS | None = None) -> ConversationModel:
    return ConversationModel(encoders or C2CRS(C2CRSConfig(**config.encoders)), ResponseGenerator(
        GeneratorConfig(**config.generator)), config.movie_token_ids, config.uncopyable_ids, tuple(config.frozen))


def load_conversation_model(path: Path) -> tuple[ConversationModel, ConvModelConfig]:
    saved = _load_saved(path)
    config = ConvModelConfig(**saved["config"])
    model = _conversation_model(config)
    model.load_state_dict(saved["state_dict"])
    return model, config


def conv_model_path(workspace: Path, variant: str | None = None) -> Path:
    if variant is None:
        return workspace / STAGES["finetune_conv"].outs[0]
    return workspace / STAGES["conv_baselines"].outs[0] / f"{variant}.pt"


def _conv_data(workspace: Path, run: c2crs_train.Run, inputs: dict[str, Path]):
    """The output vocabulary and the train/valid responses."""
    vocabulary = conv_train.conv_vocabulary(pl.read_parquet(inputs["vocab"]))
    samples = pl.read_parquet(inputs["samples"], columns=["sample_id", "split", "role", "response_token_ids"])
    longest = int(samples["response_token_ids"].list.len().max() or 0)
    return (vocabulary, conv_train.responses(samples, run.train, "train", vocabulary),
            conv_train.responses(samples, run.valid, "valid", vocabulary), longest)


def _train_conversation(params: Params, workspace: Path, log: StageLog, out: Path,
                        loaded=None) -> tuple[ConversationModel, dict, dict[str, Path]]:
    """Train one response generator with params.finetune_conv, keep its best epoch (valid perplexity), save it."""
    cfg, m = params.finetune_conv, params.model
    run, model_config, inputs = loaded or _training_run(params, workspace)
    inputs = dict(inputs)
    vocabulary, train_data, valid_data, longest = _conv_data(workspace, run, inputs)
    c2crs_training.seed_everything(params.seed, params.deterministic)
    start = CONV_ENCODERS[cfg.pretrained]
    if start is not None:
        inputs["start_from"] = workspace / start
    encoders = load_c2crs(workspace / start) if start else C2CRS(model_config)
    dims = {"history": m.token_dim, "kg": m.kg_dim, "review": m.token_dim}
    config = ConvModelConfig(
        encoders=dataclasses.asdict(encoders.cfg),
        generator=dataclasses.asdict(GeneratorConfig(
            vocab_size=len(vocabulary.tokens), memory_dims={k: dims[k] for k in cfg.memories}, dim=m.token_dim,
            n_layers=m.n_layers, n_heads=m.n_heads, ffn_dim=m.ffn_dim, dropout=m.dropout,
            max_positions=longest + 1, copy=cfg.copy_mechanism)),
        movie_token_ids=vocabulary.movie_token_ids, uncopyable_ids=vocabulary.uncopyable_ids,
        frozen=list(cfg.freeze), pretrained=cfg.pretrained)
    model = _conversation_model(config, encoders)
    with torch.no_grad():  # the decoder's words start where the conversation encoder's are
        table = encoders.conversation_encoder.tokens.weight
        model.generator.tokens.weight[: table.size(0)] = table
    model.to(run.device)
    weights = (conv_train.loss_weights(train_data, vocabulary, cfg.weight_threshold, cfg.weight_floor)
               if cfg.instance_weighting else None)
    checkpoints = _checkpoint_dir(workspace, "finetune_conv", params, inputs)
    state = conv_train.finetune_conversation(model, run, train_data, valid_data, weights, cfg, checkpoints,
                                             on_epoch=log.epoch)
    if (checkpoints / "best.pt").is_file():
        c2crs_training.load_checkpoint(checkpoints / "best.pt", model)
    _save_model(out, model, config)
    outcome = {**_training_outcome(state), "train_responses": len(train_data), "valid_responses": len(valid_data)}
    if weights is not None:
        outcome["downweighted_tokens"] = int((weights < 1).sum())
    return model, outcome, inputs


def finetune_conv_stage(params: Params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    spec = STAGES["finetune_conv"]
    model, metrics, inputs = _train_conversation(params, workspace, log, workspace / spec.outs[0])
    write_outputs({workspace / spec.metrics[0]: metrics})
    log.model("c2crs_conv", model)
    return StageOutcome(inputs, metrics)


def _train_conv_baseline(params: Params, workspace: Path, variant: str, log: StageLog) -> tuple[dict, dict]:
    variant_params = params.variant(variant, kind="conv_baselines")
    _, outcome, inputs = _train_conversation(variant_params, workspace, _PrefixedLog(log, variant),
                                             conv_model_path(workspace, variant))
    return {"overrides": params.conv_baselines.variants[variant], **outcome}, inputs


def conv_baselines_stage(params: Params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    """The paper's Table 2 rows, each a params.conv_baselines variant of finetune_conv. A variant equal to the main
    model resumes finetune_conv's finished checkpoint; a killed stage resumes each variant where it stopped."""
    spec = STAGES["conv_baselines"]
    done = _train_variants("conv_baselines", params, workspace, log)
    for variant in done:
        log.model(f"conv_{variant}", load_conversation_model(conv_model_path(workspace, variant))[0])
    (workspace / spec.outs[0]).mkdir(parents=True, exist_ok=True)
    metrics = {variant: outcome for variant, (outcome, _) in done.items()}
    write_outputs({workspace / spec.metrics[0]: metrics})
    return StageOutcome({name: path for _, inputs in done.values() for name, path in inputs.items()}, metrics)


STAGE_BODIES.update({"finetune_conv": finetune_conv_stage, "conv_baselines": conv_baselines_stage})
VARIANT_TRAINERS = {"ablations": _train_ablation, "conv_baselines": _train_conv_baseline}


def _repeat_choice(params: Params, workspace: Path, run: c2crs_train.Run):
    """RepeatChoice's counts from the train split (whether a turn's movie repeats a context movie, and which)."""
    train = (pl.read_parquet(workspace / TRAINING_INPUTS["samples"]).filter(pl.col("split") == "train")
             .sort("sample_id"))
    recent = c2crs_train.recent_items_tensor(evaluate.context_items_by_recency(train))
    return c2crs_train.fit_repeat_choice(run.train, recent, params.evaluate.max_recency)


def score_split(params: Params, workspace: Path, samples: pl.DataFrame, triple_table: pl.DataFrame,
                split: str = "test", loaded=None) -> tuple[c2crs_data.SampleTable, dict[str, Callable]]:
    """For each model, a function giving its score blocks (row indices, [rows, n_items]) on a split's samples."""
    run, model_config, _ = loaded or _training_run(params, workspace)  # loaded: _training_run's, reused
    table = c2crs_data.sample_table(samples, triple_table, split)
    batch = params.evaluate.batch_size
    train_targets = torch.as_tensor([item for targets in run.train.targets for item in targets], dtype=torch.long)
    popularity = popularity_scores(train_targets, model_config.n_items).numpy()
    recent = evaluate.context_items_by_recency(samples.filter(pl.col("split") == split).sort("sample_id"))
    naive = evaluate.naive_scorers(recent, popularity)

    def naive_blocks(name: str):
        for start in range(0, len(table), batch):
            rows = np.arange(start, min(start + batch, len(table)))
            yield rows, naive[name](rows)

    c2crs = load_c2crs(workspace / STAGES["finetune_rec"].outs[0]).to(run.device)
    kbrd = load_c2crs(workspace / STAGES["baselines"].outs[1]).to(run.device)
    textcnn = load_textcnn(workspace / STAGES["baselines"].outs[0]).to(run.device)
    models = {
        **{name: (lambda name=name: naive_blocks(name)) for name in naive},
        "textcnn": lambda: c2crs_train.score_textcnn(textcnn, run, table, batch),
        "kbrd": lambda: c2crs_train.score_samples(kbrd, run, table, batch),
        "c2crs": lambda: c2crs_train.score_samples(c2crs, run, table, batch),
        evaluate.REPEAT_CHOICE: lambda: c2crs_train.with_repeat_choice(
            c2crs_train.score_samples(c2crs, run, table, batch), c2crs_train.recent_items_tensor(recent), table,
            _repeat_choice(params, workspace, run)),
    }
    runs = {params.model.model_dump_json(): run}  # a variant's model section may change the graph (w/o SD)
    for variant in params.ablations.variants:
        variant_params = params.variant(variant)
        key = variant_params.model.model_dump_json()
        if key not in runs:
            runs[key] = _training_run(variant_params, workspace)[0]
        model = load_c2crs(ablation_model_path(workspace, variant)).to(run.device)
        models[evaluate.ABLATION_PREFIX + variant] = (
            lambda model=model, run=runs[key]: c2crs_train.score_samples(model, run, table, batch))
    return table, models


def evaluate_samples(params: Params, workspace: Path, samples: pl.DataFrame, triple_table: pl.DataFrame,
                     split: str = "test", log: StageLog = NO_LOG, loaded=None) -> dict:
    """Every model's metrics on one split's samples: {model: {protocol: metrics}} (the metrics/rec.json shape)."""
    table, models = score_split(params, workspace, samples, triple_table, split, loaded)
    rows = evaluate.expand_mentions(samples.filter(pl.col("split") == split).sort("sample_id"))
    ranks, masked = {}, {}
    for name, blocks in models.items():  # one pass per model gives both rankings
        ranks[name], masked[name] = evaluate.ranks_and_masked_ranks(
            ((table.sample_ids[r], scores) for r, scores in blocks()), rows, rows["context_item_ids"])
    results = {}
    for name in models:
        compare = name == "c2crs"
        results[name] = evaluate.evaluate_model(
            rows, ranks[name], params.evaluate.bootstrap_resamples, params.seed,
            compare_with={other: r for other, r in ranks.items() if other != name} if compare else None,
            masked_ranks=masked[name],
            compare_masked={other: r for other, r in masked.items() if other != name} if compare else None)
        log.epoch(0, {name: {p: {k: v for k, v in m.items() if not isinstance(v, dict)}
                             for p, m in results[name].items()}})
    return results


def _setting(params: Params, samples: pl.DataFrame) -> str:
    """One paragraph on how this run's setting differs from the paper's, from the data and params it used."""
    conversations = dict(samples.group_by("split").agg(pl.col("conv_id").n_unique()).iter_rows())
    pre = f"{params.pretrain_coarse.epochs} coarse + {params.pretrain_fine.epochs} fine pre-training epochs"
    per_conversation = params.pretrain_coarse.samples_per_conversation
    if per_conversation is not None:
        pre += f" over {per_conversation} turns per conversation and epoch"
    return (f"trained on {conversations.get('train', 0):,} train conversations (validation "
            f"{conversations.get('valid', 0):,}), tested on {conversations.get('test', 0):,}; token dim "
            f"{params.model.token_dim}, KG dim {params.model.kg_dim}, {pre}, at most {params.finetune_rec.epochs} "
            "recommender epochs with early stopping on validation recall@50. The paper trained on the full ReDial "
            "train split (about 10k conversations), with token dim 300 and 12 + 13 pre-training epochs over every "
            "turn, and scored all turns: compare directions and gaps between rows, not levels.")


def _top_items(params: Params, workspace: Path, run: c2crs_train.Run, table: c2crs_data.SampleTable,
               k: int) -> dict[str, np.ndarray]:
    """Each recommender's k best items for every row of the table: {recommender: [rows, k] item entity ids}."""
    batch = params.evaluate.batch_size
    c2crs = load_c2crs(workspace / STAGES["finetune_rec"].outs[0]).to(run.device)
    kbrd = load_c2crs(workspace / STAGES["baselines"].outs[1]).to(run.device)
    textcnn = load_textcnn(workspace / STAGES["baselines"].outs[0]).to(run.device)
    blocks = {"c2crs": c2crs_train.score_samples(c2crs, run, table, batch),
              "kbrd": c2crs_train.score_samples(kbrd, run, table, batch),
              "textcnn": c2crs_train.score_textcnn(textcnn, run, table, batch)}
    top = {}
    k = min(k, run.graph.n_items)
    for name, scored in blocks.items():
        top[name] = np.zeros((len(table), k), dtype=np.int64)
        for rows, scores in scored:
            best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1, kind="stable")
            top[name][rows] = np.take_along_axis(best, order, axis=1)
    return top


def _gold_words(workspace: Path, samples: pl.DataFrame, table: c2crs_data.SampleTable,
                data: conv_train.Responses) -> list[list[str]]:
    """The test responses as words, every movie as its own "@id" token (rare words and movies included, unlike the
    vocabulary ids), cut where the samples' responses are cut."""
    part = samples.filter(pl.col("split") == "test").sort("sample_id").select("conv_id", "turn_idx",
                                                                              "response_token_ids")
    texts = part.join(pl.read_parquet(workspace / "data/ingest/utterances.parquet").select("conv_id", "turn_idx",
                                                                                          "text"),
                      on=["conv_id", "turn_idx"], how="left", maintain_order="left")
    words = [triples.token_texts(text)[: len(ids)] for text, ids in zip(texts["text"], texts["response_token_ids"])]
    return [words[row] for row in data.rows]


def _context_turns(utterances: pl.DataFrame, conv_id: int, turn_idx: int, titles: dict[str, str],
                   turns: int = 4) -> list[str]:
    """The last turns before a sample's turn, as "role: text" with "@123" shown as the movie's title."""
    earlier = utterances.filter((pl.col("conv_id") == conv_id) & (pl.col("turn_idx") < turn_idx)).sort("turn_idx")
    return [f"{role}: " + re.sub(r"@\d+", lambda m: titles.get(m.group(0), m.group(0)), text)
            for role, text in earlier.select("role", "text").tail(turns).iter_rows()]


def evaluate_conversation(params: Params, workspace: Path, log: StageLog = NO_LOG,
                          loaded=None) -> tuple[dict, str, str, str]:
    """Every generator on the test split's recommender turns: metrics/conv.json's content, the report, the rating
    sheet and its key.

    A model's response is scored as the system says it: each movie placeholder filled with the next of its
    recommender's top items, as that movie's own "@id" token (the reference code's vocabulary has a token per
    movie), against the gold response's words with its movies as "@id" too. generator_only holds Dist-n of the
    responses with the placeholders left as they are.
    """
    run, _, inputs = loaded or _training_run(params, workspace)
    samples = pl.read_parquet(inputs["samples"])
    table = c2crs_data.sample_table(samples, pl.read_parquet(inputs["triples"]), "test")
    vocabulary = conv_train.conv_vocabulary(pl.read_parquet(inputs["vocab"]))
    data = conv_train.responses(samples, table, "test", vocabulary)
    decoding = params.evaluate.decoding
    entities = pl.read_parquet(inputs["entities"])
    linker = kg_entity_linker(entities, pl.read_parquet(inputs["edges"]),
                              raw_files(params.data, workspace, "stopwords")["stopwords"], params.linking)
    items = entities.filter(pl.col("is_item"))
    movie_token = dict(zip(items["entity_id"], (f"@{m}" for m in items["movie_id"])))
    movies = pl.read_parquet(workspace / "data/ingest/movies.parquet")
    title = {f"@{m}": f"{t} ({y})" if y else t for m, t, y in movies.select("movie_id", "title", "year").iter_rows()}

    def names_entity(words) -> bool:
        return (any(w.startswith("@") or w == conv_train.PLACEHOLDER for w in words)
                or bool(linker.link(" ".join(words))))

    def words(tokens: list[int]) -> list[str]:
        return [vocabulary.tokens[t] for t in tokens if vocabulary.tokens[t] not in triples.SPECIAL_TOKENS]

    gold = _gold_words(workspace, samples, table, data)
    top = _top_items(params, workspace, run, table, k=5)
    paths = {variant: conv_model_path(workspace, variant) for variant in params.conv_baselines.variants}
    paths["c2crs"] = conv_model_path(workspace)
    rank = {name: i for i, name in enumerate(conv_evaluate.MODEL_NAMES)}  # the paper's order; others before C2-CRS
    paths = dict(sorted(paths.items(), key=lambda item: rank.get(item[0], rank["c2crs"] - 0.5)))
    results = {"human": conv_evaluate.generation_metrics(gold, None, names_entity, None)}
    said = {}
    for name, path in paths.items():
        model, config = load_conversation_model(path)
        model.to(run.device)
        perplexity = conv_train.perplexity(model, run, table, data, decoding.batch_size)["perplexity"]
        generated = [words(t) for t in conv_train.generate(model, run, table, data.rows, decoding,
                                                           vocabulary.banned_ids)]
        recommended = top[CONV_RECOMMENDER[config.pretrained]]
        said[name] = [conv_train.fill_movies(response, [movie_token[e] for e in recommended[row]])
                      for response, row in zip(generated, data.rows)]
        results[name] = {**conv_evaluate.generation_metrics(said[name], gold, names_entity, perplexity),
                         "generator_only": {f"dist@{n}": conv_evaluate.distinct(generated, n)
                                            for n in conv_evaluate.DIST_NS}}
        log.epoch(0, {f"conv.{name}": {k: v for k, v in results[name].items() if not isinstance(v, dict)}})
        logger.info("conversation %s: %s", name, results[name])

    picked = np.sort(np.random.default_rng(params.seed).choice(
        len(data), min(params.evaluate.samples_for_reading, len(data)), replace=False))

    def shown(response: list[str]) -> str:
        return " ".join(title.get(w, w) for w in response)

    utterances = pl.read_parquet(workspace / "data/ingest/utterances.parquet")
    turn_of = dict(zip(samples["sample_id"], zip(samples["conv_id"], samples["turn_idx"])))
    readable = [{"sample_id": int(table.sample_ids[data.rows[i]]),
                 "context": _context_turns(utterances, *turn_of[int(table.sample_ids[data.rows[i]])], title),
                 "gold": shown(gold[i]), "responses": {name: shown(said[name][i]) for name in paths}}
                for i in picked.tolist()]
    protocol = (f"the {len(data):,} recommender turns of the test split that have a response (every such turn of "
                f"the {len(set(table.conv_ids[data.rows].tolist())):,} test conversations); "
                f"{decoding.method} decoding" + (f" (beam {decoding.beam_size})" if decoding.method == "beam" else "")
                + f", at most {decoding.max_tokens} tokens, {decoding.block_ngram}-gram blocking; each movie "
                "placeholder filled with the next of the model's recommender's top items, every movie one word "
                "(its id), as the reference code's vocabulary has it; the gold responses likewise; perplexity of "
                "the gold responses under each model (movies as the placeholder). Definitions in "
                "stages/conv_evaluate.py.")
    report = conv_evaluate.conversation_report(results, protocol, readable, list(paths))
    sheet, key = conv_evaluate.rating_sheet(readable, list(paths), params.seed)
    return results, report, sheet, key


def evaluate_stage(params: Params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    """Test-split metrics (the test split is read here and nowhere else): recommendation in both protocols with 95 %
    intervals, and conversation (generation metrics, responses to read, a rating sheet)."""
    spec = STAGES["evaluate"]
    inputs = {Path(d).name: workspace / d for d in spec.deps}
    samples = pl.read_parquet(workspace / TRAINING_INPUTS["samples"])
    loaded = _training_run(params, workspace)  # read once for both tasks
    results = evaluate_samples(params, workspace, samples, pl.read_parquet(workspace / TRAINING_INPUTS["triples"]),
                               "test", log, loaded)
    report = evaluate.recommendation_report(results, _setting(params, samples))
    conversation, conv_report, sheet, key = evaluate_conversation(params, workspace, log, loaded)
    rec_metrics, conv_metrics = (workspace / m for m in spec.metrics)
    rec_report, conv_report_path, sheet_path, key_path = (workspace / r for r in spec.reports)
    write_outputs({rec_metrics: results, conv_metrics: conversation, rec_report: report,
                   conv_report_path: conv_report, sheet_path: sheet, key_path: key})
    return StageOutcome(inputs, {"rec": results, "conv": conversation})


def score_file(params: Params, workspace: Path, path: Path) -> dict:
    """The trained models on conversations a user brings (ReDial JSONL), with the pipeline's own rules: merged
    turns, the kg stage's entities and linker, the triples stage's vocabulary; every conversation is scored."""
    bad = ingest.BadRecords(params.ingest.on_bad_record)
    conversations, utterance_rows = ingest.read_conversations(Path(path), "test", bad, {})
    if not conversations:
        raise ValueError(f"{path}: no conversation could be read")
    utterances = (pl.DataFrame(utterance_rows, schema=ingest.UTTERANCE_SCHEMA)
                  .join(pl.DataFrame(conversations, schema=ingest.CONVERSATION_SCHEMA).select("conv_id", "split"),
                        on="conv_id").sort("conv_id", "turn_idx"))
    entities = pl.read_parquet(workspace / TRAINING_INPUTS["entities"])
    items = entities.filter(pl.col("is_item"))
    item_entity = dict(zip(items["movie_id"], items["entity_id"]))
    stopwords = raw_files(params.data, workspace, "stopwords")["stopwords"]
    linker = kg_entity_linker(entities, pl.read_parquet(workspace / TRAINING_INPUTS["edges"]), stopwords,
                              params.linking)
    linked = triples.link_all(utterances, linker, item_entity)
    samples, _ = triples.build_samples(utterances, linked, pl.read_parquet(workspace / TRAINING_INPUTS["vocab"]),
                                       item_entity, params.triples.context_max_tokens,
                                       params.triples.response_max_tokens)
    no_triples = pl.DataFrame(schema=triples.TRIPLE_SCHEMA)
    return {"conversations": len(conversations), "bad_records": dict(bad.counts),
            "results": evaluate_samples(params, workspace, samples, no_triples, "test")}


STAGE_BODIES.update({"baselines": baselines_stage, "evaluate": evaluate_stage})
