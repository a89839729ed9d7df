"""Recommendation evaluation on hand-made rankings: metrics, ties, masking, blocks, mention rows, protocols, naive
baselines, bootstrap, the report."""

import math
import time

import numpy as np
import polars as pl
import pytest

from stages.evaluation import rec_metrics
from stages.triples import SAMPLE_SCHEMA


def samples_table(rows):
    """rows: (sample_id, conv_id, turn_idx, role, context_item_ids, target_item_ids[, context_entity_ids])."""
    return pl.DataFrame(
        [
            (sid, conv, turn, role, "test", [], entities[0] if entities else [], ctx, targets, [])
            for sid, conv, turn, role, ctx, targets, *entities in rows
        ],
        schema=SAMPLE_SCHEMA,
        orient="row",
    )


SAMPLES = samples_table(
    [
        (0, 1, 1, "recommender", [3], [5, 3], [3, 40]),  # two targets, the second a repeat of the context
        (1, 1, 2, "seeker", [3, 5], []),  # no target: no row
        (2, 1, 3, "recommender", [3, 5], [7]),
        (3, 2, 1, "seeker", [], [7]),
    ]
)


def test_metrics_from_ranks_by_hand():
    got = rec_metrics.metrics_from_ranks(np.array([1, 3, 10, 11, 60]))
    assert got["n"] == 5
    assert got["recall@1"] == pytest.approx(1 / 5)
    assert got["recall@10"] == pytest.approx(3 / 5)
    assert got["recall@50"] == pytest.approx(4 / 5)
    assert got["ndcg@10"] == pytest.approx((1 + 1 / 2 + 1 / math.log2(11)) / 5)  # 1/log2(2), 1/log2(4), 1/log2(11)
    assert got["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 10) / 5)
    assert set(got) == {"recall@1", "recall@10", "recall@50", "ndcg@10", "mrr@10", "n"}


def test_metrics_of_nothing_are_none():
    assert rec_metrics.metrics_from_ranks(np.array([], dtype=int)) == {**{m: None for m in rec_metrics.METRICS}, "n": 0}


def test_rank_counts_scores_at_least_as_high_so_ties_count_against_the_target():
    scores = np.array([[0.9, 0.5, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2]], dtype=np.float32)
    ranks = rec_metrics.rank_of_targets(scores, np.array([0, 0, 0, 1]), np.array([0, 1, 2, 3]))
    assert ranks.tolist() == [1, 3, 3, 4]


def test_rank_rejects_nan_and_out_of_range_targets():
    with pytest.raises(rec_metrics.EvaluationError):
        rec_metrics.rank_of_targets(np.array([[np.nan, 1.0]]), np.array([0]), np.array([0]))
    with pytest.raises(rec_metrics.EvaluationError):
        rec_metrics.rank_of_targets(np.array([[0.0, 1.0]]), np.array([0]), np.array([2]))


def test_ranks_from_blocks_equal_ranks_from_the_full_matrix():
    rng = np.random.default_rng(0)
    n_samples, n_items = 50, 30
    scores = rng.integers(0, 5, size=(n_samples, n_items)).astype(np.float32)  # many ties
    rows = pl.DataFrame(
        {"sample_id": np.repeat(np.arange(n_samples), 2), "target_item": rng.integers(0, n_items, size=2 * n_samples)}
    )
    full = rec_metrics.rank_of_targets(scores, rows["sample_id"].to_numpy(), rows["target_item"].to_numpy(), chunk=7)
    permutation = rng.permutation(n_samples)  # blocks in any order, sample ids not sorted inside a block
    blocks = [(permutation[i : i + 8], scores[permutation[i : i + 8]]) for i in range(0, n_samples, 8)]
    assert rec_metrics.ranks_and_masked_ranks(iter(blocks), rows, [[]] * rows.height)[0].tolist() == full.tolist()


def test_ranks_from_blocks_catch_missing_and_repeated_samples():
    rows = pl.DataFrame({"sample_id": [0, 1], "target_item": [0, 1]})
    scores = np.zeros((1, 3), dtype=np.float32)
    with pytest.raises(rec_metrics.EvaluationError, match="no scores"):
        rec_metrics.ranks_and_masked_ranks([(np.array([0]), scores)], rows, [[], []])
    with pytest.raises(rec_metrics.EvaluationError, match="more than one"):
        rec_metrics.ranks_and_masked_ranks([(np.array([0]), scores), (np.array([0]), scores)], rows, [[], []])


def test_expand_mentions_keeps_every_mention_and_flags_repeats():
    rows = rec_metrics.expand_mentions(SAMPLES)
    assert rows.columns == list(rec_metrics.ROW_COLUMNS)
    assert rows.select("sample_id", "target_item", "in_context", "has_entities").rows() == [
        (0, 5, False, True),
        (0, 3, True, True),
        (2, 7, False, False),
        (3, 7, False, False),
    ]
    assert rows["context_item_ids"].to_list() == [[3], [3], [3, 5], []]


def test_protocols_select_rows():
    rows = rec_metrics.expand_mentions(SAMPLES)
    assert rec_metrics.protocol_rows(rows, "all_turns").tolist() == [True] * 4
    assert rec_metrics.protocol_rows(rows, "recommender_turns").tolist() == [True, True, True, False]
    # new_items: recommender turns without the repeat (row 1) and without the seeker turn (row 3)
    assert rec_metrics.protocol_rows(rows, "new_items").tolist() == [True, False, True, False]
    assert rec_metrics.protocol_rows(rows, "new_items_masked").tolist() == [True, False, True, False]
    with pytest.raises(ValueError):
        rec_metrics.protocol_rows(rows, "seeker_only")


def random_rows(n_conv=200, seed=1):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 8, size=n_conv)
    conv = np.repeat(np.arange(n_conv), sizes)
    ranks = rng.integers(1, 100, size=len(conv))
    return pl.DataFrame({"conv_id": conv, "rank": ranks})


