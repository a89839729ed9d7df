"""The C2-CRS training stages: coarse pre-training, fine pre-training, recommender fine-tuning, and scoring (the
TextCNN baseline is textcnn_train.py, the pre-training diagnostics probe.py, the repeat choice repeat_choice.py).

Over 400 lines: the three stages share one batch layout, the per-step sentence and context encodings and one epoch
loop (run_epoch), so they stay together.

Each stage is a function of tensors, a model and its settings; it trains with stages.training.train (resumable,
checkpointed every epoch) and reports per-epoch metrics through `on_epoch`. The knowledge-graph encoder runs, in
each step, only on the entities the step needs (their one-hop neighbourhood), except where every item's row is
needed (recommendation logits), where it runs on the whole graph.
"""

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.c2crs import C2CRS, batch_entities
from stages.evaluation.rec_metrics import rank_of_targets
from stages.io.progress import progress
from stages.training.c2crs_data import (
    Graph,
    SampleTable,
    bucketed_batches,
    context_batch,
    entity_batch,
    fine_batch,
    pad,
    per_conversation,
    recommendation_rows,
)
from stages.training.distributed import SINGLE_PROCESS, Ranks
from stages.training.loop import LoopState, adam, autocast, epoch_generator, evaluating, optimizer_step, train

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
    max_context_entities: int | None
    max_review_sentences: int
    device: torch.device
    seed: int
    views: frozenset[str] = frozenset(VIEWS)  # the ablations drop "conversation" (w/o CH) or "review" (w/o UD)
    ranks: Ranks = SINGLE_PROCESS  # the processes of a torchrun launch that share each batch
    precision: str = "fp32"  # params precision: bf16 runs training forward passes under autocast (loop.autocast)
    text_ratio: float = 0.0  # pre-training: text samples (in train, role "text") drawn per conversation sample
    passes_per_epoch: int = 1  # a share of the train conversations is passed over 1/share times an epoch


def _node_rows(model: C2CRS, run: Run, *entity_ids: torch.Tensor, with_items: bool = False):
    """N for the entities a batch needs (and every item, for recommendation), with the ids renumbered into it."""
    nodes, remapped = batch_entities(*entity_ids, n_items=run.graph.n_items if with_items else 0)
    if len(nodes) == 0:
        return torch.zeros(1, model.cfg.kg_dim, device=run.device), remapped
    rows = model.entity_graph(run.graph.edge_index.to(run.device), run.graph.edge_type.to(run.device), nodes)
    return rows, remapped


class StepSentences:
    """The review sentence vectors of one step, each distinct sentence encoded once: the fine loss's triples and the
    coarse loss's review documents of a pre-training step share most of their sentences."""

    def __init__(self, model: C2CRS, run: Run):
        self.model, self.run = model, run
        self.position: dict[int, int] = {}
        self.encoded: list[torch.Tensor] = []

    def vectors(self, sentence_ids: list[int]) -> torch.Tensor:
        """Vectors [len(sentence_ids), token_dim] of the given review sentences (indices of run.sentence_tokens)."""
        missing = sorted(set(sentence_ids) - self.position.keys())
        if missing:
            tokens = pad([self.run.sentence_tokens[s] for s in missing], self.run.pad_id).to(self.run.device)
            self.position.update({s: len(self.position) + i for i, s in enumerate(missing)})
            self.encoded.append(self.model.encode_sentences(tokens))
        every = torch.cat(self.encoded) if len(self.encoded) > 1 else self.encoded[0]
        return every[torch.as_tensor([self.position[s] for s in sentence_ids], dtype=torch.long, device=every.device)]


@dataclass
class EncodedContext:
    """A batch's context tensors, its conversation view and its review sentences, computed once for the coarse and
    the fine loss of a step (as one forward of the reference model does): the Transformers over the context and
    the sentences are a step's largest part."""

    batch: dict[str, torch.Tensor]
    e_c: torch.Tensor | None  # None: the conversation view is not used (w/o CH)
    words: torch.Tensor | None
    sentences: StepSentences


