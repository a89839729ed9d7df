"""Stage finetune_conv (and the conversation baselines): response generation (paper 4.3.2) on the recommender's
turns, validation perplexity, and decoding.

Just over 400 lines: the vocabulary, the frozen-encoder caches, batching, training and decoding share one batch
layout (memories + copy source), so they stay together.

A sample is a recommender turn with a response: its context (tokens, entities, review sentences) is the
recommendation stages' (stages/training/c2crs_data.py), its target the turn's tokens with every movie token replaced by
one placeholder, which the recommender's top items fill when a response is shown (fill_movies).
"""

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from models.c2crs import batch_entities
from models.decoding import Rules, beam_decode, greedy_decode
from models.generator import USER, ConversationModel, generation_loss, instance_weights
from stages.io.progress import progress
from stages.training.c2crs_data import SampleTable, bucketed_batches, context_batch, pad, review_batch
from stages.training.c2crs_train import Run
from stages.training.loop import LoopState, adam, autocast, epoch_generator, evaluating, optimizer_step, train
from stages.triples import END, PAD, SPECIAL_TOKENS, SPLIT, START, UNK

PLACEHOLDER = "__movie__"


@dataclass
class ConvVocabulary:
    """The generator's output vocabulary: the conversation vocabulary plus the movie placeholder."""

    tokens: list[str]
    movie_token_ids: list[int]  # "@123" tokens of the input vocabulary; in responses they become the placeholder
    uncopyable_ids: list[int]  # pad, start, end, unk, split: the copy path never points at them
    banned_ids: list[int]  # never generated: pad, start, unk, split and the movie tokens themselves

    @property
    def placeholder_id(self) -> int:
        return len(self.tokens) - 1

    @property
    def token_id(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}


def conv_vocabulary(vocabulary: pl.DataFrame) -> ConvVocabulary:
    ordered = vocabulary.sort("token_id")
    tokens = ordered["token"].to_list()
    if ordered["token_id"].to_list() != list(range(len(tokens))) or tokens[: len(SPECIAL_TOKENS)] != list(
        SPECIAL_TOKENS
    ):
        raise ValueError(f"vocab.parquet: expected token ids 0..n-1 starting with {SPECIAL_TOKENS}")
    if PLACEHOLDER in tokens:
        raise ValueError(f"vocab.parquet: holds {PLACEHOLDER!r}, which the generator reserves for its placeholder")
    index = {t: i for i, t in enumerate(tokens)}
    movies = [i for i, t in enumerate(tokens) if t.startswith("@")]
    return ConvVocabulary(
        tokens=tokens + [PLACEHOLDER],
        movie_token_ids=movies,
        uncopyable_ids=[index[t] for t in (PAD, START, END, UNK, SPLIT)],
        banned_ids=[index[t] for t in (PAD, START, UNK, SPLIT)] + movies,
    )


@dataclass
class Responses:
    """What a generator learns to say on one split: rows of the split's SampleTable (recommender turns with a
    response) and each one's response as output-vocabulary ids."""

    rows: np.ndarray
    tokens: list[list[int]]

    def __len__(self) -> int:
        return len(self.rows)


def responses(samples: pl.DataFrame, table: SampleTable, split: str, vocabulary: ConvVocabulary) -> Responses:
    part = samples.filter(pl.col("split") == split).sort("sample_id")
    if not np.array_equal(part["sample_id"].to_numpy(), table.sample_ids):
        raise ValueError(f"samples.parquet: the {split} samples do not match the sample table")
    movies = set(vocabulary.movie_token_ids)
    rows, tokens = [], []
    for row, (role, response) in enumerate(zip(part["role"], part["response_token_ids"])):
        if role == "recommender" and len(response):
            rows.append(row)
            tokens.append([vocabulary.placeholder_id if t in movies else int(t) for t in response])
    return Responses(np.asarray(rows, dtype=np.int64), tokens)


def token_frequencies(train: Responses, vocab_size: int) -> torch.Tensor:
    """f_w of Eq. 12: how often each token occurs in the train responses."""
    counts = Counter(t for tokens in train.tokens for t in tokens)
    frequency = torch.zeros(vocab_size)
    for token, count in counts.items():
        frequency[token] = count
    return frequency


def loss_weights(train: Responses, vocabulary: ConvVocabulary, threshold: float, floor: float) -> torch.Tensor:
    """Eq. 12's alpha per output token. Two tokens keep weight 1: the end token, which is not a word of the corpus,
    and the movie placeholder, which stands for many tokens: in the reference's vocabulary every movie is a token
    of its own, far below the threshold (the placeholder itself is the most frequent response token here, and
    weighting it down teaches the generator to stop naming movies)."""
    weights = instance_weights(token_frequencies(train, len(vocabulary.tokens)), threshold, floor)
    weights[vocabulary.token_id[END]] = 1.0
    weights[vocabulary.placeholder_id] = 1.0
    return weights