def test_bootstrap_interval_contains_the_point_and_is_deterministic():
    rows = random_rows()
    point = rec_metrics.metrics_from_ranks(rows["rank"].to_numpy())
    ci = rec_metrics.bootstrap_ci(rows, n_resamples=500, seed=3)
    for metric in rec_metrics.METRICS:
        low, high = ci[metric]
        assert low <= point[metric] <= high and low < high
    assert rec_metrics.bootstrap_ci(rows, n_resamples=500, seed=3) == ci
    assert rec_metrics.bootstrap_ci(rows, n_resamples=500, seed=4) != ci


def test_bootstrap_collapses_when_all_conversations_are_identical():
    rows = pl.DataFrame({"conv_id": [1, 1, 2, 2, 3, 3], "rank": [1, 20, 1, 20, 1, 20]})
    ci = rec_metrics.bootstrap_ci(rows, n_resamples=200, seed=0)
    point = rec_metrics.metrics_from_ranks(rows["rank"].to_numpy())
    for metric in rec_metrics.METRICS:
        assert ci[metric] == pytest.approx([point[metric], point[metric]])


def test_bootstrap_is_fast_at_test_split_size():
    rows = random_rows(n_conv=1342, seed=2)  # about 5,000 rows, the size of the ReDial test split
    start = time.perf_counter()
    rec_metrics.bootstrap_ci(rows, n_resamples=1000, seed=0)
    assert time.perf_counter() - start < 1.0


def test_repeat_share_by_hand():
    rows = pl.DataFrame({"in_context": [True, False, True, False, True]})
    ranks = np.array([1, 5, 20, 30, 100])
    # hits@10: rows 0 (repeat), 1 -> 1/2; hits@50: rows 0-3, repeats 0 and 2 -> 2/4
    assert rec_metrics.repeat_share(rows, ranks) == {"recall@10": 0.5, "recall@50": 0.5}
    assert rec_metrics.repeat_share(rows, np.array([99] * 5)) == {"recall@10": None, "recall@50": None}