def encode_context(model: C2CRS, run: Run, table: SampleTable, rows: np.ndarray) -> EncodedContext:
    batch = {k: v.to(run.device) for k, v in context_batch(table, rows, run.pad_id, run.max_context_entities).items()}
    if "conversation" not in run.views:
        return EncodedContext(batch, None, None, StepSentences(model, run))
    e_c, words = model.conversation_view(batch["context_ids"])
    return EncodedContext(batch, e_c, words, StepSentences(model, run))


def coarse_losses(
    model: C2CRS, run: Run, table: SampleTable, rows: np.ndarray, context: EncodedContext | None = None
) -> torch.Tensor:
    context = context or encode_context(model, run, table, rows)
    batch = context.batch
    rows_valid = torch.ones(len(rows), dtype=torch.bool, device=run.device)
    if context.e_c is not None:
        e_c = context.e_c
    else:
        e_c, rows_valid = torch.zeros(len(rows), model.cfg.token_dim, device=run.device), ~rows_valid
    n_rows, (entity_ids,) = _node_rows(model, run, batch["entity_ids"])
    e_g = model.graph_view(n_rows, entity_ids)
    documents = [table.review_sentences(r, run.max_review_sentences) for r in rows]
    sentence_mask = torch.zeros((len(rows), max([1] + [len(d) for d in documents])), dtype=torch.bool)
    for i, document in enumerate(documents):
        sentence_mask[i, : len(document)] = True
    sentence_mask = sentence_mask.to(run.device)
    valid_review = sentence_mask.any(1)
    if "review" in run.views and valid_review.any():
        E = torch.zeros((*sentence_mask.shape, model.cfg.token_dim), device=run.device)
        vectors = context.sentences.vectors([s for d in documents for s in d])
        E = E.index_put(sentence_mask.nonzero(as_tuple=True), vectors.to(E.dtype))
        e_r = model.review_document(E, sentence_mask)
    else:
        e_r, valid_review = torch.zeros(len(rows), model.cfg.token_dim, device=run.device), valid_review & False
    return model.coarse_contrastive_loss(
        e_c, e_g, e_r, valid_graph=(entity_ids >= 0).any(1), valid_review=valid_review, valid_conversation=rows_valid
    )


def fine_losses(
    model: C2CRS,
    run: Run,
    table: SampleTable,
    rows: np.ndarray,
    max_triples: int,
    rng: np.random.Generator | None,
    context: EncodedContext | None = None,
) -> torch.Tensor:
    batch = {k: v.to(run.device) for k, v in fine_batch(table, rows, max_triples, rng).items()}
    if len(batch["triple_rows"]) < 2:
        return torch.zeros((), device=run.device, requires_grad=True)
    context = context or encode_context(model, run, table, rows)
    if "conversation" in run.views:
        word_vectors = context.words[batch["triple_rows"], batch["triple_positions"]]
    else:
        word_vectors = torch.zeros(len(batch["triple_rows"]), model.cfg.token_dim, device=run.device)
    n_rows, (entity_index,) = _node_rows(model, run, batch["triple_entities"])
    entity_vectors = n_rows[entity_index]
    sentence_ids = batch["triple_sentences"]
    if "review" in run.views:
        sentence_vectors = context.sentences.vectors(sentence_ids.tolist())
    else:
        sentence_vectors, sentence_ids = torch.zeros_like(word_vectors), torch.full_like(sentence_ids, -1)
    return model.fine_contrastive_loss(
        word_vectors,
        entity_vectors,
        sentence_vectors,
        entity_ids=batch["triple_entities"],
        sentence_ids=sentence_ids,
        use_words="conversation" in run.views,
    )


