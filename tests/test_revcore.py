"""RevCore (models/revcore.py, stages/training/revcore_train.py): the sentiment model, the sentence links, the
sentiment-aware retrieval and the enriched contexts it gives the recommender and the generator."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch

from models.kgsf import KGSFConfig
from models.revcore import RevCoreConfig, RevCoreRecommender
from stages.training import baseline_models, revcore_train, runs
from stages.training.c2crs_data import SampleTable
from stages.triples import SPECIAL_TOKENS, SPLIT

WORDS = ["great", "wonderful", "loved", "awful", "boring", "hated", "plot", "the", "@11", "@12"]
TOKENS = list(SPECIAL_TOKENS) + WORDS
ID = {t: i for i, t in enumerate(TOKENS)}
VOCABULARY = pl.DataFrame({"token": TOKENS, "token_id": list(range(len(TOKENS)))})


def _model(weights: dict[str, float] | None = None, links: list[list[int]] = ((),) * 4) -> RevCoreRecommender:
    kgsf = KGSFConfig(n_words=3, n_entities=6, n_relations=2, n_items=2, dim=4, num_bases=2)
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in links])])
    model = RevCoreRecommender(
        RevCoreConfig(
            kgsf=dataclasses.asdict(kgsf), vocab_size=len(TOKENS), n_sentences=len(links), n_links=int(offsets[-1])
        )
    )
    weight = np.zeros(len(TOKENS), dtype=np.float32)
    for word, value in (weights or {}).items():
        weight[ID[word]] = value
    return revcore_train.load_sentiment(model, weight, 0.0, offsets, np.asarray([e for link in links for e in link]))


def test_the_sentiment_model_learns_polarity_from_rated_reviews_and_measures_it_on_held_out_ones():
    rng = np.random.default_rng(0)
    texts, ratings = [], []
    for i in range(60):
        positive = i % 2 == 0
        words = rng.choice(["great", "wonderful", "loved"] if positive else ["awful", "boring", "hated"], 2)
        texts.append(" ".join([*words, "the", "plot"]))
        ratings.append(int(rng.choice([7, 8, 10])) if positive else int(rng.choice([1, 2, 4])))
    reviews = pl.DataFrame({"text": texts + ["neutral", "plot"], "rating": ratings + [5, None]})
    weight, bias, measures = revcore_train.fit_sentiment(reviews, VOCABULARY, seed=0)
    assert measures["rated_reviews"] == 60 and measures["positive"] == 30  # 5/10 and unrated left out
    assert measures["held_out"] == 6 and measures["held_out_accuracy"] == 1.0
    assert weight[ID["great"]] > 0 > weight[ID["awful"]]
    model = _model()
    revcore_train.load_sentiment(model, weight, bias, np.zeros(5, dtype=np.int64), np.zeros(0, dtype=np.int64))
    p = model.positive([[ID["loved"], ID["the"]], [ID["hated"], ID["hated"]], []])
    expected = 1 / (1 + np.exp(-(weight[ID["loved"]] + weight[ID["the"]] + bias)))  # a word counts once
    assert float(p[0]) == pytest.approx(expected, rel=1e-5) and float(p[1]) < 0.5
    assert float(p[2]) == pytest.approx(1 / (1 + np.exp(-bias)), rel=1e-5)
    with pytest.raises(ValueError, match="needs both polarities"):
        revcore_train.fit_sentiment(reviews.filter(pl.col("rating") >= 7), VOCABULARY, seed=0)


def test_sentence_links_are_the_linkers_entities_in_sentence_order():
    sentences = pl.DataFrame({"sentence_id": [1, 0, 2], "text": ["b c", "a", "none"]})
    linker = SimpleNamespace(entity_ids=lambda text: {"a": {4}, "b c": {5, 3}, "none": set()}[text])
    offsets, linked = revcore_train.link_sentences(sentences, linker)
    assert offsets.tolist() == [0, 1, 3, 3] and linked.tolist() == [4, 3, 5]
    model = _model(links=[[4], [3, 5], []])
    assert model.sentence_entities(1) == [3, 5] and model.sentence_entities(2) == []


def _table(contexts: list[list[str]], items: list[list[int]], entities: list[list[int]]) -> SampleTable:
    n = len(contexts)
    return SampleTable(
        sample_ids=np.arange(n),
        conv_ids=np.arange(n),
        roles=["recommender"] * n,
        context_tokens=[[ID[w] for w in c] for c in contexts],
        context_entities=entities,
        context_items=items,
        targets=[[1]] * n,
        triples=[[] for _ in range(n)],
    )


def _retrieval(model: RevCoreRecommender, review_movies: int = 3, max_context_tokens: int = 100):
    # movie 11 is item 0 with a positive (0) and a negative (1) sentence; movie 12 is item 1 with sentence 2;
    # sentence 3 belongs to a movie that is no item
    sentences = pl.DataFrame({"sentence_id": [0, 1, 2, 3], "movie_id": [11, 11, 12, 99]})
    entities = pl.DataFrame({"entity_id": [0, 1, 2], "is_item": [True, True, False], "movie_id": [11, 12, None]})
    sentence_tokens = [[ID["great"], ID["plot"], ID["loved"]], [ID["awful"], ID["boring"]], [ID["plot"]], [ID["the"]]]
    cfg = SimpleNamespace(review_movies=review_movies, review_tokens=2)
    return revcore_train.ReviewRetrieval.build(
        model, sentence_tokens, sentences, entities, VOCABULARY, cfg, max_context_tokens
    )


def test_retrieval_picks_the_review_sentence_whose_polarity_agrees_with_the_utterance_that_mentions_the_movie():
    model = _model(
        {"great": 3.0, "loved": 3.0, "wonderful": 3.0, "awful": -3.0, "boring": -3.0, "hated": -3.0},
        links=[[2, 0], [], [2], []],
    )
    retrieval = _retrieval(model)
    assert retrieval.movie_sentences == {0: [0, 1], 1: [2]} and retrieval.movie_token == {0: ID["@11"], 1: ID["@12"]}
    table = _table(
        [
            ["loved", "@11", SPLIT, "the"],  # liked movie 0 -> its positive sentence
            ["hated", "@11", SPLIT, "wonderful", "@12"],  # disliked 0 -> negative; 1 -> its only one
            ["the", "plot"],  # movie 0 is in the context but its mention was cut: neutral
            ["great"],
        ],  # no context movie: nothing retrieved
        items=[[0], [0, 1], [0], []],
        entities=[[0], [0, 1], [0], [2]],
    )
    assert retrieval.choose(table, np.arange(4)) == [[0], [2, 1], [0], []]
    enriched = retrieval.augment(table)
    split = ID[SPLIT]
    assert enriched.context_tokens[0] == table.context_tokens[0] + [split, ID["great"], ID["plot"]]  # 2 words each
    assert enriched.context_tokens[1] == table.context_tokens[1] + [split, ID["plot"], split, ID["awful"], ID["boring"]]
    assert enriched.context_entities[0] == [2, 0]  # the review's new entity first, the context's own kept last
    assert enriched.context_entities[1] == [2, 0, 1] and enriched.context_entities[3] == [2]
    assert enriched.review_sentences(1, 5) == [2, 1] and enriched.review_sentences(3, 5) == []
    assert enriched.targets == table.targets and enriched.context_items == table.context_items
    assert table.documents is None and table.context_tokens[0] == [ID[w] for w in ["loved", "@11", SPLIT, "the"]]


def test_retrieval_reviews_the_most_recent_movies_and_keeps_the_end_of_a_long_context():
    model = _model()
    retrieval = _retrieval(model, review_movies=1, max_context_tokens=5)
    table = _table([["@11", "the", "@12", "plot", "the", "plot"]], items=[[0, 1]], entities=[[]])
    enriched = retrieval.augment(table)
    assert enriched.documents == [[2]]  # movie 1, the most recent
    assert enriched.context_tokens[0] == [ID["plot"], ID["the"], ID["plot"], ID[SPLIT], ID["plot"]]


def test_a_saved_revcore_model_keeps_its_sentiment_model_and_links(tmp_path):
    model = _model({"great": 2.0}, links=[[1], [], [2, 3], []])
    runs.save_model(tmp_path / "revcore.pt", model, model.cfg)
    loaded = baseline_models.load_revcore(tmp_path / "revcore.pt")
    assert loaded.sentence_entities(2) == [2, 3]
    assert torch.equal(loaded.positive([[ID["great"]], [ID["the"]]]), model.positive([[ID["great"]], [ID["the"]]]))
    assert all(torch.equal(a, b) for a, b in zip(loaded.kgsf.state_dict().values(), model.kgsf.state_dict().values()))