def test_evaluate_model_reports_every_protocol():
    rows = rec_metrics.expand_mentions(SAMPLES)
    ranks = np.array([1, 2, 40, 5])
    result = rec_metrics.evaluate_model(rows, ranks, n_resamples=50, seed=0)
    assert set(result) == {"all_turns", "recommender_turns", "new_items"}  # no masked ranks: no masked protocol
    assert result["all_turns"]["n"] == 4 and result["recommender_turns"]["n"] == 3
    assert result["new_items"]["n"] == 2 and result["new_items"]["recall@1"] == pytest.approx(1 / 2)
    assert result["recommender_turns"]["recall@10"] == pytest.approx(2 / 3)
    assert result["all_turns"]["repeat_share"] == {"recall@10": pytest.approx(1 / 3), "recall@50": 0.25}
    assert set(result["all_turns"]["ci95"]) == set(rec_metrics.METRICS)


def test_markdown_table_lists_models_and_paper_rows():
    rows = rec_metrics.expand_mentions(SAMPLES)
    results = {
        "popularity": rec_metrics.evaluate_model(rows, np.array([1, 2, 40, 5]), n_resamples=20),
        "c2crs": rec_metrics.evaluate_model(rows, np.array([3, 1, 4, 1]), n_resamples=20),
    }
    table = rec_metrics.markdown_table(results, rec_metrics.PAPER_TABLE1)
    assert "### all_turns" in table and "### recommender_turns" in table
    assert "| popularity |" in table and "| c2crs |" in table
    assert "| paper: C2-CRS | 0.053 | 0.233 | 0.407 | – | – | – |" in table
    assert "paper: KBRD" not in table  # only the paper's rows of models in the results
    assert table.index("paper: C2-CRS") < table.index("### recommender_turns")  # paper scored all turns
    assert "[" in table.split("| popularity |")[1].splitlines()[0]  # cells carry the interval
    assert "paper" not in rec_metrics.markdown_table(results)


def test_paired_difference_by_hand():
    rows = rec_metrics.expand_mentions(SAMPLES)  # conversation 1: rows 0-2, conversation 2: row 3
    a, b = np.array([1, 20, 60, 5]), np.array([30, 20, 11, 70])
    got = rec_metrics.paired_difference(rows, a, b, n_resamples=200, seed=0)
    # recall@10: a hits rows 0 and 3, b none -> +2/4; recall@50: a 0,1,3 vs b 0,1,2 -> 0
    assert got["recall@10"]["difference"] == pytest.approx(0.5)
    assert got["recall@50"]["difference"] == pytest.approx(0.0)
    low, high = got["recall@10"]["ci95"]
    assert 0 < low <= 0.5 <= high <= 1  # every resample favours a on recall@10
    same = rec_metrics.paired_difference(rows, a, a, n_resamples=50)
    assert all(d["difference"] == 0 and d["ci95"] == [0.0, 0.0] for d in same.values())
    with pytest.raises(rec_metrics.EvaluationError):
        rec_metrics.paired_difference(rows, a, b[:3])


def test_the_report_has_table_1_margins_and_table_4():
    rows = rec_metrics.expand_mentions(SAMPLES)
    ranks = {
        "kbrd": np.array([30, 20, 11, 70]),
        "c2crs_wo_fine": np.array([2, 20, 60, 5]),
        "c2crs_mine": np.array([2, 2, 2, 2]),
    }
    results = {name: rec_metrics.evaluate_model(rows, r, n_resamples=50) for name, r in ranks.items()}
    results["c2crs"] = rec_metrics.evaluate_model(rows, np.array([1, 20, 60, 5]), n_resamples=50, compare_with=ranks)
    report = rec_metrics.recommendation_report(results, "a tiny hand-made setting.")
    assert "Setting: a tiny hand-made setting." in report
    margins = report.split("## Margins")[1].split("## Recall by context")[0]
    assert "| all_turns | kbrd | +0.500" in margins and "c2crs_wo_fine" not in margins
    table4 = report.split("## Ablations")[1]
    assert "| w/o Coarse-Fine | kbrd |" in table4 and "| w/o Fine | c2crs_wo_fine |" in table4
    assert "| 0.048 | 0.221 | 0.400 |" in table4.split("| w/o Fine |")[1].splitlines()[0]  # the paper's row
    assert "| mine | c2crs_mine |" in table4  # a variant the paper does not have: no paper cells
    assert table4.index("w/o Coarse-Fine") < table4.index("w/o Fine") < table4.index("| mine |")


