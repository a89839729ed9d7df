"""Training and scoring of KGSF's recommender (models/kgsf.py): Mutual Information Maximisation pre-training, then
recommendation with the MIM loss kept at a small weight, as KGSF's run.py; early stopping on valid recall@50."""

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from models.c2crs import batch_entities
from models.kgsf import KGSFRecommender
from stages.io.graph import STAGES
from stages.training.c2crs_data import SampleTable, pad, recommendation_rows
from stages.training.c2crs_train import Run, recall_at, recommendation_batch, run_epoch, score_in_blocks, valid_ranks
from stages.training.loop import LoopState, adam, epoch_generator, train

WORD_GRAPH_INPUTS = {
    ("word_" if name == "edges" else "") + name: STAGES["word_graph"].output(name)
    for name in ("words", "edges", "token_words")
}


@dataclass
class WordGraph:
    """The word_graph stage's outputs as tensors."""

    n_words: int
    edge_index: torch.Tensor  # [2, E] (source, target) word ids
    token_word: np.ndarray  # [vocabulary size] the word id of each conversation token, -1 for none


def load_word_graph(workspace: Path, vocab_size: int, device) -> WordGraph:
    words = pl.read_parquet(workspace / WORD_GRAPH_INPUTS["words"])
    edges = pl.read_parquet(workspace / WORD_GRAPH_INPUTS["word_edges"])
    token_words = pl.read_parquet(workspace / WORD_GRAPH_INPUTS["token_words"])
    if token_words.height and int(token_words["token_id"].max()) >= vocab_size:
        raise ValueError(
            f"{WORD_GRAPH_INPUTS['token_words']}: token id {int(token_words['token_id'].max())} is "
            f"outside the vocabulary ({vocab_size} tokens): rerun the word_graph stage"
        )
    token_word = np.full(vocab_size, -1, dtype=np.int64)
    token_word[token_words["token_id"].to_numpy()] = token_words["word_id"].to_numpy()
    edge_index = torch.as_tensor(edges.select("source", "target").to_numpy().T.copy(), dtype=torch.long)
    return WordGraph(words.height, edge_index.to(device), token_word)


def context_words(table: SampleTable, rows: np.ndarray, words: WordGraph) -> torch.Tensor:
    """The graph words of each row's context tokens, in order (a word said twice counts twice, as in KGSF) ->
    [B, W] word ids, -1 padding."""
    return pad([[w for w in words.token_word[table.context_tokens[r]] if w >= 0] for r in rows], -1)


def _step_graph(model: KGSFRecommender, run: Run, table: SampleTable, rows: np.ndarray, words: WordGraph):
    """(N for every item and the rows' context entities, the renumbered entity ids [B, E], their node ids, W,
    the word ids [B, W]): what one step or one scoring block needs. Items are the smallest ids, so N[:n_items]
    are the items."""
    entity_ids = recommendation_batch(table, rows, run.max_context_entities, run.device)
    nodes, (entity_ids,) = batch_entities(entity_ids, n_items=model.cfg.n_items)
    N = model.entity_rows(nodes.to(run.device), run.graph.edge_index.to(run.device), run.graph.edge_type.to(run.device))
    W = model.word_states(words.edge_index)
    return N, entity_ids, nodes.to(run.device), W, context_words(table, rows, words).to(run.device)


def _mim_loss(
    model: KGSFRecommender, run: Run, table: SampleTable, rows: np.ndarray, N, entity_ids, nodes, W, word_ids
) -> torch.Tensor:
    """MIM on the rows: the word-side vector scores the step's entities against the context's movies."""
    _, word_user = model.user_vectors(N, entity_ids, W, word_ids)
    targets = torch.zeros(len(rows), len(nodes), device=run.device)
    for i, r in enumerate(rows):
        items = [item for item in table.context_items[r] if item < model.cfg.n_items]
        targets[i, items] = 1.0  # items are node rows 0..n_items-1
    counted = (entity_ids >= 0).any(dim=1).float()
    return model.mim_loss(N, nodes, word_user, targets, counted)


def train_kgsf(
    model: KGSFRecommender, run: Run, words: WordGraph, cfg, checkpoint_dir: Path, on_epoch=None
) -> LoopState:
    """MIM pre-training (cfg.pretrain_epochs over every train sample, its own checkpoints), then recommendation on
    the (sample, target item) pairs with cfg.mim_weight x MIM on each batch's samples."""

    def mim_step(rows: np.ndarray) -> torch.Tensor:
        return _mim_loss(model, run, run.train, rows, *_step_graph(model, run, run.train, rows, words))

    def pretrain_epoch(epoch: int) -> dict:
        order = epoch_generator(run.seed, epoch).permutation(len(run.train))
        batches = [order[start : start + cfg.batch_size] for start in range(0, len(order), cfg.batch_size)]
        return run_epoch(model, pretrain_optimizer, batches, mim_step, cfg.grad_clip, run)

    pretrain_optimizer = adam(model.parameters(), cfg.learning_rate)
    # (no validation: the model ends as the last epoch left it, or as its checkpoint when the run resumes)
    train(
        model,
        pretrain_optimizer,
        checkpoint_dir / "mim",
        cfg.pretrain_epochs,
        pretrain_epoch,
        on_epoch=None if on_epoch is None else lambda e, m: on_epoch(e, {f"mim_{k}": v for k, v in m.items()}),
    )

    optimizer = adam(model.parameters(), cfg.learning_rate)
    sample_rows, target_items = recommendation_rows(run.train)

    def rec_step(picked: np.ndarray) -> torch.Tensor:
        rows = sample_rows[picked]
        N, entity_ids, nodes, W, word_ids = _step_graph(model, run, run.train, rows, words)
        logits = model.recommendation_logits(N, entity_ids, W, word_ids)
        loss = F.cross_entropy(logits, torch.as_tensor(target_items[picked], device=run.device))
        if cfg.mim_weight:
            loss = loss + cfg.mim_weight * _mim_loss(model, run, run.train, rows, N, entity_ids, nodes, W, word_ids)
        return loss

    def train_epoch(epoch: int) -> dict:
        order = epoch_generator(run.seed, epoch).permutation(len(sample_rows))
        batches = [order[start : start + cfg.batch_size] for start in range(0, len(order), cfg.batch_size)]
        return run_epoch(model, optimizer, batches, rec_step, cfg.grad_clip, run)

    return train(
        model,
        optimizer,
        checkpoint_dir / "rec",
        cfg.epochs,
        train_epoch,
        validate=lambda: recall_at(valid_ranks(score_kgsf(model, run, run.valid, words, cfg.batch_size), run.valid)),
        monitor="valid_recall@50",
        higher_is_better=True,
        patience=cfg.patience,
        on_epoch=on_epoch,
    )


def score_kgsf(
    model: KGSFRecommender, run: Run, table: SampleTable, words: WordGraph, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """KGSF's item scores for every sample of a table, in blocks; N (items and the table's context entities) and W
    are computed once, on first use (in eval mode, inside score_in_blocks)."""

    @functools.cache
    def graphs():
        N, entity_ids, _, W, _ = _step_graph(model, run, table, np.arange(len(table)), words)
        return N, entity_ids, W

    def scores(rows: np.ndarray) -> torch.Tensor:
        N, entity_ids, W = graphs()
        word_ids = context_words(table, rows, words).to(run.device)
        return model.recommendation_logits(N, entity_ids[torch.as_tensor(rows, device=run.device)], W, word_ids)

    return score_in_blocks(model, table, batch_size, scores)
