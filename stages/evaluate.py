"""Recommendation evaluation: one row per ground-truth mention, ranks over all items, metrics with cluster CIs.

The protocol follows DESIGN.md 'Evaluation protocol': every target item of every scored sample (turns after the
first) is one evaluation row, ranked against all n_items movies; nothing already mentioned is excluded, and no
mention is ever dropped, so two models are always scored on the same rows. Two protocols are reported side by
side (`all_turns`, what C2-CRS's Table 1 used, and `recommender_turns`, what CRSLab and later papers use), each
with a conversation-level bootstrap interval and the share of hits that were repeats of a movie in the context.
"""

from collections.abc import Callable, Iterable

import numpy as np
import polars as pl

METRICS = ("recall@1", "recall@10", "recall@50", "ndcg@10", "mrr@10")
REPEAT_KS = (10, 50)
ROW_COLUMNS = ("sample_id", "conv_id", "turn_idx", "role", "target_item", "in_context")

# Protocol name -> boolean row mask. all_turns keeps seeker turns too (C2-CRS code, paper Table 1).
PROTOCOLS: dict[str, Callable[[pl.DataFrame], np.ndarray]] = {
    "all_turns": lambda rows: np.ones(rows.height, dtype=bool),
    "recommender_turns": lambda rows: (rows["role"] == "recommender").to_numpy(),
}

# The paper's numbers (Table 1 and the Table 4 ablations). They come from training on the FULL ReDial train split
# and scoring all turns (seeker turns included), so they belong next to `all_turns`; this workplace's mirror holds
# only about a quarter of the train split, so a gap is expected.
PAPER_REC = {
    "protocol": "all_turns",
    "note": "Zhou et al., WSDM 2022 (Tables 1 and 4): full ReDial train split, all turns scored",
    "rows": {
        "C2-CRS": {"recall@1": 0.053, "recall@10": 0.233, "recall@50": 0.407},
        "C2-CRS w/o Coarse-Fine": {"recall@1": 0.031, "recall@10": 0.150, "recall@50": 0.336},
        "C2-CRS w/o Coarse": {"recall@1": 0.049, "recall@10": 0.220, "recall@50": 0.394},
        "C2-CRS w/o Fine": {"recall@1": 0.048, "recall@10": 0.221, "recall@50": 0.400},
        "C2-CRS Multi-task": {"recall@1": 0.052, "recall@10": 0.221, "recall@50": 0.404},
        "C2-CRS w/o CH": {"recall@1": 0.048, "recall@10": 0.223, "recall@50": 0.403},
        "C2-CRS w/o SD": {"recall@1": 0.051, "recall@10": 0.226, "recall@50": 0.403},
        "C2-CRS w/o UD": {"recall@1": 0.051, "recall@10": 0.222, "recall@50": 0.395},
    },
}


class EvaluationError(ValueError):
    """Scores that cannot be ranked (NaN, missing samples, wrong width); names what is wrong."""


# ---------------------------------------------------------------- rows


def expand_mentions(samples: pl.DataFrame) -> pl.DataFrame:
    """One row per (sample, ground-truth item), in sample order; in_context flags a repeat of a context movie.

    Samples without targets give no row; duplicate targets in one sample stay (a mention is never dropped).
    """
    return (samples.filter(pl.col("target_item_ids").list.len() > 0)
            .select("sample_id", "conv_id", "turn_idx", "role", "context_item_ids",
                    pl.col("target_item_ids").alias("target_item"))
            .explode("target_item")
            .with_columns(pl.col("context_item_ids").list.contains(pl.col("target_item")).alias("in_context"))
            .select(ROW_COLUMNS))


