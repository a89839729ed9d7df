"""Tokenizer and entity linker: unit tests on tiny label sets, properties (hypothesis), evaluation on a fixture,
and the score on the real mirror when C2CRS_DATA_DIR is set."""

import os
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.text.linking import (
    EntityLinker,
    dbpedia_label,
    evaluate_linker,
    label_variants,
    mirror_linker_inputs,
    normalize,
    normalized_tokens,
    tokenize,
)

FIXTURE = Path(__file__).parent / "fixtures" / "linking" / "valid_data.json"
MIRROR = Path(os.environ.get("C2CRS_DATA_DIR", "/nonexistent"))
DBP = "<http://dbpedia.org/resource/{}>"

# Measured on the mirror with the defaults (bench/linker.py): F1 0.402 (P 0.473, R 0.349). The floor leaves a margin.
MIRROR_F1_FLOOR = 0.37


# ---------------------------------------------------------------- tokenizer


def test_tokenize_offsets_and_kinds():
    text = "I don't like @12345, but Tom Hanks’s café... rocks!"
    tokens = tokenize(text)
    assert [t.text for t in tokens] == [
        "I",
        "don't",
        "like",
        "@12345",
        ",",
        "but",
        "Tom",
        "Hanks’s",
        "café",
        ".",
        ".",
        ".",
        "rocks",
        "!",
    ]
    assert all(text[t.start : t.end] == t.text for t in tokens)


def test_normalize():
    assert normalize("Café") == "cafe"
    assert normalize(unicodedata.normalize("NFD", "BEYONCÉ")) == "beyonce"
    assert normalize("@12345") == "@12345"
    assert normalize("Hanks’s") == normalize("hanks's") == "hanks"
    assert normalize("don’t") == "don't"


@given(st.text(max_size=80))
def test_tokenize_round_trip(text):
    tokens = tokenize(text)
    assert all(text[t.start : t.end] == t.text for t in tokens)
    assert all(a.end <= b.start for a, b in zip(tokens, tokens[1:]))
    assert "".join(t.text for t in tokens) == "".join(text.split())  # every non-space character is in one token


# ---------------------------------------------------------------- labels


def test_label_variants():
    assert label_variants("Science fiction film") == {"Science fiction film", "Science fiction"}
    assert label_variants("Horror film") == {"Horror film", "Horror"}
    assert label_variants("Thriller (genre)") == {"Thriller (genre)", "Thriller"}
    assert "Spider Man" in label_variants("Spider-Man") and "SpiderMan" in label_variants("Spider-Man")
    assert label_variants("Tom Hanks") == {"Tom Hanks"}


def test_dbpedia_label():
    assert dbpedia_label(DBP.format("Heat_(1995_film)")) == "Heat"
    assert dbpedia_label(DBP.format("Heat_(1995_film)"), keep_qualifier=True) == "Heat (1995 film)"
    assert dbpedia_label(DBP.format("Why_Him%3F")) == "Why Him?"
    assert dbpedia_label(DBP.format("Adam_Pascal__1")) == "Adam Pascal"
    assert dbpedia_label("<http://www.imdb.com/name/nm0404181/>") is None
    assert dbpedia_label("75962") is None


# ---------------------------------------------------------------- linker


def linked(linker, text):
    return [(m.surface, m.entity_id) for m in linker.link(text)]


def test_longest_match_wins():
    linker = EntityLinker.build({1: ["Tom Hanks"], 2: ["Hanks"], 3: ["Tom Hanks Jr"]}, stopwords=set())
    assert linked(linker, "tom hanks and Hanks") == [("tom hanks", 1), ("Hanks", 2)]
    assert linked(linker, "Tom Hanks Jr. was there") == [("Tom Hanks Jr", 3)]


def test_leftmost_match_wins_over_a_longer_later_one():
    linker = EntityLinker.build({1: ["New York"], 2: ["York City Council"]}, stopwords=set())
    assert linked(linker, "New York City Council") == [("New York", 1)]


def test_token_boundaries_only():
    linker = EntityLinker.build({1: ["Hanks"], 2: ["Tom Hanks"]}, stopwords=set())
    assert linked(linker, "Hanksville, Tom Hanksy, TomHanks, xHanks") == []
    assert linked(linker, "(Hanks)") == [("Hanks", 1)]


