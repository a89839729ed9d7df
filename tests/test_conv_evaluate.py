"""Conversation metrics and the rating sheet (stages/evaluation/conv_metrics.py), on hand-made sentences."""

import csv
import math

import pytest

from pipeline.cli import main
from stages.evaluation.conv_metrics import (
    RatingError,
    bleu,
    distinct,
    generation_metrics,
    rating_sheet,
    read_key,
    read_ratings,
    score_ratings,
)
from stages.training.conv_train import PLACEHOLDER, fill_movies

RESPONSES = [["i", "like", "it", "i", "like", "it"], ["i", "like", "comedies"], ["ok"]]


def test_distinct_ngrams_under_both_definitions():
    # bigrams: (i,like) (like,it) (it,i) (i,like) (like,it) | (i,like) (like,comedies) | none -> 7 in all, 4 distinct
    assert distinct(RESPONSES, 2) == {"corpus": pytest.approx(4 / 7), "per_sentence": pytest.approx(4 / 3)}
    # trigrams: (i,like,it) (like,it,i) (it,i,like) (i,like,it) | (i,like,comedies) -> 5 in all, 4 distinct
    assert distinct(RESPONSES, 3) == {"corpus": pytest.approx(4 / 5), "per_sentence": pytest.approx(4 / 3)}
    assert distinct([["a"]], 2) == {"corpus": 0.0, "per_sentence": 0.0}


def test_bleu_by_hand():
    hypothesis, reference = ["the", "cat", "sat", "down"], ["the", "cat", "is", "down", "here"]
    brevity = math.exp(1 - 5 / 4)  # hypothesis shorter than the reference
    assert bleu([hypothesis], [reference], 1) == pytest.approx(brevity * 3 / 4)
    assert bleu([hypothesis], [reference], 2) == pytest.approx(brevity * 1 / 3)  # only (the, cat) of 3 bigrams
    assert bleu([reference], [reference], 2) == pytest.approx(1.0)
    assert bleu([["x"], reference], [reference, reference], 1) == pytest.approx(0.5)  # a mean over responses


def test_generation_metrics_contract():
    metrics = generation_metrics(RESPONSES, RESPONSES, lambda words: "comedies" in words, perplexity=12.5)
    assert set(metrics) == {
        "dist@2",
        "dist@3",
        "dist@4",
        "bleu@1",
        "bleu@2",
        "perplexity",
        "avg_len",
        "entity_rate",
        "n",
    }
    assert metrics["avg_len"] == pytest.approx(10 / 3) and metrics["entity_rate"] == pytest.approx(1 / 3)
    assert metrics["bleu@1"] == pytest.approx(1.0) and metrics["perplexity"] == 12.5


def test_fill_movies_puts_the_recommenders_items_in_order():
    words = ["try", PLACEHOLDER, "or", PLACEHOLDER, "or", PLACEHOLDER]
    assert fill_movies(words, ["Alpha (2001)", "Beta (1999)"]) == [
        "try",
        "Alpha (2001)",
        "or",
        "Beta (1999)",
        "or",
        PLACEHOLDER,
    ]


SAMPLES = [
    {"sample_id": 7, "context": ["hi", "any comedy?"], "responses": {"a": "try Alpha", "b": "hi hi"}},
    {"sample_id": 9, "context": ["hello"], "responses": {"a": "what do you like?", "b": "ok"}},
]


def _filled(tmp_path, name, scores):
    """The sheet as a rater returns it: scores[model] = (fluency, informativeness) for every item of that model."""
    sheet, key = rating_sheet(SAMPLES, ["a", "b"], seed=0)
    (tmp_path / "key.csv").write_text(key)
    model_of = {int(r["item"]): r["model"] for r in csv.DictReader(key.splitlines())}
    rows = list(csv.DictReader(sheet.splitlines()))
    with open(tmp_path / name, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=rows[0].keys())
        writer.writeheader()
        for row in rows:
            row["fluency"], row["informativeness"] = scores[model_of[int(row["item"])]]
            writer.writerow(row)
    return tmp_path / name


