"""ReDial's recommender (models/baselines.AutoRecRecommender, stages/training/redial_train.py): the seeker's likings
from the movie forms as the autoencoder's input; KECRS's targets (new and liked, stages/training/kecrs_train.py)."""

import numpy as np
import polars as pl
import torch

from models.baselines import AutoRecRecommender
from stages.training import redial_train

ENTITIES = pl.DataFrame(
    {"entity_id": [0, 1, 2, 3], "is_item": [True, True, True, False], "movie_id": [100, 200, 300, None]}
)


class _Table:
    """A sample table's conversation ids and context items (what the likings read)."""

    def __init__(self, conv_ids, context_items):
        self.conv_ids, self.context_items = np.asarray(conv_ids), context_items

    def __len__(self):
        return len(self.conv_ids)


def _forms(rows):
    return pl.DataFrame(rows, schema=["conv_id", "movie_id", "form", "suggested", "seen", "liked"], orient="row")


def test_the_seekers_answer_wins_and_the_recommenders_fills_in():
    forms = _forms(
        [
            (1, 100, "recommender", 0, 1, 1),
            (1, 100, "seeker", 0, 1, 0),
            (1, 200, "recommender", 1, 0, 1),
            (1, 300, "seeker", 1, 2, 2),
            (2, 999, "seeker", 0, 1, 1),
        ]
    )
    likes = redial_train.seeker_likes(forms, ENTITIES)
    assert likes == {(1, 0): 0.0, (1, 1): 1.0, (1, 2): 0.5}  # movie 999 is no item


def test_the_input_holds_each_context_movies_liking_and_coverage_counts_answers():
    likes = {(1, 0): 0.0, (1, 1): 1.0}
    table = _Table([1, 1, 2], [[0, 1, 2], [], [1]])
    x = redial_train.likes_input(table, np.array([0, 2]), likes, n_items=3)
    assert x.tolist() == [[0.0, 1.0, 0.5], [0.0, 0.5, 0.0]]  # no answer: "did not say"
    assert redial_train.label_coverage(table, likes) == {
        "samples": 3,
        "samples_with_context_movies": 2,
        "samples_with_a_liked_or_disliked_movie": 1,
        "context_mentions": 4,
        "context_mentions_liked_or_disliked": 2,
    }


def test_the_autoencoder_learns_which_movie_follows_a_liked_one():
    torch.manual_seed(0)
    model = AutoRecRecommender(n_items=4, hidden=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    likes = torch.eye(4)  # liked movie i -> the next movie is (i + 1) % 4
    targets = torch.tensor([1, 2, 3, 0])
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(likes), targets).backward()
        optimizer.step()
    assert model(likes).argmax(dim=1).tolist() == targets.tolist()


def test_kecrs_trains_on_targets_new_to_the_conversation_and_liked():
    import pytest

    from stages.training.kecrs_train import new_liked_pairs

    table = _Table([1, 1, 2], [[0], [0, 1], []])
    table.targets = [[0, 1], [2], [1]]  # 0 repeats a context movie; 2 is not liked; conversation 2 has no answers
    likes = {(1, 0): 1.0, (1, 1): 1.0, (1, 2): 0.5}
    rows, items = new_liked_pairs(table, likes)
    assert list(zip(rows.tolist(), items.tolist())) == [(0, 1)]
    with pytest.raises(ValueError, match="no train target is both new to its conversation and liked"):
        new_liked_pairs(table, {})
