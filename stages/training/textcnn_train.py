"""The TextCNN baseline's training and scoring: context words only, softmax over all items, the same (sample, item)
pairs and validation as the C2-CRS recommender."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.baselines import TextCNNRecommender
from stages.training.c2crs_data import SampleTable, bucketed_batches, pad, recommendation_rows
from stages.training.c2crs_train import Run, recall_at, run_epoch, score_in_blocks, valid_ranks
from stages.training.loop import LoopState, adam, epoch_generator, train
from stages.training.runs import load_module


@dataclass
class TextCNNConfig:
    vocab_size: int
    n_items: int
    embed_dim: int
    n_filters: int
    dropout: float


def load_textcnn(path: Path) -> TextCNNRecommender:
    return load_module(path, lambda config: TextCNNRecommender(**config))


def train_textcnn(model: TextCNNRecommender, run: Run, cfg, checkpoint_dir: Path, on_epoch=None) -> LoopState:
    """The TextCNN baseline: context words only, softmax over all items, the same (sample, item) pairs."""
    optimizer = adam(model.parameters(), cfg.learning_rate)
    sample_rows, target_items = recommendation_rows(run.train)

    def step_loss(picked: np.ndarray) -> torch.Tensor:
        ids = pad([run.train.context_tokens[r] for r in sample_rows[picked]], run.pad_id).to(run.device)
        return torch.nn.functional.cross_entropy(model(ids), torch.as_tensor(target_items[picked], device=run.device))

    def train_epoch(epoch: int) -> dict:
        rng = epoch_generator(run.seed, epoch)
        order = rng.permutation(len(sample_rows))
        lengths = run.train.context_lengths[sample_rows[order]]
        batches = [order[batch] for batch in bucketed_batches(lengths, cfg.batch_size, rng)]
        return run_epoch(model, optimizer, batches, step_loss, cfg.grad_clip, run)

    return train(
        model,
        optimizer,
        checkpoint_dir,
        cfg.epochs,
        train_epoch,
        validate=lambda: recall_at(valid_ranks(score_textcnn(model, run, run.valid, cfg.batch_size), run.valid)),
        monitor="valid_recall@50",
        higher_is_better=True,
        patience=cfg.patience,
        on_epoch=on_epoch,
    )


def score_textcnn(
    model: TextCNNRecommender, run: Run, table: SampleTable, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    return score_in_blocks(
        model,
        table,
        batch_size,
        lambda rows: model(pad([table.context_tokens[r] for r in rows], run.pad_id).to(run.device)),
    )