# ---------------------------------------------------------------- masking, new_items, naive baselines, by context


def test_masked_rank_never_counts_an_excluded_item():
    scores = np.array([[0.9, 0.8, 0.5, 0.5, 0.1]], dtype=np.float32)
    index, target = np.zeros(4, dtype=int), np.full(4, 2)
    # Unmasked: items 0, 1, 2 and 3 (a tie) score at least 0.5 -> rank 4. Excluding item 0 (above) and item 3 (the
    # tie) leaves items 1 and 2 -> 2; item 4 scores below the target, so excluding it changes nothing; a duplicate
    # counts once; the target itself is never taken away.
    exclude = [[0, 3], [4], [0, 0], [2]]
    assert rec_metrics.rank_of_targets(scores, index, target).tolist() == [4, 4, 4, 4]
    assert rec_metrics.rank_of_targets(scores, index, target, exclude=exclude).tolist() == [2, 4, 3, 4]
    with pytest.raises(rec_metrics.EvaluationError):
        rec_metrics.rank_of_targets(scores, index[:1], target[:1], exclude=[[5]])


def test_masked_ranks_from_blocks_by_hand():
    rows = rec_metrics.expand_mentions(SAMPLES)  # targets 5, 3, 7, 7; contexts [3], [3], [3, 5], []
    scores = np.array(
        [
            [0, 0, 0, 9, 0, 8, 0, 1],  # sample 0: the context movie 3 above the target 5
            [0] * 8,  # sample 1 has no row
            [0, 0, 0, 9, 0, 9, 0, 5],  # sample 2: both context movies above the target 7
            [0, 0, 0, 0, 0, 0, 0, 1],
        ],
        dtype=np.float32,
    )
    blocks = [(np.array([2, 3]), scores[2:]), (np.array([0, 1]), scores[:2])]
    exclude = rows["context_item_ids"].to_list()
    ranks, masked = rec_metrics.ranks_and_masked_ranks(iter(blocks), rows, exclude)
    assert ranks.tolist() == [2, 1, 3, 1]
    assert masked.tolist() == [1, 1, 1, 1]  # row 1's target 3 is itself in the context: it still counts once
    unmasked, masked_by_blocks = rec_metrics.ranks_and_masked_ranks(iter(blocks), rows, rows["context_item_ids"])
    assert masked_by_blocks.tolist() == masked.tolist() and unmasked.tolist() == ranks.tolist()
    with pytest.raises(rec_metrics.EvaluationError, match="entries"):
        rec_metrics.ranks_and_masked_ranks(iter(blocks), rows, exclude[:3])


def test_masked_protocol_and_its_margins_use_the_masked_ranks():
    rows = rec_metrics.expand_mentions(SAMPLES)  # new_items rows: 0 and 2
    ranks, masked = np.array([20, 1, 60, 5]), np.array([1, 1, 9, 5])
    other, other_masked = np.array([1, 1, 1, 1]), np.array([30, 30, 30, 30])
    result = rec_metrics.evaluate_model(
        rows,
        ranks,
        n_resamples=50,
        compare_with={"kbrd": other},
        masked_ranks=masked,
        compare_masked={"kbrd": other_masked},
    )
    assert set(result) == set(rec_metrics.PROTOCOLS)
    assert result["new_items"]["recall@10"] == 0.0 and result["new_items_masked"]["recall@10"] == 1.0
    assert result["new_items_masked"]["n"] == result["new_items"]["n"] == 2
    assert result["all_turns"]["recall@1"] == pytest.approx(1 / 4)  # unmasked ranks outside the masked protocol
    assert result["new_items"]["margin_over"]["kbrd"]["recall@10"]["difference"] == pytest.approx(-1.0)
    assert result["new_items_masked"]["margin_over"]["kbrd"]["recall@10"]["difference"] == pytest.approx(1.0)
    with pytest.raises(rec_metrics.EvaluationError, match="compare_masked"):
        rec_metrics.evaluate_model(rows, ranks, n_resamples=10, compare_with={"kbrd": other}, masked_ranks=masked)


