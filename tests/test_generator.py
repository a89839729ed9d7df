"""The response generator (models/generator.py, models/decoding.py): masks, copy path, Eq. 11-12, decoding.

Over 400 lines since the formatter: one tiny generator and its memories serve every case; split, each file would
rebuild them."""

import itertools

import numpy as np
import pytest
import torch

from models.c2crs import C2CRS
from models.decoding import Rules, _banned_by_ngrams, beam_decode, greedy_decode
from models.generator import (
    ConversationModel,
    CopySource,
    Memory,
    ResponseGenerator,
    generation_loss,
    instance_weights,
)
from tests.conftest import c2crs_config, tiny_generator_config

PAD, START, END = 0, 1, 2


def tiny_generator(vocab_size=12, copy=True, memories=("history", "kg", "review"), seed=0, max_positions=8):
    torch.manual_seed(seed)
    cfg = tiny_generator_config(
        vocab_size=vocab_size,
        memory_dims={m: 8 if m != "kg" else 6 for m in memories},
        dim=8,
        n_layers=2,
        n_heads=2,
        ffn_dim=16,
        dropout=0.0,
        max_positions=max_positions,
        copy=copy,
    )
    return ResponseGenerator(cfg).eval()


def tiny_memories(batch=3, memories=("history", "kg", "review"), seed=1):
    g = torch.Generator().manual_seed(seed)
    dims = {"history": 8, "kg": 6, "review": 8}
    out = {}
    for m in memories:
        states = torch.randn(batch, 5, dims[m], generator=g)
        pad = torch.zeros(batch, 5, dtype=torch.bool)
        pad[0, 3:] = True
        out[m] = Memory(states, pad)
    if "kg" in out and batch > 1:
        out["kg"].pad[1] = True  # a turn without any linked entity
    return out


def tiny_source(batch=3, vocab_size=12, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, 6), generator=g)
    blocked = torch.zeros(batch, 6, dtype=torch.bool)
    blocked[:, -1] = True
    return CopySource(torch.randn(batch, 6, 8, generator=g), ids, blocked)


def test_the_decoder_never_looks_at_future_tokens():
    model, memories = tiny_generator(), tiny_memories()
    kv = model.memory_keys_values(memories)
    ids = torch.tensor([[START, 5, 6, 7, 8]] * 3)
    changed = ids.clone()
    changed[:, 3:] = torch.tensor([9, 10])
    a, b = model.decode(ids, kv), model.decode(changed, kv)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3:], b[:, 3:])
    assert torch.isfinite(a).all()  # the row whose KG memory is empty attends to its (zeroed) first slot


def test_the_copy_path_emits_a_token_the_vocabulary_softmax_all_but_forbids():
    model = tiny_generator(copy=True)
    with torch.no_grad():
        model.output_bias[9] = -40.0  # the generation path gives token 9 ~e^-40
        model.copy_gate.bias.fill_(-20.0)  # and the gate leans fully on copying
        model.copy_gate.weight.zero_()
    memories = tiny_memories(batch=1)
    source = CopySource(torch.randn(1, 3, 8), torch.tensor([[9, 9, 4]]), torch.tensor([[False, False, True]]))
    hidden = model.decode(torch.tensor([[START]]), model.memory_keys_values(memories))
    generated_only = torch.log_softmax(model.vocabulary_logits(hidden[:, -1]), -1)[0, 9]
    assert generated_only < -30
    log_probs = model.next_token_log_probs(hidden[:, -1], source)[0]
    assert log_probs[9] > torch.log(torch.tensor(0.99))  # both unblocked source positions hold 9
    assert log_probs[4] < -20  # a blocked position is never copied
    assert torch.allclose(log_probs.exp().sum(), torch.tensor(1.0), atol=1e-4)
    # target_log_probs (training) gives the same probability without building the full distribution
    assert torch.allclose(model.target_log_probs(hidden, torch.tensor([[9]]), source)[0, 0], log_probs[9], atol=1e-5)


def test_with_nothing_to_copy_the_distribution_is_the_vocabulary_softmax():
    model = tiny_generator(copy=True)
    memories = tiny_memories(batch=1)
    source = CopySource(torch.randn(1, 2, 8), torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.bool))
    hidden = model.decode(torch.tensor([[START]]), model.memory_keys_values(memories))[:, -1]
    expected = torch.log_softmax(model.vocabulary_logits(hidden), -1)
    assert torch.allclose(model.next_token_log_probs(hidden, source), expected, atol=1e-5)


