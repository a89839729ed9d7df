"""Decoding responses: greedy and beam search with a maximum length, n-gram blocking, a repetition penalty, a ban on
repeating the previous token and banned tokens, driven by a stepper (one token per row per step, returning the
next-token log-probabilities). The C2-CRS generator's stepper (_Stepper: key/value cache, memories projected once)
is here; models/hred.py has HRED's.

The repetition penalty divides the probability of every token already in the response by `repetition_penalty`
(once per token, however often it occurred): log P'(w) = log P(w) - ln(penalty). Not CTRL's rule (a positive logit
divided by the penalty, a negative one multiplied): the steppers return log-probabilities of a mixture (vocabulary
softmax, copy attention, entity bag), not logits, and CTRL's rule on a log-probability (always negative) multiplies
it, which barely moves a confident token (log P -0.01 x 1.2 = -0.012) - the confident repeats ("so so") are the
ones to stop. A constant division of the probability is the same handicap for every repeat, and easy to reason
about: a fresh token wins over a repeated one whenever its probability is above the repeated one's / penalty.
"""

import math
from dataclasses import dataclass

import torch

from models.generator import USER, CopySource, Memory, ResponseGenerator


def _banned_by_ngrams(prefix: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in prefix (n-gram blocking)."""
    if n <= 0 or len(prefix) < n - 1:
        return []
    if n == 1:
        return list(set(prefix))
    tail = tuple(prefix[len(prefix) - n + 1 :])
    return [prefix[i + n - 1] for i in range(len(prefix) - n + 1) if tuple(prefix[i : i + n - 1]) == tail]


@dataclass(frozen=True)
class Rules:
    """What a search forbids or discourages beyond the model's own distribution (the module docstring gives the
    penalty's formula). block_ngram: never repeat an n-gram of this size within a response (0: off);
    repetition_penalty: divide an already-said token's probability by this (1: off); block_repeat_word: never the
    previous token again; banned_ids: tokens never said (special tokens)."""

    block_ngram: int = 0
    repetition_penalty: float = 1.0
    block_repeat_word: bool = False
    banned_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.block_ngram < 0 or self.repetition_penalty < 1:
            raise ValueError(
                f"block_ngram must be >= 0 and repetition_penalty >= 1, got {self.block_ngram}, "
                f"{self.repetition_penalty}"
            )

    @classmethod
    def of(cls, decoding, banned_ids) -> "Rules":
        """The rules of a decoding setting (any object with block_ngram, repetition_penalty, block_repeat_word:
        evaluate.decoding, or a generator's chosen setting)."""
        return cls(decoding.block_ngram, decoding.repetition_penalty, decoding.block_repeat_word, tuple(banned_ids))


def _mask_tokens(log_probs: torch.Tensor, prefixes: list[list[int]], rules: Rules) -> torch.Tensor:
    """log_probs [rows, vocab] (changed in place) under the rules, given each row's response so far."""
    if rules.banned_ids:
        log_probs[:, list(rules.banned_ids)] = float("-inf")
    penalty = math.log(rules.repetition_penalty)
    for row, prefix in enumerate(prefixes):
        if penalty and prefix:
            log_probs[row, sorted(set(prefix))] -= penalty
        banned = _banned_by_ngrams(prefix, rules.block_ngram) if rules.block_ngram > 0 else []
        if rules.block_repeat_word and prefix:
            banned.append(prefix[-1])
        if banned:
            log_probs[row, banned] = float("-inf")
    return log_probs


def _repeat_rows(x, k: int):
    """Each batch row k times in a row (for beam search): tensors, Memory and CopySource alike."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.repeat_interleave(k, dim=0)
    return type(x)(**{name: _repeat_rows(value, k) for name, value in vars(x).items()})


class _Stepper:
    """Feeds one token per row per step and returns the next-token log-probabilities; with use_cache the decoder
    sees only the new token (the cache holds the rest), without it the whole prefix again (for tests and benches)."""

    def __init__(
        self, model: ResponseGenerator, memories: dict[str, Memory], source: CopySource | None, use_cache: bool
    ):
        self.model, self.source, self.use_cache = model, source, use_cache
        self.user = memories.get(USER)
        self.memory_kv = model.memory_keys_values(memories)
        self.caches = [{} for _ in model.layers] if use_cache else None

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix [B, t] (start token first) -> log P(next) [B, vocab]."""
        if self.use_cache:
            hidden = self.model.decode(prefix[:, -1:], self.memory_kv, self.caches, offset=prefix.size(1) - 1)
        else:
            hidden = self.model.decode(prefix, self.memory_kv)
        return self.model.next_token_log_probs(hidden[:, -1], self.source, self.user)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep cache rows `rows` (beam search picks which hypotheses go on)."""
        if self.caches:
            for cache in self.caches:
                cache["k"], cache["v"] = cache["k"][rows], cache["v"][rows]


def _strip(tokens: list[int], end_id: int, pad_id: int) -> list[int]:
    out = []
    for t in tokens:
        if t in (end_id, pad_id):
            break
        out.append(t)
    return out


def _check_length(model: ResponseGenerator, max_tokens: int) -> None:
    if not 1 <= max_tokens <= model.cfg.max_positions:
        raise ValueError(
            f"max_tokens must be in 1..{model.cfg.max_positions} (the decoder's max_positions), got {max_tokens}"
        )


def _batch_size(memories: dict[str, Memory], source: CopySource | None) -> int:
    if memories:
        return next(iter(memories.values())).states.size(0)
    if source is None:
        raise ValueError("decoding needs at least one memory or a copy source (they give the batch size)")
    return source.ids.size(0)


@torch.no_grad()
def greedy_decode(
    model: ResponseGenerator,
    memories: dict[str, Memory],
    source: CopySource | None,
    max_tokens: int,
    rules: Rules = Rules(),
    use_cache: bool = True,
) -> list[list[int]]:
    """The most likely next token at every step (under the rules), until the end token or max_tokens; returns token
    ids per row (without start and end tokens)."""
    _check_length(model, max_tokens)
    return greedy_search(
        _Stepper(model, memories, source, use_cache),
        _batch_size(memories, source),
        model.cfg,
        max_tokens,
        rules,
        model.output_bias.device,
    )


@torch.no_grad()
def beam_decode(
    model: ResponseGenerator,
    memories: dict[str, Memory],
    source: CopySource | None,
    max_tokens: int,
    beam_size: int,
    rules: Rules = Rules(),
    length_penalty: float = 0.0,
    use_cache: bool = True,
) -> list[list[int]]:
    """Beam search (beam_search) over this generator."""
    _check_length(model, max_tokens)
    k = beam_size
    step = _Stepper(model, {m: _repeat_rows(v, k) for m, v in memories.items()}, _repeat_rows(source, k), use_cache)
    return beam_search(
        step,
        _batch_size(memories, source),
        model.cfg,
        max_tokens,
        beam_size,
        rules,
        length_penalty,
        model.output_bias.device,
    )


# The searches below drive any decoder through a stepper: step(prefix [rows, t]) -> log P(next) [rows, vocab], and
# step.reorder(rows) keeps the given rows of its state (beam search); ids: an object with start_id, end_id, pad_id.


@torch.no_grad()
def greedy_search(step, batch: int, ids, max_tokens: int, rules: Rules = Rules(), device="cpu") -> list[list[int]]:
    prefix = torch.full((batch, 1), ids.start_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_tokens):
        log_probs = _mask_tokens(step(prefix), prefix[:, 1:].tolist(), rules)
        token = log_probs.argmax(dim=-1).masked_fill(done, ids.pad_id)
        prefix = torch.cat([prefix, token[:, None]], dim=1)
        done |= token.eq(ids.end_id)
        if bool(done.all()):
            break
    return [_strip(row, ids.end_id, ids.pad_id) for row in prefix[:, 1:].tolist()]


@torch.no_grad()
def beam_search(
    step,
    batch: int,
    ids,
    max_tokens: int,
    beam_size: int,
    rules: Rules = Rules(),
    length_penalty: float = 0.0,
    device="cpu",
) -> list[list[int]]:
    """step's rows are each batch row beam_size times in a row. A hypothesis ends with the end token (its
    log-probability counted) or after max_tokens tokens; its score is its summed log-probability (penalised as the
    rules say) divided by length ** length_penalty (0: no normalisation)."""
    k = beam_size
    prefix = torch.full((batch * k, 1), ids.start_id, dtype=torch.long, device=device)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # every beam starts as the same empty hypothesis: keep one copy
    done = torch.zeros(batch * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * k, device=device)
    offsets = torch.arange(batch, device=device)[:, None] * k
    for _ in range(max_tokens):
        log_probs = _mask_tokens(step(prefix), prefix[:, 1:].tolist(), rules)
        # A finished hypothesis goes on with padding at no cost, so it keeps competing with its score as it is.
        log_probs[done] = float("-inf")
        log_probs[done, ids.pad_id] = 0.0
        V = log_probs.size(1)
        scores, index = (scores.view(-1, 1) + log_probs).view(batch, k * V).topk(k, dim=1)
        rows = (index // V + offsets).view(-1)
        token = (index % V).view(-1)
        prefix = torch.cat([prefix[rows], token[:, None]], dim=1)
        step.reorder(rows)
        lengths = lengths[rows] + (~done[rows]).float()
        done = done[rows] | token.eq(ids.end_id)
        alive = scores.view(-1) > float("-inf")
        if bool(done[alive].all()):
            break
    final = (scores.view(-1) / lengths.clamp(min=1) ** length_penalty).view(batch, k)
    final = final.masked_fill(scores == float("-inf"), float("-inf"))
    best = final.argmax(dim=1) + offsets[:, 0]
    return [_strip(row, ids.end_id, ids.pad_id) for row in prefix[best, 1:].tolist()]