def test_context_items_by_recency_replays_later_mentions():
    samples = samples_table(
        [
            (0, 1, 1, "seeker", [10, 11], [12]),  # the first turn named 10 then 11
            (1, 1, 2, "recommender", [10, 11, 12], [10]),
            (2, 1, 3, "seeker", [10, 11, 12], []),
            (4, 2, 1, "seeker", [20], []),
        ]
    )
    # context_item_ids keeps first mentions (10, 11, 12); 10 named again in turn 2 is the most recent for sample 2
    assert rec_metrics.context_items_by_recency(samples) == [[11, 10], [12, 11, 10], [10, 12, 11], [20]]
    assert rec_metrics.context_items_by_recency(samples.reverse()) == [[20], [10, 12, 11], [12, 11, 10], [11, 10]]


def test_repeat_scores_by_hand():
    context = [[3, 1], [], [2]]  # most recent first
    assert rec_metrics.repeat_scores(context, 5).tolist() == [[0, 1, 0, 2, 0], [0] * 5, [0, 0, 1, 0, 0]]
    popularity = np.array([0.5, 2.0, 1.0, 0.0, 2.0], dtype=np.float32)
    got = rec_metrics.repeat_popularity_scores(context, popularity)
    assert got.tolist() == [[0.5, 3.0, 1.0, 4.0, 2.0], popularity.tolist(), [0.5, 2.0, 3.0, 0.0, 2.0]]
    # row 0: 3 then 1 (context), then 4 (popularity 2.0) above 2 above 0; row 2: 2, then the tie 1 = 4 counts
    ranks = rec_metrics.rank_of_targets(got, np.array([0, 0, 0, 0, 0, 2, 2]), np.array([3, 1, 4, 2, 0, 2, 4]))
    assert ranks.tolist() == [1, 2, 3, 4, 5, 1, 3]


REPEAT_SAMPLES = samples_table(
    [
        (0, 1, 1, "seeker", [10], [11]),
        (1, 1, 2, "recommender", [10, 11], [10, 12]),
        (2, 1, 3, "seeker", [10, 11, 12], [12]),
        (3, 1, 4, "recommender", [10, 11, 12], [10]),
        (4, 1, 5, "seeker", [10, 11, 12], [10]),
        (5, 2, 1, "recommender", [], [20]),
        (6, 2, 2, "seeker", [20], [20]),
    ]
)


def test_repeat_recall_at_1_is_the_share_of_targets_that_are_the_latest_context_movie():
    n_items = 60
    rows = rec_metrics.expand_mentions(REPEAT_SAMPLES)
    recent = rec_metrics.context_items_by_recency(REPEAT_SAMPLES)
    blocks = [(REPEAT_SAMPLES["sample_id"].to_numpy(), rec_metrics.repeat_scores(recent, n_items))]
    ranks, masked = rec_metrics.ranks_and_masked_ranks(blocks, rows, rows["context_item_ids"].to_list())
    # rows (sample, target): (0, 11) new, (1, 10) 2nd latest, (1, 12) new, (2, 12) latest, (3, 10) 2nd latest,
    # (4, 10) latest (named again in turn 4; by first mention it would be the oldest), (5, 20) new, (6, 20) latest
    assert ranks.tolist() == [60, 2, 60, 1, 2, 1, 60, 1]
    latest = [context[0] if context else None for context in recent]
    share = np.mean([latest[s] == t for s, t in rows.select("sample_id", "target_item").iter_rows()])
    result = rec_metrics.evaluate_model(rows, ranks, n_resamples=20, masked_ranks=masked)
    assert result["all_turns"]["recall@1"] == pytest.approx(share) == pytest.approx(3 / 8)
    assert result["recommender_turns"]["recall@1"] == 0.0 and result["recommender_turns"]["recall@10"] == 0.5
    for protocol in ("new_items", "new_items_masked"):
        assert result[protocol]["n"] == 2  # (1, 12) and (5, 20)
        assert all(result[protocol][f"recall@{k}"] == 0.0 for k in (1, 10, 50)), protocol
    assert masked[[2, 6]].tolist() == [58, 60]  # among the movies not yet mentioned, all tied