def test_instance_weights_follow_eq_12_on_hand_values():
    frequency = torch.tensor([0.0, 10.0, 1499.0, 1500.0, 3000.0, 75000.0, 1e6])
    weights = instance_weights(frequency, threshold=1500, floor=0.02)
    # below the threshold: 1; at or above: max(0.02, 1500 / f)
    assert weights.tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.5, 0.02, 0.02])


def test_generation_loss_weights_each_token_and_averages_over_real_tokens():
    log_probs = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 1.0, 1.0]]))
    targets = torch.tensor([[4, 5, 0], [4, 0, 0]])  # 0 is padding
    weights = torch.ones(8)
    weights[4] = 0.1
    expected = (
        0.1 * -torch.log(torch.tensor(0.5)) - torch.log(torch.tensor(0.25)) + 0.1 * -torch.log(torch.tensor(0.1))
    ) / 3
    assert torch.allclose(generation_loss(log_probs, targets, 0, weights), expected)
    plain = (-torch.log(torch.tensor([0.5, 0.25, 0.1]))).mean()
    assert torch.allclose(generation_loss(log_probs, targets, 0), plain)


def test_ngram_blocking_by_hand():
    assert sorted(_banned_by_ngrams([5, 6, 7, 5, 6], 3)) == [7]
    assert _banned_by_ngrams([5, 6, 7], 3) == []
    assert sorted(_banned_by_ngrams([5, 6, 5], 2)) == [6]
    assert sorted(_banned_by_ngrams([5, 6], 1)) == [5, 6]
    assert _banned_by_ngrams([5], 0) == []


@pytest.mark.parametrize("copy", [True, False])
def test_cached_and_uncached_decoding_give_the_same_tokens(copy):
    model, memories = tiny_generator(copy=copy), tiny_memories()
    source = tiny_source() if copy else None
    cached = greedy_decode(model, memories, source, max_tokens=7, rules=Rules(block_ngram=2, banned_ids=(PAD, START)))
    uncached = greedy_decode(
        model, memories, source, max_tokens=7, rules=Rules(block_ngram=2, banned_ids=(PAD, START)), use_cache=False
    )
    assert cached == uncached and all(len(r) <= 7 for r in cached)
    beam = beam_decode(model, memories, source, max_tokens=7, beam_size=3, rules=Rules(banned_ids=(PAD, START)))
    assert beam == beam_decode(
        model, memories, source, max_tokens=7, beam_size=3, rules=Rules(banned_ids=(PAD, START)), use_cache=False
    )


def test_greedy_decoding_blocks_repeated_ngrams():
    model = tiny_generator(copy=False, memories=("history",), max_positions=16)
    with torch.no_grad():
        model.output_bias[7] = 30.0  # left alone it says 7 7 7 ...
    memories = tiny_memories(memories=("history",))
    assert greedy_decode(model, memories, None, max_tokens=5, rules=Rules(banned_ids=(PAD, START)))[0] == [7] * 5
    blocked = greedy_decode(model, memories, None, max_tokens=12, rules=Rules(block_ngram=2, banned_ids=(PAD, START)))
    for row in blocked:
        bigrams = list(zip(row, row[1:]))
        assert len(bigrams) == len(set(bigrams))


def _sequence_log_prob(model, memories, source, tokens):
    """log P of a whole response (as decoding scores it) by running the decoder on its prefix."""
    kv = model.memory_keys_values(memories)
    ids = torch.tensor([[START] + tokens[:-1]])
    hidden = model.decode(ids, kv)
    total = 0.0
    for t, token in enumerate(tokens):
        total += float(model.next_token_log_probs(hidden[:, t], source)[0, token].detach())
    return total


