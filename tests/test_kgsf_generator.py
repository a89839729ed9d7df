"""KGSF's generator (models/generator.py with models/kgsf.py): the decoder's chain order, the word memory, the
vocabulary bias from the user vectors, and saving and loading the model with its word graph."""

import dataclasses

import pytest
import torch

from models.c2crs import C2CRS
from models.decoding import beam_decode, greedy_decode
from models.generator import USER, ConversationModel, Memory, ResponseGenerator, generation_loss
from models.kgsf import KGSFConfig, KGSFRecommender
from stages.training import conv_runs, runs
from tests.conftest import c2crs_config, tiny_generator_config

PAD, START, END = 0, 1, 2


def _generator(memory_dims: dict, bias_dim: int = 0, seed: int = 0) -> ResponseGenerator:
    torch.manual_seed(seed)
    return ResponseGenerator(
        tiny_generator_config(
            vocab_size=11,
            memory_dims=memory_dims,
            dim=8,
            n_heads=2,
            ffn_dim=16,
            dropout=0.0,
            max_positions=8,
            copy=False,
            vocabulary_bias_dim=bias_dim,
        )
    ).eval()


def test_the_decoder_reads_its_memories_in_the_configured_order():
    history_first = _generator({"history": 8, "kg": 6})
    kg_first = _generator({"kg": 6, "history": 8})
    kg_first.load_state_dict(history_first.state_dict())  # the same weights, only the chain differs
    assert kg_first.layers[0].memories == ["kg", "history"]
    g = torch.Generator().manual_seed(1)
    memories = {
        "history": Memory(torch.randn(2, 4, 8, generator=g), torch.zeros(2, 4, dtype=torch.bool)),
        "kg": Memory(torch.randn(2, 3, 6, generator=g), torch.zeros(2, 3, dtype=torch.bool)),
    }
    ids = torch.tensor([[START, 5, 6], [START, 7, 8]])
    a = history_first.decode(ids, history_first.memory_keys_values(memories))
    b = kg_first.decode(ids, kg_first.memory_keys_values(memories))
    assert not torch.allclose(a, b, atol=1e-4)


def test_the_vocabulary_bias_raises_graph_words_only_and_teacher_forcing_equals_the_full_softmax():
    model = _generator({"history": 8}, bias_dim=4)
    model.vocabulary_bias.tokens[[5, 6]] = True
    with torch.no_grad():
        model.vocabulary_bias.output.bias.fill_(3.0)
    g = torch.Generator().manual_seed(2)
    hidden, user = torch.randn(2, 3, 8, generator=g), torch.randn(2, 1, 4, generator=g)
    with_bias = model.vocabulary_logits(hidden, user.expand(-1, 3, -1))
    plain = hidden @ model.tokens.weight.T + model.output_bias
    changed = (with_bias - plain).abs().amax(dim=(0, 1)) > 1e-6
    assert changed.nonzero().flatten().tolist() == [5, 6]
    with pytest.raises(ValueError, match="needs the user vectors"):
        model.vocabulary_logits(hidden)
    targets = torch.tensor([[5, 6, END], [7, END, PAD]])
    user_memory = Memory(user, torch.zeros(2, 1, dtype=torch.bool))
    got = model.target_log_probs(hidden, targets, None, user_memory)
    for b, t in zip(*targets.ne(PAD).nonzero(as_tuple=True)):
        full = model.next_token_log_probs(hidden[b, t][None], None, Memory(user[b][None], user_memory.pad[b][None]))
        assert float(got[b, t]) == pytest.approx(float(full[0, targets[b, t]]), abs=1e-5)


def _kgsf_model(seed: int = 0) -> tuple[ConversationModel, conv_runs.ConvModelConfig]:
    """A tiny KGSF generator: 10 input tokens (9 is a movie), 6 entities, 5 graph words of tokens 5..8."""
    torch.manual_seed(seed)
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
    kgsf = KGSFRecommender(KGSFConfig(n_words=5, n_entities=6, n_relations=2, n_items=3, dim=6, num_bases=2))
    word_edges = torch.tensor([[0, 1, 1, 2, 3], [1, 0, 2, 1, 4]])
    token_word = torch.tensor([-1, -1, -1, -1, -1, 0, 1, 2, 3, -1])  # tokens 5..8 are words 0..3; word 4 unsaid
    config = conv_runs.ConvModelConfig(
        encoders=dataclasses.asdict(encoders.cfg),
        generator=dataclasses.asdict(
            tiny_generator_config(
                vocab_size=11,
                memory_dims={"kg": 6, "word": 6, "history": 8},
                dim=8,
                n_heads=2,
                ffn_dim=16,
                max_positions=8,
                copy=False,
                vocabulary_bias_dim=12,
            )
        ),
        movie_token_ids=[9],
        uncopyable_ids=[0, 1, 2, 3, 4],
        frozen=["kg", "word"],
        pretrained="kgsf",
        kgsf=dataclasses.asdict(kgsf.cfg),
        word_edges=word_edges.size(1),
    )
    return conv_runs.conversation_model(config, encoders, kgsf, (word_edges, token_word)), config


