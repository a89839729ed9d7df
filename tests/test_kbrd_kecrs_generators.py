"""KBRD's and KECRS's generators. KBRD: the user bias. KECRS (models/generator.py's bag-of-entity head and
infusion, stages/training/kecrs_train.py): the entity distribution summed over a response, both losses by hand, the
decoding mixture, the names of entities in the vocabulary, the KG neighbours of a turn's movies, and a saved model
that decodes the same after loading."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch

from models.c2crs import C2CRS
from models.decoding import greedy_decode
from models.generator import (
    USER,
    Memory,
    ResponseGenerator,
    bag_of_entity_loss,
    generation_loss,
    infusion_loss,
)
from pipeline.config import FinetuneConvConfig, load_params
from stages.training import conv_runs, kecrs_train, runs
from tests.conftest import PROJECT, c2crs_config, tiny_generator_config

PAD, START, END = 0, 1, 2


def _generator(seed: int = 0, mixing: float = 0.1) -> ResponseGenerator:
    torch.manual_seed(seed)
    model = ResponseGenerator(
        tiny_generator_config(
            vocab_size=11,
            memory_dims={"history": 8},
            dim=8,
            n_heads=2,
            ffn_dim=16,
            dropout=0.0,
            max_positions=8,
            copy=False,
            entity_bag=6,
            entity_dim=4,
            entity_bag_mixing=mixing,
            infusion=True,
        )
    ).eval()
    with torch.no_grad():
        model.entity_bag.entities.normal_()
    return model


def test_the_bag_sums_each_real_positions_entity_distribution():
    model = _generator()
    g = torch.Generator().manual_seed(1)
    hidden, user = (
        torch.randn(2, 3, 8, generator=g),
        Memory(torch.randn(2, 1, 4, generator=g), torch.zeros(2, 1, dtype=torch.bool)),
    )
    targets = torch.tensor([[5, 6, END], [7, END, PAD]])
    sums = model.bag_of_entities(hidden, targets, user)
    for b, real in ((0, 3), (1, 2)):
        expected = sum(
            torch.softmax(
                model.entity_bag.align(torch.cat([user.states[b, 0], hidden[b, t]])) @ model.entity_bag.entities.T
                + model.entity_bag.bias,
                dim=-1,
            )
            for t in range(real)
        )
        assert torch.allclose(sums[b], expected, atol=1e-6)
        assert float(sums[b].sum()) == pytest.approx(real, abs=1e-5)  # one distribution per real position


def test_the_bag_of_entity_and_infusion_losses_by_hand():
    sums = torch.tensor([[0.5, 2.0, 0.0], [1.0, 0.0, 3.0]])
    targets = torch.tensor([[1, 1, 0], [0, 0, 0]])  # the second response's movies have no neighbour
    expected = -(np.log(1 / (1 + np.exp(-0.5))) + np.log(1 / (1 + np.exp(-2.0)))) / 2
    assert float(bag_of_entity_loss(sums, targets)) == pytest.approx(expected, rel=1e-6)
    scores = torch.tensor([[0.5, 1.0, -1.0], [4.0, 4.0, 4.0]])
    names = torch.tensor([[0, 1, 0], [0, 0, 0]], dtype=torch.bool)  # the second context names no entity: no loss
    assert float(infusion_loss(scores, names)) == pytest.approx((0.25 + 0.0 + 1.0) / 2)
    raised = sums.clone().requires_grad_(True)
    bag_of_entity_loss(raised, targets).backward()
    assert (raised.grad[0, :2] < 0).all() and (raised.grad[0, 2] == 0) and (raised.grad[1] == 0).all()


def test_decoding_adds_an_entitys_probability_to_the_token_naming_it():
    model = _generator(mixing=0.5)
    model.entity_bag.token_entity[7] = 3  # token 7 names entity 3
    with torch.no_grad():
        model.entity_bag.bias[3] = 50.0  # the bag is all on entity 3
    g = torch.Generator().manual_seed(3)
    hidden, user = (
        torch.randn(2, 8, generator=g),
        Memory(torch.randn(2, 1, 4, generator=g), torch.zeros(2, 1, dtype=torch.bool)),
    )
    plain = model.next_token_log_probs(hidden).exp()
    mixed = model.next_token_log_probs(hidden, None, user).exp()
    expected = plain.clone()
    expected[:, 7] += 0.5
    expected /= expected.sum(dim=-1, keepdim=True)
    assert torch.allclose(mixed, expected, atol=1e-5) and torch.allclose(mixed.sum(-1), torch.ones(2), atol=1e-5)
    # teacher forcing (the perplexity and the training loss) is the plain softmax, as in KECRS
    targets = torch.tensor([[7, END], [7, END]])
    forced = model.target_log_probs(hidden[:, None].expand(-1, 2, -1), targets, None, user)
    assert torch.allclose(forced[:, 0], plain[:, 7].log(), atol=1e-5)


def test_entity_names_are_mention_tokens_and_one_word_labels():
    entities = pl.DataFrame(
        {
            "entity_id": [0, 1, 2, 3, 4],
            "label": ["Heat", "Comedy film", "comedy", "Comedy", None],
            "is_item": [True, False, False, False, False],
            "movie_id": [123, None, None, None, None],
        }
    )
    edges = pl.DataFrame({"src": [3, 3, 2, 0], "rel": [0, 0, 0, 0], "dst": [0, 1, 0, 3]})
    tokens = ["__pad__", "@123", "comedy", "heat"]
    entity_token, token_entity = kecrs_train.entity_names(entities, edges, tokens)
    assert entity_token.tolist() == [1, -1, 2, 2, -1]  # the movie by its mention; "Comedy film" is two words
    assert token_entity.tolist() == [-1, 0, 3, -1]  # "comedy" names the better connected of its two entities


def test_the_bag_targets_are_the_kg_neighbours_of_the_turns_movies_and_the_names_of_the_context():
    graph = SimpleNamespace(n_entities=5, edge_index=torch.tensor([[0, 0, 1, 2, 3], [0, 3, 4, 0, 1]]))
    table = SimpleNamespace(targets=[[0], [1, 2], []], context_entities=[[3], [], [0, 4]], context_items=[[], [], [0]])
    generator = SimpleNamespace(cfg=SimpleNamespace(vocab_size=6))
    losses = kecrs_train.KECRSLosses(generator, graph, np.array([5, -1, -1, 4, 3]), 1.5, 0.025, "cpu")
    assert losses.neighbours(table, np.array([0, 1, 2])).int().tolist() == [
        [0, 0, 0, 1, 0],  # 0 -> 3 (its self loop is no neighbour)
        [1, 0, 0, 0, 1],  # 1 -> 4, 2 -> 0
        [0, 0, 0, 0, 0],
    ]
    assert losses.names(table, np.array([0, 2])).int().tolist() == [[0, 0, 0, 0, 1, 0], [0, 0, 0, 1, 0, 1]]


def _kecrs_model(seed: int = 0):
    """A tiny KECRS generator: 10 input tokens (9 a movie), 6 entities, a frozen KBRD-style R-GCN."""
    torch.manual_seed(seed)
    encoders = C2CRS(
        c2crs_config(
            vocab_size=10,
            n_entities=6,
            n_relations=2,
            n_items=3,
            token_dim=8,
            kg_dim=4,
            n_layers=1,
            n_heads=2,
            ffn_dim=16,
            max_positions=20,
        )
    )
    config = conv_runs.ConvModelConfig(
        encoders=dataclasses.asdict(encoders.cfg),
        generator=dataclasses.asdict(
            tiny_generator_config(
                vocab_size=11,
                memory_dims={"history": 8},
                dim=8,
                n_heads=2,
                ffn_dim=16,
                max_positions=8,
                copy=False,
                entity_bag=6,
                entity_dim=4,
                infusion=True,
            )
        ),
        movie_token_ids=[9],
        uncopyable_ids=[0, 1, 2, 3, 4],
        frozen=["kg"],
        pretrained="kecrs",
    )
    model = conv_runs.conversation_model(config, encoders)
    edge_index, edge_type = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]]), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        model.generator.entity_bag.entities.copy_(encoders.entity_graph(edge_index, edge_type))
    model.generator.entity_bag.token_entity[[5, 6]] = torch.tensor([4, 5])
    return model, config


def _memories(model):
    context = torch.tensor([[5, 9, 4, 6], [7, 0, 0, 0]])
    entity_ids = torch.tensor([[0, 4], [-1, -1]])  # global ids: the decoder reads no entity memory
    no_review = (torch.zeros((2, 1, 1), dtype=torch.long), torch.zeros((2, 1), dtype=torch.bool))
    return model.memories(context, None, entity_ids, *no_review), entity_ids


def test_kecrs_reads_its_recommenders_user_vector_frozen_and_decodes_the_same_after_loading(tmp_path):
    model, config = _kecrs_model()
    (memories, source), entity_ids = _memories(model)
    assert source is None and set(memories) == {"history", USER}
    expected = model.encoders.user_vector(model.generator.entity_bag.entities, entity_ids)
    assert torch.allclose(memories[USER].states[:, 0], expected, atol=1e-6)
    assert not memories[USER].states.requires_grad  # the recommender is frozen, as KECRS detaches it
    targets = torch.tensor([[5, END], [10, END]])
    hidden = model.generator.decode(
        torch.tensor([[START, 5], [START, 10]]), model.generator.memory_keys_values(memories)
    )
    loss = (
        generation_loss(model.generator.target_log_probs(hidden, targets, None, memories[USER]), targets, PAD)
        + bag_of_entity_loss(
            model.generator.bag_of_entities(hidden, targets, memories[USER]),
            torch.tensor([[1, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0]]),
        )
        + infusion_loss(
            model.generator.infusion_scores(memories[USER].states[:, 0]),
            torch.zeros(2, 11, dtype=torch.bool).index_fill_(1, torch.tensor([5]), True),
        )
    )
    loss.backward()
    assert all(p.grad is None for p in model.encoders.kg_encoder.parameters())
    bag = model.generator.entity_bag
    assert bag.align.weight.grad is not None and bag.infusion_align.weight.grad is not None

    model.eval()
    runs.save_model(tmp_path / "kecrs.pt", model, config)
    loaded, _ = conv_runs.load_conversation_model(tmp_path / "kecrs.pt")
    loaded.eval()
    assert torch.equal(loaded.generator.entity_bag.entities, model.generator.entity_bag.entities)
    assert torch.equal(loaded.generator.entity_bag.token_entity, model.generator.entity_bag.token_entity)
    (got, _), _ = _memories(loaded)
    (want, _), _ = _memories(model)
    assert greedy_decode(loaded.generator, got, None, 5) == greedy_decode(model.generator, want, None, 5)


def finetune_conv(**changes) -> FinetuneConvConfig:
    """params.yaml's finetune_conv section with `changes`, validated as the schema validates it."""
    shipped = load_params(PROJECT / "params.yaml").finetune_conv.model_dump()
    return FinetuneConvConfig.model_validate({**shipped, **changes})


