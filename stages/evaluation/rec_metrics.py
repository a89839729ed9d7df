"""Recommendation evaluation: one row per ground-truth mention, ranks over all items, metrics with cluster CIs.

Over 400 lines: ranks, protocols, intervals, baselines without training and the report tables share the row layout
(one row per ground-truth mention); split, each part would redefine it.

The protocol follows docs/design.md 'Evaluation protocol': every target item of every scored sample (turns after the
first) is one evaluation row, ranked against all n_items movies; no mention is ever dropped, so two models are always
scored on the same rows. Four protocols are reported side by side, each with a conversation-level bootstrap interval,
the share of hits that were repeats of a movie in the context, and recall split by whether the context has linked
entities:
- `all_turns` (what C2-CRS's Table 1 used) and `recommender_turns` (what CRSLab and later papers use) keep every
  target, repeats of context movies included, and rank it among all movies;
- `new_items` (Kostric and Balog's re-evaluation of ReDial CRS) keeps only recommender-turn targets that were not
  mentioned earlier in the conversation, with the same ranks: the context's movies still compete with the target;
- `new_items_masked` scores the same rows with the context's movies removed from the ranking, so a target ranks only
  among movies not yet mentioned (a model is not penalised for ranking a movie already mentioned above it).
Two naive baselines show how much recall repeats alone buy: `repeat` (the context's movies, most recent first) and
`repeat_popularity` (the same, then every other movie by train popularity).
"""

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import polars as pl
from scipy import stats

METRICS = ("recall@1", "recall@10", "recall@50", "ndcg@10", "mrr@10")
REPEAT_KS = (10, 50)
ROW_COLUMNS = (
    "sample_id",
    "conv_id",
    "turn_idx",
    "role",
    "target_item",
    "in_context",
    "context_item_ids",
    "has_entities",
    "context_entities",
)
# How much context a scored turn has: earlier turns (consecutive messages of one speaker are one turn) and linked
# entities in the context (movies included). Bins: (label, lowest, highest or None).
CONTEXT_SIZES = {
    "earlier_turns": (("1", 1, 1), ("2-3", 2, 3), ("4-6", 4, 6), ("7_or_more", 7, None)),
    "context_entities": (("0", 0, 0), ("1-2", 1, 2), ("3-5", 3, 5), ("6_or_more", 6, None)),
}


def _new_items(rows: pl.DataFrame) -> np.ndarray:
    return ((rows["role"] == "recommender") & ~rows["in_context"]).to_numpy()


# Protocol name -> boolean row mask. all_turns keeps seeker turns too (C2-CRS code, paper Table 1).
PROTOCOLS: dict[str, Callable[[pl.DataFrame], np.ndarray]] = {
    "all_turns": lambda rows: np.ones(rows.height, dtype=bool),
    "recommender_turns": lambda rows: (rows["role"] == "recommender").to_numpy(),
    "new_items": _new_items,
    "new_items_masked": _new_items,
}
# Protocols scored with the ranks that leave the context's movies out (evaluate_model's masked_ranks).
MASKED_PROTOCOLS = frozenset({"new_items_masked"})