def _memories_inputs(model: ConversationModel) -> tuple:
    """model.memories' inputs for three contexts: (context, entity rows, entity ids, sentence ids, sentence mask)."""
    context = torch.tensor([[5, 9, 4, 6], [7, 0, 0, 0], [3, 0, 0, 0]])
    entity_ids = torch.tensor([[0, 1], [-1, -1], [1, -1]])
    rows = model.entity_rows(torch.tensor([0, 1]), torch.tensor([[0, 1], [1, 0]]), torch.tensor([0, 1]))
    no_review = (torch.zeros((3, 1, 1), dtype=torch.long), torch.zeros((3, 1), dtype=torch.bool))
    return context, rows, entity_ids, *no_review


def _memories(model: ConversationModel):
    context, rows, entity_ids, *no_review = _memories_inputs(model)
    return model.memories(context, rows, entity_ids, *no_review), rows, entity_ids, context


def test_kgsf_generator_reads_words_entities_and_user_vectors_from_its_frozen_recommender():
    model, _ = _kgsf_model()
    (memories, source), rows, entity_ids, context = _memories(model)
    assert source is None and set(memories) == {"history", "kg", "word", USER}
    word = memories["word"]
    assert word.pad.tolist() == [[False, True, True, False], [False, True, True, True], [True] * 4]
    W = model.kgsf.word_states(model.word_edges)
    assert torch.allclose(word.states[0, 0], W[0]) and torch.allclose(word.states[0, 3], W[1])
    e, w = model.kgsf.side_vectors(rows, entity_ids, W, model.token_word[context])
    assert torch.allclose(memories[USER].states[:, 0], torch.cat([e, w], dim=-1), atol=1e-6)
    assert model.generator.vocabulary_bias.tokens.nonzero().flatten().tolist() == [
        5,
        6,
        7,
        8,
    ]  # graph words, no placeholder

    targets = torch.tensor([[5, END], [10, END], [6, END]])
    hidden = model.generator.decode(
        torch.tensor([[START, 5], [START, 10], [START, 6]]), model.generator.memory_keys_values(memories)
    )
    generation_loss(model.generator.target_log_probs(hidden, targets, source, memories[USER]), targets, PAD).backward()
    assert all(p.grad is None for p in model.kgsf.parameters())  # KGSF freezes its recommender's parts
    assert model.encoders.conversation_encoder.tokens.weight.grad is not None
    assert model.generator.vocabulary_bias.output.weight.grad is not None
    for decoded in (
        greedy_decode(model.generator, memories, source, 5),
        beam_decode(model.generator, memories, source, 5, beam_size=2),
    ):
        assert len(decoded) == 3 and all(len(r) <= 5 for r in decoded)


def test_frozen_word_states_are_computed_once_and_give_the_memories_of_computing_them_per_batch(monkeypatch):
    from types import SimpleNamespace

    from stages.training.conv_train import FrozenStates

    model, _ = _kgsf_model()
    frozen = FrozenStates(model, SimpleNamespace(sentence_tokens=[], pad_id=PAD, device="cpu"))
    expected, _ = model.memories(*_memories_inputs(model))
    calls = []
    word_states = model.kgsf.word_states
    monkeypatch.setattr(model.kgsf, "word_states", lambda edges: calls.append(1) or word_states(edges))
    for _ in range(3):
        cached, _ = model.memories(*_memories_inputs(model), word_states=frozen.words())
        for name in ("word", USER):
            assert torch.equal(cached[name].states, expected[name].states)
    assert len(calls) == 1
    model.frozen = ("kg",)  # a trained word encoder changes every step: never cached
    assert FrozenStates(model, SimpleNamespace(sentence_tokens=[], pad_id=PAD, device="cpu")).words() is None


def test_a_saved_kgsf_generator_loads_with_its_word_graph(tmp_path):
    model, config = _kgsf_model()
    model.eval()
    runs.save_model(tmp_path / "kgsf.pt", model, config)
    loaded, loaded_config = conv_runs.load_conversation_model(tmp_path / "kgsf.pt")
    loaded.eval()
    assert loaded_config.kgsf == config.kgsf and torch.equal(loaded.word_edges, model.word_edges)
    (expected, _), *_ = _memories(model)
    (got, _), *_ = _memories(loaded)
    for name in expected:
        assert torch.allclose(expected[name].states, got[name].states, atol=1e-6)
    assert torch.equal(loaded.generator.vocabulary_bias.tokens, model.generator.vocabulary_bias.tokens)
    assert greedy_decode(loaded.generator, got, None, 5) == greedy_decode(model.generator, expected, None, 5)


def test_the_word_memory_and_vocabulary_bias_need_kgsf():
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
    with pytest.raises(ValueError, match="need KGSF's recommender and its word graph"):
        ConversationModel(encoders, _generator({"word": 6, "history": 8}), [9], [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="the word encoder is KGSF's"):
        ConversationModel(encoders, _generator({"history": 8}), [9], [0, 1, 2, 3, 4], frozen=("word",))