def pretraining_rows(table: SampleTable, cfg, rng: np.random.Generator, text_ratio: float = 0.0) -> np.ndarray:
    """The sample rows of one pre-training epoch: every turn (cfg.sample_unit "turn") or one row per (turn, movie
    it mentions) ("mention", the reference's samples), at most cfg.samples_per_conversation per conversation; then
    text_ratio x as many of the table's text samples (stages/text_triples.py), drawn anew each epoch."""
    is_text = table.is_text
    candidates = recommendation_rows(table)[0] if cfg.sample_unit == "mention" else np.flatnonzero(~is_text)
    rows = candidates[per_conversation(table.conv_ids[candidates], cfg.samples_per_conversation, rng)]
    if text_ratio > 0 and is_text.any():
        texts = np.flatnonzero(is_text)
        drawn = rng.choice(texts, min(len(texts), round(text_ratio * len(rows))), replace=False)
        rows = np.sort(np.concatenate([rows, drawn]))
    return rows


def _pretraining_batches(run: Run, cfg, rng: np.random.Generator) -> list[np.ndarray]:
    rows = np.concatenate([pretraining_rows(run.train, cfg, rng, run.text_ratio) for _ in range(run.passes_per_epoch)])
    return [rows[batch] for batch in bucketed_batches(run.train.context_lengths[rows], cfg.batch_size, rng)]


def run_epoch(
    model, optimizer, batches, step_loss: Callable[[np.ndarray], torch.Tensor], grad_clip: float, run: Run
) -> dict:
    """One pass over the batches; distributed, each process steps on its share of every batch (run.ranks.shard).
    The forward pass runs under run.precision's autocast, the backward and the update in float32."""
    ranks = run.ranks
    run_step = ranks.step_runner(model)
    total, count = 0.0, 0
    for rows in progress(batches, desc="train", unit=" batch", leave=False):
        mine, share = ranks.shard(rows)
        with autocast(run.device, run.precision):
            loss = run_step(step_loss, mine).float()
        optimizer_step(optimizer, loss * share, model.parameters(), grad_clip)
        total += loss.item() * len(mine)
        count += len(mine)
    return {"loss": ranks.mean(total, count)}


@torch.no_grad()
def _mean_loss(table: SampleTable, cfg, step_loss: Callable[[np.ndarray], torch.Tensor], seed: int) -> dict:
    """Validation loss on a fixed draw of the valid samples (the same every epoch), in train mode as it always was
    (dropout on: the number is the training loss's twin), without autograd."""
    rows = pretraining_rows(table, cfg, np.random.default_rng(seed))
    batches = [rows[b] for b in bucketed_batches(table.context_lengths[rows], cfg.batch_size, None)]
    losses = [(float(step_loss(rows)), len(rows)) for rows in batches]
    return {"loss": sum(loss * n for loss, n in losses) / max(sum(n for _, n in losses), 1)}


def pretrain_coarse(model: C2CRS, run: Run, cfg, checkpoint_dir: Path, on_epoch=None) -> LoopState:
    """Coarse-grained contrastive pre-training (4.2.1): conversation vs. subgraph vs. review document."""
    model.cfg.temperature = cfg.temperature
    optimizer = adam(model.parameters(), cfg.learning_rate)

    def step(table):
        return lambda rows: coarse_losses(model, run, table, rows)

    def train_epoch(epoch: int) -> dict:
        return run_epoch(
            model,
            optimizer,
            _pretraining_batches(run, cfg, epoch_generator(run.seed, epoch)),
            step(run.train),
            cfg.grad_clip,
            run,
        )

    return train(
        model,
        optimizer,
        checkpoint_dir,
        cfg.epochs,
        train_epoch,
        validate=lambda: _mean_loss(run.valid, cfg, step(run.valid), run.seed),
        monitor="valid_loss",
        higher_is_better=False,
        patience=cfg.patience,
        on_epoch=on_epoch,
        min_improvement=cfg.min_improvement,
    )