def test_the_rating_sheet_hides_the_models_and_scores_means_and_agreement(tmp_path):
    sheet, key = rating_sheet(SAMPLES, ["a", "b"], seed=0)
    assert "model" not in sheet.splitlines()[0] and len(sheet.splitlines()) == 5
    one = _filled(tmp_path, "one.csv", {"a": ("2", "2"), "b": ("1", "0")})
    two = _filled(tmp_path, "two.csv", {"a": ("2", "2"), "b": ("1", "0")})
    scored = score_ratings({"one": read_ratings(one), "two": read_ratings(two)}, read_key(tmp_path / "key.csv"))
    assert scored["models"] == {
        "a": {"fluency": 2.0, "informativeness": 2.0},
        "b": {"fluency": 1.0, "informativeness": 0.0},
    }
    assert scored["agreement"]["fluency"]["krippendorff_alpha_ordinal"] == pytest.approx(1.0)  # identical raters
    three = _filled(tmp_path, "three.csv", {"a": ("0", "0"), "b": ("2", "2")})  # the opposite opinion
    disagreeing = score_ratings(
        {"one": read_ratings(one), "three": read_ratings(three)}, read_key(tmp_path / "key.csv")
    )
    assert disagreeing["agreement"]["fluency"]["krippendorff_alpha_ordinal"] < 0


def test_a_bad_rating_names_the_file_line_and_what_was_expected(tmp_path, capsys):
    path = _filled(tmp_path, "bad.csv", {"a": ("2", "3"), "b": ("1", "")})
    with pytest.raises(RatingError, match=r"bad.csv, line \d+ \(item \d+\): informativeness must be 0, 1 or 2"):
        read_ratings(path)
    good = _filled(tmp_path, "good.csv", {"a": ("2", "1"), "b": ("1", "0")})
    assert main(["rate", str(good), "--key", str(tmp_path / "key.csv")]) == 0
    assert "| a | 2.00 | 1.00 |" in capsys.readouterr().out
    assert main(["rate", str(path), "--key", str(tmp_path / "key.csv")]) == 2
    assert "informativeness must be 0, 1 or 2" in capsys.readouterr().err


def test_quality_metrics_by_hand():
    from stages.evaluation.conv_metrics import quality_metrics

    responses = [
        ["i", "think", "so", "so"],  # a word repeated in a row
        ["you", "like", "it", "you", "like", "it"],  # a bigram and a trigram twice; at the cap (6)
        ["try", "@7", "or", "@9"],  # names movies: @9 is among its top 3
        ["hello"],
    ]
    recommended = [["@1", "@2", "@3"], ["@1", "@2", "@3"], ["@9", "@4", "@5", "@7"], ["@1", "@2", "@3"]]
    quality = quality_metrics(responses, 6, recommended)
    assert quality == {
        "repeat_in_a_row": 0.25,
        "repeat@2": 0.25,
        "repeat@3": 0.25,
        "at_length_cap": 0.25,
        "names_movie": 0.25,
        "names_recommended": 0.25,  # @7 is the 4th item: not on the cards
    }
    assert "names_recommended" not in quality_metrics(responses, 6, None)


def test_the_fluency_model_is_a_distribution_and_prefers_what_people_write():
    from stages.evaluation.fluency import TrigramLM

    train = [["i", "like", "it"], ["i", "like", "@12"], ["you", "like", "it"], ["i", "love", "it"]]
    lm = TrigramLM(train)
    words = {w for s in train for w in s} - {"@12"} | {"@movie", "</s>", "never-seen"}
    for context in [("<s>", "<s>"), ("<s>", "i"), ("i", "like"), ("no", "such")]:
        assert sum(lm.probability(*context, w) for w in words) == pytest.approx(1.0)
    assert lm.perplexity([["i", "like", "@12"]]) == lm.perplexity([["i", "like", "@99"]])  # every movie is one word
    # by hand: c(i like .) = 2 over 2 types, so P3(it | i like) = (1 - 0.75) / 2 + 0.75 * 2 / 2 * P2(it | like)
    p2 = lm.probability("zz", "like", "it")  # an unseen context: P2 alone
    assert lm.probability("i", "like", "it") == pytest.approx(0.25 / 2 + 0.75 * p2)
    assert lm.perplexity([["i", "like", "it"]]) < lm.perplexity([["it", "it", "it", "it"]])
