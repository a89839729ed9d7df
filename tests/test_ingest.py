"""The ingest stage on small fixture files: merging, splits, movies, and every kind of bad input."""

import shutil
from pathlib import Path

import polars as pl
import pytest

from stages import ingest
from tests.conftest import FIXTURES


def files(mirror: Path, train: str = "redial/train.jsonl") -> ingest.RawRedialFiles:
    return ingest.locate_mirror_files(
        mirror,
        redial_train=train,
        redial_test="redial/test.jsonl",
        movies="redial/movies_with_mentions.csv",
        movies_imdb="redial/movies_merged_with_imdb.csv",
        movies_dbpedia="crslab_redial/id2entity.jsonl",
    )


def run(raw: ingest.RawRedialFiles, on_bad_record="error", valid_split="fraction", valid_fraction=0.25):
    return ingest.ingest(
        raw,
        on_bad_record=on_bad_record,
        valid_split=valid_split,
        valid_fraction=valid_fraction,
        full_train_conversations=10006,
        seed=0,
    )


def test_consecutive_messages_of_one_speaker_are_merged(mirror):
    result = run(files(mirror))
    turns = result.utterances.filter(pl.col("conv_id") == 11).sort("turn_idx")
    assert turns["role"].to_list() == ["seeker", "recommender", "seeker", "recommender"]
    assert turns["text"][0] == "Hi, I like @100 and @200 too"
    assert turns["movie_ids"].to_list() == [[100, 200], [300, 100], [], [400]]
    conversation = result.conversations.filter(pl.col("conv_id") == 11).row(0, named=True)
    assert (conversation["n_turns"], conversation["n_messages"]) == (4, 6)


def test_a_movie_named_twice_in_one_turn_is_one_mention(mirror):
    turns = run(files(mirror)).utterances.filter(pl.col("conv_id") == 12)
    assert turns["movie_ids"].to_list() == [[], [200], [200]]


def test_already_merged_records_come_out_the_same(mirror):
    raw = run(files(mirror)).utterances.filter(pl.col("conv_id") == 11)
    premerged = run(files(mirror, "redial/train_premerged.jsonl")).utterances.filter(pl.col("conv_id") == 11)
    assert premerged.equals(raw)


def test_splits_and_statistics(mirror):
    result = run(files(mirror))
    splits = dict(result.conversations.group_by("split").len().iter_rows())
    assert splits == {"train": 3, "valid": 1, "test": 2}
    assert result.metrics["test"] == {"conversations": 2, "turns": 5, "movie_mentions": 5, "mentions_by_recommender": 3}
    assert result.metrics["validation_rule"] == "fraction"
    assert result.metrics["bad_records"] == {}


def test_the_validation_draw_is_seeded(mirror):
    first = run(files(mirror)).conversations
    assert run(files(mirror)).conversations.equals(first)


def test_kgsf_ids_are_used_when_asked(mirror):
    result = run(files(mirror), valid_split="kgsf_ids")
    assert result.metrics["valid"]["conversations"] == 0  # none of the fixture ids is a KGSF validation id
    assert result.metrics["validation_rule"] == "kgsf_ids"


def test_movies_table(mirror):
    movies = run(files(mirror)).movies
    assert movies["movie_id"].to_list() == [100, 200, 300, 400, 500]
    beta = movies.filter(pl.col("movie_id") == 200).row(0, named=True)
    assert beta == {
        "movie_id": 200,
        "title": "Beta",
        "year": 1999,
        "mentions_redial_release": 3,
        "mentions_ingested": 4,
        "dbpedia_uri": None,
        "imdb_id": None,
    }
    alpha = movies.filter(pl.col("movie_id") == 100).row(0, named=True)
    assert (alpha["imdb_id"], alpha["dbpedia_uri"]) == ("tt0012345", "http://dbpedia.org/resource/Alpha_(film)")
    gamma = movies.filter(pl.col("movie_id") == 300).row(0, named=True)
    assert (gamma["title"], gamma["year"]) == ("Gamma", None)
    assert movies.filter(pl.col("movie_id") == 400)["imdb_id"].item() == "tt0000123"


