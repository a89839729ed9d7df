"""The triples stage on hand-made inputs: vocabulary, samples, context truncation, mention positions, triples."""

import numpy as np
import polars as pl
import pytest

from stages import triples
from stages.text.linking import EntityLinker

# Items 0 (movie 100) and 1 (movie 200); entity 2 "Tom Hanks" starred in movie 100; entity 3 "comedy".
ITEM_ENTITY = {100: 0, 200: 1}
ENTITIES = pl.DataFrame(
    {
        "entity_id": [0, 1, 2, 3],
        "is_item": [True, True, False, False],
        "movie_id": [100, 200, None, None],
        "mentions": [5, 1, 0, 0],
    }
)
EDGES = pl.DataFrame({"src": [2, 0, 3, 3, 0], "rel": [0, 1, 0, 0, 2], "dst": [0, 2, 0, 1, 0]})
SENTENCES = pl.DataFrame(
    {
        "sentence_id": [0, 1, 2, 3],
        "movie_id": [100, 100, 200, 200],
        "text": [
            "Tom Hanks is wonderful in this comedy.",
            "The soundtrack is loud and long.",
            "A dull comedy with no laughs.",
            "The dog steals the whole show.",
        ],
    }
)
UTTERANCES = pl.DataFrame(
    {
        "conv_id": [1, 1, 1, 2, 2],
        "turn_idx": [0, 1, 2, 0, 1],
        "role": ["seeker", "recommender", "seeker", "seeker", "recommender"],
        "split": ["train", "train", "train", "test", "test"],
        "text": [
            "I love Tom Hanks comedies like @100",
            "Then watch @200 !",
            "Great, thanks",
            "Any comedy?",
            "Sure, @100",
        ],
        "movie_ids": [[100], [200], [], [], [100]],
    }
)


@pytest.fixture(scope="module")
def linker():
    return EntityLinker.build({2: ["Tom Hanks"], 3: ["Comedy"]}, stopwords=set(), degree={2: 2, 3: 3})


@pytest.fixture(scope="module")
def linked(linker):
    return triples.link_all(UTTERANCES, linker, ITEM_ENTITY)


def vocabulary():
    return triples.build_vocabulary([triples.token_texts(t) for t in UTTERANCES["text"]], min_frequency=1)


def test_tokens_keep_movie_mentions_whole_and_lowercase_words():
    assert triples.token_texts("I LOVE @100, really") == ["i", "love", "@100", ",", "really"]


def test_vocabulary_puts_special_tokens_first_and_applies_min_frequency():
    vocab = triples.build_vocabulary([["b", "a", "a", "c", "c", "c"]], min_frequency=2)
    assert vocab["token"].to_list() == list(triples.SPECIAL_TOKENS) + ["c", "a"]
    assert vocab["token_id"].to_list() == list(range(7))


def test_linking_finds_movies_and_entities_at_token_positions(linked):
    first = linked[0]
    assert first.tokens == ["i", "love", "tom", "hanks", "comedies", "like", "@100"]
    assert first.mentions == [(2, 2, "entity"), (6, 0, "item")]


def test_samples_are_every_turn_after_the_first(linked):
    samples, _ = triples.build_samples(UTTERANCES, linked, vocabulary(), ITEM_ENTITY, 256, 30)
    assert samples.select("conv_id", "turn_idx").rows() == [(1, 1), (1, 2), (2, 1)]
    second = samples.row(1, named=True)
    assert second["context_entity_ids"] == [2, 0, 1]
    assert second["context_item_ids"] == [0, 1]
    assert samples.row(0, named=True)["target_item_ids"] == [1]
    assert samples.row(2, named=True)["split"] == "test"


def test_context_is_left_truncated_and_mention_positions_follow(linked):
    vocab = vocabulary()
    full, full_mentions = triples.build_samples(UTTERANCES, linked, vocab, ITEM_ENTITY, 256, 30)
    cut, cut_mentions = triples.build_samples(UTTERANCES, linked, vocab, ITEM_ENTITY, 5, 2)
    assert cut["context_token_ids"][1].to_list() == full["context_token_ids"][1].to_list()[-5:]
    assert all(len(r) <= 2 for r in cut["response_token_ids"].to_list())
    id_of = dict(zip(vocab["token_id"], vocab["token"]))
    for sample_id, position, entity in cut_mentions.select("sample_id", "token_position", "entity_id").iter_rows():
        token = id_of[cut["context_token_ids"][sample_id][position]]
        assert token in ({"tom"} if entity == 2 else {"comedy", "@100", "@200"})
    # Sample 1's full context holds "tom" (entity 2) at position 2; after cutting to 5 tokens it is gone.
    assert (1, 2, 2) in full_mentions.select("sample_id", "token_position", "entity_id").rows()
    assert 2 not in cut_mentions.filter(pl.col("sample_id") == 1)["entity_id"].to_list()


def test_a_target_movie_without_an_item_is_an_error(linked):
    with pytest.raises(triples.TriplesDataError, match="conversation 1, turn 1: movie 200 has no item entity"):
        triples.build_samples(UTTERANCES, linked, vocabulary(), {100: 0}, 256, 30)


def test_candidates_are_own_sentences_for_items_and_linked_items_for_others():
    candidates = triples.candidate_sentences(ENTITIES, EDGES, SENTENCES, max_movies_per_entity=5)
    assert candidates[0].tolist() == [0, 1]
    assert candidates[2].tolist() == [0, 1]
    assert candidates[3].tolist() == [0, 1, 2, 3]  # most-mentioned movie first
    only_one = triples.candidate_sentences(ENTITIES, EDGES, SENTENCES, max_movies_per_entity=1)
    assert only_one[3].tolist() == [0, 1]


@pytest.mark.parametrize("rule,expected", [("bm25", 2), ("first", 0), ("highest_rated", 3)])
def test_sentence_rules(rule, expected):
    candidates = triples.candidate_sentences(ENTITIES, EDGES, SENTENCES, max_movies_per_entity=5)
    ratings = np.array([5.0, np.nan, 2.0, 9.0])
    chooser = triples.SentenceChooser(rule, SENTENCES, ratings, {3: "Comedy"}, candidates)
    assert chooser.choose(3, ["a", "dull", "comedy", "please"]) == expected
    assert chooser.choose(99, ["anything"]) is None


def test_triples_reuse_one_sentence_per_mention(linked):
    samples, mentions = triples.build_samples(UTTERANCES, linked, vocabulary(), ITEM_ENTITY, 256, 30)
    candidates = triples.candidate_sentences(ENTITIES, EDGES, SENTENCES, max_movies_per_entity=5)
    chooser = triples.SentenceChooser("bm25", SENTENCES, np.full(4, np.nan), {2: "Tom Hanks", 3: "Comedy"}, candidates)
    table = triples.build_triples(mentions, linked, UTTERANCES, chooser)
    assert set(table.columns) == set(triples.TRIPLE_SCHEMA)
    tom = table.filter(pl.col("entity_id") == 2)
    assert tom["sentence_id"].unique().to_list() == [0]  # "Tom Hanks is wonderful ..." in both samples
    assert sorted(tom["sample_id"].to_list()) == [0, 1]
    metrics = triples.triple_metrics(samples, table, linked)
    assert metrics["samples"] == {"test": 1, "train": 2}
    assert metrics["samples_with_triple"] == 1.0
