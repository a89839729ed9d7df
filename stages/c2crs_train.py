"""The C2-CRS training stages: coarse pre-training, fine pre-training, recommender fine-tuning, and scoring.

Each stage is a function of tensors, a model and its settings; it trains with stages.training.train (resumable,
checkpointed every epoch) and reports per-epoch metrics through `on_epoch`. The knowledge-graph encoder runs, in
each step, only on the entities the step needs (their one-hop neighbourhood), except where every item's row is
needed (recommendation logits), where it runs on the whole graph.
"""

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.baselines import TextCNNRecommender
from models.c2crs import C2CRS, batch_entities
from stages.c2crs_data import (Graph, SampleTable, bucketed_batches, context_batch, fine_batch, pad,
                               per_conversation,
                               recommendation_rows, review_batch)
from stages.evaluate import rank_of_targets
from stages.training import LoopState, epoch_generator, train

log = logging.getLogger(__name__)

VIEWS = ("conversation", "graph", "review")


@dataclass
class Run:
    """What a training stage needs besides the model."""

    graph: Graph
    train: SampleTable
    valid: SampleTable
    sentence_tokens: list[list[int]]
    pad_id: int
    max_context_entities: int
    max_review_sentences: int
    device: torch.device
    seed: int
    views: frozenset[str] = frozenset(VIEWS)  # the ablations drop "conversation" (w/o CH) or "review" (w/o UD)


def _node_rows(model: C2CRS, run: Run, *entity_ids: torch.Tensor, with_items: bool = False):
    """N for the entities a batch needs (and every item, for recommendation), with the ids renumbered into it."""
    nodes, remapped = batch_entities(*entity_ids, n_items=run.graph.n_items if with_items else 0)
    if len(nodes) == 0:
        return torch.zeros(1, model.cfg.kg_dim, device=run.device), remapped
    rows = model.entity_graph(run.graph.edge_index.to(run.device), run.graph.edge_type.to(run.device), nodes)
    return rows, remapped


def coarse_losses(model: C2CRS, run: Run, table: SampleTable, rows: np.ndarray) -> torch.Tensor:
    batch = {**context_batch(table, rows, run.pad_id, run.max_context_entities),
             **review_batch(table, rows, run.sentence_tokens, run.pad_id, run.max_review_sentences)}
    batch = {k: v.to(run.device) for k, v in batch.items()}
    rows_valid = torch.ones(len(rows), dtype=torch.bool, device=run.device)
    if "conversation" in run.views:
        e_c, _ = model.conversation_view(batch["context_ids"])
    else:
        e_c, rows_valid = torch.zeros(len(rows), model.cfg.token_dim, device=run.device), ~rows_valid
    n_rows, (entity_ids,) = _node_rows(model, run, batch["entity_ids"])
    e_g = model.graph_view(n_rows, entity_ids)
    valid_review = batch["sentence_mask"].any(1)
    if "review" in run.views:
        e_r, _ = model.review_view(batch["sentence_ids"], batch["sentence_mask"])
    else:
        e_r, valid_review = torch.zeros(len(rows), model.cfg.token_dim, device=run.device), valid_review & False
    return model.coarse_contrastive_loss(e_c, e_g, e_r, valid_graph=(entity_ids >= 0).any(1),
                                         valid_review=valid_review, valid_conversation=rows_valid)


def fine_losses(model: C2CRS, run: Run, table: SampleTable, rows: np.ndarray, max_triples: int,
                rng: np.random.Generator | None) -> torch.Tensor:
    batch = {**context_batch(table, rows, run.pad_id, run.max_context_entities),
             **fine_batch(table, rows, max_triples, rng)}
    batch = {k: v.to(run.device) for k, v in batch.items()}
    if len(batch["triple_rows"]) < 2:
        return torch.zeros((), device=run.device, requires_grad=True)
    if "conversation" in run.views:
        _, words = model.conversation_view(batch["context_ids"])
        word_vectors = words[batch["triple_rows"], batch["triple_positions"]]
    else:
        word_vectors = torch.zeros(len(batch["triple_rows"]), model.cfg.token_dim, device=run.device)
    n_rows, (entity_index,) = _node_rows(model, run, batch["triple_entities"])
    entity_vectors = n_rows[entity_index]
    sentence_ids = batch["triple_sentences"]
    if "review" in run.views:
        sentences = torch.unique(sentence_ids)
        tokens = pad([run.sentence_tokens[s] for s in sentences.tolist()], run.pad_id).to(run.device)
        sentence_vectors = model.encode_sentences(tokens)[torch.searchsorted(sentences, sentence_ids)]
    else:
        sentence_vectors, sentence_ids = torch.zeros_like(word_vectors), torch.full_like(sentence_ids, -1)
    return model.fine_contrastive_loss(word_vectors, entity_vectors, sentence_vectors,
                                       entity_ids=batch["triple_entities"], sentence_ids=sentence_ids,
                                       use_words="conversation" in run.views)


