"""Stage 2, reviews: item reviews and descriptions per ReDial movie, split into sentences, top-k kept per movie.

C2-CRS enriches the conversation with review text; the authors never released how they selected theirs. Here each
source is explicit and measurable:
- aclimdb: IMDb user reviews of the Large Movie Review Dataset (Maas et al. 2011), joined by IMDb id;
- revcore: RevCore's snippet of the most helpful IMDb review per movie (20 tokens);
- plots: the movie's plot summary (the paper allows "descriptive text of the entity");
- imdb_scraper: IMDb user reviews fetched live (stages/sources/imdb_scraper.py), for machines with internet.
Which sentences stay: per movie, the order of the sources in params, then the most helpful review first, then the
sentence's position in its review; the first `max_sentences_per_movie` long enough to say something are kept.
"""

import gzip
import json
import logging
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from sentencex import segment

from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.progress import progress
from stages.io.stage_log import NO_LOG, StageLog, StageOutcome, WarningTally
from stages.sources import raw
from stages.sources.safe_pickle import load_pickle_restricted

log = logging.getLogger(__name__)

SOURCES = ("imdb_scraper", "aclimdb", "revcore", "plots")
REVIEW_SCHEMA = {
    "movie_id": pl.Int64,
    "source": pl.String,
    "review_id": pl.String,
    "rating": pl.Int32,
    "helpful": pl.Int64,
    "text": pl.String,
}
SENTENCE_SCHEMA = {
    "sentence_id": pl.Int64,
    "movie_id": pl.Int64,
    "source": pl.String,
    "review_id": pl.String,
    "position": pl.Int32,
    "text": pl.String,
}
HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
PTB_BRACKETS = {"-LRB-": "(", "-RRB-": ")"}
NO_SPACE_BEFORE = re.compile(r"^([,.;:!?%)]|n't|'s|'re|'ve|'ll|'d|'m)$", re.IGNORECASE)
ACLIMDB_MEMBER = re.compile(r"aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
ACLIMDB_URLS = re.compile(r"aclImdb/(train|test)/urls_(pos|neg)\.txt$")
IMDB_TITLE = re.compile(r"(tt\d{7,8})")


class ReviewDataError(ValueError):
    """A review source that cannot be read; the message names the file, the record and the problem."""


@dataclass
class BadReviews:
    """on_bad_record for review sources: raise at once, or count and go on."""

    policy: str
    tally: WarningTally = field(default_factory=lambda: WarningTally(log))

    @property
    def count(self) -> int:
        return sum(self.tally.counts.values())

    def report(self, where: str, problem: str) -> None:
        if self.policy == "error":
            raise ReviewDataError(f"{where}: {problem}. Set reviews.on_bad_record: skip to drop such records.")
        self.tally.warn(problem, f"{where}: {problem}")


def clean_text(text: str) -> str:
    return " ".join(HTML_BREAK.sub(" ", text).split())


def _review_rows(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=REVIEW_SCHEMA)


def _checked(rows: list[dict], where: str, bad: BadReviews) -> list[dict]:
    kept = []
    for row in rows:
        row["text"] = clean_text(row["text"] or "")
        if row["text"]:
            kept.append(row)
        else:
            bad.report(f"{where}, review {row['review_id']} (movie {row['movie_id']})", "empty review text")
    return kept


# ---------------------------------------------------------------- sources


def movie_imdb_ids(movies: pl.DataFrame, movie_info: dict) -> dict[str, list[int]]:
    """IMDb id -> ReDial movie ids: the ingest table's ids, completed from the metadata's where it has none."""
    from_info = {int(k): v.get("imdb_id") for k, v in movie_info.items() if isinstance(v, dict)}
    mapping: dict[str, list[int]] = {}
    for movie_id, imdb_id in movies.select("movie_id", "imdb_id").iter_rows():
        imdb_id = imdb_id or from_info.get(movie_id)
        if imdb_id and IMDB_TITLE.fullmatch(imdb_id):
            mapping.setdefault(imdb_id, []).append(movie_id)
    return mapping


def aclimdb_reviews(path: Path, imdb_to_movies: dict[str, list[int]], bad: BadReviews) -> pl.DataFrame:
    """Reviews of ReDial movies from the Large Movie Review Dataset: the mirror's JSONL, or the official tarball."""
    records = _aclimdb_tarball(path) if tarfile.is_tarfile(path) else _aclimdb_jsonl(path)
    rows = []
    for _where, record in records:
        for movie_id in imdb_to_movies.get(record["imdb_id"], ()):
            rows.append(
                {
                    "movie_id": movie_id,
                    "source": "aclimdb",
                    "rating": record["rating"],
                    "helpful": None,
                    "review_id": f"{record['split']}/{record['label']}/{record['id']}",
                    "text": record["text"],
                }
            )
    return _review_rows(_checked(rows, str(path), bad))


def _aclimdb_jsonl(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(progress(f, desc="aclimdb", unit=" reviews"), start=1):
            try:
                record = json.loads(line)
                yield (
                    f"{path}, line {line_no}",
                    {key: record[key] for key in ("split", "label", "id", "rating", "imdb_id", "text")},
                )
            except (json.JSONDecodeError, KeyError) as exc:
                raise ReviewDataError(
                    f"{path}, line {line_no}: expected a JSON review with split, label, id, "
                    f"rating, imdb_id, text: {exc}"
                ) from None


def _aclimdb_tarball(path: Path):
    """The official aclImdb_v1.tar.gz: <split>/<label>/<id>_<rating>.txt, and urls_<label>.txt whose line <id>
    is the review page of the movie (which carries its IMDb id)."""
    urls: dict[tuple[str, str], list[str]] = {}
    texts = []
    with tarfile.open(path) as archive:
        for member in progress(archive, desc="aclImdb tarball", unit=" files"):
            if match := ACLIMDB_URLS.search(member.name):
                urls[match.groups()] = archive.extractfile(member).read().decode("utf-8").splitlines()
            elif match := ACLIMDB_MEMBER.search(member.name):
                split, label, review_id, rating = match.groups()
                text = archive.extractfile(member).read().decode("utf-8", errors="replace")
                texts.append((split, label, int(review_id), int(rating), text))
    for split, label, review_id, rating, text in texts:
        lines = urls.get((split, label), [])
        imdb = IMDB_TITLE.search(lines[review_id]) if review_id < len(lines) else None
        if imdb is None:
            raise ReviewDataError(f"{path}: no IMDb URL for {split}/{label}/{review_id} in urls_{label}.txt")
        yield (
            f"{path}:{split}/{label}/{review_id}",
            {"split": split, "label": label, "id": review_id, "rating": rating, "imdb_id": imdb.group(1), "text": text},
        )


def revcore_reviews(path: Path, movie_ids: set[int], bad: BadReviews) -> pl.DataFrame:
    """RevCore's snippets: the first 20 tokens of the most helpful IMDb review, Penn-Treebank tokenized."""
    snippets = load_pickle_restricted(path)
    if not isinstance(snippets, dict):
        raise ReviewDataError(f"{path}: expected a dict movieId -> list of tokens, got {type(snippets).__name__}")
    rows = []
    for key, tokens in snippets.items():
        if not (str(key).isdigit() and isinstance(tokens, list)):
            raise ReviewDataError(f"{path}: record {key!r}: expected a movie id mapped to a list of tokens")
        if int(key) in movie_ids:
            rows.append(
                {
                    "movie_id": int(key),
                    "source": "revcore",
                    "review_id": f"revcore/{key}",
                    "rating": None,
                    "helpful": None,
                    "text": detokenize(tokens),
                }
            )
    return _review_rows(_checked(rows, str(path), bad))


def detokenize(tokens: list[str]) -> str:
    """Penn-Treebank tokens back to text: `` and '' are opening and closing quotes; punctuation and clitics
    attach to the word before."""
    text, attach_next = "", True
    for token in tokens:
        if token == "''":
            text += '"'
            attach_next = False
            continue
        token = PTB_BRACKETS.get(token, '"' if token == "``" else token)
        text += token if attach_next or NO_SPACE_BEFORE.match(token) else " " + token
        attach_next = token in ('"', "(", "$")
    return text


def read_movie_info(path: Path) -> dict:
    """movie_metadata/id2info.json. The upstream file has one stray character (CFCRS defect, documented in the
    mirror's SOURCE.txt) that breaks JSON; a single stray 'f' where a delimiter belongs is removed, nothing else."""
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if text[exc.pos] != "f":
            raise ReviewDataError(f"{path}: not valid JSON: {exc}") from None
        log.warning("%s: removed the known stray 'f' at character %d", path, exc.pos)
        try:
            return json.loads(text[: exc.pos] + text[exc.pos + 1 :])
        except json.JSONDecodeError as again:
            raise ReviewDataError(f"{path}: not valid JSON: {again}") from None


def plot_reviews(movie_info: dict, movie_ids: set[int], path: Path, bad: BadReviews) -> pl.DataFrame:
    rows = []
    for key, info in movie_info.items():
        if not isinstance(info, dict):
            raise ReviewDataError(f"{path}: record {key!r}: expected an object with name, plot, ...")
        if int(key) in movie_ids and info.get("plot"):
            rows.append(
                {
                    "movie_id": int(key),
                    "source": "plots",
                    "review_id": f"plot/{key}",
                    "rating": None,
                    "helpful": None,
                    "text": info["plot"],
                }
            )
    return _review_rows(_checked(rows, str(path), bad))


def scraped_reviews(scraped, imdb_to_movies: dict[str, list[int]], bad: BadReviews) -> pl.DataFrame:
    """Rows from the IMDb scraper's MovieReviews results."""
    rows = []
    for movie in scraped:
        for review in movie.reviews:
            for movie_id in imdb_to_movies.get(movie.imdb_id, ()):
                rows.append(
                    {
                        "movie_id": movie_id,
                        "source": "imdb_scraper",
                        "review_id": review.review_id,
                        "rating": review.rating,
                        "helpful": review.helpful_yes,
                        "text": review.text,
                    }
                )
    return _review_rows(_checked(rows, "imdb_scraper", bad))


# ---------------------------------------------------------------- sentences


def split_sentences(
    reviews: pl.DataFrame, source_order: list[str], min_tokens: int, max_tokens: int, max_sentences_per_movie: int
) -> pl.DataFrame:
    """Sentences of every review; per movie the first max_sentences_per_movie by the selection rule.

    A sentence shorter than min_tokens words rarely carries a preference ("Wow."); a longer one than max_tokens is
    cut there (the reference used 40 tokens).
    """
    rows = []
    ordered = reviews.with_columns(
        pl.col("source")
        .replace_strict({s: i for i, s in enumerate(source_order)}, return_dtype=pl.Int32)
        .alias("source_rank")
    )
    ordered = ordered.sort(
        ["movie_id", "source_rank", "helpful", "review_id"], descending=[False, False, True, False], nulls_last=True
    )
    for movie_id, source, review_id, text in progress(
        ordered.select("movie_id", "source", "review_id", "text").iter_rows(),
        total=ordered.height,
        desc="sentences",
        unit=" reviews",
    ):
        pieces = (sentence.split() for sentence in segment("en", text))
        for position, words in enumerate(words for words in pieces if words):
            if len(words) >= min_tokens:
                rows.append((movie_id, source, review_id, position, " ".join(words[:max_tokens])))
    sentences = pl.DataFrame(rows, schema=[c for c in SENTENCE_SCHEMA if c != "sentence_id"], orient="row")
    sentences = (
        sentences.unique(["movie_id", "text"], keep="first", maintain_order=True)
        .with_columns(pl.int_range(pl.len()).over("movie_id").alias("rank"))
        .filter(pl.col("rank") < max_sentences_per_movie)
        .drop("rank")
    )
    return sentences.with_row_index("sentence_id").cast(SENTENCE_SCHEMA).select(list(SENTENCE_SCHEMA))


def coverage(sentences: pl.DataFrame, all_movies: set[int], test_movies: set[int], sources: list[str]) -> dict:
    """Share of ReDial movies, and of movies mentioned in the test split, with at least one sentence."""

    def shares(covered: set[int]) -> dict:
        return {
            "movies": round(len(covered & all_movies) / max(len(all_movies), 1), 4),
            "test_movies": round(len(covered & test_movies) / max(len(test_movies), 1), 4),
        }

    result = {"overall": shares(set(sentences["movie_id"]))}
    for source in sources:
        result[source] = shares(set(sentences.filter(pl.col("source") == source)["movie_id"]))
    return result


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    cfg = params.reviews
    spec = STAGES["reviews"]
    movies_path, conversations_path, utterances_path = (
        workspace / spec.input(name) for name in ("movies", "conversations", "utterances")
    )
    movies = pl.read_parquet(movies_path)
    test_movies = set(
        pl.read_parquet(utterances_path)
        .join(pl.read_parquet(conversations_path).filter(pl.col("split") == "test"), on="conv_id")
        .select(pl.col("movie_ids").explode())
        .drop_nulls()["movie_ids"]
    )
    local = {"aclimdb": "aclimdb_reviews", "revcore": "revcore_reviews"}
    files = raw.raw_files(params.data, workspace, "movie_info", *(local[s] for s in cfg.sources if s in local))
    movie_info = read_movie_info(files["movie_info"])
    imdb_to_movies = movie_imdb_ids(movies, movie_info)
    movie_ids = set(movies["movie_id"])
    bad = BadReviews(cfg.on_bad_record)
    tables, scraper_stats = [], None
    for source in cfg.sources:
        if source == "aclimdb":
            tables.append(aclimdb_reviews(files["aclimdb_reviews"], imdb_to_movies, bad))
        elif source == "revcore":
            tables.append(revcore_reviews(files["revcore_reviews"], movie_ids, bad))
        elif source == "plots":
            tables.append(plot_reviews(movie_info, movie_ids, files["movie_info"], bad))
        else:
            scraped, scraper_stats = _scrape_imdb(cfg.scraper, sorted(imdb_to_movies), workspace)
            tables.append(scraped_reviews(scraped, imdb_to_movies, bad))
    review_table = pl.concat(tables)
    bad.tally.summary()
    sentences = split_sentences(
        review_table, cfg.sources, cfg.min_sentence_tokens, cfg.max_sentence_tokens, cfg.max_sentences_per_movie
    )
    metrics = {
        "coverage": coverage(sentences, movie_ids, test_movies, cfg.sources),
        "reviews": dict(review_table.group_by("source").len().iter_rows()),
        "sentences": dict(sentences.group_by("source").len().iter_rows()),
        "movies_with_sentences": sentences["movie_id"].n_unique(),
        "bad_records": bad.count,
    }
    if scraper_stats:
        metrics["scraper"] = scraper_stats
    reviews_out, sentences_out = workspace / spec.output("reviews"), workspace / spec.output("review_sentences")
    write_outputs({reviews_out: review_table, sentences_out: sentences, workspace / spec.metrics_file: metrics})
    return StageOutcome({**files, **{Path(d).name: workspace / d for d in spec.deps}}, metrics)


def _scrape_imdb(cfg, imdb_ids: list[str], workspace: Path):
    from stages.sources.imdb_scraper import ImdbReviewScraper  # httpx and the parser only when scraping

    ids = imdb_ids[: cfg.max_movies] if cfg.max_movies else imdb_ids
    with ImdbReviewScraper(
        workspace / cfg.cache_dir,
        user_agent=cfg.user_agent,
        requests_per_second=cfg.requests_per_second,
        max_retries=cfg.max_retries,
        max_pages=cfg.max_pages_per_movie,
        allowed_hosts=cfg.allowed_hosts,
        timeout=cfg.timeout_seconds,
    ) as scraper:
        scraped = list(scraper.scrape(ids))
        return scraped, scraper.stats.as_dict()
