"""Stage 4, triples: tokens and vocabulary, entity linking, training samples, word-entity-sentence triples.

Every turn after the first is a sample: its context is the conversation so far (tokens left-truncated, entities
and items in order of first mention), its targets the movies the turn mentions and its own tokens. For the
fine-grained pre-training (paper 4.2.2) each linked mention in a context becomes a triple (word position, entity,
review sentence): the sentence is the one most related to the entity under the params' rule.
"""

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
import polars as pl

from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.progress import progress
from stages.io.stage_log import NO_LOG, StageLog, StageOutcome
from stages.sources import raw
from stages.text import linking
from stages.text.linking import EntityLinker, tokenize

log = logging.getLogger(__name__)

PAD, START, END, UNK, SPLIT = "__pad__", "__start__", "__end__", "__unk__", "__split__"
TEXT_ROLE = "text"  # the role of a text sample (stages/text_triples.py): a review or plot sentence, not a turn
SPECIAL_TOKENS = (PAD, START, END, UNK, SPLIT)
SENTENCE_RULES = ("bm25", "highest_rated", "first")

SAMPLE_SCHEMA = {
    "sample_id": pl.Int64,
    "conv_id": pl.Int64,
    "turn_idx": pl.Int32,
    "role": pl.String,
    "split": pl.String,
    "context_token_ids": pl.List(pl.Int32),
    "context_entity_ids": pl.List(pl.Int64),
    "context_item_ids": pl.List(pl.Int64),
    "target_item_ids": pl.List(pl.Int64),
    "response_token_ids": pl.List(pl.Int32),
}
TRIPLE_SCHEMA = {"sample_id": pl.Int64, "token_position": pl.Int32, "entity_id": pl.Int64, "sentence_id": pl.Int64}


class TriplesDataError(ValueError):
    """Inputs that do not fit together (an item without an entity, ids out of range); names the record."""


def token_texts(text: str) -> list[str]:
    """Vocabulary tokens: lowercased words and punctuation; movie mentions "@123" stay one token."""
    return [token.text if token.text.startswith("@") else token.text.lower() for token in tokenize(text)]


def build_vocabulary(token_lists, min_frequency: int) -> pl.DataFrame:
    """Special tokens first, then tokens seen at least min_frequency times (in the train split), by count."""
    counts = Counter(token for tokens in token_lists for token in tokens)
    kept = sorted(
        ((t, c) for t, c in counts.items() if c >= min_frequency and t not in SPECIAL_TOKENS),
        key=lambda item: (-item[1], item[0]),
    )
    rows = [(i, token, 0) for i, token in enumerate(SPECIAL_TOKENS)]
    rows += [(len(SPECIAL_TOKENS) + i, token, count) for i, (token, count) in enumerate(kept)]
    return pl.DataFrame(rows, schema={"token_id": pl.Int32, "token": pl.String, "count": pl.Int64}, orient="row")


@dataclass(frozen=True)
class LinkedUtterance:
    tokens: list[str]
    mentions: list[tuple[int, int, str]]  # (token position, entity id, "item" | "entity")


def link_utterance(text: str, linker: EntityLinker, item_entity: dict[int, int]) -> LinkedUtterance:
    """Movies through their "@id" token; other entities through the linker (which never sees "@id")."""
    tokens = tokenize(text)
    start_to_index = {token.start: i for i, token in enumerate(tokens)}
    mentions = [(start_to_index[m.start], m.entity_id, "entity") for m in linker.link(text)]
    for i, token in enumerate(tokens):
        if token.text.startswith("@") and token.text[1:].isdigit():
            entity = item_entity.get(int(token.text[1:]))
            if entity is not None:
                mentions.append((i, entity, "item"))
    texts = [t.text if t.text.startswith("@") else t.text.lower() for t in tokens]
    return LinkedUtterance(texts, sorted(mentions))


def link_all(utterances: pl.DataFrame, linker: EntityLinker, item_entity: dict[int, int]) -> list[LinkedUtterance]:
    return [
        link_utterance(text, linker, item_entity) for text in progress(utterances["text"], desc="linking", unit=" utt")
    ]


