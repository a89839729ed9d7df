"""Training, scoring and decoding of ReDial's HRED generator (models/hred.py), on the same samples, responses,
batches, loss and decoding rules as the Transformer generators (stages/training/conv_train.py)."""

import math
from pathlib import Path

import numpy as np
import torch

from models.decoding import Rules, beam_search, greedy_search
from models.generator import generation_loss
from models.hred import HRED, HREDStepper
from stages.io.progress import progress
from stages.training.c2crs_data import SampleTable, bucketed_batches
from stages.training.c2crs_train import Run
from stages.training.conv_train import (
    Responses,
    by_response_length,
    corpus_perplexity,
    length_batches,
    teacher_forcing,
)
from stages.training.loop import LoopState, adam, autocast, epoch_generator, evaluating, optimizer_step, train


def context_utterances(tokens: list[int], split_id: int, max_utterance_tokens: int) -> list[list[int]]:
    """A sample's context tokens (utterances, each followed by the split token; the oldest may be cut) as its
    utterances, each at most max_utterance_tokens long (its last tokens). An empty context is one split token."""
    utterances, current = [], []
    for token in tokens:
        if token == split_id:
            if current:
                utterances.append(current[-max_utterance_tokens:])
            current = []
        else:
            current.append(token)
    if current:
        utterances.append(current[-max_utterance_tokens:])
    return utterances or [[split_id]]


def utterance_batch(model: HRED, table: SampleTable, rows: np.ndarray, device) -> torch.Tensor:
    """The rows' contexts as utterances [B, U, L], padded."""
    cfg = model.cfg
    contexts = [context_utterances(table.context_tokens[r], cfg.split_id, cfg.max_utterance_tokens) for r in rows]
    U = max(len(c) for c in contexts)
    L = max(len(u) for c in contexts for u in c)
    batch = torch.full((len(rows), U, L), cfg.pad_id, dtype=torch.long)
    for i, context in enumerate(contexts):
        for j, utterance in enumerate(context):
            batch[i, j, : len(utterance)] = torch.as_tensor(utterance)
    return batch.to(device)


def target_log_probs(
    model: HRED, run: Run, table: SampleTable, data: Responses, picked: np.ndarray, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log P of every target token of the picked responses [B, T] and the targets [B, T]; state: the decoder's
    first state for them when the caller has it (model.encode)."""
    cfg = model.cfg
    inputs, targets = teacher_forcing([data.tokens[i] for i in picked], cfg.start_id, cfg.end_id, cfg.pad_id)
    if state is None:
        state = model.encode(utterance_batch(model, table, data.rows[picked], run.device))
    outputs, _ = model.decode(inputs.to(run.device), state)
    targets = targets.to(run.device)
    return model.target_log_probs(outputs, targets), targets


@torch.no_grad()
def perplexity(model: HRED, run: Run, table: SampleTable, data: Responses, batch_size: int) -> dict:
    with evaluating(model):
        return corpus_perplexity(
            (
                target_log_probs(model, run, table, data, picked)
                for picked in length_batches(table, data, batch_size, None)
            ),
            model.cfg.pad_id,
        )


def train_hred(
    model: HRED, run: Run, train_data: Responses, valid_data: Responses, cfg, checkpoint_dir: Path, on_epoch=None
) -> LoopState:
    """Cross-entropy on the train responses (teacher forcing), early stopping on validation perplexity."""
    optimizer = adam(model.parameters(), cfg.learning_rate)

    def train_epoch(epoch: int) -> dict:
        total, tokens = 0.0, 0
        batches = length_batches(run.train, train_data, cfg.batch_size, epoch_generator(run.seed, epoch))
        for picked in progress(batches, desc="train", unit=" batch", leave=False):
            with autocast(run.device, run.precision):
                log_probs, targets = target_log_probs(model, run, run.train, train_data, picked)
                loss = generation_loss(log_probs.float(), targets, model.cfg.pad_id)
            optimizer_step(optimizer, loss, model.parameters(), cfg.grad_clip)
            real = int(targets.ne(model.cfg.pad_id).sum())
            total, tokens = total + loss.item() * real, tokens + real
        return {"loss": total / max(tokens, 1)}

    return train(
        model,
        optimizer,
        checkpoint_dir,
        cfg.epochs,
        train_epoch,
        validate=lambda: perplexity(model, run, run.valid, valid_data, cfg.batch_size),
        monitor="valid_perplexity",
        higher_is_better=False,
        patience=cfg.patience,
        on_epoch=on_epoch,
    )


def decode(model: HRED, state: torch.Tensor, decoding, banned_ids: list[int]) -> list[list[int]]:
    """Responses from the decoder's first states [1, B, context_dim] under evaluate.decoding's rules."""
    batch, rules = state.size(1), Rules.of(decoding, banned_ids)
    if decoding.method == "beam":
        step = HREDStepper(model, state.repeat_interleave(decoding.beam_size, dim=1))
        return beam_search(
            step,
            batch,
            model.cfg,
            decoding.max_tokens,
            decoding.beam_size,
            rules,
            decoding.length_penalty,
            state.device,
        )
    return greedy_search(HREDStepper(model, state), batch, model.cfg, decoding.max_tokens, rules, state.device)


@torch.no_grad()
def generate(
    model: HRED, run: Run, table: SampleTable, rows: np.ndarray, decoding, banned_ids: list[int]
) -> list[list[int]]:
    """A response for each of the table's rows, in that order."""
    with evaluating(model):
        out: list[list[int] | None] = [None] * len(rows)
        for batch in bucketed_batches(table.context_lengths[rows], decoding.batch_size, None):
            state = model.encode(utterance_batch(model, table, rows[batch], run.device))
            for i, response in zip(batch, decode(model, state, decoding, banned_ids)):
                out[i] = response
    return out


@torch.no_grad()
def perplexity_and_responses(
    model: HRED, run: Run, table: SampleTable, data: Responses, decoding, banned_ids: list[int]
) -> tuple[dict, list[list[int]]]:
    """As conv_train.perplexity_and_responses: perplexity of data's responses and a response for each row."""
    with evaluating(model):
        out: list[list[int] | None] = [None] * len(data)
        nll, count = 0.0, 0
        for picked in progress(
            length_batches(table, data, decoding.batch_size, None),
            desc="perplexity and generate",
            unit=" batch",
            leave=False,
        ):
            picked = by_response_length(data, picked)
            state = model.encode(utterance_batch(model, table, data.rows[picked], run.device))
            log_probs, targets = target_log_probs(model, run, table, data, picked, state)
            real = targets.ne(model.cfg.pad_id)
            nll -= float(log_probs[real].sum())
            count += int(real.sum())
            for i, response in zip(picked, decode(model, state, decoding, banned_ids)):
                out[i] = response
    return {"perplexity": math.exp(nll / count) if count else float("nan"), "tokens": count}, out
