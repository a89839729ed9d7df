"""Training and scoring of ReDial's recommender (models/baselines.AutoRecRecommender): the movies mentioned so far,
each entered as the seeker's liking of it from ReDial's movie forms, into an autoencoder; softmax over all items on
the same (sample, target item) pairs as the other recommenders, early stopping on valid recall@50.

ReDial's own system predicts the liking with a sentiment classifier trained on the same forms; here the form's
answer is read directly (that classifier's best case), so the recommender is measured, not the classifier.
"""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from models.baselines import AutoRecRecommender
from stages.io.graph import STAGES
from stages.training.c2crs_data import SampleTable, recommendation_rows
from stages.training.c2crs_train import Run, recall_at, run_epoch, score_in_blocks, valid_ranks
from stages.training.loop import LoopState, adam, epoch_generator, train

FORMS_INPUT = STAGES["ingest"].output("movie_forms")
# The autoencoder's input for a mentioned movie, by the form's `liked` answer (ReDial: the classifier's P(liked));
# a movie without an answer counts as "did not say".
LIKING = {0: 0.0, 1: 1.0, 2: 0.5}
NOT_SAID = LIKING[2]


def seeker_likes(forms: pl.DataFrame, entities: pl.DataFrame) -> dict[tuple[int, int], float]:
    """{(conversation, item entity id): liking} from the seeker's form, or the recommender's where the seeker
    answered nothing about the movie (both answer for the seeker)."""
    items = entities.filter(pl.col("is_item")).select("entity_id", "movie_id")
    answers = (
        forms.join(items, on="movie_id")
        .sort("conv_id", "entity_id", pl.col("form") != "seeker")
        .unique(["conv_id", "entity_id"], keep="first", maintain_order=True)
    )
    return {(c, e): LIKING[int(liked)] for c, e, liked in answers.select("conv_id", "entity_id", "liked").iter_rows()}


def likes_input(table: SampleTable, rows: np.ndarray, likes: dict, n_items: int) -> torch.Tensor:
    """The autoencoder's input [B, n_items] for the rows: each context movie's liking, 0 elsewhere."""
    x = torch.zeros(len(rows), n_items)
    for i, r in enumerate(rows):
        conv = int(table.conv_ids[r])
        for item in table.context_items[r]:
            if item < n_items:
                x[i, item] = likes.get((conv, item), NOT_SAID)
    return x


def label_coverage(table: SampleTable, likes: dict) -> dict:
    """How many samples (turns) have a context movie, how many of those have at least one movie that the forms say
    was liked or disliked, and how many context mentions have such an answer."""
    with_movies = labelled = mentions = answered = 0
    for conv, items in zip(table.conv_ids, table.context_items):
        said = [likes.get((int(conv), item), NOT_SAID) != NOT_SAID for item in items]
        with_movies += bool(items)
        labelled += any(said)
        mentions += len(items)
        answered += sum(said)
    return {
        "samples": len(table),
        "samples_with_context_movies": with_movies,
        "samples_with_a_liked_or_disliked_movie": labelled,
        "context_mentions": mentions,
        "context_mentions_liked_or_disliked": answered,
    }


def train_redial(
    model: AutoRecRecommender, run: Run, likes: dict, cfg, checkpoint_dir: Path, on_epoch=None
) -> LoopState:
    optimizer = adam(model.parameters(), cfg.learning_rate)
    sample_rows, target_items = recommendation_rows(run.train)
    n_items = model.decoder.out_features

    def step_loss(picked: np.ndarray) -> torch.Tensor:
        x = likes_input(run.train, sample_rows[picked], likes, n_items).to(run.device)
        return F.cross_entropy(model(x), torch.as_tensor(target_items[picked], device=run.device))

    def train_epoch(epoch: int) -> dict:
        order = epoch_generator(run.seed, epoch).permutation(len(sample_rows))
        batches = [order[start : start + cfg.batch_size] for start in range(0, len(order), cfg.batch_size)]
        return run_epoch(model, optimizer, batches, step_loss, cfg.grad_clip, run)

    return train(
        model,
        optimizer,
        checkpoint_dir,
        cfg.epochs,
        train_epoch,
        validate=lambda: recall_at(valid_ranks(score_redial(model, run, run.valid, likes, cfg.batch_size), run.valid)),
        monitor="valid_recall@50",
        higher_is_better=True,
        patience=cfg.patience,
        on_epoch=on_epoch,
    )


def score_redial(
    model: AutoRecRecommender, run: Run, table: SampleTable, likes: dict, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    n_items = model.decoder.out_features
    return score_in_blocks(
        model, table, batch_size, lambda rows: model(likes_input(table, rows, likes, n_items).to(run.device))
    )
