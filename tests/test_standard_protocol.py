"""Kostric and Balog's standardized protocol: instances per recommender message, their substring rule, dedup, on
hand-made conversations; and their published counts on the real test file when the mirror is there."""

import json
import os
from pathlib import Path

import polars as pl
import pytest

from stages.evaluation import standard_protocol
from stages.triples import SPECIAL_TOKENS


def _conversation(conv_id, messages, mentions):
    return {
        "conversationId": conv_id,
        "initiatorWorkerId": 1,
        "respondentWorkerId": 2,
        "movieMentions": mentions,
        "messages": [{"senderWorkerId": sender, "text": text} for sender, text in messages],
    }


@pytest.fixture
def test_file(tmp_path) -> Path:
    path = tmp_path / "test.jsonl"
    conversations = [
        _conversation(
            7,
            [
                (2, "Try @123 !"),  # no context yet: not an instance
                (1, "I loved @45"),  # the seeker's: not an instance
                (2, ""),  # an empty message is context too
                (2, "Then @45 and @123 , or @999"),  # @999 is not declared: not a target
                (1, "ok"),
                (2, "@123 again"),
            ],
            {"123": "A", "45": "B", "12": "C"},
        ),
        _conversation(8, [(1, "hi"), (2, "@12")], {"12": "C"}),
    ]
    path.write_text("\n".join(json.dumps(c) for c in conversations) + "\n")
    return path


def test_messages_follow_their_substring_rule_and_dedup(test_file):
    rows = standard_protocol.messages(test_file)
    assert rows.height == 8 and rows["turn_idx"].to_list() == [0, 1, 2, 3, 4, 5, 0, 1]
    # "@123" also contains "@12": their substring test names both, in movieMentions' order
    assert rows["movie_ids"].to_list()[0] == [123, 12]
    assert rows.filter((pl.col("conv_id") == 7) & (pl.col("turn_idx") == 3))["fresh"].item().to_list() == [
        False,
        False,
        False,
    ]  # @123 and @12 were named in message 0, @45 by the seeker: any earlier message counts
    assert rows["role"].to_list()[:3] == ["recommender", "seeker", "recommender"]


class NoLinker:
    def link(self, text):
        return []


def test_instances_are_recommender_messages_with_a_movie_and_context(test_file):
    movies = [123, 45, 12]
    item_entity = {movie: i for i, movie in enumerate(movies)}
    vocabulary = pl.DataFrame(
        {
            "token_id": list(range(len(SPECIAL_TOKENS))),
            "token": list(SPECIAL_TOKENS),
            "count": [0] * len(SPECIAL_TOKENS),
        },
        schema={"token_id": pl.Int32, "token": pl.String, "count": pl.Int64},
    )
    samples, rows, (recent, states) = standard_protocol.instances(
        test_file, NoLinker(), vocabulary, item_entity, 256, 30
    )
    assert samples.select("conv_id", "turn_idx").rows() == [(7, 3), (7, 5), (8, 1)]
    # the context is what the linker reads ("@123" is movie 123 alone), most recent first, replayed over every
    # message: the seeker's @45 is more recent than @123
    assert recent == [[1, 0], [1, 0], []]
    assert states == [2, 2, 0]  # (context movies, 1 to 4+, minus 1) x 2 + whether the message before named one
    assert rows["target_item"].to_list() == [0, 1, 2, 0, 2, 2]  # 123, 45, 12 | 123, 12 | 12
    assert rows["in_context"].to_list() == [True, True, True, True, True, False]
    assert set(rows["role"]) == {"recommender"}


MIRROR = Path(os.environ.get("C2CRS_DATA_DIR", "/nonexistent"))


@pytest.mark.skipif(
    not (MIRROR / "redial/test_data.jsonl").is_file(),
    reason="real data mirror absent: set C2CRS_DATA_DIR to a directory with redial/test_data.jsonl",
)
def test_the_real_test_file_gives_their_published_counts():
    rows = standard_protocol.messages(MIRROR / "redial/test_data.jsonl")
    instances = rows.filter(
        (pl.col("role") == "recommender") & (pl.col("turn_idx") > 0) & (pl.col("movie_ids").list.len() > 0)
    )
    fresh = instances["fresh"].explode()
    assert (instances.height, len(fresh)) == (4198, 4975)  # their statistics file: full
    assert (int(fresh.sum()), int(instances["fresh"].list.any().sum())) == (4472, 3838)  # dedup


def test_seeker_rewards_read_the_seekers_form(tmp_path):
    path = tmp_path / "test.jsonl"
    conversation = _conversation(7, [(1, "hi"), (2, "@123"), (1, "ok")], {"123": "A", "45": "B", "12": "C", "9": "D"})
    conversation["initiatorQuestions"] = {
        "123": {"liked": 1, "seen": 1, "suggested": 1},
        "45": {"liked": 2, "seen": 1, "suggested": 1},  # seen, no opinion: 0.5
        "12": {"liked": 0, "seen": 0, "suggested": 1},  # neither: no reward
        "9": {"liked": 1, "seen": 0, "suggested": 0},  # not an item of the KG: left out
    }
    path.write_text(json.dumps(conversation) + "\n")
    rewards, lengths = standard_protocol.seeker_rewards(path, {123: 0, 45: 1, 12: 2})
    assert rewards == {7: {0: 1.0, 1: 0.5}} and lengths == {7: 3}


def test_success_rate_and_reward_per_dialogue_length_by_hand():
    rows = pl.DataFrame(
        {"sample_id": [10, 10, 11, 12], "conv_id": [7, 7, 7, 8], "target_item": [0, 1, 0, 2]},
        schema={"sample_id": pl.Int64, "conv_id": pl.Int64, "target_item": pl.Int64},
    )
    top1 = {10: 1, 11: 2, 12: 2}  # 10: a target the seeker saw; 11: no target; 12: a target without a liked/seen form
    rewards, lengths = {7: {0: 1.0, 1: 0.5}, 8: {}}, {7: 6, 8: 2}
    measures = standard_protocol.dialogue_measures(rows, top1, rewards, lengths, resamples=200, seed=0)
    assert measures["success_rate"] == 0.5 and measures["dialogues"] == 2
    assert measures["reward_per_dialogue_length"] == pytest.approx((0.5 / 6 + 0.0) / 2)
    low, high = measures["ci95"]["success_rate"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    liked = standard_protocol.dialogue_measures(rows, {10: 0, 11: 0, 12: 0}, rewards, lengths, resamples=10, seed=0)
    assert liked["success_rate"] == 0.5 and liked["reward_per_dialogue_length"] == pytest.approx((2.0 / 6) / 2)
