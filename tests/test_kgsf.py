"""KGSF's baseline: the word graph stage (stages/word_graph.py) and the recommender (models/kgsf.py)."""

import json

import polars as pl
import pytest
import torch

from models.kgsf import KGSFConfig, KGSFRecommender
from stages.word_graph import build_word_graph, read_word_edges, read_word_index

VOCABULARY = pl.DataFrame(
    {"token_id": [0, 1, 2, 3, 4], "token": ["__pad__", "Comedy", "funny", "the", "zzz"], "count": [0, 5, 4, 9, 1]}
)


def test_the_word_graph_joins_words_both_ways_drops_stopword_edges_and_maps_tokens_by_lowercase():
    words = {"comedy": 10, "funny": 3, "the": 7, "laugh": 1}
    pairs = [("comedy", "funny"), ("funny", "comedy"), ("the", "laugh"), ("funny", "laugh")]
    table, edges, token_words, metrics = build_word_graph(words, pairs, VOCABULARY, {"the"}, drop_stopwords=True)
    assert table["word"].to_list() == ["laugh", "funny", "the", "comedy"]  # renumbered in the index's id order
    ids = dict(zip(table["word"], table["word_id"]))
    assert sorted(edges.rows()) == sorted(
        [
            (ids["comedy"], ids["funny"]),
            (ids["funny"], ids["comedy"]),
            (ids["funny"], ids["laugh"]),
            (ids["laugh"], ids["funny"]),
        ]
    )
    assert dict(token_words.rows()) == {1: ids["comedy"], 2: ids["funny"], 3: ids["the"]}
    assert metrics["stopword_edges_dropped"] == 1 and metrics["edges"] == 4
    _, kept, _, _ = build_word_graph(words, pairs, VOCABULARY, {"the"}, drop_stopwords=False)
    assert kept.height == 6


def test_bad_conceptnet_files_are_named_with_the_line_and_what_was_expected(tmp_path):
    index = tmp_path / "key2index.json"
    index.write_text(json.dumps({"comedy": 0, "funny": 1}))
    words = read_word_index(index)
    edges = tmp_path / "edges.txt"
    edges.write_text("RelatedTo\tcomedy/n\tfunny\nRelatedTo\tcomedy\n")
    with pytest.raises(ValueError, match=r"edges.txt:2: expected 'relation<TAB>word<TAB>word', got 2 fields"):
        read_word_edges(edges, words)
    edges.write_text("RelatedTo\tcomedy/n\tfunny\nRelatedTo\tcomedy\tlaugh\n")
    with pytest.raises(ValueError, match=r"edges.txt:2: word 'laugh' is not in the word index"):
        read_word_edges(edges, words)
    index.write_text(json.dumps({"comedy": 0, "funny": 0}))
    with pytest.raises(ValueError, match="two words share an id"):
        read_word_index(index)
    index.write_text(json.dumps({"comedy": -1}))
    with pytest.raises(ValueError, match="'comedy' has id -1"):
        read_word_index(index)


def test_kgsf_learns_items_from_words_alone_and_from_entities_alone():
    """Two kinds of users: one names a genre word and no entity, the other a KG entity and no graph word; each kind
    wants its own item. The fused user vector must carry both sides' signal."""
    torch.manual_seed(0)
    model = KGSFRecommender(KGSFConfig(n_words=4, n_entities=6, n_relations=1, n_items=3, dim=8, num_bases=1))
    edge_index, edge_type = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]), torch.zeros(6, dtype=torch.long)
    word_edges = torch.tensor([[0, 1], [1, 0]])
    nodes = torch.arange(6)
    entity_ids = torch.tensor([[-1], [-1], [4], [5]])
    word_ids = torch.tensor([[0], [2], [-1], [-1]])
    targets = torch.tensor([0, 1, 2, 0])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        N = model.entity_rows(nodes, edge_index, edge_type)
        W = model.word_states(word_edges)
        loss = torch.nn.functional.cross_entropy(model.recommendation_logits(N, entity_ids, W, word_ids), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = model.recommendation_logits(
            model.entity_rows(nodes, edge_index, edge_type), entity_ids, model.word_states(word_edges), word_ids
        )
    assert logits.argmax(dim=1).tolist() == targets.tolist()


def test_the_mim_loss_is_the_squared_error_over_entities_averaged_over_counted_rows():
    torch.manual_seed(0)
    model = KGSFRecommender(KGSFConfig(n_words=3, n_entities=5, n_relations=1, n_items=2, dim=4, num_bases=1))
    N, word_user = torch.randn(3, 4), torch.randn(2, 4)
    node_ids = torch.tensor([0, 1, 4])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    with torch.no_grad():
        model.mim_bias.copy_(torch.arange(5.0))
        scores = model.mim_projection(word_user) @ N.T + torch.tensor([0.0, 1.0, 4.0])
        expected = ((scores - targets) ** 2).sum(dim=1)
        got_both = model.mim_loss(N, node_ids, word_user, targets, torch.tensor([1.0, 1.0]))
        got_first = model.mim_loss(N, node_ids, word_user, targets, torch.tensor([1.0, 0.0]))
    assert float(got_both) == pytest.approx(float(expected.mean()), rel=1e-5)
    assert float(got_first) == pytest.approx(float(expected[0]), rel=1e-5)