def _pretraining_batches(run: Run, cfg, rng: np.random.Generator) -> list[np.ndarray]:
    rows = per_conversation(run.train.conv_ids, cfg.samples_per_conversation, rng)
    return [rows[batch] for batch in bucketed_batches(run.train.context_lengths[rows], cfg.batch_size, rng)]


def _epoch(model, optimizer, batches, step_loss: Callable[[np.ndarray], torch.Tensor], grad_clip: float) -> dict:
    total, count = 0.0, 0
    for rows in tqdm(batches, desc="train", unit=" batch", leave=False, disable=None):
        loss = step_loss(rows)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        total += loss.item() * len(rows)
        count += len(rows)
    return {"loss": total / max(count, 1)}


def _mean_loss(table: SampleTable, batch_size: int, step_loss: Callable[[np.ndarray], torch.Tensor],
               samples_per_conversation: int | None, seed: int) -> dict:
    """Validation loss on a fixed draw of the valid samples (the same every epoch)."""
    rows = per_conversation(table.conv_ids, samples_per_conversation, np.random.default_rng(seed))
    batches = [rows[b] for b in bucketed_batches(table.context_lengths[rows], batch_size, None)]
    losses = [(float(step_loss(rows)), len(rows)) for rows in batches]
    return {"loss": sum(l * n for l, n in losses) / max(sum(n for _, n in losses), 1)}


def pretrain_coarse(model: C2CRS, run: Run, cfg, checkpoint_dir: Path, on_epoch=None) -> LoopState:
    """Coarse-grained contrastive pre-training (4.2.1): conversation vs. subgraph vs. review document."""
    model.cfg.temperature = cfg.temperature
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)

    def step(table):
        return lambda rows: coarse_losses(model, run, table, rows)

    def train_epoch(epoch: int) -> dict:
        return _epoch(model, optimizer, _pretraining_batches(run, cfg, epoch_generator(run.seed, epoch)),
                      step(run.train), cfg.grad_clip)

    return train(model, optimizer, checkpoint_dir, cfg.epochs, train_epoch,
                 validate=lambda: _mean_loss(run.valid, cfg.batch_size, step(run.valid), cfg.samples_per_conversation,
                                             run.seed),
                 monitor="valid_loss", higher_is_better=False, patience=cfg.patience, on_epoch=on_epoch)


def pretrain_fine(model: C2CRS, run: Run, cfg, checkpoint_dir: Path, on_epoch=None) -> LoopState:
    """Fine-grained contrastive pre-training (4.2.2) with lambda x the coarse loss (Eq. 7)."""
    model.cfg.temperature = cfg.temperature
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)

    def step_loss(table, rng):
        def loss(rows):
            fine = fine_losses(model, run, table, rows, cfg.max_triples_per_sample, rng)
            coarse = coarse_losses(model, run, table, rows) if cfg.coarse_weight else torch.zeros(())
            return model.pretraining_loss(fine, coarse, cfg.coarse_weight)
        return loss

    def train_epoch(epoch: int) -> dict:
        rng = epoch_generator(run.seed, epoch)
        return _epoch(model, optimizer, _pretraining_batches(run, cfg, rng), step_loss(run.train, rng), cfg.grad_clip)

    return train(model, optimizer, checkpoint_dir, cfg.epochs, train_epoch,
                 validate=lambda: _mean_loss(run.valid, cfg.batch_size, step_loss(run.valid, None),
                                             cfg.samples_per_conversation, run.seed),
                 monitor="valid_loss", higher_is_better=False, patience=cfg.patience, on_epoch=on_epoch)


def recommendation_batch(table: SampleTable, rows: np.ndarray, max_entities: int, device) -> torch.Tensor:
    return context_batch(table, rows, 0, max_entities)["entity_ids"].to(device)