def test_by_context_splits_rows_on_linked_entities():
    rows = rec_metrics.expand_mentions(SAMPLES)  # sample 0 (rows 0, 1) has entities; samples 2 and 3 have none
    result = rec_metrics.evaluate_model(rows, np.array([1, 2, 40, 5]), n_resamples=20)
    split = result["all_turns"]["by_context"]
    assert split["with_entities"]["n"] == 2 and split["without_entities"]["n"] == 2
    assert split["with_entities"]["recall@1"] == pytest.approx(1 / 2)
    assert split["without_entities"]["recall@10"] == pytest.approx(1 / 2)
    assert split["without_entities"]["recall@1"] == 0.0
    assert result["recommender_turns"]["by_context"]["without_entities"]["n"] == 1
    assert result["new_items"]["by_context"]["with_entities"] == {
        **rec_metrics.metrics_from_ranks(np.array([1])),
        "n": 1,
    }
    assert set(split["with_entities"]) == {*rec_metrics.METRICS, "n"}


def test_the_report_shows_the_new_protocols_the_naive_baselines_and_recall_by_context():
    rows = rec_metrics.expand_mentions(SAMPLES)
    names = ("popularity", "repeat", "repeat_popularity", "kbrd")
    ranks = {name: np.array([30, 1, 11, 70]) + i for i, name in enumerate(names)}
    masked = {name: r - 1 for name, r in ranks.items()}
    results = {
        name: rec_metrics.evaluate_model(rows, ranks[name], n_resamples=20, masked_ranks=masked[name]) for name in names
    }
    results["c2crs"] = rec_metrics.evaluate_model(
        rows,
        np.array([1, 20, 60, 5]),
        n_resamples=20,
        compare_with=ranks,
        masked_ranks=np.array([1, 20, 5, 5]),
        compare_masked=masked,
    )
    report = rec_metrics.recommendation_report(results, "tiny.")
    assert "new_items_masked" in report.split("Setting:")[0]  # the protocol text names the masked variant
    table1 = report.split("## C2-CRS and the baselines")[1].split("## Margins")[0]
    for protocol in rec_metrics.PROTOCOLS:
        section = table1.split(f"### {protocol}\n")[1].split("###")[0]
        assert "| repeat |" in section and "| repeat_popularity |" in section and "| c2crs |" in section, protocol
    margins = report.split("## Margins")[1].split("## Recall by context")[0]
    for protocol in rec_metrics.PROTOCOLS:
        for other in ("repeat", "repeat_popularity"):
            assert f"| {protocol} | {other} |" in margins
    by_context = report.split("## Recall by context")[1].split("## Ablations")[0]
    # repeat's ranks 31, 2 (with entities) and 12, 71 (without); c2crs's masked new_items ranks 1 (with), 5 (without)
    assert "| all_turns | repeat | 0.500 | 1.000 | 2 | 0.000 | 0.500 | 2 |" in by_context
    assert "| new_items_masked | c2crs | 1.000 | 1.000 | 1 | 1.000 | 1.000 | 1 |" in by_context
    assert "| new_items |" not in by_context and "| recommender_turns |" not in by_context


def test_by_context_size_bins_rows_by_earlier_turns_and_context_entities():
    rows = pl.DataFrame({"turn_idx": [1, 2, 3, 5, 9], "context_entities": [0, 2, 6, 4, 1]})
    split = rec_metrics.by_context_size(rows, np.array([1, 20, 60, 5, 1]))
    counts = {dimension: {label: m["n"] for label, m in bins.items()} for dimension, bins in split.items()}
    assert counts["earlier_turns"] == {"1": 1, "2-3": 2, "4-6": 1, "7_or_more": 1}
    assert split["earlier_turns"]["2-3"]["recall@10"] == 0.0 and split["earlier_turns"]["2-3"]["recall@50"] == 0.5
    assert counts["context_entities"] == {"0": 1, "1-2": 2, "3-5": 1, "6_or_more": 1}
    assert split["context_entities"]["1-2"]["recall@1"] == 0.5
