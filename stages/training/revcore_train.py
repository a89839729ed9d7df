"""RevCore (Lu et al., Findings of ACL 2021) by this pipeline: its sentiment model, its sentiment-aware review
retrieval, and the review-enriched conversations that its recommender (KGSF's, models/revcore.py) and its generator
(conv_baselines@revcore) read.

Retrieval, for each of the most recent movies of a context: the polarity of the utterance that mentions it (the
sentiment model), then the movie's review sentence whose own polarity agrees best with it (P(both positive) +
P(both negative)). The sentence's first words join the context after a separator, as RevCore splices a review of
20 tokens into the conversation, and the entities linked in it join the context's entities (ahead of the
conversation's own, so the most recent-first cap keeps those). The chosen sentences are also the generator's review
memory and copy source.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from scipy import sparse
from sklearn.linear_model import LogisticRegression

from models.revcore import RevCoreRecommender
from stages.io.graph import STAGES
from stages.text.linking import EntityLinker
from stages.training.c2crs_data import SampleTable
from stages.triples import SPLIT, token_texts

REVIEWS_INPUT = STAGES["reviews"].output("reviews")
POSITIVE_RATING, NEGATIVE_RATING = 7, 4  # IMDb's 10-point ratings as Maas et al. label them (5 and 6 left out)
HELD_OUT = 0.1  # share of the rated reviews kept to measure the sentiment model


def fit_sentiment(reviews: pl.DataFrame, vocabulary: pl.DataFrame, seed: int) -> tuple[np.ndarray, float, dict]:
    """A logistic regression P(positive | the set of vocabulary words) on the rated reviews; its weights [vocab],
    bias and measures (the accuracy on HELD_OUT of each polarity's reviews, which it is not fitted on)."""
    rated = reviews.filter((pl.col("rating") >= POSITIVE_RATING) | (pl.col("rating") <= NEGATIVE_RATING))
    labels = (rated["rating"] >= POSITIVE_RATING).to_numpy()
    if labels.all() or not labels.any():
        raise ValueError(
            f"{REVIEWS_INPUT}: {rated.height} rated reviews ({int(labels.sum())} positive): RevCore's "
            "sentiment model needs both polarities (params reviews.sources must include aclimdb)"
        )
    token_id = dict(zip(vocabulary["token"], vocabulary["token_id"]))
    words = [sorted({token_id[t] for t in token_texts(text) if t in token_id}) for text in rated["text"]]
    indptr = np.concatenate([[0], np.cumsum([len(w) for w in words])])
    bags = sparse.csr_matrix(
        (np.ones(indptr[-1]), np.concatenate(words or [[]]).astype(np.int64), indptr),
        shape=(len(words), vocabulary.height),
    )
    rng = np.random.default_rng(seed)
    held = np.concatenate(
        [
            rng.permutation(np.flatnonzero(labels == label))[: int((labels == label).sum() * HELD_OUT)]
            for label in (False, True)
        ]
    )  # HELD_OUT of each polarity (none of a rare one)
    fit = np.setdiff1d(np.arange(len(words)), held)
    classifier = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit(bags[fit], labels[fit])
    measures = {
        "rated_reviews": rated.height,
        "positive": int(labels.sum()),
        "held_out": len(held),
        "held_out_accuracy": float(classifier.score(bags[held], labels[held])) if len(held) else None,
    }
    return classifier.coef_[0].astype(np.float32), float(classifier.intercept_[0]), measures


def link_sentences(sentences: pl.DataFrame, linker: EntityLinker) -> tuple[np.ndarray, np.ndarray]:
    """The entities the linker finds in each review sentence (ids 0..n-1): CSR offsets [n + 1] and entity ids."""
    ordered = sentences.sort("sentence_id")
    linked = [sorted(linker.entity_ids(text)) for text in ordered["text"]]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in linked])]).astype(np.int64)
    return offsets, np.asarray([e for entities in linked for e in entities], dtype=np.int64)


def _utterances(tokens: list[int], split_id: int) -> list[list[int]]:
    parts, current = [], []
    for token in tokens:
        if token == split_id:
            parts.append(current)
            current = []
        else:
            current.append(token)
    return parts + [current]


