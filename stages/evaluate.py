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

# The paper's numbers (Tables 1 and 4, ReDial), keyed by our model names in metrics/rec.json. They come from
# training on the FULL ReDial train split and scoring all turns (seeker turns included), so they belong next to
# `all_turns`; this workplace's mirror holds only about a quarter of the train split, so a gap is expected.
PAPER_PROTOCOL = "all_turns"
PAPER_NOTE = "Zhou et al., WSDM 2022, Tables 1 and 4: full ReDial train split, reference sizes and epochs, all turns"
PAPER_TABLE1 = {
    "popularity": ("Popularity", {"recall@1": 0.011, "recall@10": 0.054, "recall@50": 0.183}),
    "textcnn": ("TextCNN", {"recall@1": 0.013, "recall@10": 0.068, "recall@50": 0.191}),
    "kbrd": ("KBRD", {"recall@1": 0.031, "recall@10": 0.150, "recall@50": 0.336}),
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
BASELINES = ("popularity", "textcnn", "kbrd")


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
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_conv, np.full(n_conv, 1.0 / n_conv), size=n_resamples).astype(np.float64)
    return (weights @ sums) / (weights @ counts)[:, None]


def _percentiles(stats: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    tail = (1.0 - level) / 2.0 * 100.0
    return np.percentile(stats, [tail, 100.0 - tail], axis=0)


def bootstrap_ci(rows: pl.DataFrame, ranks: np.ndarray | None = None, *, n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float]]:
    """Percentile interval of each metric, resampling conversations with replacement (cluster bootstrap).
    `ranks` defaults to rows["rank"]."""
    ranks = rows["rank"].to_numpy() if ranks is None else np.asarray(ranks)
    if len(ranks) != rows.height:
        raise EvaluationError(f"{len(ranks)} ranks for {rows.height} rows")
    if len(ranks) == 0:
        return {m: [None, None] for m in METRICS}
    low, high = _percentiles(_bootstrap_stats(rows, metric_values(ranks), n_resamples, seed), level)
    return {m: [float(lo), float(hi)] for m, lo, hi in zip(METRICS, low, high)}


def paired_difference(rows: pl.DataFrame, ranks_a: np.ndarray, ranks_b: np.ndarray, *, n_resamples: int = 1000,
                      seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """Model a minus model b on the same rows: the difference of each metric and its paired cluster-bootstrap
    interval (both models scored on the same resampled conversations). An interval above 0 means a beats b."""
    ranks_a, ranks_b = np.asarray(ranks_a), np.asarray(ranks_b)
    if not len(ranks_a) == len(ranks_b) == rows.height:
        raise EvaluationError(f"{len(ranks_a)} and {len(ranks_b)} ranks for {rows.height} rows")
    if rows.height == 0:
        return {m: {"difference": None, "ci95": [None, None]} for m in METRICS}
    values = metric_values(ranks_a) - metric_values(ranks_b)
    low, high = _percentiles(_bootstrap_stats(rows, values, n_resamples, seed), level)
    return {m: {"difference": float(d), "ci95": [float(lo), float(hi)]}
            for m, d, lo, hi in zip(METRICS, values.mean(axis=0), low, high)}


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


def evaluate_model(rows: pl.DataFrame, ranks: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                   compare_with: dict[str, np.ndarray] | None = None) -> dict:
    """{protocol: metrics + n + ci95 + repeat_share} for one model; the caller writes {model: this} to rec.json.

    compare_with {name: ranks of another model on the same rows} adds margin_over[name]: this model minus that one,
    with a paired bootstrap interval.
    """
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
        if compare_with:
            results[protocol]["margin_over"] = {
                name: paired_difference(kept_rows, kept_ranks, np.asarray(other)[keep], n_resamples=n_resamples,
                                        seed=seed)
                for name, other in compare_with.items()}
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
                lines.append(f"| {protocol} | {other} | " + " | ".join(
                    _signed(difference[m]) for m in ("recall@10", "recall@50", "ndcg@10")) + " |")
    return "\n".join(lines) + "\n"


def ablation_table(results: dict) -> str:
    """The paper's Table 4: each variant's R@1/10/50 under the paper's protocol with the paper's numbers beside
    them, and our recommender_turns numbers. Variants the paper does not have get no paper cells."""
    keys = ("recall@1", "recall@10", "recall@50")
    lines = ["| variant | model | R@1 | R@10 | R@50 | paper R@1 | paper R@10 | paper R@50 | C2-CRS minus this, R@50 | "
             "recommender turns R@10 | recommender turns R@50 |", "|---|---|" + "---|" * 9]
    margins = results.get("c2crs", {}).get(PAPER_PROTOCOL, {}).get("margin_over", {})
    names = [m for m in PAPER_TABLE4 if m in results] + [
        m for m in results if m.startswith(ABLATION_PREFIX) and m not in PAPER_TABLE4]
    for model in names:
        label, paper = PAPER_TABLE4.get(model, (model.removeprefix(ABLATION_PREFIX), {}))
        ours, other = results[model].get(PAPER_PROTOCOL, {}), results[model].get("recommender_turns", {})
        margin = _signed(margins[model]["recall@50"]) if model in margins else "–"
        cells = ([_cell(ours, k) for k in keys] + [_cell(paper, k) for k in keys] + [margin]
                 + [_cell(other, k) for k in ("recall@10", "recall@50")])
        lines.append(f"| {label} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recommendation_report(results: dict, setting: str) -> str:
    """reports/rec.md: the protocol, the setting next to the paper's, Table 1 with margins, Table 4."""
    main = {m: results[m] for m in (*BASELINES, "c2crs") if m in results}
    return "\n".join([
        "# Recommendation on the ReDial test split",
        "",
        "Protocol: every ground-truth movie mention of a scored turn is one sample (the first turn has no context and "
        "is not scored); ranking over all 6,924 ReDial movies; nothing excluded. all_turns scores seeker and "
        "recommender turns (the C2-CRS code and Table 1), recommender_turns only the recommender's (CRSLab's KGSF "
        "and most later papers). 95 % intervals: bootstrap over test conversations.",
        "",
        f"Setting: {setting}",
        "",
        "## C2-CRS and the baselines (the paper's Table 1)",
        "",
        markdown_table(main, PAPER_TABLE1),
        "## Margins of C2-CRS",
        "",
        "C2-CRS minus each model on the same samples; 95 % paired bootstrap intervals over test conversations.",
        "",
        margins_table(results),
        "## Ablations (the paper's Table 4)",
        "",
        f"Ours under {PAPER_PROTOCOL} with 95 % intervals, the paper's numbers beside them ({PAPER_NOTE}), "
        "and ours under recommender_turns. w/o Coarse-Fine is the KBRD-style baseline.",
        "",
        ablation_table(results),
    ])