def test_case_and_accent_insensitive():
    linker = EntityLinker.build({1: ["Café Society"], 2: ["Beyoncé"]}, stopwords=set())
    assert linked(linker, "CAFE society and beyonce") == [("CAFE society", 1), ("beyonce", 2)]
    assert linked(linker, unicodedata.normalize("NFD", "Beyoncé’s album")) == [
        (unicodedata.normalize("NFD", "Beyoncé’s"), 2)
    ]


def test_possessive_matches_the_name():
    linker = EntityLinker.build({1: ["Tom Hanks"]}, stopwords=set())
    assert linked(linker, "Tom Hanks's movies") == [("Tom Hanks's", 1)]


def test_stopword_short_and_numeric_filters():
    labels = {1: ["It"], 2: ["Up"], 3: ["Her"], 4: ["1984"], 5: ["The Who"], 6: ["Nice"], 7: ["Ha!"], 8: ["Jaws"]}
    linker = EntityLinker.build(labels, stopwords={"it", "her", "the", "who"})
    assert linked(linker, "It is up to her, 1984, The Who, nice, ha! Jaws") == [("Jaws", 8)]
    assert linker.stats.skipped_stopword == 4  # It, Her, The Who (all stopwords), Nice (chat word)
    assert linker.stats.skipped_short == 3  # Up, Ha!, 1984
    loose = EntityLinker.build(
        labels, stopwords=set(), min_label_chars=2, add_chat_stopwords=False, skip_all_stopword_labels=False
    )
    assert {e for _, e in linked(loose, "It is up to her, 1984, The Who, nice, ha! Jaws")} == {1, 2, 3, 5, 6, 7, 8}


def test_qualified_single_token_not_linked_except_genres():
    labels = {1: ["Time (magazine)"], 2: ["Thriller (genre)"], 3: ["Heat (1995 film)"], 4: ["Lost in Space (film)"]}
    linker = EntityLinker.build(labels, stopwords=set())
    assert linked(linker, "time for a thriller like heat or lost in space") == [("thriller", 2), ("lost in space", 4)]
    assert linker.stats.skipped_qualified == 2
    assert {e for _, e in linked(EntityLinker.build(labels, set(), kept_qualifiers=None), "time heat")} == {1, 3}


def test_film_suffix_variant():
    linker = EntityLinker.build({1: ["Science fiction film"], 2: ["Horror film"]}, stopwords=set())
    assert linked(linker, "science fiction or HORROR films") == [("science fiction", 1), ("HORROR", 2)]


def test_ambiguity_rule():
    labels = {1: ["Michael Jordan"], 2: ["Michael Jordan"], 3: ["Jordan"], 4: ["Drama"], 5: ["Drama"]}
    # no degrees: a shared surface never links, and blocks the shorter "Jordan" inside it
    linker = EntityLinker.build(labels, stopwords=set())
    assert linked(linker, "Michael Jordan in Jordan, drama") == [("Jordan", 3)]
    assert linker.stats.ambiguous_skipped == 2
    assert linker.link_details("Michael Jordan")[1] == [(0, 14)]
    # a dominant degree (>= ratio x the runner-up) resolves; a close one does not
    linker = EntityLinker.build(labels, stopwords=set(), degree={1: 30, 2: 10, 4: 5, 5: 4}, dominance_ratio=3)
    assert linked(linker, "Michael Jordan, drama") == [("Michael Jordan", 1)]
    assert (linker.stats.ambiguous_resolved, linker.stats.ambiguous_skipped) == (1, 1)
    assert linked(EntityLinker.build(labels, set(), degree={1: 0, 2: 0}), "Michael Jordan") == []


def test_movie_mentions_are_not_linked():
    linker = EntityLinker.build({1: ["Tom Hanks"]}, stopwords=set())
    assert linked(linker, "@12345 with Tom Hanks") == [("Tom Hanks", 1)]


def test_build_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"labels\[1\] is a str"):
        EntityLinker.build({1: "Tom Hanks"}, stopwords=set())
    with pytest.raises(ValueError, match="dominance_ratio"):
        EntityLinker.build({}, stopwords=set(), dominance_ratio=0.5)
    assert EntityLinker.build({}, stopwords=set()).link("anything") == []


# ---------------------------------------------------------------- properties