def finetune_recommender(model: C2CRS, run: Run, cfg, checkpoint_dir: Path, on_epoch=None) -> LoopState:
    """Recommendation fine-tuning (4.3.1): self-attention over the context entities, softmax over all items.

    One step runs the R-GCN on every item and the batch's context entities (every item's row is scored) and
    trains on a batch of (sample, target item) pairs. Validation: recall@10 and recall@50 on the valid split, which picks the best epoch.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    sample_rows, target_items = recommendation_rows(run.train)

    def step_loss(picked: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        entity_ids = recommendation_batch(run.train, sample_rows[picked], run.max_context_entities, run.device)
        nodes, (entity_ids,) = _node_rows(model, run, entity_ids, with_items=True)
        logits = model.recommendation_logits(nodes, entity_ids)
        loss = model.recommendation_loss(logits, torch.as_tensor(target_items[picked], device=run.device))
        if cfg.pretraining_weight:  # the "multi-task" ablation: every objective at once, no pre-training
            samples = np.unique(sample_rows[picked])
            if cfg.pretraining_samples_per_step and len(samples) > cfg.pretraining_samples_per_step:
                samples = np.sort(rng.choice(samples, cfg.pretraining_samples_per_step, replace=False))
            pretraining = model.pretraining_loss(
                fine_losses(model, run, run.train, samples, cfg.max_triples_per_sample, rng),
                coarse_losses(model, run, run.train, samples), cfg.coarse_weight)
            loss = loss + cfg.pretraining_weight * pretraining
        return loss

    def train_epoch(epoch: int) -> dict:
        rng = epoch_generator(run.seed, epoch)
        order = rng.permutation(len(sample_rows))
        if cfg.pretraining_weight:  # the step encodes contexts too: batch similar lengths, as pre-training does
            lengths = run.train.context_lengths[sample_rows[order]]
            batches = [order[batch] for batch in bucketed_batches(lengths, cfg.batch_size, rng)]
        else:
            batches = [order[start: start + cfg.batch_size] for start in range(0, len(order), cfg.batch_size)]
        return _epoch(model, optimizer, batches, lambda picked: step_loss(picked, rng), cfg.grad_clip)

    def validate() -> dict:
        return _recall_at(_valid_ranks(score_samples(model, run, run.valid, cfg.batch_size), run.valid))

    return train(model, optimizer, checkpoint_dir, cfg.epochs, train_epoch, validate=validate,
                 monitor="valid_recall@50", higher_is_better=True, patience=cfg.patience, on_epoch=on_epoch)


@torch.no_grad()
def score_samples(model: C2CRS, run: Run, table: SampleTable, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Item scores for every sample of a table, in blocks: (row indices, scores [rows, n_items])."""
    was_training = model.training
    model.eval()
    nodes = model.entity_graph(run.graph.edge_index.to(run.device), run.graph.edge_type.to(run.device))
    for start in range(0, len(table), batch_size):
        rows = np.arange(start, min(start + batch_size, len(table)))
        entity_ids = recommendation_batch(table, rows, run.max_context_entities, run.device)
        yield rows, model.recommendation_logits(nodes, entity_ids).float().cpu().numpy()
    model.train(was_training)


# ---------------------------------------------------------------- baselines and scoring for evaluation


def _recall_at(ranks: np.ndarray) -> dict:
    return {"recall@10": float((ranks <= 10).mean()) if len(ranks) else 0.0,
            "recall@50": float((ranks <= 50).mean()) if len(ranks) else 0.0}


def _valid_ranks(blocks, table: SampleTable) -> np.ndarray:
    ranks = []
    for rows, scores in blocks:
        targets = [(i, item) for i, row in enumerate(rows) for item in table.targets[row]]
        if targets:
            index, items = np.asarray(targets).T
            ranks.append(rank_of_targets(scores, index, items))
    return np.concatenate(ranks) if ranks else np.zeros(0)


def train_textcnn(model: TextCNNRecommender, run: Run, cfg, checkpoint_dir: Path, on_epoch=None) -> LoopState:
    """The TextCNN baseline: context words only, softmax over all items, the same (sample, item) pairs."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    sample_rows, target_items = recommendation_rows(run.train)

    def step_loss(picked: np.ndarray) -> torch.Tensor:
        ids = pad([run.train.context_tokens[r] for r in sample_rows[picked]], run.pad_id).to(run.device)
        return torch.nn.functional.cross_entropy(model(ids), torch.as_tensor(target_items[picked], device=run.device))

    def train_epoch(epoch: int) -> dict:
        rng = epoch_generator(run.seed, epoch)
        order = rng.permutation(len(sample_rows))
        lengths = run.train.context_lengths[sample_rows[order]]
        batches = [order[batch] for batch in bucketed_batches(lengths, cfg.batch_size, rng)]
        return _epoch(model, optimizer, batches, step_loss, cfg.grad_clip)

    return train(model, optimizer, checkpoint_dir, cfg.epochs, train_epoch,
                 validate=lambda: _recall_at(_valid_ranks(score_textcnn(model, run, run.valid, cfg.batch_size),
                                                          run.valid)),
                 monitor="valid_recall@50", higher_is_better=True, patience=cfg.patience, on_epoch=on_epoch)


@torch.no_grad()
def score_textcnn(model: TextCNNRecommender, run: Run, table: SampleTable,
                  batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    was_training = model.training
    model.eval()
    for start in range(0, len(table), batch_size):
        rows = np.arange(start, min(start + batch_size, len(table)))
        ids = pad([table.context_tokens[r] for r in rows], run.pad_id).to(run.device)
        yield rows, model(ids).float().cpu().numpy()
    model.train(was_training)