def protocol_rows(rows: pl.DataFrame, protocol: str) -> np.ndarray:
    """Boolean mask of the rows a protocol scores."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {protocol!r}")
    return PROTOCOLS[protocol](rows)


# ---------------------------------------------------------------- ranks


def rank_of_targets(scores: np.ndarray, sample_index: np.ndarray, target_items: np.ndarray,
                    chunk: int = 1024) -> np.ndarray:
    """1-based rank of each target among all items: the number of items scoring at least as high as it.

    Ties count against the target (pessimistic): a model that gives many items the same score (popularity: equal
    counts) cannot win recall from the tie, and one that scores every item alike ranks each target last. Rows
    are processed in chunks so only chunk x n_items floats are copied at a time.
    """
    sample_index = np.asarray(sample_index, dtype=np.int64)
    target_items = np.asarray(target_items, dtype=np.int64)
    if scores.ndim != 2:
        raise EvaluationError(f"scores must be [n_samples, n_items], got shape {scores.shape}")
    if target_items.size and (target_items.min() < 0 or target_items.max() >= scores.shape[1]):
        raise EvaluationError(f"target items must lie in 0..{scores.shape[1] - 1}")
    ranks = np.empty(len(target_items), dtype=np.int64)
    for start in range(0, len(target_items), chunk):
        block = scores[sample_index[start:start + chunk]]
        target_score = block[np.arange(len(block)), target_items[start:start + chunk]]
        if np.isnan(target_score).any():
            raise EvaluationError("a target item has a NaN score")
        ranks[start:start + chunk] = (block >= target_score[:, None]).sum(axis=1)
    return ranks


def ranks_from_score_blocks(blocks: Iterable[tuple[np.ndarray, np.ndarray]], rows: pl.DataFrame) -> np.ndarray:
    """Ranks for every row (aligned with `rows`) from (sample_ids, scores[len(sample_ids), n_items]) blocks.

    Lets a model score the test set a block at a time (e.g. 1024 x 6,924 float32, 28 MB) instead of holding the
    whole matrix. Every sample of `rows` must appear in exactly one block; extra samples are ignored.
    """
    row_samples = rows["sample_id"].to_numpy()
    targets = rows["target_item"].to_numpy()
    ranks = np.zeros(rows.height, dtype=np.int64)
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
        if (ranks[hit] != 0).any():
            raise EvaluationError("a sample appears in more than one score block")
        ranks[hit] = rank_of_targets(scores, order[position[hit]], targets[hit])
    if (ranks == 0).any():
        missing = np.unique(row_samples[ranks == 0])
        raise EvaluationError(f"{len(missing)} samples have no scores, e.g. sample_id {missing[:5].tolist()}")
    return ranks


# ---------------------------------------------------------------- metrics


def metric_values(ranks: np.ndarray) -> np.ndarray:
    """Per-row value of each metric in METRICS (one relevant item per row), shape [n_rows, len(METRICS)]."""
    ranks = np.asarray(ranks, dtype=np.float64)
    top10 = ranks <= 10
    return np.stack([ranks <= 1, top10, ranks <= 50,
                     np.where(top10, 1.0 / np.log2(ranks + 1.0), 0.0),
                     np.where(top10, 1.0 / ranks, 0.0)], axis=1).astype(np.float64)


def metrics_from_ranks(ranks: np.ndarray) -> dict:
    """Recall@1/10/50, NDCG@10 (1/log2(rank+1) within the top 10), MRR@10 and n; metrics are None when n is 0."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return {**{m: None for m in METRICS}, "n": 0}
    means = metric_values(ranks).mean(axis=0)
    return {**{m: float(v) for m, v in zip(METRICS, means)}, "n": int(ranks.size)}


def bootstrap_ci(rows: pl.DataFrame, ranks: np.ndarray | None = None, *, n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float]]:
    """Percentile interval of each metric, resampling conversations with replacement (cluster bootstrap).

    Rows of one conversation are correlated (the same movies recur turn after turn), so conversations, not rows,
    are the unit. A resample is a multinomial count per conversation; its metric is sum(count * conv_sum) /
    sum(count * conv_rows), so the whole bootstrap is two matrix products. `ranks` defaults to rows["rank"].
    """
    ranks = rows["rank"].to_numpy() if ranks is None else np.asarray(ranks)
    if len(ranks) != rows.height:
        raise EvaluationError(f"{len(ranks)} ranks for {rows.height} rows")
    if len(ranks) == 0:
        return {m: [None, None] for m in METRICS}
    _, conv = np.unique(rows["conv_id"].to_numpy(), return_inverse=True)
    n_conv = int(conv.max()) + 1
    sums = np.zeros((n_conv, len(METRICS)))
    np.add.at(sums, conv, metric_values(ranks))
    counts = np.bincount(conv, minlength=n_conv).astype(np.float64)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_conv, np.full(n_conv, 1.0 / n_conv), size=n_resamples).astype(np.float64)
    stats = (weights @ sums) / (weights @ counts)[:, None]
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(stats, [tail, 100.0 - tail], axis=0)
    return {m: [float(lo), float(hi)] for m, lo, hi in zip(METRICS, low, high)}


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


def evaluate_model(rows: pl.DataFrame, ranks: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> dict:
    """{protocol: metrics + n + ci95 + repeat_share} for one model; the caller writes {model: this} to rec.json."""
    ranks = np.asarray(ranks)
    if len(ranks) != rows.height:
        raise EvaluationError(f"{len(ranks)} ranks for {rows.height} rows")
    results = {}
    for protocol in PROTOCOLS:
        keep = protocol_rows(rows, protocol)
        kept_rows, kept_ranks = rows.filter(pl.Series(keep)), ranks[keep]
        results[protocol] = {
            **metrics_from_ranks(kept_ranks),
            "ci95": bootstrap_ci(kept_rows, kept_ranks, n_resamples=n_resamples, seed=seed, level=0.95),
            "repeat_share": repeat_share(kept_rows, kept_ranks),
        }
    return results


# ---------------------------------------------------------------- report

TABLE_COLUMNS = (("R@1", "recall@1"), ("R@10", "recall@10"), ("R@50", "recall@50"), ("NDCG@10", "ndcg@10"),
                 ("MRR@10", "mrr@10"))


def _cell(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "–"
    interval = (metrics.get("ci95") or {}).get(key)
    if interval and interval[0] is not None:
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
    return f"{value:.3f}"


def markdown_table(results: dict[str, dict[str, dict]], paper: dict | None = None) -> str:
    """One markdown table per protocol, models as rows, 'value [95% CI]' cells; paper rows under its protocol."""
    protocols = list(dict.fromkeys([p for by_protocol in results.values() for p in by_protocol]
                                   + ([paper["protocol"]] if paper else [])))
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
        if paper and paper["protocol"] == protocol:
            for model, metrics in paper["rows"].items():
                cells = [_cell(metrics, key) for _, key in TABLE_COLUMNS]
                lines.append(f"| paper: {model} | " + " | ".join(cells) + " | – |")
            lines += ["", f"Paper rows: {paper['note']}."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