# The paper's numbers (Tables 1 and 4, ReDial), keyed by our model names in reports/rec.json. They come from
# training on the FULL ReDial train split and scoring all turns (seeker turns included), so they belong next to
# `all_turns`; this workplace's mirror holds only about a quarter of the train split, so a gap is expected.
PAPER_PROTOCOL = "all_turns"
PAPER_NOTE = "Zhou et al., WSDM 2022, Tables 1 and 4: full ReDial train split, reference sizes and epochs, all turns"
PAPER_TABLE1 = {
    "popularity": ("Popularity", {"recall@1": 0.011, "recall@10": 0.054, "recall@50": 0.183}),
    "textcnn": ("TextCNN", {"recall@1": 0.013, "recall@10": 0.068, "recall@50": 0.191}),
    "redial": ("ReDial", {"recall@1": 0.024, "recall@10": 0.140, "recall@50": 0.320}),
    "kbrd": ("KBRD", {"recall@1": 0.031, "recall@10": 0.150, "recall@50": 0.336}),
    "kgsf": ("KGSF", {"recall@1": 0.039, "recall@10": 0.183, "recall@50": 0.378}),
    "kecrs": ("KECRS", {"recall@1": 0.021, "recall@10": 0.143, "recall@50": 0.340}),
    "revcore": ("RevCore", {"recall@1": 0.046, "recall@10": 0.220, "recall@50": 0.396}),
    "c2crs": ("C2-CRS", {"recall@1": 0.053, "recall@10": 0.233, "recall@50": 0.407}),
}
ABLATION_PREFIX = "c2crs_"  # the model name of ablation variant v is c2crs_v
PAPER_TABLE4 = {
    "c2crs": ("C2-CRS", PAPER_TABLE1["c2crs"][1]),
    "kbrd": ("w/o Coarse-Fine", PAPER_TABLE1["kbrd"][1]),  # the paper's KBRD row and this one are the same numbers
    "c2crs_wo_coarse": ("w/o Coarse", {"recall@1": 0.049, "recall@10": 0.220, "recall@50": 0.394}),
    "c2crs_wo_fine": ("w/o Fine", {"recall@1": 0.048, "recall@10": 0.221, "recall@50": 0.400}),
    "c2crs_multitask": ("Multi-task", {"recall@1": 0.052, "recall@10": 0.221, "recall@50": 0.404}),
    "c2crs_wo_ch": ("w/o CH", {"recall@1": 0.048, "recall@10": 0.223, "recall@50": 0.403}),
    "c2crs_wo_sd": ("w/o SD", {"recall@1": 0.051, "recall@10": 0.226, "recall@50": 0.403}),
    "c2crs_wo_ud": ("w/o UD", {"recall@1": 0.051, "recall@10": 0.222, "recall@50": 0.395}),
}
NAIVE_BASELINES = ("repeat", "repeat_popularity")  # no training: the context's movies (then popularity)
BASELINES = ("popularity", *NAIVE_BASELINES, "textcnn", "redial", "kbrd", "kecrs", "kgsf", "revcore")
# C2-CRS inside a learned choice between re-mentioning a context movie and a new one (models.baselines.RepeatChoice;
# beyond the paper), shown next to C2-CRS
NAIVE_MODELS = ("popularity", "repeat", "repeat_popularity")  # naive_scorers: nothing to train
REPEAT_CHOICE = "c2crs-repeat-choice"  # MLflow metric names allow no "+"; "c2crs_" would read as an ablation


class EvaluationError(ValueError):
    """Scores that cannot be ranked (NaN, missing samples, wrong width); names what is wrong."""


# ---------------------------------------------------------------- rows


def expand_mentions(samples: pl.DataFrame) -> pl.DataFrame:
    """One row per (sample, ground-truth item), in sample order; in_context flags a repeat of a context movie.

    Samples without targets give no row; duplicate targets in one sample stay (a mention is never dropped).
    context_item_ids travels with each row (the masked protocol leaves those movies out of the ranking), and
    has_entities says whether the context has any linked entity (context_entity_ids holds every linked mention,
    movies included).
    """
    return (
        samples.filter(pl.col("target_item_ids").list.len() > 0)
        .select(
            "sample_id",
            "conv_id",
            "turn_idx",
            "role",
            "context_item_ids",
            (pl.col("context_entity_ids").list.len() > 0).alias("has_entities"),
            pl.col("context_entity_ids").list.len().alias("context_entities"),
            pl.col("target_item_ids").alias("target_item"),
        )
        .explode("target_item")
        .with_columns(pl.col("context_item_ids").list.contains(pl.col("target_item")).alias("in_context"))
        .select(ROW_COLUMNS)
    )


