"""text_triples (beyond the paper): review and plot sentences as pre-training samples, and the pre-training stages
drawing them at pretrain_text.ratio, on the fixture mirror."""

import numpy as np
import polars as pl
import yaml

from pipeline.config import load_params
from stages.io.graph import stage_body
from stages.io.stage_log import NO_LOG
from stages.text_triples import TEXT_CONV_OFFSET
from stages.training.c2crs_train import pretraining_rows
from stages.triples import TEXT_ROLE


def _workspace(params_file, ratio: float = 0.0):
    raw = yaml.safe_load(params_file.read_text())
    raw["pretrain_text"]["ratio"] = ratio
    params_file.write_text(yaml.safe_dump(raw))
    params = load_params(params_file)
    for stage in ("ingest", "reviews", "kg", "triples", "text_triples"):
        stage_body(stage)(params, params_file.parent)
    return params, params_file.parent


def test_text_samples_are_sentences_with_their_movie_and_entities(params_file):
    params, workspace = _workspace(params_file)
    samples = pl.read_parquet(workspace / "data/text_triples/samples.parquet")
    triples = pl.read_parquet(workspace / "data/text_triples/triples.parquet")
    sentences = pl.read_parquet(workspace / "data/reviews/review_sentences.parquet")
    vocabulary = pl.read_parquet(workspace / "data/triples/vocab.parquet")
    assert samples.height > 0 and triples.height > 0
    assert set(samples["role"]) == {TEXT_ROLE} and set(samples["split"]) == {"train"}
    assert (samples["conv_id"] >= TEXT_CONV_OFFSET).all() and samples["target_item_ids"].list.len().max() == 0
    entities = pl.read_parquet(workspace / "data/kg/entities.parquet").filter(pl.col("is_item"))
    item_of = dict(zip(entities["movie_id"], entities["entity_id"]))
    movie_of = dict(zip(sentences["sentence_id"], sentences["movie_id"]))
    token = dict(zip(vocabulary["token_id"], vocabulary["token"]))
    own = dict(zip(samples["sample_id"], samples["conv_id"] - TEXT_CONV_OFFSET))
    for sentence, tokens, items in samples.select(
        pl.col("conv_id") - TEXT_CONV_OFFSET, "context_token_ids", "context_item_ids"
    ).iter_rows():
        assert items == [item_of[movie_of[sentence]]]
        assert token[tokens[0]] in (f"@{movie_of[sentence]}", "__unk__")  # the movie it is about comes first
    for sample_id, _position, _entity, sentence in triples.iter_rows():
        assert sentence != own[sample_id]  # never the sample's own sentence
    first = triples.filter(pl.col("token_position") == 0)
    assert first.height > 0 and all(
        e == i for e, i in zip(first["entity_id"], first.join(samples, on="sample_id")["context_item_ids"].list.first())
    )


def test_pretraining_draws_text_samples_at_the_ratio(params_file):
    from stages.training import runs

    params, workspace = _workspace(params_file, ratio=0.5)
    loaded = runs.training_run(params, workspace)
    inputs = dict(loaded[2])
    run = runs.with_text_samples(loaded[0], params, workspace, inputs)
    assert {"text_samples", "text_triples"} <= set(inputs) and run.text_ratio == 0.5
    rows = pretraining_rows(run.train, params.pretrain_coarse, np.random.default_rng(0), run.text_ratio)
    is_text = run.train.is_text[rows]
    assert is_text.any() and (~is_text).any()
    assert is_text.sum() == min(run.train.is_text.sum(), round(0.5 * (~is_text).sum()))
    alone = pretraining_rows(loaded[0].train, params.pretrain_coarse, np.random.default_rng(0))
    assert (rows[~is_text] == alone).all()  # the conversation rows are drawn as without text

    # pre-training with text is its own run (its checkpoint key holds pretrain_text and the text files), fine-tuning
    # never reads the text samples
    runs.train_c2crs("pretrain_coarse", params, workspace, NO_LOG, None, workspace / "with_text.pt", loaded)
    without = params.model_copy(update={"pretrain_text": params.pretrain_text.model_copy(update={"ratio": 0.0})})
    runs.train_c2crs("pretrain_coarse", without, workspace, NO_LOG, None, workspace / "without_text.pt", loaded)
    assert len(list((workspace / "data/checkpoints").glob("pretrain_coarse-*"))) == 2
    _, _, read = runs.train_c2crs(
        "finetune_rec", params, workspace, NO_LOG, workspace / "with_text.pt", workspace / "rec.pt", loaded
    )
    assert "text_samples" not in read