def pretrain_fine(model: C2CRS, run: Run, cfg, checkpoint_dir: Path, on_epoch=None) -> LoopState:
    """Fine-grained contrastive pre-training (4.2.2) with lambda x the coarse loss (Eq. 7)."""
    model.cfg.temperature = cfg.temperature
    optimizer = adam(model.parameters(), cfg.learning_rate)

    def step_loss(table, rng):
        def loss(rows):
            context = encode_context(model, run, table, rows)
            fine = fine_losses(model, run, table, rows, cfg.max_triples_per_sample, rng, context)
            coarse = coarse_losses(model, run, table, rows, context) if cfg.coarse_weight else torch.zeros(())
            return model.pretraining_loss(fine, coarse, cfg.coarse_weight)

        return loss

    def train_epoch(epoch: int) -> dict:
        rng = epoch_generator(run.seed, epoch)
        return run_epoch(
            model, optimizer, _pretraining_batches(run, cfg, rng), step_loss(run.train, rng), cfg.grad_clip, run
        )

    return train(
        model,
        optimizer,
        checkpoint_dir,
        cfg.epochs,
        train_epoch,
        validate=lambda: _mean_loss(run.valid, cfg, step_loss(run.valid, None), run.seed),
        monitor="valid_loss",
        higher_is_better=False,
        patience=cfg.patience,
        on_epoch=on_epoch,
        min_improvement=cfg.min_improvement,
    )


def recommendation_batch(table: SampleTable, rows: np.ndarray, max_entities: int, device) -> torch.Tensor:
    return entity_batch(table, rows, max_entities).to(device)


def finetune_recommender(
    model: C2CRS,
    run: Run,
    cfg,
    checkpoint_dir: Path,
    on_epoch=None,
    training_pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> LoopState:
    """Recommendation fine-tuning (4.3.1): self-attention over the context entities, softmax over all items (or
    all entities, cfg.softmax_over). training_pairs: the (sample rows, target items) to train on; default every
    (sample, target) pair of the train split (KECRS trains on a subset).

    One step runs the R-GCN on every item and the batch's context entities (every item's row is scored) and
    trains on a batch of (sample, target item) pairs. Validation: recall@10 and recall@50 on the valid split, which
    picks the best epoch.
    """
    optimizer = adam(model.parameters(), cfg.learning_rate)
    sample_rows, target_items = training_pairs or recommendation_rows(run.train)

    def step_loss(picked: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        entity_ids = recommendation_batch(run.train, sample_rows[picked], run.max_context_entities, run.device)
        if cfg.softmax_over == "entities":  # every entity is a candidate: the whole graph's N
            nodes = model.entity_graph(run.graph.edge_index.to(run.device), run.graph.edge_type.to(run.device))
            logits = model.recommendation_logits(nodes, entity_ids, all_entities=True)
        else:
            nodes, (entity_ids,) = _node_rows(model, run, entity_ids, with_items=True)
            logits = model.recommendation_logits(nodes, entity_ids)
        loss = model.recommendation_loss(logits, torch.as_tensor(target_items[picked], device=run.device))
        if cfg.pretraining_weight:  # the "multi-task" ablation: every objective at once, no pre-training
            samples = np.unique(sample_rows[picked])
            if cfg.pretraining_samples_per_step and len(samples) > cfg.pretraining_samples_per_step:
                samples = np.sort(rng.choice(samples, cfg.pretraining_samples_per_step, replace=False))
            context = encode_context(model, run, run.train, samples)
            pretraining = model.pretraining_loss(
                fine_losses(model, run, run.train, samples, cfg.max_triples_per_sample, rng, context),
                coarse_losses(model, run, run.train, samples, context),
                cfg.coarse_weight,
            )
            loss = loss + cfg.pretraining_weight * pretraining
        return loss

    def train_epoch(epoch: int) -> dict:
        rng = epoch_generator(run.seed, epoch)
        order = np.concatenate([rng.permutation(len(sample_rows)) for _ in range(run.passes_per_epoch)])
        if cfg.pretraining_weight:  # the step encodes contexts too: batch similar lengths, as pre-training does
            lengths = run.train.context_lengths[sample_rows[order]]
            batches = [order[batch] for batch in bucketed_batches(lengths, cfg.batch_size, rng)]
        else:
            batches = [order[start : start + cfg.batch_size] for start in range(0, len(order), cfg.batch_size)]
        return run_epoch(model, optimizer, batches, lambda picked: step_loss(picked, rng), cfg.grad_clip, run)

    def validate() -> dict:
        return recall_at(valid_ranks(score_samples(model, run, run.valid, cfg.batch_size), run.valid))

    return train(
        model,
        optimizer,
        checkpoint_dir,
        cfg.epochs,
        train_epoch,
        validate=validate,
        monitor="valid_recall@50",
        higher_is_better=True,
        patience=cfg.patience,
        on_epoch=on_epoch,
    )


@torch.no_grad()
def score_in_blocks(
    model: torch.nn.Module, table: SampleTable, batch_size: int, scores_of: Callable[[np.ndarray], torch.Tensor]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices, scores [rows, n_items]) for every sample of a table, `batch_size` rows at a time, with the model
    in eval mode meanwhile; scores_of(rows) scores one block."""
    with evaluating(model):
        for start in range(0, len(table), batch_size):
            rows = np.arange(start, min(start + batch_size, len(table)))
            yield rows, scores_of(rows).float().cpu().numpy()


def _table_graph(model: C2CRS, run: Run, table: SampleTable) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """N for the items and the table's context entities only (KGEncoder.forward_nodes: their one-hop neighbourhood,
    20x cheaper than the whole graph on ReDial) and every row's context entities renumbered into it ([rows, E],
    -1 padding), computed on first use (inside score_in_blocks, so in eval mode) and then reused."""

    @functools.cache
    def graph():
        entity_ids = recommendation_batch(table, np.arange(len(table)), run.max_context_entities, run.device)
        nodes, (remapped,) = batch_entities(entity_ids, n_items=run.graph.n_items)
        return model.entity_graph(
            run.graph.edge_index.to(run.device), run.graph.edge_type.to(run.device), nodes
        ), remapped

    return graph


def score_samples(
    model: C2CRS, run: Run, table: SampleTable, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The recommender's item scores (Eq. 8) for every sample of a table, in blocks."""
    graph = _table_graph(model, run, table)
    return score_in_blocks(
        model,
        table,
        batch_size,
        lambda rows: model.recommendation_logits(graph()[0], graph()[1][torch.as_tensor(rows, device=run.device)]),
    )