WORDS = ["tom", "Hanks", "meg", "ryan", "horror", "film", "café", "CAFE", "the", "new", "york", "city", "jr"]
SEPARATORS = [" ", "  ", ", ", ". ", "! ", "-", " @123 ", "'s "]
label_sets = st.dictionaries(
    st.integers(1, 12),
    st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join), min_size=1, max_size=2),
    max_size=10,
)
texts = st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPARATORS)), max_size=25).map(
    lambda parts: "".join(word + sep for word, sep in parts)
)
degrees = st.none() | st.dictionaries(st.integers(1, 12), st.integers(0, 20))


@settings(max_examples=150, deadline=None)
@given(label_sets, texts, degrees)
def test_linking_properties(labels, text, degree):
    linker = EntityLinker.build(labels, stopwords={"the"}, degree=degree)
    mentions = linker.link(text)
    tokens = tokenize(text)
    for m in mentions:
        assert text[m.start : m.end] == m.surface
        assert (tokens[m.token_start].start, tokens[m.token_end - 1].end) == (m.start, m.end)
        assert " ".join(normalized_tokens(m.surface)) in linker.labels[m.entity_id]
    assert all(a.end <= b.start and a.token_end <= b.token_start for a, b in zip(mentions, mentions[1:]))
    assert linker.link(text) == mentions  # deterministic, no state carried between calls
    surfaces = " . ".join(m.surface for m in mentions)
    assert [m.entity_id for m in linker.link(surfaces)] == [m.entity_id for m in mentions]


# ---------------------------------------------------------------- evaluation


def fixture_linker():
    labels = {1: ["Tom Hanks"], 2: ["Horror film"], 3: ["Steven Spielberg"], 4: ["Nice"], 10: ["Heat (1995 film)"]}
    return EntityLinker.build(labels, stopwords=set())


def test_evaluate_on_fixture():
    uri_map = {
        DBP.format(name): i
        for name, i in [
            ("Tom_Hanks", 1),
            ("Horror_film", 2),
            ("Steven_Spielberg", 3),
            ("Nice", 4),
            ("Heat_(1995_film)", 10),
        ]
    }
    result = evaluate_linker(fixture_linker(), FIXTURE, uri_map, {DBP.format("Heat_(1995_film)")}, sample_size=2)
    assert result["counts"] == {
        "utterances": 5,
        "gold": 6,
        "predicted": 4,
        "true_positives": 3,
        "gold_unmapped": 1,
        "gold_mapped": 5,
        "ambiguous_spans": 0,
    }
    assert result["precision"] == pytest.approx(0.75)
    assert result["recall"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx(0.6)
    assert result["recall_mapped"] == pytest.approx(0.6)
    assert result["macro_f1"] == pytest.approx(0.5)
    assert len(result["sample_misses"]) == 2 and len(result["sample_false_hits"]) == 1
    assert result["sample_false_hits"][0] == {
        "conv_id": 1,
        "utt_id": 2,
        "text": "any horror movies ?",
        "entity_id": 2,
        "surface": "horror",
    }
    again = evaluate_linker(fixture_linker(), FIXTURE, uri_map, {DBP.format("Heat_(1995_film)")}, sample_size=2)
    assert again["sample_misses"] == result["sample_misses"]  # seeded


def test_evaluate_names_a_bad_file(tmp_path):
    bad = tmp_path / "valid_data.json"
    bad.write_text('[{"conv_id": 7, "dialog": [{"utt_id": 0, "text": "not a token list"}]}]')
    with pytest.raises(ValueError, match=r"valid_data.json: conversation 7, utterance 0"):
        evaluate_linker(fixture_linker(), bad, {}, set())


# ---------------------------------------------------------------- real mirror


@pytest.mark.skipif(
    not (MIRROR / "crslab_redial" / "valid_data.json").is_file(),
    reason="real data mirror absent: set C2CRS_DATA_DIR to a directory with crslab_redial/",
)
def test_mirror_f1_floor():
    inputs = mirror_linker_inputs(MIRROR)
    linker = EntityLinker.build(inputs.labels, inputs.stopwords, degree=inputs.degree)
    result = evaluate_linker(
        linker, MIRROR / "crslab_redial" / "valid_data.json", inputs.uri_to_entity_id, inputs.movie_uris
    )
    assert result["counts"]["utterances"] == 16387
    assert result["f1"] >= MIRROR_F1_FLOOR, result
