"""The reviews stage: each source, the official aclImdb tarball, sentence selection, coverage, bad input."""

import io
import pickle
import tarfile
from types import SimpleNamespace

import polars as pl
import pytest

from stages import reviews
from stages.sources.safe_pickle import PickleSafetyError
from tests.conftest import ACLIMDB_FIXTURE

MOVIES = pl.DataFrame({"movie_id": [100, 200, 300, 400, 500], "imdb_id": ["tt0012345", None, None, "tt0000123", None]})


@pytest.fixture
def movie_info(mirror):
    return reviews.read_movie_info(mirror / "movie_metadata/id2info.json")


@pytest.fixture
def imdb_to_movies(movie_info):
    return reviews.movie_imdb_ids(MOVIES, movie_info)


def test_imdb_ids_come_from_ingest_then_from_the_metadata(imdb_to_movies):
    assert imdb_to_movies == {"tt0012345": [100], "tt0022222": [200], "tt0000123": [400]}


def test_aclimdb_reviews_are_joined_by_imdb_id(mirror, imdb_to_movies):
    table = reviews.aclimdb_reviews(
        mirror / "reviews_aclimdb/aclimdb_reviews.jsonl.gz", imdb_to_movies, reviews.BadReviews("error")
    )
    assert table.sort("review_id")["review_id"].to_list() == ["test/neg/2", "train/neg/3", "train/pos/1"]
    first = table.filter(pl.col("review_id") == "train/pos/1").row(0, named=True)
    assert first["movie_id"] == 100 and first["rating"] == 9
    assert first["text"] == "Alpha is a joy from start to end. The map scene is great fun. Wow."


def test_the_official_tarball_gives_the_same_reviews(tmp_path, mirror, imdb_to_movies):
    archive = tmp_path / "aclImdb_v1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:

        def add(name: str, text: str):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        urls: dict[tuple, list[str]] = {}
        for r in ACLIMDB_FIXTURE:
            add(f"aclImdb/{r['split']}/{r['label']}/{r['id']}_{r['rating']}.txt", r["text"])
            lines = urls.setdefault((r["split"], r["label"]), ["http://www.imdb.com/title/tt0000001/usercomments"] * 5)
            lines[r["id"]] = f"http://www.imdb.com/title/{r['imdb_id']}/usercomments"
        for (split, label), lines in urls.items():
            add(f"aclImdb/{split}/urls_{label}.txt", "\n".join(lines) + "\n")
    bad = reviews.BadReviews("error")
    from_tarball = reviews.aclimdb_reviews(archive, imdb_to_movies, bad).sort("review_id")
    from_jsonl = reviews.aclimdb_reviews(mirror / "reviews_aclimdb/aclimdb_reviews.jsonl.gz", imdb_to_movies, bad)
    assert from_tarball.equals(from_jsonl.sort("review_id"))


def test_revcore_snippets_are_detokenized_and_empty_ones_are_bad(mirror):
    path = mirror / "reviews_revcore/movie2tokenreview_helpful.pkl"
    with pytest.raises(reviews.ReviewDataError, match=r"review revcore/300 \(movie 300\): empty review text"):
        reviews.revcore_reviews(path, {100, 300}, reviews.BadReviews("error"))
    bad = reviews.BadReviews("skip")
    table = reviews.revcore_reviews(path, {100, 300}, bad)
    assert table["text"].to_list() == ['"Alpha" is the best comedy of its year, I think.']
    assert bad.count == 1


def test_a_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(SimpleNamespace(a=1)))
    with pytest.raises(PickleSafetyError, match="pickle holds types.SimpleNamespace"):
        reviews.revcore_reviews(path, {100}, reviews.BadReviews("error"))


def test_the_known_stray_character_of_the_metadata_is_repaired_and_nothing_else(tmp_path, movie_info):
    good = tmp_path / "good.json"
    text = '{"1": {"plot": "x"}, "2": {"plot": "y"}}'
    (tmp_path / "stray.json").write_text(text.replace('}, "2"', '}f, "2"'))
    assert reviews.read_movie_info(tmp_path / "stray.json") == {"1": {"plot": "x"}, "2": {"plot": "y"}}
    good.write_text(text.replace('}, "2"', '}x, "2"'))
    with pytest.raises(reviews.ReviewDataError, match="good.json: not valid JSON"):
        reviews.read_movie_info(good)


def test_plots(mirror, movie_info):
    table = reviews.plot_reviews(
        movie_info, {100, 200, 300}, mirror / "movie_metadata/id2info.json", reviews.BadReviews("error")
    )
    assert sorted(table["movie_id"].to_list()) == [100, 300]  # 200 has no plot: nothing to say, not an error


def test_scraped_reviews_map_to_movies():
    review = SimpleNamespace(review_id="rw1", rating=7, helpful_yes=12, text="Great cast and a sharp script.")
    scraped = [SimpleNamespace(imdb_id="tt0012345", reviews=[review])]
    table = reviews.scraped_reviews(scraped, {"tt0012345": [100]}, reviews.BadReviews("error"))
    assert table.row(0, named=True) == {
        "movie_id": 100,
        "source": "imdb_scraper",
        "review_id": "rw1",
        "rating": 7,
        "helpful": 12,
        "text": "Great cast and a sharp script.",
    }


def test_sentence_selection_follows_source_order_then_helpfulness():
    table = pl.DataFrame(
        {
            "movie_id": [1, 1, 1, 2],
            "source": ["aclimdb", "aclimdb", "plots", "plots"],
            "review_id": ["a", "b", "p", "q"],
            "rating": [None] * 4,
            "helpful": [1, 50, None, None],
            "text": [
                "Low votes here for sure. Short.",
                "Many people found this one useful indeed.",
                "The plot comes first of all here. It has two sentences here.",
                "one two three four five six seven eight nine ten eleven",
            ],
        },
        schema=reviews.REVIEW_SCHEMA,
    )
    sentences = reviews.split_sentences(
        table, ["plots", "aclimdb"], min_tokens=4, max_tokens=8, max_sentences_per_movie=3
    )
    movie_1 = sentences.filter(pl.col("movie_id") == 1)
    assert movie_1["review_id"].to_list() == ["p", "p", "b"]
    assert movie_1["position"].to_list() == [0, 1, 0]
    assert sentences.filter(pl.col("movie_id") == 2)["text"].item() == "one two three four five six seven eight"
    assert sentences["sentence_id"].to_list() == list(range(sentences.height))


def test_coverage():
    sentences = pl.DataFrame({"movie_id": [1, 1, 2], "source": ["plots", "aclimdb", "aclimdb"]})
    result = reviews.coverage(sentences, all_movies={1, 2, 3, 4}, test_movies={1, 3}, sources=["plots", "aclimdb"])
    assert result == {
        "overall": {"movies": 0.5, "test_movies": 0.5},
        "plots": {"movies": 0.25, "test_movies": 0.5},
        "aclimdb": {"movies": 0.5, "test_movies": 0.5},
    }