@torch.no_grad()
def scores_with_pooling_weights(
    model: C2CRS, run: Run, table: SampleTable, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the recommender recommends and what it attended to, from one pass over the graph: the item scores of the
    rows [R, n_items] (score_samples' scores), their context entities as the recommender reads them (the most recent
    max_context_entities, -1 padding) [R, E], and each entity's weight in the user vector [R, E]."""
    graph = _table_graph(model, run, table)
    with evaluating(model):
        N, remapped = graph()
        ids = remapped[torch.as_tensor(rows, device=run.device)]
        scores, weights = model.recommendation_logits(N, ids), model.user_pooling_weights(N, ids)
    every_row = recommendation_batch(table, np.arange(len(table)), run.max_context_entities, "cpu")  # as remapped
    entity_ids = every_row[rows]
    return scores.float().cpu().numpy(), entity_ids.cpu().numpy(), weights.float().cpu().numpy()


# ---------------------------------------------------------------- baselines and scoring for evaluation


def recall_at(ranks: np.ndarray) -> dict:
    return {
        "recall@10": float((ranks <= 10).mean()) if len(ranks) else 0.0,
        "recall@50": float((ranks <= 50).mean()) if len(ranks) else 0.0,
    }


def valid_ranks(blocks, table: SampleTable) -> np.ndarray:
    ranks = []
    for rows, scores in blocks:
        targets = [(i, item) for i, row in enumerate(rows) for item in table.targets[row]]
        if targets:
            index, items = np.asarray(targets).T
            ranks.append(rank_of_targets(scores, index, items))
    return np.concatenate(ranks) if ranks else np.zeros(0)