# Seeds where greedy search misses the best response (found by trying seeds), so the test can tell them apart.
@pytest.mark.parametrize("seed, length_penalty", [(39, 0.0), (56, 0.0), (46, 1.0)])
def test_beam_search_with_a_wide_beam_equals_exhaustive_search(seed, length_penalty):
    vocab_size, max_tokens = 5, 3  # pad, start, end, a, b
    model = tiny_generator(vocab_size=vocab_size, copy=True, seed=seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4.0)  # sharper distributions: greedy choices then have consequences
    memories = tiny_memories(batch=1, seed=4)
    source = CopySource(torch.randn(1, 2, 8), torch.tensor([[3, 4]]), torch.zeros(1, 2, dtype=torch.bool))
    # Every response: fewer than max_tokens words and the end token, or exactly max_tokens words.
    candidates = [
        list(words) + [END] for length in range(max_tokens) for words in itertools.product([3, 4], repeat=length)
    ]
    candidates += [list(words) for words in itertools.product([3, 4], repeat=max_tokens)]

    def score(c):
        return _sequence_log_prob(model, memories, source, c) / len(c) ** length_penalty

    best = max(candidates, key=score)
    found = beam_decode(
        model,
        memories,
        source,
        max_tokens=max_tokens,
        beam_size=64,
        rules=Rules(banned_ids=(PAD, START)),
        length_penalty=length_penalty,
    )[0]
    assert found == [t for t in best if t != END]
    assert greedy_decode(model, memories, source, max_tokens, rules=Rules(banned_ids=(PAD, START)))[0] != found


def test_the_conversation_model_builds_memories_and_a_copy_source():
    torch.manual_seed(0)
    encoders = C2CRS(
        c2crs_config(
            vocab_size=10,
            n_entities=6,
            n_relations=2,
            n_items=3,
            token_dim=8,
            kg_dim=6,
            n_layers=1,
            n_heads=2,
            ffn_dim=16,
            max_positions=20,
        )
    )
    generator = ResponseGenerator(
        tiny_generator_config(
            vocab_size=11,
            memory_dims={"history": 8, "kg": 6, "review": 8},
            dim=8,
            n_heads=2,
            ffn_dim=16,
            max_positions=8,
        )
    )
    model = ConversationModel(
        encoders, generator, movie_token_ids=[9], uncopyable_ids=[0, 1, 2, 3, 4], frozen=("review",)
    )
    context = torch.tensor([[5, 9, 4, 6], [7, 0, 0, 0]])
    entity_ids = torch.tensor([[0, 1], [-1, -1]])
    rows = model.entity_rows(torch.tensor([0, 1]), torch.tensor([[0, 1], [1, 0]]), torch.tensor([0, 1]))
    sentences = torch.tensor([[[5, 6, 0], [0, 0, 0]], [[7, 8, 6], [6, 0, 0]]])
    mask = torch.tensor([[True, False], [True, True]])
    memories, source = model.memories(context, rows, entity_ids, sentences, mask)
    assert memories["history"].states.shape == (2, 4, 8) and memories["kg"].states.shape == (2, 2, 6)
    assert memories["review"].states.shape == (2, 2, 8) and memories["kg"].pad[1].all()
    # the copy source: the context, then each row's real review tokens in document order (padding dropped)
    assert source.ids.shape == (2, 4 + 4)
    assert source.ids[:, 4:].tolist() == [[5, 6, 0, 0], [7, 8, 6, 6]]
    assert source.ids[0, 1] == 10  # the movie token is copied as the placeholder
    assert source.blocked[0, 2] and source.blocked[1, 1]  # the separator and padding are not copyable
    hidden = generator.decode(torch.tensor([[START, 5], [START, 6]]), generator.memory_keys_values(memories))
    loss = generation_loss(
        generator.target_log_probs(hidden, torch.tensor([[5, END], [10, END]]), source),
        torch.tensor([[5, END], [10, END]]),
        PAD,
    )
    loss.backward()
    assert encoders.review_encoder.tokens.weight.grad is None  # frozen
    assert encoders.conversation_encoder.tokens.weight.grad is not None


def test_loss_weights_spare_the_end_token_and_the_movie_placeholder():
    import polars as pl

    from stages.training.conv_train import PLACEHOLDER, Responses, conv_vocabulary, loss_weights
    from stages.triples import SPECIAL_TOKENS

    tokens = list(SPECIAL_TOKENS) + ["hi", "@123", "rare"]
    vocabulary = conv_vocabulary(
        pl.DataFrame({"token_id": range(len(tokens)), "token": tokens, "count": [0] * len(tokens)})
    )
    hi, rare, placeholder = tokens.index("hi"), tokens.index("rare"), vocabulary.placeholder_id
    assert vocabulary.tokens[placeholder] == PLACEHOLDER and vocabulary.movie_token_ids == [tokens.index("@123")]
    train = Responses(rows=None, tokens=[[hi, placeholder, hi]] * 10 + [[rare]])  # hi 20x, placeholder 10x
    weights = loss_weights(train, vocabulary, threshold=5, floor=0.3)
    assert weights[hi] == pytest.approx(0.3)  # max(0.3, 5 / 20)
    assert weights[placeholder] == 1.0 and weights[rare] == 1.0 and weights[vocabulary.token_id["__end__"]] == 1.0


