"""Integration on the real data mirror (C2CRS_DATA_DIR); skipped with a reason when it is absent."""

import os
import re
from pathlib import Path

import polars as pl
import pytest

from pipeline.config import load_params
from stages import ingest
from tests.conftest import PROJECT

MIRROR = Path(os.environ.get("C2CRS_DATA_DIR", "/nonexistent"))
pytestmark = pytest.mark.skipif(
    not (MIRROR / "redial").is_dir(), reason="real data mirror absent: set C2CRS_DATA_DIR to a directory with redial/"
)


@pytest.fixture(scope="module")
def raw():
    from stages.ingest import redial_raw_files

    return redial_raw_files(load_params(PROJECT / "params.yaml").data, PROJECT)


@pytest.fixture(scope="module")
def result(raw):
    return ingest.ingest(
        raw, on_bad_record="skip", valid_split="auto", valid_fraction=0.1, full_train_conversations=10006, seed=42
    )


def test_real_split_counts(result):
    metrics = result.metrics
    assert metrics["test"]["conversations"] == 1342
    assert metrics["train"]["conversations"] + metrics["valid"]["conversations"] == 2501
    assert metrics["valid"]["conversations"] == 250  # partial train file: a seeded 10 %
    assert metrics["validation_rule"] == "fraction"


def test_real_movies(result):
    assert result.metrics["movies"] == 6924
    assert result.metrics["movies_with_imdb_id"] == 5178
    assert result.metrics["movies_with_dbpedia_uri"] == 6924 - 812
    assert result.metrics["mentions_outside_movie_list"] == 0


def test_turns_alternate_after_merging(result):
    alternating = (
        result.utterances.sort("conv_id", "turn_idx")
        .with_columns(pl.col("role").shift().over("conv_id").alias("previous"))
        .filter(pl.col("role") == pl.col("previous"))
    )
    assert alternating.height == 0


def test_the_one_known_bad_mention_is_reported(raw, result):
    assert result.metrics["bad_records"] == {"unknown_mention": 1}
    with pytest.raises(ingest.BadRecordError, match=r"train_partial.jsonl, line 107: conversation 1382: .*@115908"):
        ingest.ingest(
            raw, on_bad_record="error", valid_split="auto", valid_fraction=0.1, full_train_conversations=10006, seed=42
        )


def test_every_data_stage_on_the_mirror(tmp_path, monkeypatch):
    """The data stages end to end on the real files, in a scratch workspace: the numbers the README reports."""
    import shutil

    from stages.io.graph import stage_body

    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    params = load_params(tmp_path / "params.yaml")
    data_stages = ("ingest", "reviews", "kg", "triples")  # training on the mirror takes half an hour
    metrics = {name: stage_body(name)(params, tmp_path).metrics for name in data_stages}
    assert metrics["reviews"]["coverage"]["overall"]["test_movies"] > 0.95
    assert metrics["reviews"]["bad_records"] == 18
    assert metrics["kg"]["reference"] == {
        "relations": 35,
        "edges": 316884,
        "entities": 64363,
        "entities_with_edges": 59809,
    }
    assert metrics["kg"]["items"] == 6924 and metrics["kg"]["relations"] == 69
    assert metrics["triples"]["samples"] == {"test": 14362, "train": 25810, "valid": 2761}
    assert metrics["triples"]["linker"]["f1"] > 0.33
    assert metrics["triples"]["samples_with_triple"] > 0.75


def test_no_simulated_seeker_on_the_mirror_names_its_target(result):
    """Every test conversation's seeker (stages/chat/seeker.py) on the real data: the opening and every hint of every
    kind, movies shown as titles, never name the target; most conversations have one."""
    from stages.chat import seeker
    from stages.reviews import read_movie_info

    movie_info = read_movie_info(MIRROR / "movie_metadata" / "id2info.json")
    test = result.conversations.filter(pl.col("split") == "test")["conv_id"].to_list()
    movies = result.movies
    seekers, left_out = seeker.build_seekers(
        test, result.utterances, result.forms, movies, movie_info, set(movies["movie_id"])
    )
    assert len(seekers) > 0.9 * len(test) and sum(left_out.values()) == len(test) - len(seekers)
    titles = dict(movies.select("movie_id", "title").iter_rows())
    guard = seeker.TitleGuard(titles)
    for who in seekers:
        said = [who.opening, *(hint for hints in who.hints.values() for hint in hints)]
        assert not any(guard.names(text, who.target) for text in said), who
        # independently of the guard: no "@id", and the title nowhere as a phrase of what is shown
        title = re.compile(rf"(?<!\w){re.escape(titles[who.target].lower())}(?!\w)")
        for text in said:
            shown = re.sub(r"@(\d+)", lambda m: titles.get(int(m.group(1)), m.group(0)), text).lower()
            assert not re.search(rf"@{who.target}\b", text) and not title.search(shown), (who.target, text)