def protocol_rows(rows: pl.DataFrame, protocol: str) -> np.ndarray:
    """Boolean mask of the rows a protocol scores."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {protocol!r}")
    return PROTOCOLS[protocol](rows)


# ---------------------------------------------------------------- ranks


def _excluded_at_least(
    scores: np.ndarray,
    sample_index: np.ndarray,
    target_items: np.ndarray,
    target_score: np.ndarray,
    exclude: Sequence[Sequence[int]],
) -> np.ndarray:
    """Per row, how many of its excluded items (the target itself never, each item once) score at least as high
    as the target: what rank_of_targets counted but must not."""
    lengths = np.array([len(items) for items in exclude], dtype=np.int64)
    if len(lengths) != len(target_items):
        raise EvaluationError(f"exclude has {len(lengths)} rows for {len(target_items)} targets")
    if not lengths.sum():
        return np.zeros(len(target_items), dtype=np.int64)
    row = np.repeat(np.arange(len(lengths)), lengths)
    item = np.concatenate([np.asarray(items, dtype=np.int64) for items in exclude if len(items)])
    if item.min() < 0 or item.max() >= scores.shape[1]:
        raise EvaluationError(f"excluded items must lie in 0..{scores.shape[1] - 1}")
    row, item = np.unique(np.stack([row, item]), axis=1)
    counted = (scores[sample_index[row], item] >= target_score[row]) & (item != target_items[row])
    return np.bincount(row[counted], minlength=len(target_items))


def rank_of_targets(
    scores: np.ndarray,
    sample_index: np.ndarray,
    target_items: np.ndarray,
    chunk: int = 1024,
    exclude: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
    """1-based rank of each target among all items: the number of items scoring at least as high as it.

    Ties count against the target (pessimistic): a model that gives many items the same score (popularity: equal
    counts) cannot win recall from the tie, and one that scores every item alike ranks each target last. Rows
    are processed in chunks so only chunk x n_items floats are copied at a time. exclude (per target row, item ids)
    takes those items out of the ranking: they are never counted, whatever they score (ties included).
    """
    sample_index = np.asarray(sample_index, dtype=np.int64)
    target_items = np.asarray(target_items, dtype=np.int64)
    if scores.ndim != 2:
        raise EvaluationError(f"scores must be [n_samples, n_items], got shape {scores.shape}")
    if target_items.size and (target_items.min() < 0 or target_items.max() >= scores.shape[1]):
        raise EvaluationError(f"target items must lie in 0..{scores.shape[1] - 1}")
    ranks = np.empty(len(target_items), dtype=np.int64)
    target_score = scores[sample_index, target_items]
    if np.isnan(target_score).any():
        raise EvaluationError("a target item has a NaN score")
    for start in range(0, len(target_items), chunk):
        block = scores[sample_index[start : start + chunk]]
        ranks[start : start + chunk] = (block >= target_score[start : start + chunk, None]).sum(axis=1)
    if exclude is not None:
        ranks -= _excluded_at_least(scores, sample_index, target_items, target_score, exclude)
    return ranks


def _ranks_from_blocks(
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    rows: pl.DataFrame,
    excludes: Sequence[pl.Series | Sequence[Sequence[int]] | None],
) -> list[np.ndarray]:
    """One rank array per entry of excludes (None: nothing excluded), all from a single pass over the blocks."""
    row_samples = rows["sample_id"].to_numpy()
    targets = rows["target_item"].to_numpy()
    excludes = [
        None if exclude is None else exclude.to_list() if isinstance(exclude, pl.Series) else list(exclude)
        for exclude in excludes
    ]
    for exclude in excludes:
        if exclude is not None and len(exclude) != rows.height:
            raise EvaluationError(f"exclude has {len(exclude)} entries for {rows.height} rows")
    ranks = [np.zeros(rows.height, dtype=np.int64) for _ in excludes]
    for sample_ids, scores in blocks:
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        if scores.shape[0] != len(sample_ids):
            raise EvaluationError(f"a block has {len(sample_ids)} sample ids but {scores.shape[0]} score rows")
        if len(sample_ids) == 0:
            continue
        order = np.argsort(sample_ids, kind="stable")
        position = np.minimum(np.searchsorted(sample_ids, row_samples, sorter=order), len(sample_ids) - 1)
        hit = sample_ids[order[position]] == row_samples
        if not hit.any():
            continue
        if (ranks[0][hit] != 0).any():
            raise EvaluationError("a sample appears in more than one score block")
        hit_rows = np.flatnonzero(hit)
        for kept, exclude in zip(ranks, excludes):
            kept[hit] = rank_of_targets(
                scores,
                order[position[hit]],
                targets[hit],
                exclude=None if exclude is None else [exclude[i] for i in hit_rows],
            )
    if (ranks[0] == 0).any():
        missing = np.unique(row_samples[ranks[0] == 0])
        raise EvaluationError(f"{len(missing)} samples have no scores, e.g. sample_id {missing[:5].tolist()}")
    return ranks


def ranks_and_masked_ranks(
    blocks: Iterable[tuple[np.ndarray, np.ndarray]], rows: pl.DataFrame, exclude: pl.Series | Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """(ranks over all items, ranks without each row's `exclude` items) from one pass, so a model is scored once."""
    ranks, masked = _ranks_from_blocks(blocks, rows, [None, exclude])
    return ranks, masked


# ---------------------------------------------------------------- naive baselines


def context_items_by_recency(samples: pl.DataFrame) -> list[list[int]]:
    """Each sample's context movies, most recently mentioned first, aligned with `samples`.

    context_item_ids keeps a movie once, at its first mention, so a movie named early and again just now would look
    old. A conversation's mentions are replayed instead: its first sample's context movies (the first turn's), then
    each sample's targets (the movies of its turn) in turn order. A context movie that the replay misses keeps its
    first-mention order, after the others.
    """
    history: dict[int, list[int]] = {}
    by_sample = {}
    ordered = samples.sort("conv_id", "turn_idx").select("sample_id", "conv_id", "context_item_ids", "target_item_ids")
    for sample_id, conv_id, context, targets in ordered.iter_rows():
        mentions = history.setdefault(conv_id, list(context))
        in_context = set(context)
        recent = [item for item in dict.fromkeys(reversed(mentions)) if item in in_context]
        replayed = set(recent)
        by_sample[sample_id] = recent + [item for item in reversed(context) if item not in replayed]
        mentions.extend(targets)
    return [by_sample[sample_id] for sample_id in samples["sample_id"]]


CONTEXT_MOVIE_BUCKETS = 4  # the new-or-repeat choice's states: 1, 2, 3, 4+ context movies ...
CHOICE_STATES = CONTEXT_MOVIE_BUCKETS * 2  # ... x whether the turn just before named a movie


def choice_states(samples: pl.DataFrame) -> list[int]:
    """Each sample's context state for the new-or-repeat choice (models.baselines.RepeatChoice), aligned with
    `samples`: how many distinct movies its context holds (1, 2, 3, 4+; none shares the first bucket, where no repeat
    is possible anyway) and whether the turn just before it named a movie (its sample's targets, or for the second
    turn the first turn's movies; unknown, counted as no, when that turn's sample is not in `samples`)."""
    previous: dict[int, tuple[int, bool]] = {}
    state = {}
    ordered = samples.sort("conv_id", "turn_idx").select(
        "sample_id", "conv_id", "turn_idx", "context_item_ids", "target_item_ids"
    )
    for sample_id, conv_id, turn, context, targets in ordered.iter_rows():
        before = previous.get(conv_id)
        named = before[1] if before is not None and before[0] == turn - 1 else turn == 1 and len(context) > 0
        bucket = min(max(len(set(context)), 1), CONTEXT_MOVIE_BUCKETS) - 1
        state[sample_id] = bucket * 2 + int(named)
        previous[conv_id] = (turn, len(targets) > 0)
    return [state[sample_id] for sample_id in samples["sample_id"]]


def repeat_scores(context_items: Sequence[Sequence[int]], n_items: int) -> np.ndarray:
    """The `repeat` baseline, [len(context_items), n_items]: each row's context movies (most recent first) score
    m, m-1, ..., 1 and every other movie 0, so those tie below them and a target outside the context ranks last."""
    lengths = np.array([len(items) for items in context_items], dtype=np.int64)
    scores = np.zeros((len(context_items), n_items), dtype=np.float32)
    if lengths.sum():
        row = np.repeat(np.arange(len(lengths)), lengths)
        position = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        item = np.concatenate([np.asarray(items, dtype=np.int64) for items in context_items if len(items)])
        scores[row, item] = (lengths[row] - position).astype(np.float32)
    return scores


def repeat_popularity_scores(context_items: Sequence[Sequence[int]], popularity: np.ndarray) -> np.ndarray:
    """The `repeat_popularity` baseline: the context's movies most recent first, above every other movie, which
    keeps its train popularity score (popularity ties stay ties)."""
    popularity = np.asarray(popularity, dtype=np.float32)
    repeat = repeat_scores(context_items, len(popularity))
    return np.where(repeat > 0, popularity.max() + repeat, popularity[None, :]).astype(np.float32)


def naive_scorers(
    recent: Sequence[Sequence[int]], popularity: np.ndarray
) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The models that need no training, as functions of sample rows -> scores [rows, n_items]: popularity, repeat
    and repeat_popularity; recent[row] = that sample's context movies, most recent first (context_items_by_recency)."""
    popularity = np.asarray(popularity)
    return {
        "popularity": lambda rows: np.broadcast_to(popularity, (len(rows), len(popularity))),
        "repeat": lambda rows: repeat_scores([recent[r] for r in rows], len(popularity)),
        "repeat_popularity": lambda rows: repeat_popularity_scores([recent[r] for r in rows], popularity),
    }


# ---------------------------------------------------------------- metrics


def metric_values(ranks: np.ndarray) -> np.ndarray:
    """Per-row value of each metric in METRICS (one relevant item per row), shape [n_rows, len(METRICS)]."""
    ranks = np.asarray(ranks, dtype=np.float64)
    top10 = ranks <= 10
    return np.stack(
        [
            ranks <= 1,
            top10,
            ranks <= 50,
            np.where(top10, 1.0 / np.log2(ranks + 1.0), 0.0),
            np.where(top10, 1.0 / ranks, 0.0),
        ],
        axis=1,
    ).astype(np.float64)


def metrics_from_ranks(ranks: np.ndarray) -> dict:
    """Recall@1/10/50, NDCG@10 (1/log2(rank+1) within the top 10), MRR@10 and n; metrics are None when n is 0."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return {**{m: None for m in METRICS}, "n": 0}
    means = metric_values(ranks).mean(axis=0)
    return {**{m: float(v) for m, v in zip(METRICS, means)}, "n": int(ranks.size)}


def recall_curve(ranks: np.ndarray, max_k: int = 50) -> list[float]:
    """Recall@k for k = 1..max_k (the evaluation plot); empty when there are no rows."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return []
    counts = np.bincount(np.clip(ranks, 1, max_k + 1).astype(np.int64), minlength=max_k + 2)[1 : max_k + 1]
    return (np.cumsum(counts) / ranks.size).tolist()


def _bootstrap_stats(rows: pl.DataFrame, values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Each metric's mean over `n_resamples` resamples of conversations: [n_resamples, n_metrics].

    Rows of one conversation are correlated (the same movies recur turn after turn), so conversations, not rows,
    are the unit. A resample is a multinomial count per conversation; its metric is sum(count * conv_sum) /
    sum(count * conv_rows), so the whole bootstrap is two matrix products. The same seed draws the same
    resamples, which makes two models' statistics paired.
    """
    _, conv = np.unique(rows["conv_id"].to_numpy(), return_inverse=True)
    n_conv = int(conv.max()) + 1
    sums = np.zeros((n_conv, values.shape[1]))
    np.add.at(sums, conv, values)
    counts = np.bincount(conv, minlength=n_conv).astype(np.float64)
    weights = resample_weights(n_conv, n_resamples, seed)
    return (weights @ sums) / (weights @ counts)[:, None]


def resample_weights(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """How many times each of n units is drawn in each bootstrap resample: [n_resamples, n]. The same seed draws
    the same resamples, so statistics of two models computed with them are paired."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(np.float64)


def percentiles(stats: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    tail = (1.0 - level) / 2.0 * 100.0
    return np.percentile(stats, [tail, 100.0 - tail], axis=0)


def bootstrap_ci(
    rows: pl.DataFrame, ranks: np.ndarray | None = None, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, list[float]]:
    """Percentile interval of each metric, resampling conversations with replacement (cluster bootstrap).
    `ranks` defaults to rows["rank"]."""
    ranks = rows["rank"].to_numpy() if ranks is None else np.asarray(ranks)
    if len(ranks) != rows.height:
        raise EvaluationError(f"{len(ranks)} ranks for {rows.height} rows")
    if len(ranks) == 0:
        return {m: [None, None] for m in METRICS}
    low, high = percentiles(_bootstrap_stats(rows, metric_values(ranks), n_resamples, seed), level)
    return {m: [float(lo), float(hi)] for m, lo, hi in zip(METRICS, low, high)}


def paired_difference(
    rows: pl.DataFrame,
    ranks_a: np.ndarray,
    ranks_b: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict]:
    """Model a minus model b on the same rows: the difference of each metric and its paired cluster-bootstrap
    interval (both models scored on the same resampled conversations). An interval above 0 means a beats b."""
    ranks_a, ranks_b = np.asarray(ranks_a), np.asarray(ranks_b)
    if not len(ranks_a) == len(ranks_b) == rows.height:
        raise EvaluationError(f"{len(ranks_a)} and {len(ranks_b)} ranks for {rows.height} rows")
    return paired_values_difference(
        rows, metric_values(ranks_a) - metric_values(ranks_b), n_resamples=n_resamples, seed=seed, level=level
    )


def paired_values_difference(
    rows: pl.DataFrame, differences: np.ndarray, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, dict]:
    """The mean of per-row metric differences [n_rows, len(METRICS)] (e.g. averaged over several seeds' runs) with
    its cluster-bootstrap interval over conversations."""
    if rows.height == 0:
        return {m: {"difference": None, "ci95": [None, None]} for m in METRICS}
    low, high = percentiles(_bootstrap_stats(rows, differences, n_resamples, seed), level)
    return {
        m: {"difference": float(d), "ci95": [float(lo), float(hi)]}
        for m, d, lo, hi in zip(METRICS, differences.mean(axis=0), low, high)
    }


def seed_level_difference(
    rows: pl.DataFrame, per_seed: list[np.ndarray], *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, dict]:
    """a minus b with training variance in the interval: per_seed holds each seed's per-row differences
    [n_rows, len(METRICS)] (both arms trained with that seed, scored on the same rows).

    difference: the mean over seeds; per_seed: each seed's mean; ci95: difference ± t(n-1) x sqrt(s^2/n + v), with
    s^2 the variance of the per-seed means (training variance: the seeds are scored on the same test rows) and v the
    cluster-bootstrap variance over test conversations of the seed-averaged rows (which test set was drawn). None
    with fewer than two seeds."""
    if rows.height == 0 or not per_seed:
        return {m: {"difference": None, "per_seed": [], "ci95": [None, None]} for m in METRICS}
    means = np.array([values.mean(axis=0) for values in per_seed])  # [seeds, metrics]
    averaged = np.mean(per_seed, axis=0)
    conversation_variance = _bootstrap_stats(rows, averaged, n_resamples, seed).var(axis=0, ddof=1)
    n = len(per_seed)
    out = {}
    for i, metric in enumerate(METRICS):
        difference = float(means[:, i].mean())
        interval = [None, None]
        if n >= 2:
            half = stats.t.ppf(0.5 + level / 2, n - 1) * np.sqrt(means[:, i].var(ddof=1) / n + conversation_variance[i])
            interval = [difference - float(half), difference + float(half)]
        out[metric] = {"difference": difference, "per_seed": [float(v) for v in means[:, i]], "ci95": interval}
    return out


def repeat_share(rows: pl.DataFrame, ranks: np.ndarray) -> dict[str, float | None]:
    """Of the hits at k, the share whose target was already in the context (None when there is no hit).

    A high share means the model's recall mostly re-ranks movies already mentioned, which `all_turns` rewards.
    """
    ranks = np.asarray(ranks)
    repeat = rows["in_context"].to_numpy().astype(bool)
    shares = {}
    for k in REPEAT_KS:
        hits = ranks <= k
        shares[f"recall@{k}"] = float((hits & repeat).sum() / hits.sum()) if hits.any() else None
    return shares


def by_context(rows: pl.DataFrame, ranks: np.ndarray) -> dict[str, dict]:
    """Metrics (with n) of the rows whose context has linked entities and of those whose context has none: a model
    that reads the KG can only use it on the first kind."""
    has_entities = rows["has_entities"].to_numpy().astype(bool)
    ranks = np.asarray(ranks)
    return {
        "with_entities": metrics_from_ranks(ranks[has_entities]),
        "without_entities": metrics_from_ranks(ranks[~has_entities]),
    }


def context_size_masks(rows: pl.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    """{dimension: {bin label: boolean mask over the rows}} (CONTEXT_SIZES; a row's turn_idx is its earlier turns)."""
    size = {"earlier_turns": rows["turn_idx"].to_numpy(), "context_entities": rows["context_entities"].to_numpy()}
    return {
        dimension: {
            label: (size[dimension] >= low) & (True if high is None else size[dimension] <= high)
            for label, low, high in bins
        }
        for dimension, bins in CONTEXT_SIZES.items()
    }


def by_context_size(rows: pl.DataFrame, ranks: np.ndarray) -> dict[str, dict[str, dict]]:
    """Metrics (with n) of the rows in each bin of how much context they have (CONTEXT_SIZES)."""
    ranks = np.asarray(ranks)
    return {
        dimension: {label: metrics_from_ranks(ranks[mask]) for label, mask in bins.items()}
        for dimension, bins in context_size_masks(rows).items()
    }


def evaluate_model(
    rows: pl.DataFrame,
    ranks: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    compare_with: dict[str, np.ndarray] | None = None,
    masked_ranks: np.ndarray | None = None,
    compare_masked: dict[str, np.ndarray] | None = None,
) -> dict:
    """{protocol: metrics + n + ci95 + repeat_share + by_context + recall_curve (recall@1..50)} for one model; the
    caller writes {model: this} to
    reports/rec.json.

    masked_ranks (ranks_and_masked_ranks' second array) score the MASKED_PROTOCOLS, `ranks` every other one; without
    masked_ranks the masked protocols are left out. compare_with {name: ranks of another model on the same rows}
    adds margin_over[name]: this model minus that one, with a paired bootstrap interval; under a masked protocol
    the pair is masked_ranks and compare_masked[name], so both sides are ranked the same way.
    """
    ranks = np.asarray(ranks)
    for name, other in {"ranks": ranks, "masked_ranks": masked_ranks}.items():
        if other is not None and len(other) != rows.height:
            raise EvaluationError(f"{len(other)} {name} for {rows.height} rows")
    if compare_with and masked_ranks is not None and set(compare_masked or {}) != set(compare_with):
        raise EvaluationError("compare_masked must hold the masked ranks of every model in compare_with")
    results = {}
    for protocol in PROTOCOLS:
        masked = protocol in MASKED_PROTOCOLS
        if masked and masked_ranks is None:
            continue
        protocol_ranks, others = (np.asarray(masked_ranks), compare_masked) if masked else (ranks, compare_with)
        keep = protocol_rows(rows, protocol)
        kept_rows, kept_ranks = rows.filter(pl.Series(keep)), protocol_ranks[keep]
        results[protocol] = {
            **metrics_from_ranks(kept_ranks),
            "ci95": bootstrap_ci(kept_rows, kept_ranks, n_resamples=n_resamples, seed=seed, level=0.95),
            "repeat_share": repeat_share(kept_rows, kept_ranks),
            "by_context": by_context(kept_rows, kept_ranks),
            "by_context_size": by_context_size(kept_rows, kept_ranks),
            "recall_curve": recall_curve(kept_ranks),
        }
        if compare_with:
            results[protocol]["margin_over"] = {
                name: paired_difference(
                    kept_rows, kept_ranks, np.asarray(other)[keep], n_resamples=n_resamples, seed=seed
                )
                for name, other in others.items()
            }
    return results


# ---------------------------------------------------------------- report

TABLE_COLUMNS = (
    ("R@1", "recall@1"),
    ("R@10", "recall@10"),
    ("R@50", "recall@50"),
    ("NDCG@10", "ndcg@10"),
    ("MRR@10", "mrr@10"),
)


def _cell(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "–"
    interval = (metrics.get("ci95") or {}).get(key)
    if interval and interval[0] is not None:
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
    return f"{value:.3f}"


def markdown_table(results: dict[str, dict[str, dict]], paper: dict[str, tuple[str, dict]] | None = None) -> str:
    """One markdown table per protocol, models as rows, 'value [95% CI]' cells; the paper's rows (PAPER_TABLE1 or
    PAPER_TABLE4: our model name -> (paper label, numbers)) under the protocol the paper used."""
    protocols = list(dict.fromkeys(p for by_protocol in results.values() for p in by_protocol))
    header = "| model | " + " | ".join(name for name, _ in TABLE_COLUMNS) + " | n |"
    rule = "|---|" + "---|" * (len(TABLE_COLUMNS) + 1)
    parts = []
    for protocol in protocols:
        lines = [f"### {protocol}", "", header, rule]
        for model, by_protocol in results.items():
            if protocol in by_protocol:
                metrics = by_protocol[protocol]
                cells = [_cell(metrics, key) for _, key in TABLE_COLUMNS]
                lines.append(f"| {model} | " + " | ".join(cells) + f" | {metrics.get('n', '–')} |")
        if paper and protocol == PAPER_PROTOCOL:
            for model, (label, metrics) in paper.items():
                if model in results:
                    cells = [_cell(metrics, key) for _, key in TABLE_COLUMNS]
                    lines.append(f"| paper: {label} | " + " | ".join(cells) + " | – |")
            lines += ["", f"Paper rows: {PAPER_NOTE}."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _signed(difference: dict) -> str:
    lo, hi = difference["ci95"]
    if difference["difference"] is None:
        return "–"
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "tie"
    return f"{difference['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}"


def margins_table(results: dict, model: str = "c2crs", others: tuple[str, ...] = BASELINES) -> str:
    """`model` minus each of `others`, per protocol: R@10, R@50 and NDCG@10 differences with paired 95 % intervals;
    'better' / 'worse' when the interval excludes 0, else 'tie'."""
    lines = ["| protocol | C2-CRS minus | R@10 | R@50 | NDCG@10 |", "|---|---|---|---|---|"]
    for protocol, metrics in results.get(model, {}).items():
        for other, difference in metrics.get("margin_over", {}).items():
            if other in others:
                lines.append(
                    f"| {protocol} | {other} | "
                    + " | ".join(_signed(difference[m]) for m in ("recall@10", "recall@50", "ndcg@10"))
                    + " |"
                )
    return "\n".join(lines) + "\n"


def ablation_table(results: dict) -> str:
    """The paper's Table 4: each variant's R@1/10/50 under the paper's protocol with the paper's numbers beside
    them, and our recommender_turns numbers. Variants the paper does not have get no paper cells."""
    keys = ("recall@1", "recall@10", "recall@50")
    lines = [
        "| variant | model | R@1 | R@10 | R@50 | paper R@1 | paper R@10 | paper R@50 | C2-CRS minus this, R@50 | "
        "recommender turns R@10 | recommender turns R@50 |",
        "|---|---|" + "---|" * 9,
    ]
    margins = results.get("c2crs", {}).get(PAPER_PROTOCOL, {}).get("margin_over", {})
    names = [m for m in PAPER_TABLE4 if m in results] + [
        m for m in results if m.startswith(ABLATION_PREFIX) and m not in PAPER_TABLE4
    ]
    for model in names:
        label, paper = PAPER_TABLE4.get(model, (model.removeprefix(ABLATION_PREFIX), {}))
        ours, other = results[model].get(PAPER_PROTOCOL, {}), results[model].get("recommender_turns", {})
        margin = _signed(margins[model]["recall@50"]) if model in margins else "–"
        cells = (
            [_cell(ours, k) for k in keys]
            + [_cell(paper, k) for k in keys]
            + [margin]
            + [_cell(other, k) for k in ("recall@10", "recall@50")]
        )
        lines.append(f"| {label} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CONTEXT_PROTOCOLS = ("all_turns", "new_items_masked")


def by_context_table(results: dict, protocols: tuple[str, ...] = CONTEXT_PROTOCOLS) -> str:
    """R@10 and R@50 of each model on samples whose context has linked entities and on those whose context has
    none, per protocol (point values: a split of the rows above, no intervals)."""
    lines = [
        "| protocol | model | R@10 with entities | R@50 with entities | n with | R@10 without | R@50 without | "
        "n without |",
        "|---|---|" + "---|" * 6,
    ]
    for protocol in protocols:
        for model, by_protocol in results.items():
            split = by_protocol.get(protocol, {}).get("by_context")
            if split:
                cells = [
                    _cell(split[part], key) if key != "n" else str(split[part]["n"])
                    for part in ("with_entities", "without_entities")
                    for key in ("recall@10", "recall@50", "n")
                ]
                lines.append(f"| {protocol} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recommendation_report(results: dict, setting: str) -> str:
    """reports/rec.md: the protocol, the setting next to the paper's, Table 1 with the naive baselines and margins,
    recall by context, Table 4."""
    main = {m: results[m] for m in (*BASELINES, "c2crs", REPEAT_CHOICE) if m in results}
    return "\n".join(
        [
            "# Recommendation on the ReDial test split",
            "",
            "Protocol: every ground-truth movie mention of a scored turn is one sample (the first turn has no "
            "context and "
            "is not scored). all_turns scores seeker and recommender turns (the C2-CRS code and Table 1), "
            "recommender_turns only the recommender's (CRSLab's KGSF and most later papers); both rank each target "
            "among all 6,924 ReDial movies and keep targets already mentioned in the context. new_items (Kostric and "
            "Balog's re-evaluation of ReDial CRS) keeps only the recommender turns' targets that were not mentioned "
            "before in the conversation, with the same ranks, so movies already mentioned still compete with the "
            "target; "
            "new_items_masked scores the same samples with the context's movies removed from the ranking, so a target "
            "ranks only among movies not mentioned yet. repeat ranks the context's movies, most recent mention first, "
            "above all other movies (tied, which counts against the target); repeat_popularity ranks the rest by train "
            "popularity. Neither is trained: what they score under all_turns and recommender_turns is what repeats "
            "alone buy, and repeat scores 0 under new_items by construction. 95 % intervals: bootstrap over test "
            "conversations.",
            "",
            f"Setting: {setting}",
            "",
            "## C2-CRS and the baselines (the paper's Table 1)",
            "",
            markdown_table(main, PAPER_TABLE1),
            "## Margins of C2-CRS",
            "",
            "C2-CRS minus each model on the same samples, ranked the same way (masked ranks for both under "
            "new_items_masked); 95 % paired bootstrap intervals over test conversations.",
            "",
            margins_table(results),
            "## Recall by context",
            "",
            "Samples whose context has at least one linked entity (a movie or another KG entity) and samples whose "
            "context has none; a model that reads the KG can only use it on the first kind.",
            "",
            by_context_table(main),
            "## Ablations (the paper's Table 4)",
            "",
            f"Ours under {PAPER_PROTOCOL} with 95 % intervals, the paper's numbers beside them ({PAPER_NOTE}), "
            "and ours under recommender_turns. w/o Coarse-Fine is the KBRD-style baseline.",
            "",
            ablation_table(results),
        ]
    )