def _conversation_model(frozen=("review",)):
    torch.manual_seed(0)
    encoders = C2CRS(
        c2crs_config(
            vocab_size=10,
            n_entities=6,
            n_relations=2,
            n_items=3,
            token_dim=8,
            kg_dim=6,
            n_layers=1,
            n_heads=2,
            ffn_dim=16,
            max_positions=20,
        )
    )
    generator = ResponseGenerator(
        tiny_generator_config(
            vocab_size=11, memory_dims={"history": 8, "review": 8}, dim=8, n_heads=2, ffn_dim=16, max_positions=8
        )
    )
    return ConversationModel(encoders, generator, movie_token_ids=[9], uncopyable_ids=[0, 1, 2, 3, 4], frozen=frozen)


def test_cached_frozen_review_states_give_the_memories_of_encoding_them_in_the_batch():
    from stages.training.conv_train import FrozenReviews

    model = _conversation_model()
    model.encoders.conversation_encoder.eval()  # no dropout in the (trained) history encoder: comparable outputs
    sentence_tokens = [[5, 6], [7, 8, 6], [6], [5, 5, 5, 7]]
    cache = FrozenReviews(model, sentence_tokens, pad_id=0, device="cpu")
    context = torch.tensor([[5, 9, 4, 6], [7, 0, 0, 0]])
    for documents in ([[0], [1, 2]], [[3, 1], [2]]):  # the second batch reuses sentences 1 and 2 from the cache
        width = max(len(sentence_tokens[s]) for d in documents for s in d)
        ids = torch.zeros((2, 2, width), dtype=torch.long)
        mask = torch.zeros((2, 2), dtype=torch.bool)
        for i, document in enumerate(documents):
            for j, s in enumerate(document):
                ids[i, j, : len(sentence_tokens[s])] = torch.tensor(sentence_tokens[s])
                mask[i, j] = True
        expected, expected_source = model.memories(context, None, torch.full((2, 1), -1), ids, mask)
        cached, cached_source = model.memories(context, None, torch.full((2, 1), -1), ids, mask, cache.batch(documents))
        assert torch.allclose(cached["review"].states, expected["review"].states, atol=1e-5)
        real = ~expected_source.blocked  # the copy path reads the states of copyable tokens only
        assert torch.allclose(cached_source.states[real], expected_source.states[real], atol=1e-5)
    assert sorted(cache.row) == [0, 1, 2, 3]


def test_cached_frozen_context_states_give_the_generator_of_encoding_them_in_the_batch():
    from types import SimpleNamespace

    from stages.training.c2crs_data import pad
    from stages.training.conv_train import FrozenHistory

    model = _conversation_model(frozen=("history", "review")).eval()  # no decoder dropout: comparable outputs
    contexts = [[5, 9, 4, 6], [7], [], [6, 6, 5, 7, 8, 5], [8, 5]]
    table = SimpleNamespace(context_tokens=contexts, sample_ids=np.arange(len(contexts)))
    cache = FrozenHistory(model, table, pad_id=0, device="cpu")
    no_review = (torch.zeros((3, 1, 1), dtype=torch.long), torch.zeros((3, 1), dtype=torch.bool))
    targets = torch.tensor([[5, END], [6, END], [10, END]])
    for rows in (np.array([0, 1, 2]), np.array([3, 2, 4])):  # the second batch reuses the empty context's states
        context = pad([contexts[r] for r in rows], 0)
        outputs = []
        for history_states in (None, cache.batch(rows, context)):
            memories, source = model.memories(
                context, None, torch.full((3, 1), -1), *no_review, history_states=history_states
            )
            hidden = model.generator.decode(
                torch.tensor([[START, 5], [START, 6], [START, 7]]), model.generator.memory_keys_values(memories)
            )
            outputs.append(model.generator.target_log_probs(hidden, targets, source).detach())
        assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
        real = context.ne(0)
        assert torch.allclose(cache.batch(rows, context)[real], model.encode_context(context)[0][real], atol=1e-5)
    assert sorted(cache.first) == sorted(cache.first[[0, 1, 2, 3, 4]]) and (cache.first > 0).all()
    assert len(cache.states) == 1 + 4 + 1 + 1 + 6 + 2  # each context once; the empty one keeps one state


