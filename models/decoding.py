"""Decoding responses: greedy and beam search with a maximum length, n-gram blocking and banned tokens, driven by a
stepper (one token per row per step, returning the next-token log-probabilities). The C2-CRS generator's stepper
(_Stepper: key/value cache, memories projected once) is here; models/hred.py has HRED's.
"""

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


def _mask_tokens(
    log_probs: torch.Tensor, prefixes: list[list[int]], banned_ids: list[int], block_ngram: int
) -> torch.Tensor:
    if banned_ids:
        log_probs[:, banned_ids] = float("-inf")
    if block_ngram > 0:
        for row, prefix in enumerate(prefixes):
            banned = _banned_by_ngrams(prefix, block_ngram)
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
    block_ngram: int = 0,
    banned_ids: tuple[int, ...] = (),
    use_cache: bool = True,
) -> list[list[int]]:
    """The most likely next token at every step, until the end token or max_tokens; returns token ids per row
    (without start and end tokens)."""
    _check_length(model, max_tokens)
    return greedy_search(
        _Stepper(model, memories, source, use_cache),
        _batch_size(memories, source),
        model.cfg,
        max_tokens,
        block_ngram,
        banned_ids,
        model.output_bias.device,
    )


@torch.no_grad()
def beam_decode(
    model: ResponseGenerator,
    memories: dict[str, Memory],
    source: CopySource | None,
    max_tokens: int,
    beam_size: int,
    block_ngram: int = 0,
    banned_ids: tuple[int, ...] = (),
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
        block_ngram,
        banned_ids,
        length_penalty,
        model.output_bias.device,
    )


# The searches below drive any decoder through a stepper: step(prefix [rows, t]) -> log P(next) [rows, vocab], and
# step.reorder(rows) keeps the given rows of its state (beam search); ids: an object with start_id, end_id, pad_id.


@torch.no_grad()
def greedy_search(
    step, batch: int, ids, max_tokens: int, block_ngram: int = 0, banned_ids: tuple[int, ...] = (), device="cpu"
) -> list[list[int]]:
    prefix = torch.full((batch, 1), ids.start_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_tokens):
        log_probs = _mask_tokens(step(prefix), prefix[:, 1:].tolist(), list(banned_ids), block_ngram)
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
    block_ngram: int = 0,
    banned_ids: tuple[int, ...] = (),
    length_penalty: float = 0.0,
    device="cpu",
) -> list[list[int]]:
    """step's rows are each batch row beam_size times in a row. A hypothesis ends with the end token (its
    log-probability counted) or after max_tokens tokens; its score is its summed log-probability divided by
    length ** length_penalty (0: no normalisation)."""
    k = beam_size
    prefix = torch.full((batch * k, 1), ids.start_id, dtype=torch.long, device=device)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # every beam starts as the same empty hypothesis: keep one copy
    done = torch.zeros(batch * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * k, device=device)
    offsets = torch.arange(batch, device=device)[:, None] * k
    for _ in range(max_tokens):
        log_probs = _mask_tokens(step(prefix), prefix[:, 1:].tolist(), list(banned_ids), block_ngram)
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