# ---------------------------------------------------------------- batches


class FrozenReviews:
    """A frozen review encoder's outputs per review sentence, computed the first time a batch needs the sentence.

    A frozen encoder runs in eval mode (no dropout) and gets no gradient, so a sentence's states never change while
    the generator trains; on ReDial the train and valid samples use ~4,000 sentences (95k tokens), and encoding them
    once instead of in every batch saves 12 % of a finetune_conv step on CPU. Token states sit in one flat tensor
    (real tokens only, row 0: padding) and sentence vectors in another (row 0: no sentence), so a batch's are one
    gather each, already in the copy source's layout (models/generator.review_token_order).
    """

    def __init__(self, model: ConversationModel, sentence_tokens: list[list[int]], pad_id: int, device):
        self.model, self.sentence_tokens, self.pad_id = model, sentence_tokens, pad_id
        self.row: dict[int, int] = {}  # sentence -> its row in vectors
        self.token_rows: dict[int, np.ndarray] = {}  # sentence -> its tokens' rows in states
        dim = model.encoders.cfg.token_dim
        self.states = torch.zeros((1, dim), device=device)
        self.vectors = torch.zeros((1, dim), device=device)

    def _add(self, sentences: list[int]) -> None:
        ids = pad([self.sentence_tokens[s] for s in sentences], self.pad_id).to(self.states.device)
        states, vectors = self.model.encode_sentences(ids)
        real = ids.ne(self.pad_id)
        lengths = real.sum(dim=1).cpu().numpy()
        firsts = len(self.states) + np.cumsum(lengths) - lengths
        self.states = torch.cat([self.states, states[real].to(self.states.dtype)])
        self.vectors = torch.cat([self.vectors, vectors.to(self.vectors.dtype)])
        for i, s in enumerate(sentences):
            self.row[s] = len(self.row) + 1
            self.token_rows[s] = np.arange(firsts[i], firsts[i] + lengths[i])

    def batch(self, documents: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states [B, R, d] of each row's real sentence tokens in document order (zero past them) and
        sentence vectors [B, K, d] (zero past the row's sentences)."""
        missing = sorted({s for d in documents for s in d} - self.row.keys())
        if missing:
            self._add(missing)
        k = max([1] + [len(d) for d in documents])
        vector_index = torch.tensor(
            [[self.row[s] for s in d] + [0] * (k - len(d)) for d in documents], device=self.states.device
        )
        token_rows = [
            np.concatenate([self.token_rows[s] for s in d]) if d else np.zeros(0, np.int64) for d in documents
        ]
        token_index = np.zeros((len(documents), max([0] + [len(r) for r in token_rows])), dtype=np.int64)
        for i, rows in enumerate(token_rows):
            token_index[i, : len(rows)] = rows
        return self.states[torch.as_tensor(token_index, device=self.states.device)], self.vectors[vector_index]


class FrozenHistory:
    """A frozen conversation encoder's states per sample of one table, computed the first time a batch needs them.

    As with FrozenReviews, a frozen encoder runs in eval mode without gradient, so a context's states never change
    while the generator trains; the reference code trains its generator on frozen pre-trained encoders, and caching
    them removes the context encoder from every step after the first epoch. A sample's states are its context's
    real tokens (one state for an empty context, which attends to its first slot) in one flat tensor, so a batch's
    are a single gather; padding positions get zeros (the decoder masks them and never copies from them).
    """

    def __init__(self, model: ConversationModel, table: SampleTable, pad_id: int, device):
        self.model, self.table, self.pad_id = model, table, pad_id
        self.first = np.full(len(table.sample_ids), -1, dtype=np.int64)  # row of a sample's first state
        self.states = torch.zeros((1, model.encoders.cfg.token_dim), device=device)  # row 0: padding

    def _add(self, rows: np.ndarray) -> None:
        ids = pad([self.table.context_tokens[r] for r in rows], self.pad_id).to(self.states.device)
        states, _ = self.model.encode_context(ids)
        keep = ids.ne(self.pad_id)
        keep[:, 0] = True  # an empty context keeps its one (padding) state
        self.first[rows] = len(self.states) + np.concatenate([[0], np.cumsum(keep.sum(dim=1).cpu().numpy())[:-1]])
        self.states = torch.cat([self.states, states[keep].to(self.states.dtype)])

    def batch(self, rows: np.ndarray, context_ids: torch.Tensor) -> torch.Tensor:
        """The states [B, L, d] of the rows' contexts, laid out as context_ids [B, L] (right padding)."""
        missing = np.unique(rows[self.first[rows] < 0])
        if len(missing):
            self._add(missing)
        positions = torch.arange(context_ids.size(1), device=context_ids.device)
        real = context_ids.ne(self.pad_id)
        real[:, 0] = True
        index = torch.as_tensor(self.first[rows], device=context_ids.device)[:, None] + positions
        return self.states[index.masked_fill(~real, 0)]


class FrozenStates:
    """The outputs of the generator's frozen encoders that stay fixed during training: review sentences (shared by
    every split), each table's contexts and KGSF's word states. contexts=False for a single pass over a table
    (decoding, test scoring), where a context is encoded once anyway and keeping its states would only cost memory."""

    def __init__(self, model: ConversationModel, run: Run, contexts: bool = True):
        self.model, self.run, self.contexts = model, run, contexts
        wanted = model.generator.cfg.memory_dims
        self.reviews = (
            FrozenReviews(model, run.sentence_tokens, run.pad_id, run.device)
            if "review" in model.frozen and "review" in wanted
            else None
        )
        self._history: dict[int, FrozenHistory] = {}
        self._words: torch.Tensor | None = None

    def words(self) -> torch.Tensor | None:
        """KGSF's W when its word encoder is frozen: the word GCN over the whole graph (28k words) once instead of
        in every batch, 9 % of a conv_baselines@kgsf training step on CPU."""
        if "word" not in self.model.frozen or self.model.kgsf is None:
            return None
        if self._words is None:
            self._words = self.model.word_states()
        return self._words

    def history(self, table: SampleTable) -> FrozenHistory | None:
        if not self.contexts or "history" not in self.model.frozen:
            return None
        if id(table) not in self._history:
            self._history[id(table)] = FrozenHistory(self.model, table, self.run.pad_id, self.run.device)
        return self._history[id(table)]


def _batch(
    model: ConversationModel, run: Run, table: SampleTable, rows: np.ndarray, frozen: FrozenStates | None = None
) -> tuple[dict, object]:
    """The memories and the copy source of a batch of table rows."""
    wanted = model.generator.cfg.memory_dims
    context = {k: v.to(run.device) for k, v in context_batch(table, rows, run.pad_id, run.max_context_entities).items()}
    entity_rows, entity_ids = None, context["entity_ids"]
    if "kg" in wanted or model.generator.cfg.user_bias_dim:  # the KG memory, or KBRD's user vector
        nodes, (entity_ids,) = batch_entities(entity_ids)
        entity_rows = model.entity_rows(nodes, run.graph.edge_index.to(run.device), run.graph.edge_type.to(run.device))
    review_states = None
    if "review" in wanted:
        reviews = review_batch(table, rows, run.sentence_tokens, run.pad_id, run.max_review_sentences)
        if frozen is not None and frozen.reviews is not None:
            documents = [table.review_sentences(r, run.max_review_sentences) for r in rows]
            review_states = frozen.reviews.batch(documents)
    else:
        reviews = {
            "sentence_ids": torch.zeros((len(rows), 1, 1), dtype=torch.long),
            "sentence_mask": torch.zeros((len(rows), 1), dtype=torch.bool),
        }
    history = frozen.history(table) if frozen is not None else None
    history_states = history.batch(rows, context["context_ids"]) if history is not None else None
    return model.memories(
        context["context_ids"],
        entity_rows,
        entity_ids,
        reviews["sentence_ids"].to(run.device),
        reviews["sentence_mask"].to(run.device),
        review_states,
        history_states,
        frozen.words() if frozen is not None else None,
    )


def teacher_forcing(
    tokens: list[list[int]], start_id: int, end_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs (start + response) and targets (response + end), right-padded."""
    return pad([[start_id] + t for t in tokens], pad_id), pad([t + [end_id] for t in tokens], pad_id)


def target_log_probs(
    model: ConversationModel,
    run: Run,
    table: SampleTable,
    data: Responses,
    picked: np.ndarray,
    frozen: FrozenStates | None = None,
    auxiliary=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log P of every target token of the picked responses [B, T], the targets [B, T] (rows in the order of
    by_response_length(data, picked)), and the auxiliary losses' mean over the responses (None without)."""
    picked = by_response_length(data, picked)
    return _teacher_forced(
        model,
        run,
        data,
        picked,
        *_batch(model, run, table, data.rows[picked], frozen),
        auxiliary=auxiliary and (auxiliary, table),
    )


# The decoder runs a batch in this many groups of rows, each padded to its own longest response: on ReDial a batch
# of 128 holds 38 % real decoder positions in one group and 76 % in four, which cuts the decoder's work by half.
DECODER_GROUPS = 4


def by_response_length(data: Responses, picked: np.ndarray) -> np.ndarray:
    """picked, shortest response first (stable): the order in which DECODER_GROUPS pads least."""
    return picked[np.argsort([len(data.tokens[i]) for i in picked], kind="stable")]


def _teacher_forced(
    model: ConversationModel, run: Run, data: Responses, picked: np.ndarray, memories: dict, source, auxiliary=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Teacher-forced log P [B, T] and targets [B, T] of the picked responses (the rows of memories and source),
    decoded in DECODER_GROUPS consecutive groups of rows; the result is the same for any grouping. auxiliary:
    (losses, table), losses(table, table rows, decoder states, targets, memories) -> the group's summed extra
    losses (KECRS's: stages/training/kecrs_train.KECRSLosses); their mean over the rows comes third."""
    cfg = model.generator.cfg
    sizes = [len(g) for g in np.array_split(np.arange(len(picked)), min(DECODER_GROUPS, len(picked)))]
    groups = zip(
        np.split(picked, np.cumsum(sizes)[:-1]),
        zip(*(m.split(sizes) for m in memories.values())) if memories else [()] * len(sizes),
        source.split(sizes) if source is not None else [None] * len(sizes),
    )
    log_probs, targets, extra = [], [], None
    for rows, group_memories, group_source in groups:
        inputs, group_targets = teacher_forcing([data.tokens[i] for i in rows], cfg.start_id, cfg.end_id, cfg.pad_id)
        inputs, group_targets = inputs.to(run.device), group_targets.to(run.device)
        group = dict(zip(memories, group_memories))
        hidden = model.generator.decode(inputs, model.generator.memory_keys_values(group))
        log_probs.append(model.generator.target_log_probs(hidden, group_targets, group_source, group.get(USER)))
        targets.append(group_targets)
        if auxiliary:
            losses, table = auxiliary
            group_extra = losses(table, data.rows[rows], hidden, group_targets, group)
            extra = group_extra if extra is None else extra + group_extra
    width = max(t.size(1) for t in targets)
    return (
        torch.cat([F.pad(p, (0, width - p.size(1))) for p in log_probs]),
        torch.cat([F.pad(t, (0, width - t.size(1)), value=cfg.pad_id) for t in targets]),
        None if extra is None else extra / len(picked),
    )


def length_batches(
    table: SampleTable, data: Responses, batch_size: int, rng: np.random.Generator | None
) -> list[np.ndarray]:
    """Batches of similar context length; for scoring (rng None) also of similar response length, which pads the
    decoder 48 % less and cannot change a per-token sum. Not for training: the loss is a mean over each batch's
    tokens, so batches of short responses would weigh their tokens up to 8x more (measured on the Transformer
    baseline: validation perplexity 105.0 after one epoch with such batches, 86.2 without)."""
    lengths = table.context_lengths[data.rows]
    if rng is not None:
        return bucketed_batches(lengths, batch_size, rng)
    return bucketed_batches(
        lengths, batch_size, None, then_by=np.fromiter(map(len, data.tokens), dtype=np.int64, count=len(data))
    )


@torch.no_grad()
def perplexity(
    model: ConversationModel,
    run: Run,
    table: SampleTable,
    data: Responses,
    batch_size: int,
    frozen: FrozenStates | None = None,
) -> dict:
    """exp(mean negative log-likelihood per target token, end token included), unweighted, and the token count
    (nan with no tokens)."""
    with evaluating(model):
        return corpus_perplexity(
            (
                target_log_probs(model, run, table, data, picked, frozen)[:2]
                for picked in length_batches(table, data, batch_size, None)
            ),
            model.generator.cfg.pad_id,
        )


def corpus_perplexity(batches, pad_id: int) -> dict:
    """exp(mean negative log-likelihood per real target token) over (log_probs, targets) batches, and the token
    count (nan with no tokens): every generator's perplexity."""
    nll, count = 0.0, 0
    for log_probs, targets in batches:
        real = targets.ne(pad_id)
        nll -= float(log_probs[real].sum())
        count += int(real.sum())
    return {"perplexity": math.exp(nll / count) if count else float("nan"), "tokens": count}


def finetune_conversation(
    model: ConversationModel,
    run: Run,
    train_data: Responses,
    valid_data: Responses,
    weights: torch.Tensor | None,
    cfg,
    checkpoint_dir: Path,
    on_epoch=None,
    auxiliary=None,
) -> LoopState:
    """Response generation fine-tuning with Eq. 11's loss (weights: Eq. 12's alpha per token, None: plain
    cross-entropy) plus the auxiliary losses when given (see _teacher_forced); early stopping on validation
    perplexity."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adam(trainable, cfg.learning_rate)
    if weights is not None:
        weights = weights.to(run.device)
    frozen = FrozenStates(model, run)

    def train_epoch(epoch: int) -> dict:
        total, tokens = 0.0, 0
        batches = length_batches(run.train, train_data, cfg.batch_size, epoch_generator(run.seed, epoch))
        for picked in progress(batches, desc="train", unit=" batch", leave=False):
            with autocast(run.device, run.precision):
                log_probs, targets, extra = target_log_probs(
                    model, run, run.train, train_data, picked, frozen, auxiliary
                )
                loss = generation_loss(log_probs.float(), targets, model.generator.cfg.pad_id, weights)
                if extra is not None:
                    loss = loss + extra
            optimizer_step(optimizer, loss, trainable, cfg.grad_clip)
            real = int(targets.ne(model.generator.cfg.pad_id).sum())
            total, tokens = total + loss.item() * real, tokens + real
        return {"loss": total / max(tokens, 1)}

    return train(
        model,
        optimizer,
        checkpoint_dir,
        cfg.epochs,
        train_epoch,
        validate=lambda: perplexity(model, run, run.valid, valid_data, cfg.batch_size, frozen),
        monitor="valid_perplexity",
        higher_is_better=False,
        patience=cfg.patience,
        on_epoch=on_epoch,
    )


# ---------------------------------------------------------------- decoding


@torch.no_grad()
def generate(
    model: ConversationModel, run: Run, table: SampleTable, rows: np.ndarray, decoding, banned_ids: list[int]
) -> list[list[int]]:
    """A response (output-vocabulary ids, no start/end) for each of the table's `rows`, in that order."""
    with evaluating(model):
        out: list[list[int] | None] = [None] * len(rows)
        frozen = FrozenStates(model, run, contexts=False)
        for batch in progress(
            bucketed_batches(table.context_lengths[rows], decoding.batch_size, None),
            desc="generate",
            unit=" batch",
            leave=False,
        ):
            memories, source = _batch(model, run, table, rows[batch], frozen)
            for i, response in zip(batch, _decode(model, memories, source, decoding, banned_ids)):
                out[i] = response
    return out


def _decode(model: ConversationModel, memories: dict, source, decoding, banned_ids: list[int]) -> list[list[int]]:
    rules = Rules.of(decoding, banned_ids)
    if decoding.method == "beam":
        return beam_decode(
            model.generator, memories, source, decoding.max_tokens, decoding.beam_size, rules, decoding.length_penalty
        )
    return greedy_decode(model.generator, memories, source, decoding.max_tokens, rules)


@torch.no_grad()
def perplexity_and_responses(
    model: ConversationModel, run: Run, table: SampleTable, data: Responses, decoding, banned_ids: list[int]
) -> tuple[dict, list[list[int]]]:
    """perplexity() of data's responses and generate()'s response for each of data's rows, from one encoding of
    each batch's context, entities and reviews (evaluate's pass over the test split: the encoders are most of it)."""
    with evaluating(model):
        out: list[list[int] | None] = [None] * len(data)
        nll, count = 0.0, 0
        frozen = FrozenStates(model, run, contexts=False)
        for picked in progress(
            length_batches(table, data, decoding.batch_size, None),
            desc="perplexity and generate",
            unit=" batch",
            leave=False,
        ):
            picked = by_response_length(data, picked)
            memories, source = _batch(model, run, table, data.rows[picked], frozen)
            log_probs, targets, _ = _teacher_forced(model, run, data, picked, memories, source)
            real = targets.ne(model.generator.cfg.pad_id)
            nll -= float(log_probs[real].sum())
            count += int(real.sum())
            for i, response in zip(picked, _decode(model, memories, source, decoding, banned_ids)):
                out[i] = response
    return {"perplexity": math.exp(nll / count) if count else float("nan"), "tokens": count}, out


def fill_movies(words: list[str], titles: list[str]) -> list[str]:
    """The response with its k-th movie placeholder replaced by the k-th title (the recommender's ranking), so
    what the system says agrees with what it recommends."""
    filled, k = [], 0
    for word in words:
        if word == PLACEHOLDER and k < len(titles):
            filled.append(titles[k])
            k += 1
        else:
            filled.append(word)
    return filled