BAD_CASES = {
    "malformed_json": "malformed JSON",
    "missing_keys": "lacks required key(s) respondentWorkerId",
    "unknown_mention": "text mention @999 is absent from movieMentions",
    "empty_conversation": "no message with text",
    "invalid_utf8": "invalid UTF-8",
    "unknown_sender": "sender 77 is neither the initiator nor the respondent",
    "duplicate_conversation": "conversation 12 was already read from",
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_record_fails_naming_file_line_and_reason(mirror, kind):
    shutil.copy(FIXTURES / "bad" / f"{kind}.jsonl", mirror / "redial" / "bad.jsonl")
    with pytest.raises(ingest.BadRecordError) as error:
        run(files(mirror, "redial/bad.jsonl"))
    message = str(error.value)
    assert "bad.jsonl, line 2" in message
    assert BAD_CASES[kind] in message
    assert f"[{kind}]" in message


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_record_is_skipped_and_counted(mirror, kind):
    shutil.copy(FIXTURES / "bad" / f"{kind}.jsonl", mirror / "redial" / "bad.jsonl")
    result = run(files(mirror, "redial/bad.jsonl"), on_bad_record="skip")
    assert result.metrics["bad_records"] == {kind: 1}
    train_ids = set(result.conversations.filter(pl.col("split") != "test")["conv_id"])
    # An unknown mention drops only the mention; every other kind drops the record.
    assert train_ids == ({12, 13, 33} if kind == "unknown_mention" else {12, 13})
    if kind == "unknown_mention":
        turns = result.utterances.filter(pl.col("conv_id") == 33)
        assert turns["movie_ids"].to_list() == [[100], []]
        assert turns["text"][1] == "Try @999"


def test_missing_mirror_file_is_named(mirror):
    (mirror / "redial" / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks: data.files.redial_test \(.*test.jsonl\)"):
        files(mirror)
    (mirror / "redial" / "test.jsonl").mkdir()
    with pytest.raises(FileNotFoundError, match=r"data.files.redial_test \(.*test.jsonl: a directory, not a file\)"):
        files(mirror)


def test_malformed_movie_list_is_named(mirror):
    (mirror / "redial" / "movies_with_mentions.csv").write_text("id,name\n1,x\n")
    with pytest.raises(ingest.BadRecordError, match="movies_with_mentions.csv: expected a CSV file with columns"):
        run(files(mirror))


def test_movie_forms_are_kept_with_their_answers(mirror):
    result = run(files(mirror))
    forms = result.forms.filter(pl.col("conv_id") == 11)
    assert forms.select("form", "movie_id", "liked").rows() == [
        ("recommender", 300, 1),
        ("recommender", 400, 1),
        ("seeker", 100, 1),
        ("seeker", 200, 0),
        ("seeker", 300, 2),
    ]
    assert result.metrics["movie_forms"]["seeker"] == {"conversations": 2, "movies": 4, "liked": 2, "disliked": 1}
    others = result.forms.filter(
        pl.col("conv_id") != 11
    )  # one test conversation's seeker form (the simulated seeker's)
    assert others.select("conv_id", "form", "movie_id", "suggested", "liked").rows() == [(21, "seeker", 200, 1, 1)]


@pytest.mark.parametrize(
    "form, reason",
    [
        (["100"], "initiatorQuestions must be a mapping, got list"),
        ({"100": {"suggested": 0, "seen": 1, "liked": 3}}, "movie '100' needs a movie of movieMentions"),
        ({"100": {"suggested": 0, "seen": 1, "liked": True}}, "movie '100' needs"),
        ({"100": {"suggested": 0, "seen": 1}}, "movie '100' needs"),
        ({"999": {"suggested": 0, "seen": 1, "liked": 1}}, "movie '999' needs a movie of movieMentions"),
    ],
)
def test_a_bad_movie_form_is_named_and_dropped_keeping_the_conversation(mirror, form, reason):
    import json

    record = json.loads((mirror / "redial" / "train.jsonl").read_text().splitlines()[0])
    record["initiatorQuestions"] = form
    (mirror / "redial" / "bad.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(ingest.BadRecordError, match=reason):
        run(files(mirror, "redial/bad.jsonl"))
    result = run(files(mirror, "redial/bad.jsonl"), on_bad_record="skip")
    assert result.metrics["bad_records"] == {"bad_movie_form": 1}
    assert 11 in set(result.conversations["conv_id"])
    kept = result.forms.filter(pl.col("conv_id") == 11)["form"].to_list()
    assert kept == ["recommender", "recommender"]  # the seeker's form is dropped whole