def test_target_log_probs_skip_padding_and_equal_the_full_softmax_at_real_positions():
    model, memories, source = tiny_generator(), tiny_memories(), tiny_source()
    targets = torch.tensor([[5, 6, END], [7, END, PAD], [END, PAD, PAD]])
    hidden = model.decode(
        torch.tensor([[START, 5, 6], [START, 7, PAD], [START, PAD, PAD]]), model.memory_keys_values(memories)
    )
    got = model.target_log_probs(hidden, targets, source).detach()
    for b, t in zip(*targets.ne(PAD).nonzero(as_tuple=True)):
        full = model.next_token_log_probs(hidden[b, t][None], CopySource(*(x[b][None] for x in vars(source).values())))
        assert float(got[b, t]) == pytest.approx(float(full[0, targets[b, t]]), abs=1e-5)
    assert (got[targets.eq(PAD)] == 0).all()


def test_decoding_a_batch_in_groups_of_rows_gives_the_log_probs_and_gradients_of_one_group(monkeypatch):
    from types import SimpleNamespace

    from stages.training import conv_train

    model = _conversation_model(frozen=())
    model.generator.cfg.copy = True
    responses = [[5], [6, 7, 8, 5], [7, 7], [], [8, 6, 5], [5, 6]]
    data = conv_train.Responses(rows=np.arange(6), tokens=responses)
    picked = conv_train.by_response_length(data, np.arange(6))
    assert [len(responses[i]) for i in picked] == [0, 1, 2, 2, 3, 4]
    g = torch.Generator().manual_seed(3)
    memories = {
        "history": Memory(
            torch.randn(6, 4, 8, generator=g, requires_grad=True),
            torch.tensor([[False] * 4] * 3 + [[False, False, True, True]] * 3),
        ),
        "review": Memory(torch.randn(6, 2, 8, generator=g, requires_grad=True), torch.zeros(6, 2, dtype=torch.bool)),
    }
    source = CopySource(
        torch.randn(6, 5, 8, generator=g),
        torch.randint(3, 11, (6, 5), generator=g),
        torch.zeros(6, 5, dtype=torch.bool),
    )
    model.eval()  # no dropout: the groupings must agree exactly
    results = []
    for groups in (1, 4):
        monkeypatch.setattr(conv_train, "DECODER_GROUPS", groups)
        log_probs, targets, _ = conv_train._teacher_forced(
            model, SimpleNamespace(device="cpu"), data, picked, memories, source
        )
        real = targets.ne(PAD)
        (-log_probs[real].sum()).backward()
        results.append((log_probs[real].detach(), targets[real], memories["history"].states.grad.clone()))
        memories["history"].states.grad = None
        model.zero_grad()
    (one, one_targets, one_grad), (four, four_targets, four_grad) = results
    assert torch.equal(one_targets, four_targets)
    assert torch.allclose(one, four, atol=1e-5) and torch.allclose(one_grad, four_grad, atol=1e-5)


def test_the_copy_path_ignores_blocked_positions_so_dropping_review_padding_changes_nothing():
    model, memories, source = tiny_generator(), tiny_memories(), tiny_source()
    targets = torch.tensor([[5, 6, END], [7, END, PAD], [END, PAD, PAD]])
    hidden = model.decode(
        torch.tensor([[START, 5, 6], [START, 7, PAD], [START, PAD, PAD]]), model.memory_keys_values(memories)
    )
    g = torch.Generator().manual_seed(4)
    padded = CopySource(
        torch.cat([source.states, torch.randn(3, 4, 8, generator=g)], dim=1),
        torch.cat([source.ids, torch.zeros(3, 4, dtype=torch.long)], dim=1),
        torch.cat([source.blocked, torch.ones(3, 4, dtype=torch.bool)], dim=1),
    )
    assert torch.allclose(
        model.target_log_probs(hidden, targets, source), model.target_log_probs(hidden, targets, padded), atol=1e-6
    )
    from models.generator import review_token_order

    tokens = torch.tensor([[5, 6, 0, 0, 0, 0], [7, 0, 0, 8, 9, 0], [0, 0, 0, 0, 0, 0]])
    order = review_token_order(tokens, PAD)
    assert tokens.gather(1, order).tolist() == [[5, 6, 0], [7, 8, 9], [0, 0, 0]]