@dataclass
class ReviewRetrieval:
    """RevCore's sentiment-aware retrieval over the reviews stage's sentences (see the module docstring)."""

    model: RevCoreRecommender
    sentence_tokens: list[list[int]]
    movie_sentences: dict[int, list[int]]  # item entity -> its review sentences
    sentence_positive: np.ndarray  # P(positive) of each sentence
    movie_token: dict[int, int]  # item entity -> its mention token ("@<ReDial id>")
    split_id: int
    review_movies: int  # the most recent context movies that get a review
    review_tokens: int  # words of a review sentence spliced into the context
    max_context_tokens: int  # the enriched context is cut to its last this many tokens

    @classmethod
    def build(
        cls,
        model: RevCoreRecommender,
        sentence_tokens: list[list[int]],
        sentences: pl.DataFrame,
        entities: pl.DataFrame,
        vocabulary: pl.DataFrame,
        cfg,
        max_context_tokens: int,
    ) -> "ReviewRetrieval":
        item_of_movie = dict(entities.filter(pl.col("is_item")).select("movie_id", "entity_id").iter_rows())
        movie_sentences: dict[int, list[int]] = {}
        for sentence, movie in sentences.sort("sentence_id").select("sentence_id", "movie_id").iter_rows():
            if movie in item_of_movie:
                movie_sentences.setdefault(item_of_movie[movie], []).append(sentence)
        token_id = dict(zip(vocabulary["token"], vocabulary["token_id"]))
        movie_token = {item: token_id[f"@{movie}"] for movie, item in item_of_movie.items() if f"@{movie}" in token_id}
        return cls(
            model,
            sentence_tokens,
            movie_sentences,
            model.positive(sentence_tokens).cpu().numpy(),
            movie_token,
            token_id[SPLIT],
            cfg.review_movies,
            cfg.review_tokens,
            max_context_tokens,
        )

    def utterance_polarity(self, table: SampleTable, rows: np.ndarray) -> dict[tuple[int, int], float]:
        """P(positive) of the last utterance of each row's context that mentions each of its recent movies;
        a movie whose mention the context no longer holds (cut at its start) is neutral (0.5)."""
        texts, keys = [], []
        for row in rows:
            utterances = _utterances(table.context_tokens[row], self.split_id)
            for item in self.recent_movies(table, row):
                token = self.movie_token.get(item)
                said = [u for u in utterances if token in u]
                if said:
                    texts.append(said[-1])
                    keys.append((int(row), item))
        positive = self.model.positive(texts).cpu().numpy() if texts else []
        return dict(zip(keys, map(float, positive)))

    def recent_movies(self, table: SampleTable, row: int) -> list[int]:
        """The row's most recent distinct context movies that have review sentences, most recent first."""
        movies = [m for m in dict.fromkeys(reversed(table.context_items[row])) if m in self.movie_sentences]
        return movies[: self.review_movies]

    def choose(self, table: SampleTable, rows: np.ndarray) -> list[list[int]]:
        """The retrieved sentence of each of each row's recent movies (most recent movie first)."""
        polarity = self.utterance_polarity(table, rows)
        chosen = []
        for row in rows:
            picked = []
            for item in self.recent_movies(table, row):
                p_utterance = polarity.get((int(row), item), 0.5)
                candidates = self.movie_sentences[item]
                p = self.sentence_positive[candidates]
                agreement = p * p_utterance + (1 - p) * (1 - p_utterance)
                picked.append(candidates[int(np.argmax(agreement))])
            chosen.append(picked)
        return chosen

    def augment(self, table: SampleTable) -> SampleTable:
        """The table with each context enriched by its retrieved reviews (words, linked entities) and those
        sentences as its review documents; rows, targets and context movies unchanged."""
        chosen = self.choose(table, np.arange(len(table)))
        tokens, entities = [], []
        for row, sentences in enumerate(chosen):
            review_words = [
                t for s in sentences for t in [self.split_id, *self.sentence_tokens[s][: self.review_tokens]]
            ]
            tokens.append((list(table.context_tokens[row]) + review_words)[-self.max_context_tokens :])
            own = list(table.context_entities[row])
            linked = dict.fromkeys(e for s in sentences for e in self.model.sentence_entities(s) if e not in own)
            entities.append(list(linked) + own)
        return dataclasses.replace(table, context_tokens=tokens, context_entities=entities, documents=chosen)


def load_retrieval(
    model: RevCoreRecommender, sentence_tokens: list[list[int]], inputs: dict, cfg, max_context_tokens: int
) -> ReviewRetrieval:
    """The retrieval of a RevCore model over the workspace's review sentences (inputs: runs.TRAINING_INPUTS' paths;
    cfg: params.baselines.revcore)."""
    return ReviewRetrieval.build(
        model,
        sentence_tokens,
        pl.read_parquet(inputs["review_sentences"]),
        pl.read_parquet(inputs["entities"]),
        pl.read_parquet(inputs["vocab"]),
        cfg,
        max_context_tokens,
    )


def retrieval_measures(table: SampleTable, augmented: SampleTable, likes: dict, retrieval: ReviewRetrieval) -> dict:
    """How much the retrieval adds to a split, and how often the utterance polarity agrees with what the seeker
    said in ReDial's movie form (liked 1, disliked 0; a diagnostic only: the forms are never read to retrieve)."""
    rows = np.arange(len(table))
    polarity = retrieval.utterance_polarity(table, rows)
    said = [
        (p >= 0.5, likes[(int(table.conv_ids[row]), item)])
        for (row, item), p in polarity.items()
        if likes.get((int(table.conv_ids[row]), item)) in (0.0, 1.0)
    ]
    agree_liked = [predicted for predicted, liked in said if liked == 1.0]
    agree_disliked = [not predicted for predicted, liked in said if liked == 0.0]
    return {
        "samples": len(table),
        "with_review": int(sum(1 for d in augmented.documents if d)),
        "review_sentences": int(sum(len(d) for d in augmented.documents)),
        "added_entities": int(sum(len(a) - len(b) for a, b in zip(augmented.context_entities, table.context_entities))),
        "polarity_vs_forms": {
            "mentions": len(said),
            "liked_predicted_positive": float(np.mean(agree_liked)) if agree_liked else None,
            "disliked_predicted_negative": (float(np.mean(agree_disliked)) if agree_disliked else None),
        },
    }


def load_sentiment(
    model: RevCoreRecommender, weight: np.ndarray, bias: float, offsets: np.ndarray, linked: np.ndarray
) -> RevCoreRecommender:
    """Fill a fresh RevCore model's sentiment weights and sentence links."""
    with torch.no_grad():
        model.sentiment.weight.copy_(torch.as_tensor(weight)[None])
        model.sentiment.bias.fill_(bias)
        model.link_offsets.copy_(torch.as_tensor(offsets))
        model.link_entities.copy_(torch.as_tensor(linked))
    model.sentiment.requires_grad_(False)
    return model
