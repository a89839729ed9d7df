"""The baselines stages, one per recommender of params.baselines (dvc.yaml runs baselines@textcnn, @kbrd, @kgsf,
@redial, @kecrs, @revcore, side by side when workers allow): TextCNN over the context words, the KBRD-style
recommender (C2-CRS's own recommender trained from fresh weights, no pre-training), KGSF's recommender
(models/kgsf.py), ReDial's autoencoder over the context movies (stages/training/redial_train.py), KECRS's (the
KBRD-style recommender on new, liked targets: stages/training/kecrs_train.py) and RevCore's (KGSF's on contexts
enriched by sentiment-aware review retrieval: stages/training/revcore_train.py), on the same splits by the same
code."""

import dataclasses
from pathlib import Path

import polars as pl

from models.baselines import AutoRecRecommender, TextCNNRecommender
from models.c2crs import C2CRS
from models.kgsf import KGSFConfig, KGSFRecommender
from models.revcore import RevCoreConfig, RevCoreRecommender
from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.stage_log import NO_LOG, CurveLog, StageLog, StageOutcome, registered_name
from stages.sources import raw
from stages.text import linking
from stages.training import (
    baseline_models,
    c2crs_train,
    kecrs_train,
    kgsf_train,
    loop,
    redial_train,
    revcore_train,
    runs,
    textcnn_train,
)

# The params each model's checkpoints are keyed by (besides the inputs it reads): the sections its training reads.
SECTIONS = {
    "textcnn": runs.TRAINING_SECTIONS + ("baselines.textcnn",),
    "kbrd": runs.TRAINING_SECTIONS + ("finetune_rec", "baselines.kbrd"),
    "kgsf": runs.TRAINING_SECTIONS + ("baselines.kgsf",),
    "redial": runs.TRAINING_SECTIONS + ("baselines.redial",),
    "kecrs": runs.TRAINING_SECTIONS + ("finetune_rec", "baselines.kecrs"),
    "revcore": runs.TRAINING_SECTIONS + ("baselines.revcore", "linking", "triples.context_max_tokens"),
}


def _textcnn(params, workspace, run, model_config, inputs, on_epoch):
    cfg = params.baselines.textcnn
    config = textcnn_train.TextCNNConfig(
        vocab_size=model_config.vocab_size,
        n_items=model_config.n_items,
        embed_dim=cfg.embed_dim,
        n_filters=cfg.n_filters,
        dropout=cfg.dropout,
    )
    model = TextCNNRecommender(**dataclasses.asdict(config)).to(run.device)
    checkpoints = runs.checkpoint_dir(workspace, "baselines", params, SECTIONS["textcnn"], inputs) / "textcnn"
    state = textcnn_train.train_textcnn(model, run, cfg, checkpoints, on_epoch=on_epoch)
    loop.load_checkpoint(checkpoints / "best.pt", model)
    return model, config, state, inputs, {}


def _kbrd(params, workspace, run, model_config, inputs, on_epoch):
    model = C2CRS(model_config).to(run.device)
    checkpoints = runs.checkpoint_dir(workspace, "baselines", params, SECTIONS["kbrd"], inputs) / "kbrd"
    state = c2crs_train.finetune_recommender(model, run, params.finetune_rec, checkpoints, on_epoch=on_epoch)
    loop.load_checkpoint(checkpoints / "best.pt", model)
    return model, model.cfg, state, inputs, {}


def _kgsf(params, workspace, run, model_config, inputs, on_epoch):
    words = kgsf_train.load_word_graph(workspace, model_config.vocab_size, run.device)
    config = KGSFConfig(
        n_words=words.n_words,
        n_entities=model_config.n_entities,
        n_relations=model_config.n_relations,
        n_items=model_config.n_items,
        dim=params.model.kg_dim,
        num_bases=params.model.num_bases,
    )
    model = KGSFRecommender(config).to(run.device)
    inputs = {**inputs, **{name: workspace / path for name, path in kgsf_train.WORD_GRAPH_INPUTS.items()}}
    checkpoints = runs.checkpoint_dir(workspace, "baselines", params, SECTIONS["kgsf"], inputs) / "kgsf"
    state = kgsf_train.train_kgsf(model, run, words, params.baselines.kgsf, checkpoints, on_epoch=on_epoch)
    loop.load_checkpoint(checkpoints / "rec" / "best.pt", model)
    return model, config, state, inputs, {}


def _redial(params, workspace, run, model_config, inputs, on_epoch):
    likes = redial_train.seeker_likes(
        pl.read_parquet(workspace / redial_train.FORMS_INPUT), pl.read_parquet(inputs["entities"])
    )
    config = baseline_models.AutoRecConfig(n_items=model_config.n_items, hidden=params.baselines.redial.hidden)
    model = AutoRecRecommender(**dataclasses.asdict(config)).to(run.device)
    inputs = {**inputs, "movie_forms": workspace / redial_train.FORMS_INPUT}
    checkpoints = runs.checkpoint_dir(workspace, "baselines", params, SECTIONS["redial"], inputs) / "redial"
    state = redial_train.train_redial(model, run, likes, params.baselines.redial, checkpoints, on_epoch=on_epoch)
    loop.load_checkpoint(checkpoints / "best.pt", model)
    coverage = {
        split: redial_train.label_coverage(table, likes)
        for split, table in (("train", run.train), ("valid", run.valid))
    }
    return model, config, state, inputs, {"form_labels": coverage}


