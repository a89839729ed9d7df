"""Recommendation evaluation on hand-made rankings: metrics, ties, blocks, mention rows, protocols, bootstrap."""

import math
import time

import numpy as np
import polars as pl
import pytest

from stages import evaluate
from stages.triples import SAMPLE_SCHEMA


def samples_table(rows):
    """rows: (sample_id, conv_id, turn_idx, role, context_item_ids, target_item_ids)."""
    return pl.DataFrame(
        [(sid, conv, turn, role, "test", [], [], ctx, targets, []) for sid, conv, turn, role, ctx, targets in rows],
        schema=SAMPLE_SCHEMA, orient="row")


SAMPLES = samples_table([
    (0, 1, 1, "recommender", [3], [5, 3]),   # two targets, the second a repeat of the context
    (1, 1, 2, "seeker", [3, 5], []),         # no target: no row
    (2, 1, 3, "recommender", [3, 5], [7]),
    (3, 2, 1, "seeker", [], [7]),
])


def test_metrics_from_ranks_by_hand():
    got = evaluate.metrics_from_ranks(np.array([1, 3, 10, 11, 60]))
    assert got["n"] == 5
    assert got["recall@1"] == pytest.approx(1 / 5)
    assert got["recall@10"] == pytest.approx(3 / 5)
    assert got["recall@50"] == pytest.approx(4 / 5)
    assert got["ndcg@10"] == pytest.approx((1 + 1 / 2 + 1 / math.log2(11)) / 5)  # 1/log2(2), 1/log2(4), 1/log2(11)
    assert got["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 10) / 5)
    assert set(got) == {"recall@1", "recall@10", "recall@50", "ndcg@10", "mrr@10", "n"}


def test_metrics_of_nothing_are_none():
    assert evaluate.metrics_from_ranks(np.array([], dtype=int)) == {**{m: None for m in evaluate.METRICS}, "n": 0}


def test_rank_counts_scores_at_least_as_high_so_ties_count_against_the_target():
    scores = np.array([[0.9, 0.5, 0.5, 0.1],
                       [0.2, 0.2, 0.2, 0.2]], dtype=np.float32)
    ranks = evaluate.rank_of_targets(scores, np.array([0, 0, 0, 1]), np.array([0, 1, 2, 3]))
    assert ranks.tolist() == [1, 3, 3, 4]


def test_rank_rejects_nan_and_out_of_range_targets():
    with pytest.raises(evaluate.EvaluationError):
        evaluate.rank_of_targets(np.array([[np.nan, 1.0]]), np.array([0]), np.array([0]))
    with pytest.raises(evaluate.EvaluationError):
        evaluate.rank_of_targets(np.array([[0.0, 1.0]]), np.array([0]), np.array([2]))


def test_ranks_from_blocks_equal_ranks_from_the_full_matrix():
    rng = np.random.default_rng(0)
    n_samples, n_items = 50, 30
    scores = rng.integers(0, 5, size=(n_samples, n_items)).astype(np.float32)  # many ties
    rows = pl.DataFrame({"sample_id": np.repeat(np.arange(n_samples), 2),
                         "target_item": rng.integers(0, n_items, size=2 * n_samples)})
    full = evaluate.rank_of_targets(scores, rows["sample_id"].to_numpy(), rows["target_item"].to_numpy(), chunk=7)
    permutation = rng.permutation(n_samples)  # blocks in any order, sample ids not sorted inside a block
    blocks = [(permutation[i:i + 8], scores[permutation[i:i + 8]]) for i in range(0, n_samples, 8)]
    assert evaluate.ranks_from_score_blocks(iter(blocks), rows).tolist() == full.tolist()


def test_ranks_from_blocks_catch_missing_and_repeated_samples():
    rows = pl.DataFrame({"sample_id": [0, 1], "target_item": [0, 1]})
    scores = np.zeros((1, 3), dtype=np.float32)
    with pytest.raises(evaluate.EvaluationError, match="no scores"):
        evaluate.ranks_from_score_blocks([(np.array([0]), scores)], rows)
    with pytest.raises(evaluate.EvaluationError, match="more than one"):
        evaluate.ranks_from_score_blocks([(np.array([0]), scores), (np.array([0]), scores)], rows)


def test_expand_mentions_keeps_every_mention_and_flags_repeats():
    rows = evaluate.expand_mentions(SAMPLES)
    assert rows.columns == list(evaluate.ROW_COLUMNS)
    assert rows.select("sample_id", "target_item", "in_context").rows() == [
        (0, 5, False), (0, 3, True), (2, 7, False), (3, 7, False)]


def test_protocols_select_rows():
    rows = evaluate.expand_mentions(SAMPLES)
    assert evaluate.protocol_rows(rows, "all_turns").tolist() == [True] * 4
    assert evaluate.protocol_rows(rows, "recommender_turns").tolist() == [True, True, True, False]
    with pytest.raises(ValueError):
        evaluate.protocol_rows(rows, "seeker_only")


def random_rows(n_conv=200, seed=1):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 8, size=n_conv)
    conv = np.repeat(np.arange(n_conv), sizes)
    ranks = rng.integers(1, 100, size=len(conv))
    return pl.DataFrame({"conv_id": conv, "rank": ranks})


def test_bootstrap_interval_contains_the_point_and_is_deterministic():
    rows = random_rows()
    point = evaluate.metrics_from_ranks(rows["rank"].to_numpy())
    ci = evaluate.bootstrap_ci(rows, n_resamples=500, seed=3)
    for metric in evaluate.METRICS:
        low, high = ci[metric]
        assert low <= point[metric] <= high and low < high
    assert evaluate.bootstrap_ci(rows, n_resamples=500, seed=3) == ci
    assert evaluate.bootstrap_ci(rows, n_resamples=500, seed=4) != ci


