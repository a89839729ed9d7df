"""The learned choice between re-mentioning a context movie and a new one (models.baselines.RepeatChoice, beyond the
paper): its counts from a split's (sample, target) pairs, and any recommender's scores turned into the mixture."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import torch

from models.baselines import RepeatChoice
from stages.evaluation import rec_metrics
from stages.training.c2crs_data import SampleTable, pad, recommendation_rows
from stages.training.c2crs_train import Run
from stages.training.runs import TRAINING_INPUTS


def recent_items_tensor(recent: list[list[int]]) -> torch.Tensor:
    """Each sample's context movies, most recent first (evaluate.context_items_by_recency), as [n, K] padded -1."""
    return pad(recent, -1)


def fit_repeat_choice(
    table: SampleTable, recent: torch.Tensor, max_recency: int, states: torch.Tensor | None = None, n_states: int = 1
) -> RepeatChoice:
    """RepeatChoice's counts from one split's (sample, target) pairs: is the target a context movie, and which;
    states: each sample's context state (None: the speaker alone decides p(repeat))."""
    sample_rows, target_items = recommendation_rows(table)
    roles = role_ids(table)
    positions = []
    for row, item in zip(sample_rows.tolist(), target_items.tolist()):
        order = recent[row].tolist()
        positions.append(order.index(item) if item in order else None)
    return RepeatChoice.fit(
        positions,
        roles[sample_rows].tolist(),
        max_recency,
        None if states is None else states[sample_rows].tolist(),
        n_states,
    )


def role_ids(table: SampleTable) -> torch.Tensor:
    """Who speaks in each sample's turn, as indices into RepeatChoice.ROLES."""
    return torch.as_tensor([RepeatChoice.ROLES.index(role) for role in table.roles], dtype=torch.long)


@torch.no_grad()
def with_repeat_choice(
    blocks, recent: torch.Tensor, table: SampleTable, choice: RepeatChoice, states: torch.Tensor | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A recommender's score blocks turned into the RepeatChoice mixture's log-probabilities (states: each sample's
    context state, when the choice was fitted with them)."""
    roles = role_ids(table)
    for rows, scores in blocks:
        yield (
            rows,
            choice(
                torch.from_numpy(np.ascontiguousarray(scores)),
                recent[rows],
                roles[rows],
                None if states is None else states[rows],
            ).numpy(),
        )


def fitted(params, workspace: Path, run: Run, by_state: bool = True) -> RepeatChoice:
    """RepeatChoice's counts from the train split (whether a turn's movie repeats a context movie, and which), by
    speaker and context state (rec_metrics.choice_states; by_state False: by speaker alone, the pre-training
    study's choice since it began)."""
    train = pl.read_parquet(workspace / TRAINING_INPUTS["samples"]).filter(pl.col("split") == "train").sort("sample_id")
    recent = recent_items_tensor(rec_metrics.context_items_by_recency(train))
    if not by_state:
        return fit_repeat_choice(run.train, recent, params.evaluate.max_recency)
    states = torch.as_tensor(rec_metrics.choice_states(train))
    return fit_repeat_choice(run.train, recent, params.evaluate.max_recency, states, rec_metrics.CHOICE_STATES)