def test_kecrs_losses_need_a_frozen_kbrd_style_recommender():
    with pytest.raises(ValueError, match="KECRS's"):
        finetune_conv(pretrained="kecrs", memories=["history"], bag_of_entity_weight=1.5)
    with pytest.raises(ValueError, match="KECRS's"):
        finetune_conv(pretrained="none", memories=["history"], bag_of_entity_weight=1.5, freeze=["kg"])
    with pytest.raises(ValueError, match="set bag_of_entity_weight too"):
        finetune_conv(pretrained="kecrs", memories=["history"], infusion_weight=0.025, freeze=["kg"])
    finetune_conv(
        pretrained="kecrs", memories=["history"], bag_of_entity_weight=1.5, infusion_weight=0.025, freeze=["kg"]
    )


def test_kbrds_user_bias_shifts_every_logit_by_its_users_bias_and_reads_the_frozen_user_vector():
    torch.manual_seed(0)
    encoders = C2CRS(
        c2crs_config(
            vocab_size=10,
            n_entities=6,
            n_relations=2,
            n_items=3,
            token_dim=8,
            kg_dim=4,
            n_layers=1,
            n_heads=2,
            ffn_dim=16,
            max_positions=20,
        )
    )
    config = conv_runs.ConvModelConfig(
        encoders=dataclasses.asdict(encoders.cfg),
        generator=dataclasses.asdict(
            tiny_generator_config(
                vocab_size=11,
                memory_dims={"history": 8},
                dim=8,
                n_heads=2,
                ffn_dim=16,
                max_positions=8,
                copy=False,
                user_bias_dim=4,
            )
        ),
        movie_token_ids=[9],
        uncopyable_ids=[0, 1, 2, 3, 4],
        frozen=["kg"],
        pretrained="kbrd",
    )
    model = conv_runs.conversation_model(config, encoders).eval()
    edge_index, edge_type = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]]), torch.tensor([0, 1, 0, 1])
    entity_ids = torch.tensor([[0, 2], [3, -1]])
    nodes = torch.tensor([0, 2, 3])
    rows = model.entity_rows(nodes, edge_index, edge_type)
    memories, _ = model.memories(
        torch.tensor([[5, 6], [7, 0]]),
        rows,
        torch.tensor([[0, 1], [2, -1]]),
        torch.zeros((2, 1, 1), dtype=torch.long),
        torch.zeros((2, 1), dtype=torch.bool),
    )
    N = encoders.entity_graph(edge_index, edge_type)
    assert torch.allclose(memories[USER].states[:, 0], encoders.user_vector(N, entity_ids), atol=1e-5)
    hidden = torch.randn(2, 3, 8)
    user = memories[USER].states.expand(-1, 3, -1)
    shift = model.generator.vocabulary_logits(hidden, user) - (
        hidden @ model.generator.tokens.weight.T + model.generator.output_bias
    )
    assert torch.allclose(shift, model.generator.user_bias(user), atol=1e-5)
    assert not torch.allclose(shift[0, 0], shift[1, 0])  # each user its own bias, the same at every step
    with pytest.raises(ValueError, match="needs the user vectors"):
        model.generator.vocabulary_logits(hidden)
    with pytest.raises(ValueError, match="user_bias is KBRD's"):
        finetune_conv(pretrained="none", memories=["history"], user_bias=True)