def _kecrs(params, workspace, run, model_config, inputs, on_epoch):
    likes = redial_train.seeker_likes(
        pl.read_parquet(workspace / redial_train.FORMS_INPUT), pl.read_parquet(inputs["entities"])
    )
    pairs = kecrs_train.new_liked_pairs(run.train, likes)
    model = C2CRS(model_config).to(run.device)
    inputs = {**inputs, "movie_forms": workspace / redial_train.FORMS_INPUT}
    checkpoints = runs.checkpoint_dir(workspace, "baselines", params, SECTIONS["kecrs"], inputs) / "kecrs"
    state = c2crs_train.finetune_recommender(
        model, run, params.finetune_rec, checkpoints, on_epoch=on_epoch, training_pairs=pairs
    )
    loop.load_checkpoint(checkpoints / "best.pt", model)
    return (
        model,
        model.cfg,
        state,
        inputs,
        {"training_pairs": len(pairs[0]), "all_training_pairs": int(sum(map(len, run.train.targets)))},
    )


def _revcore(params, workspace, run, model_config, inputs, on_epoch):
    cfg = params.baselines.revcore
    inputs = {
        **inputs,
        "reviews": workspace / revcore_train.REVIEWS_INPUT,
        "movie_forms": workspace / redial_train.FORMS_INPUT,
        **{name: workspace / path for name, path in kgsf_train.WORD_GRAPH_INPUTS.items()},
    }
    vocabulary, entities = pl.read_parquet(inputs["vocab"]), pl.read_parquet(inputs["entities"])
    weight, bias, sentiment = revcore_train.fit_sentiment(pl.read_parquet(inputs["reviews"]), vocabulary, params.seed)
    sentences, edges = pl.read_parquet(inputs["review_sentences"]), pl.read_parquet(inputs["edges"])
    stopwords = raw.raw_files(params.data, workspace, "stopwords")["stopwords"]
    offsets, linked = revcore_train.link_sentences(
        sentences, linking.kg_entity_linker(entities, edges, stopwords, params.linking)
    )
    words = kgsf_train.load_word_graph(workspace, model_config.vocab_size, run.device)
    kgsf_config = KGSFConfig(
        n_words=words.n_words,
        n_entities=model_config.n_entities,
        n_relations=model_config.n_relations,
        n_items=model_config.n_items,
        dim=params.model.kg_dim,
        num_bases=params.model.num_bases,
    )
    config = RevCoreConfig(
        kgsf=dataclasses.asdict(kgsf_config),
        vocab_size=vocabulary.height,
        n_sentences=len(offsets) - 1,
        n_links=len(linked),
    )
    model = revcore_train.load_sentiment(RevCoreRecommender(config), weight, bias, offsets, linked).to(run.device)
    retrieval = revcore_train.load_retrieval(model, run.sentence_tokens, inputs, cfg, params.triples.context_max_tokens)
    enriched = dataclasses.replace(run, train=retrieval.augment(run.train), valid=retrieval.augment(run.valid))
    checkpoints = runs.checkpoint_dir(workspace, "baselines", params, SECTIONS["revcore"], inputs) / "revcore"
    state = kgsf_train.train_kgsf(model.kgsf, enriched, words, cfg, checkpoints, on_epoch=on_epoch)
    loop.load_checkpoint(checkpoints / "rec" / "best.pt", model.kgsf)
    likes = redial_train.seeker_likes(pl.read_parquet(inputs["movie_forms"]), entities)
    retrieved = {
        split: revcore_train.retrieval_measures(table, enriched_table, likes, retrieval)
        for split, table, enriched_table in (("train", run.train, enriched.train), ("valid", run.valid, enriched.valid))
    }
    return model, config, state, inputs, {"sentiment": sentiment, "sentence_links": len(linked), "retrieval": retrieved}


TRAINERS = {"textcnn": _textcnn, "kbrd": _kbrd, "kgsf": _kgsf, "redial": _redial, "kecrs": _kecrs, "revcore": _revcore}


def run(params, workspace: Path, log: StageLog = NO_LOG, *, variant: str) -> StageOutcome:
    """Train one baseline recommender, keep its best epoch (valid recall@50), save it."""
    if variant not in TRAINERS:
        raise ValueError(f"baselines.{variant}: no such baseline; known: {', '.join(TRAINERS)}")
    spec = STAGES["baselines"].for_variant(variant)
    run, model_config, inputs = runs.training_run(params, workspace)
    log = CurveLog(log)
    loop.seed_everything(params.seed, params.deterministic)
    model, config, state, inputs, extra = TRAINERS[variant](params, workspace, run, model_config, inputs, log.epoch)
    out = workspace / spec.model_file
    runs.save_model(out, model, config)
    metrics = {**runs.training_outcome(state), **extra}
    write_outputs({workspace / spec.metrics_file: metrics, workspace / spec.report(variant): log.rows()})
    log.model(registered_name(variant, "recommender"), model, out, metrics)
    return StageOutcome(inputs, metrics)