def build_samples(
    utterances: pl.DataFrame,
    linked: list[LinkedUtterance],
    vocabulary: pl.DataFrame,
    item_entity: dict[int, int],
    context_max_tokens: int,
    response_max_tokens: int,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One sample per turn after the first; also every linked mention's position in each sample's context.

    `utterances` must be sorted by (conv_id, turn_idx) with a split column, aligned with `linked`.
    Returns (samples, context_mentions[sample_id, token_position, entity_id, conv_id, mention_turn]).
    """
    token_id = dict(zip(vocabulary["token"], vocabulary["token_id"]))
    unk, split_id = token_id[UNK], token_id[SPLIT]
    samples, mentions = [], []
    rows = utterances.select("conv_id", "turn_idx", "role", "split", "movie_ids").iter_rows()
    history: list[int] = []
    history_mentions: list[tuple[int, int, int]] = []  # (absolute position, entity, turn)
    entities: list[int] = []
    items: list[int] = []
    previous_conv = None
    for (conv_id, turn_idx, role, split, movie_ids), utterance in progress(
        zip(rows, linked), total=len(linked), desc="samples", unit=" turns"
    ):
        if conv_id != previous_conv:
            history, history_mentions, entities, items, previous_conv = [], [], [], [], conv_id
        ids = [token_id.get(token, unk) for token in utterance.tokens]
        if history:
            sample_id = len(samples)
            cut = max(0, len(history) - context_max_tokens)
            targets = []
            for movie_id in movie_ids:
                if movie_id not in item_entity:
                    raise TriplesDataError(
                        f"conversation {conv_id}, turn {turn_idx}: movie {movie_id} has no "
                        "item entity in the kg stage's entities table"
                    )
                targets.append(item_entity[movie_id])
            samples.append(
                (
                    sample_id,
                    conv_id,
                    turn_idx,
                    role,
                    split,
                    history[cut:],
                    list(dict.fromkeys(entities)),
                    list(dict.fromkeys(items)),
                    targets,
                    ids[:response_max_tokens],
                )
            )
            mentions += [
                (sample_id, position - cut, entity, conv_id, turn)
                for position, entity, turn in history_mentions
                if position >= cut
            ]
        offset = len(history)
        for position, entity, kind in utterance.mentions:
            history_mentions.append((offset + position, entity, turn_idx))
            entities.append(entity)
            if kind == "item":
                items.append(entity)
        history += ids + [split_id]
    sample_table = pl.DataFrame(samples, schema=SAMPLE_SCHEMA, orient="row")
    mention_table = pl.DataFrame(
        mentions,
        schema={
            "sample_id": pl.Int64,
            "token_position": pl.Int32,
            "entity_id": pl.Int64,
            "conv_id": pl.Int64,
            "mention_turn": pl.Int32,
        },
        orient="row",
    )
    return sample_table, mention_table


# ---------------------------------------------------------------- sentences for mentions


def candidate_sentences(
    entities: pl.DataFrame, edges: pl.DataFrame, sentences: pl.DataFrame, max_movies_per_entity: int
) -> dict[int, np.ndarray]:
    """Review sentences an entity may be paired with: an item's own; for another entity, those of the items it
    is linked to in the KG (its films, for an actor), the most-mentioned items first, at most max_movies_per_entity."""
    item_sentences = (
        sentences.join(entities.filter(pl.col("is_item")).select("entity_id", "movie_id"), on="movie_id")
        .group_by("entity_id")
        .agg(pl.col("sentence_id").sort())
    )
    by_item = dict(zip(item_sentences["entity_id"], (np.asarray(s) for s in item_sentences["sentence_id"])))
    items = entities.filter(pl.col("is_item")).select("entity_id", "mentions")
    neighbours = (
        edges.filter(pl.col("src") != pl.col("dst"))
        .join(items, left_on="dst", right_on="entity_id")
        .filter(pl.col("dst").is_in(list(by_item)))
        .unique(["src", "dst"])
        .sort(["src", "mentions", "dst"], descending=[False, True, False])
        .group_by("src", maintain_order=True)
        .agg(pl.col("dst").head(max_movies_per_entity))
    )
    candidates = dict(by_item)
    for entity, movies in zip(neighbours["src"], neighbours["dst"]):
        if entity not in candidates:
            candidates[entity] = np.concatenate([by_item[m] for m in movies])
    return candidates


class SentenceChooser:
    """Picks, for an entity mentioned in an utterance, the most related review sentence among its candidates.

    bm25: BM25 of each candidate against the entity's label plus the utterance's words; highest_rated: the
    sentence from the best-rated review (ties: earlier sentence); first: the first candidate. `rank` orders any
    sentences by BM25 whatever the rule (the chat's explanations use it).
    """

    def __init__(
        self,
        rule: str,
        sentences: pl.DataFrame,
        ratings: np.ndarray,
        labels: dict[int, str],
        candidates: dict[int, np.ndarray],
    ):
        if rule not in SENTENCE_RULES:
            raise ValueError(f"sentence rule must be one of {SENTENCE_RULES}, got {rule!r}")
        self.rule, self.labels, self.candidates, self.ratings = rule, labels, candidates, ratings
        self.texts = sentences["text"].to_list()

    @functools.cached_property
    def _index(self) -> tuple[dict[str, int], bm25s.BM25]:
        corpus = bm25s.tokenize(self.texts, stopwords="en", show_progress=False)
        index = bm25s.BM25()
        index.index(corpus, show_progress=False)
        return corpus.vocab, index

    def _scores(self, pool: np.ndarray, words: str) -> np.ndarray:
        """BM25 of each sentence of `pool` against `words` (zeros when no word is in the corpus)."""
        vocab, index = self._index
        query = [
            vocab[w]
            for w in bm25s.tokenize(words, stopwords="en", return_ids=False, show_progress=False)[0]
            if w in vocab
        ]
        return index.get_scores(query)[pool] if query else np.zeros(len(pool))

    def rank(self, pool: np.ndarray, words: str) -> list[tuple[int, float]]:
        """The sentences of `pool` with their BM25 score against `words`, best first (ties: pool order)."""
        scores = self._scores(pool, words)
        return [(int(pool[i]), float(scores[i])) for i in np.argsort(-scores, kind="stable")]

    def choose(self, entity_id: int, utterance_tokens: list[str], exclude: int | None = None) -> int | None:
        """The sentence for entity_id mentioned among utterance_tokens (never `exclude`); None when it has none."""
        pool = self.candidates.get(entity_id)
        if pool is not None and exclude is not None:
            pool = pool[pool != exclude]
        if pool is None or len(pool) == 0:
            return None
        if self.rule == "first":
            return int(pool[0])
        if self.rule == "highest_rated":
            return int(pool[np.argmax(np.nan_to_num(self.ratings[pool], nan=-1.0))])
        words = f"{self.labels.get(entity_id, '')} {' '.join(utterance_tokens)}"
        return int(pool[int(np.argmax(self._scores(pool, words)))])  # the first best, as rank's first


def build_triples(
    context_mentions: pl.DataFrame, linked: list[LinkedUtterance], utterances: pl.DataFrame, chooser: SentenceChooser
) -> pl.DataFrame:
    """(sample, token position, entity, sentence) for every mention in a context that has a sentence.

    The sentence depends on the mention's own utterance, not on the sample, so it is chosen once per mention and
    reused by every later sample whose context holds it.
    """
    row_of = {key: i for i, key in enumerate(utterances.select("conv_id", "turn_idx").iter_rows())}
    chosen: dict[tuple[int, int, int], int | None] = {}
    sentence_ids = []
    for conv_id, turn, entity in progress(
        context_mentions.select("conv_id", "mention_turn", "entity_id").iter_rows(),
        total=context_mentions.height,
        desc="triples",
        unit=" mentions",
    ):
        key = (conv_id, turn, entity)
        if key not in chosen:
            chosen[key] = chooser.choose(entity, linked[row_of[(conv_id, turn)]].tokens)
        sentence_ids.append(chosen[key])
    return (
        context_mentions.with_columns(pl.Series("sentence_id", sentence_ids, dtype=pl.Int64))
        .drop_nulls("sentence_id")
        .select(list(TRIPLE_SCHEMA))
        .cast(TRIPLE_SCHEMA)
    )


def triple_metrics(samples: pl.DataFrame, triples: pl.DataFrame, linked: list[LinkedUtterance]) -> dict:
    per_sample = triples.group_by("sample_id").len()
    with_triple = per_sample.height
    entity_mentions = sum(1 for u in linked for m in u.mentions if m[2] == "entity")
    item_mentions = sum(1 for u in linked for m in u.mentions if m[2] == "item")
    return {
        "samples": dict(samples.group_by("split").len().sort("split").iter_rows()),
        "samples_with_triple": round(with_triple / max(samples.height, 1), 4),
        "triples_per_sample": round(triples.height / max(samples.height, 1), 3),
        "triples": triples.height,
        "linked_entity_mentions_per_utterance": round(entity_mentions / max(len(linked), 1), 3),
        "item_mentions_per_utterance": round(item_mentions / max(len(linked), 1), 3),
    }


def sentence_chooser(
    cfg,
    entities: pl.DataFrame,
    edges: pl.DataFrame,
    movies: pl.DataFrame,
    sentences: pl.DataFrame,
    review_table: pl.DataFrame,
) -> SentenceChooser:
    """The triples stage's rule for the review sentence of a mentioned entity (params.triples)."""
    popularity = entities.join(
        movies.select("movie_id", pl.col("mentions_ingested").alias("mentions")), on="movie_id", how="left"
    ).with_columns(pl.col("mentions").fill_null(0))
    candidates = candidate_sentences(popularity, edges, sentences, cfg.max_movies_per_entity)
    ratings = (
        sentences.join(
            review_table.select("movie_id", "source", "review_id", "rating"),
            on=["movie_id", "source", "review_id"],
            how="left",
        )
        .sort("sentence_id")["rating"]
        .cast(pl.Float64)
        .fill_null(float("nan"))
        .to_numpy()
    )
    return SentenceChooser(
        cfg.sentence_rule, sentences, ratings, dict(zip(entities["entity_id"], entities["label"])), candidates
    )


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    cfg = params.triples
    spec = STAGES["triples"]
    dep = {Path(d).name: workspace / d for d in spec.deps}
    files = raw.raw_files(params.data, workspace, "stopwords", "linking_gold")
    entities, edges = pl.read_parquet(dep["entities.parquet"]), pl.read_parquet(dep["edges.parquet"])
    movies = pl.read_parquet(dep["movies.parquet"])
    sentences = pl.read_parquet(dep["review_sentences.parquet"])
    utterances = (
        pl.read_parquet(dep["utterances.parquet"])
        .join(pl.read_parquet(dep["conversations.parquet"]).select("conv_id", "split"), on="conv_id")
        .sort("conv_id", "turn_idx")
    )

    items = entities.filter(pl.col("is_item"))
    item_entity = dict(zip(items["movie_id"], items["entity_id"]))
    linker = linking.kg_entity_linker(entities, edges, files["stopwords"], params.linking)
    linked = link_all(utterances, linker, item_entity)

    train_rows = (utterances["split"] == "train").to_list()
    vocabulary = build_vocabulary((u.tokens for u, train in zip(linked, train_rows) if train), cfg.min_token_frequency)
    samples, context_mentions = build_samples(
        utterances, linked, vocabulary, item_entity, cfg.context_max_tokens, cfg.response_max_tokens
    )
    chooser = sentence_chooser(cfg, entities, edges, movies, sentences, pl.read_parquet(dep["reviews.parquet"]))
    triple_table = build_triples(context_mentions, linked, utterances, chooser)

    bracketed = {f"<{uri}>": entity_id for entity_id, uri in zip(entities["entity_id"], entities["uri"])}
    evaluation = linking.evaluate_linker(
        linker,
        files["linking_gold"],
        bracketed,
        {f"<{uri}>" for uri in items["uri"]},
        sample_size=params.linking.report_samples,
        seed=params.seed,
    )
    metrics = {
        **triple_metrics(samples, triple_table, linked),
        "vocabulary": vocabulary.height,
        "linker": {k: round(evaluation[k], 4) for k in ("precision", "recall", "f1", "macro_f1", "f1_mapped")},
        "linker_counts": evaluation["counts"],
    }
    vocab_out, samples_out, triples_out = (workspace / spec.output(name) for name in ("vocab", "samples", "triples"))
    report = linking.evaluation_report(evaluation, dict(zip(entities["entity_id"], entities["label"])))
    write_outputs(
        {
            vocab_out: vocabulary,
            samples_out: samples,
            triples_out: triple_table,
            workspace / spec.metrics_file: metrics,
            workspace / spec.report("linking.md"): report,
        }
    )
    return StageOutcome({**files, **dep}, metrics)