def test_bootstrap_collapses_when_all_conversations_are_identical():
    rows = pl.DataFrame({"conv_id": [1, 1, 2, 2, 3, 3], "rank": [1, 20, 1, 20, 1, 20]})
    ci = evaluate.bootstrap_ci(rows, n_resamples=200, seed=0)
    point = evaluate.metrics_from_ranks(rows["rank"].to_numpy())
    for metric in evaluate.METRICS:
        assert ci[metric] == pytest.approx([point[metric], point[metric]])


def test_bootstrap_is_fast_at_test_split_size():
    rows = random_rows(n_conv=1342, seed=2)  # about 5,000 rows, the size of the ReDial test split
    start = time.perf_counter()
    evaluate.bootstrap_ci(rows, n_resamples=1000, seed=0)
    assert time.perf_counter() - start < 1.0


def test_repeat_share_by_hand():
    rows = pl.DataFrame({"in_context": [True, False, True, False, True]})
    ranks = np.array([1, 5, 20, 30, 100])
    # hits@10: rows 0 (repeat), 1 -> 1/2; hits@50: rows 0-3, repeats 0 and 2 -> 2/4
    assert evaluate.repeat_share(rows, ranks) == {"recall@10": 0.5, "recall@50": 0.5}
    assert evaluate.repeat_share(rows, np.array([99] * 5)) == {"recall@10": None, "recall@50": None}


def test_evaluate_model_reports_both_protocols():
    rows = evaluate.expand_mentions(SAMPLES)
    ranks = np.array([1, 2, 40, 5])
    result = evaluate.evaluate_model(rows, ranks, n_resamples=50, seed=0)
    assert set(result) == set(evaluate.PROTOCOLS)
    assert result["all_turns"]["n"] == 4 and result["recommender_turns"]["n"] == 3
    assert result["recommender_turns"]["recall@10"] == pytest.approx(2 / 3)
    assert result["all_turns"]["repeat_share"] == {"recall@10": pytest.approx(1 / 3), "recall@50": 0.25}
    assert set(result["all_turns"]["ci95"]) == set(evaluate.METRICS)


def test_markdown_table_lists_models_and_paper_rows():
    rows = evaluate.expand_mentions(SAMPLES)
    results = {"popularity": evaluate.evaluate_model(rows, np.array([1, 2, 40, 5]), n_resamples=20),
               "c2crs": evaluate.evaluate_model(rows, np.array([3, 1, 4, 1]), n_resamples=20)}
    table = evaluate.markdown_table(results, evaluate.PAPER_TABLE1)
    assert "### all_turns" in table and "### recommender_turns" in table
    assert "| popularity |" in table and "| c2crs |" in table
    assert "| paper: C2-CRS | 0.053 | 0.233 | 0.407 | – | – | – |" in table
    assert "paper: KBRD" not in table  # only the paper's rows of models in the results
    assert table.index("paper: C2-CRS") < table.index("### recommender_turns")  # paper scored all turns
    assert "[" in table.split("| popularity |")[1].splitlines()[0]  # cells carry the interval
    assert "paper" not in evaluate.markdown_table(results)


def test_paired_difference_by_hand():
    rows = evaluate.expand_mentions(SAMPLES)  # conversation 1: rows 0-2, conversation 2: row 3
    a, b = np.array([1, 20, 60, 5]), np.array([30, 20, 11, 70])
    got = evaluate.paired_difference(rows, a, b, n_resamples=200, seed=0)
    # recall@10: a hits rows 0 and 3, b none -> +2/4; recall@50: a 0,1,3 vs b 0,1,2 -> 0
    assert got["recall@10"]["difference"] == pytest.approx(0.5)
    assert got["recall@50"]["difference"] == pytest.approx(0.0)
    low, high = got["recall@10"]["ci95"]
    assert 0 < low <= 0.5 <= high <= 1  # every resample favours a on recall@10
    same = evaluate.paired_difference(rows, a, a, n_resamples=50)
    assert all(d["difference"] == 0 and d["ci95"] == [0.0, 0.0] for d in same.values())
    with pytest.raises(evaluate.EvaluationError):
        evaluate.paired_difference(rows, a, b[:3])


def test_the_report_has_table_1_margins_and_table_4():
    rows = evaluate.expand_mentions(SAMPLES)
    ranks = {"kbrd": np.array([30, 20, 11, 70]), "c2crs_wo_fine": np.array([2, 20, 60, 5]),
             "c2crs_mine": np.array([2, 2, 2, 2])}
    results = {name: evaluate.evaluate_model(rows, r, n_resamples=50) for name, r in ranks.items()}
    results["c2crs"] = evaluate.evaluate_model(rows, np.array([1, 20, 60, 5]), n_resamples=50, compare_with=ranks)
    report = evaluate.recommendation_report(results, "a tiny hand-made setting.")
    assert "Setting: a tiny hand-made setting." in report
    margins = report.split("## Margins")[1].split("## Ablations")[0]
    assert "| all_turns | kbrd | +0.500" in margins and "c2crs_wo_fine" not in margins
    table4 = report.split("## Ablations")[1]
    assert "| w/o Coarse-Fine | kbrd |" in table4 and "| w/o Fine | c2crs_wo_fine |" in table4
    assert "| 0.048 | 0.221 | 0.400 |" in table4.split("| w/o Fine |")[1].splitlines()[0]  # the paper's row
    assert "| mine | c2crs_mine |" in table4  # a variant the paper does not have: no paper cells
    assert table4.index("w/o Coarse-Fine") < table4.index("w/o Fine") < table4.index("| mine |")
