"""The pieces of an explanation on hand-made data: the pooling weights are the ones the user vector is made of,
KG paths prefer the most specific shared entity, context entities are ordered by weight."""

import numpy as np
import polars as pl
import torch

from models.c2crs import SelfAttentivePooling
from stages.chat.explain import Explainer, KnowledgeGraph


def test_pooling_weights_are_the_softmax_that_makes_the_pooled_vector():
    torch.manual_seed(0)
    pooling = SelfAttentivePooling(4)
    x = torch.randn(3, 5, 4)
    mask = torch.tensor([[False] * 5, [False, False, True, True, True], [True] * 5])
    weights = pooling.weights(x, mask)
    assert torch.allclose(weights[:2].sum(-1), torch.ones(2)) and torch.all(weights[1, 2:] == 0)
    assert torch.all(weights[2] == 0)  # nothing to pool: zero weights, a zero vector
    assert torch.allclose(pooling(x, mask), torch.einsum("bl,bld->bd", weights, x))


def small_graph() -> KnowledgeGraph:
    """Movies 0 and 1; 0 and 1 both star actor 2 (who has 2 neighbours) and are both in country 3 (4 neighbours);
    entity 4 links to movie 0 only. Inverse edges as the kg stage adds them, and self loops, which are left out."""
    entities = pl.DataFrame(
        {"entity_id": [0, 1, 2, 3, 4, 5, 6], "label": ["Alpha", "Beta", "Tom Hanks", "USA", "Comedy", "Gamma", "Delta"]}
    )
    relations = pl.DataFrame(
        {"relation_id": [0, 1, 2, 3, 4], "name": ["starring", "starring^-1", "country", "country^-1", "self_loop"]}
    )
    forward = [(0, 0, 2), (1, 0, 2), (0, 2, 3), (1, 2, 3), (5, 2, 3), (6, 2, 3), (4, 0, 0)]
    inverse = [(d, r + 1, s) for s, r, d in forward]
    loops = [(e, 4, e) for e in range(7)]
    edges = pl.DataFrame(forward + inverse + loops, schema=["src", "rel", "dst"], orient="row")
    return KnowledgeGraph(entities, relations, edges)


def test_paths_take_the_direct_edge_else_the_most_specific_shared_entity():
    graph = small_graph()
    direct = graph.paths(2, 0, limit=3)
    assert [[n.label for n in p.entities] for p in direct] == [["Tom Hanks", "Alpha"]]
    assert direct[0].relations == ["starring^-1"]
    two_hop = graph.paths(1, 0, limit=3)
    assert [[n.label for n in p.entities] for p in two_hop] == [
        ["Beta", "Tom Hanks", "Alpha"],
        ["Beta", "USA", "Alpha"],
    ]
    assert two_hop[0].relations == ["starring", "starring^-1"]
    assert len(graph.paths(1, 0, limit=1)) == 1 and graph.paths(0, 0, limit=3) == []
    assert graph.paths(5, 4, limit=3) == []  # nothing shared within two hops
    assert graph.relation(0, 0) is None  # self loops are not paths


def test_context_entities_heaviest_first_padding_dropped():
    graph = small_graph()
    explainer = Explainer(
        graph,
        chooser=None,
        sentences=pl.DataFrame(
            {"sentence_id": [], "movie_id": [], "source": []},
            schema={"sentence_id": pl.Int64, "movie_id": pl.Int64, "source": pl.String},
        ),
        entity_movie={0: 100},
    )
    attended = explainer.context_entities(np.array([0, 2, 3, -1]), np.array([0.2, 0.5, 0.3, 0.0]))
    assert [(e.label, e.weight, e.movie_id) for e in attended] == [
        ("Tom Hanks", 0.5, None),
        ("USA", 0.3, None),
        ("Alpha", 0.2, 100),
    ]


class RankAsGiven:
    """SentenceChooser's interface: rank() scores the pool in its order (10, 9, ...), whatever the words."""

    def __init__(self, texts, ratings):
        self.texts, self.ratings, self.asked = texts, np.asarray(ratings, dtype=float), []

    def rank(self, pool, words):
        self.asked.append(words)
        return [(int(s), 10.0 - i) for i, s in enumerate(pool)]


def test_an_explanation_lets_several_entities_speak_and_puts_negative_reviews_last():
    graph = small_graph()
    chooser = RankAsGiven(["Awful.", "A plot.", "Great fun."], [2, np.nan, 9])
    sentences = pl.DataFrame(
        {"sentence_id": [0, 1, 2], "movie_id": [100, 100, 100], "source": ["aclimdb", "plots", "aclimdb"]}
    )
    explainer = Explainer(graph, chooser, sentences, entity_movie={0: 100, 1: 200}, max_paths=3, paths_per_entity=1)
    attended = explainer.context_entities(np.array([1, 2]), np.array([0.7, 0.3]))
    why = explainer.explain(0, attended, "I liked Beta")
    # Beta's best path (through Tom Hanks, the most specific) and then Tom Hanks's own edge: one path each.
    assert [[n.label for n in p.entities] for p in why.kg_paths] == [
        ["Beta", "Tom Hanks", "Alpha"],
        ["Tom Hanks", "Alpha"],
    ]
    assert [(s.text, s.rating) for s in why.review_sentences] == [("A plot.", None), ("Great fun.", 9.0)]
    assert "Beta" in chooser.asked[0] and "Tom Hanks" in chooser.asked[0] and "I liked Beta" in chooser.asked[0]
