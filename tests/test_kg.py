"""The kg stage's domain logic: safe loading, the three KG sources, the build rules; the real mirror when present.

Over 400 lines: one fixture KG serves every reader and rule; split, each file would rebuild it.
"""

import json
import os
import pickle
import shutil
import time
from collections import defaultdict
from pathlib import Path

import polars as pl
import pytest

from stages import kg
from stages.kg import KgDataError
from tests.conftest import FIXTURES

KG_FIXTURES = FIXTURES / "kg"
R = kg.DBPEDIA_RESOURCE


def triples_of(*rows: tuple[str, str, str]) -> pl.DataFrame:
    full = lambda name: name if ":" in name else R + name  # noqa: E731
    return pl.DataFrame([(full(h), rel, full(t), "test") for h, rel, t in rows], schema=kg.TRIPLE_SCHEMA, orient="row")


# Heat and Why_Me are movies 1 and 2; movie 3 has no URI; movie 4's URI is absent from the KG.
# Hops from the movies: Al_Pacino, De_Niro, Crime_film 1; New_York 2; USA 3.
TINY = triples_of(
    ("Heat_(1995_film)", "starring", "Al_Pacino"),
    ("Heat_(1995_film)", "starring", "Robert_De_Niro"),
    ("Why_Me%3F_(2015_film)", "starring", "Al_Pacino"),
    ("Al_Pacino", "birthPlace", "New_York"),
    ("Robert_De_Niro", "birthPlace", "New_York"),
    ("New_York", "country", "USA"),
    ("Heat_(1995_film)", "genre", "Crime_film"),
    ("Heat_(1995_film)", "self", "Heat_(1995_film)"),
)
MOVIES = pl.DataFrame(
    {  # deliberately not in movie_id order
        "movie_id": [4, 2, 1, 3],
        "dbpedia_uri": [R + "Isolated_Film", R + "Why_Me%3F_(2015_film)", "<" + R + "Heat_(1995_film)>", None],
        "title": [None, None, "Heat", "Lost Movie"],
    }
)


def build(triples=TINY, movies=MOVIES, **kwargs) -> kg.KgResult:
    options = {"seed_uris": (), "min_relation_edges": 2, "hops": 3} | kwargs
    return kg.build_kg(triples, movies, **options)


def named_edges(result: kg.KgResult) -> set[tuple[str, str, str]]:
    uri = dict(zip(result.entities["entity_id"], result.entities["uri"].str.replace(R, "", literal=True)))
    name = dict(zip(result.relations["relation_id"], result.relations["name"]))
    return {(uri[s], name[r], uri[d]) for s, r, d in result.edges.iter_rows()}


# ---------------------------------------------------------------- build rules


def test_relation_filter_counts_both_directions_at_the_boundary():
    # starring: 3 triples = 6 edges both ways; birthPlace 2 = 4; genre and country 1 = 2; the self edge never counts
    keeps = lambda m: set(build(min_relation_edges=m, add_inverse=False).relations["name"])  # noqa: E731
    assert keeps(2) == {"birthPlace", "country", "genre", "starring", "self_loop"}
    assert keeps(4) == {"birthPlace", "starring", "self_loop"}
    assert keeps(5) == {"starring", "self_loop"}
    assert keeps(7) == {"self_loop"}


def test_inverse_relations_and_self_loops():
    result = build(min_relation_edges=4)
    assert result.relations["name"].to_list() == ["birthPlace", "starring", "birthPlace^-1", "starring^-1", "self_loop"]
    assert result.relations["relation_id"].to_list() == [0, 1, 2, 3, 4]
    assert result.relations["is_inverse"].to_list() == [False, False, True, True, False]
    edges = named_edges(result)
    assert ("Heat_(1995_film)", "starring", "Al_Pacino") in edges
    assert ("Al_Pacino", "starring^-1", "Heat_(1995_film)") in edges
    forward = result.edges.filter(pl.col("rel") < 2)
    inverse = result.edges.filter(pl.col("rel").is_between(2, 3))
    assert sorted(forward.select("dst", pl.col("rel") + 2, "src").rows()) == sorted(inverse.rows())
    loops = result.edges.filter(pl.col("rel") == 4)
    assert loops.height == result.entities.height == result.metrics["self_loops"]
    assert (loops["src"] == loops["dst"]).all() and loops["src"].sort().to_list() == list(range(loops.height))
    assert ("Heat_(1995_film)", "self", "Heat_(1995_film)") not in edges  # self edges give way to self_loop
    assert result.relations.filter(pl.col("name") == "starring")["n_edges"].item() == 3
    assert result.metrics["edges"] == result.edges.height == 2 * (3 + 2) + result.entities.height


def test_without_inverses_or_self_loops():
    result = build(min_relation_edges=4, add_inverse=False, add_self_loops=False)
    assert result.relations["name"].to_list() == ["birthPlace", "starring"]
    assert result.edges.height == 5 and result.metrics["self_loops"] == 0


@pytest.mark.parametrize(
    ("hops", "others"),
    [
        (0, set()),
        (1, {"Al_Pacino", "Crime_film", "Robert_De_Niro"}),
        (2, {"Al_Pacino", "Crime_film", "New_York", "Robert_De_Niro"}),
        (3, {"Al_Pacino", "Crime_film", "New_York", "Robert_De_Niro", "USA"}),
        (None, {"Al_Pacino", "Crime_film", "New_York", "Robert_De_Niro", "USA"}),
    ],
)
def test_hop_filter_keeps_the_induced_subgraph_around_the_movies(hops, others):
    result = build(hops=hops, add_inverse=False, add_self_loops=False)
    non_items = result.entities.filter(~pl.col("is_item"))["uri"].str.replace(R, "", literal=True)
    assert set(non_items) == others
    nodes = others | {"Heat_(1995_film)", "Why_Me%3F_(2015_film)"}
    assert all(h in nodes and t in nodes for h, _, t in named_edges(result))
    if hops == 2:  # New_York is 2 hops away, USA 3: the New_York -> USA edge is outside
        assert ("Robert_De_Niro", "birthPlace", "New_York") in named_edges(result)
        assert not any(t == "USA" for _, _, t in named_edges(result))
        assert result.metrics["triples_beyond_hops"] == 1


def test_seed_uris_extend_the_neighbourhood():
    result = build(hops=1, seed_uris=["<" + R + "USA>", R + "Not_In_The_KG"], add_inverse=False, add_self_loops=False)
    edges = named_edges(result)
    assert ("New_York", "country", "USA") in edges
    assert ("Al_Pacino", "birthPlace", "New_York") in edges  # both ends within one hop of some seed
    assert result.metrics["seeds_unknown"] == 1
    assert R + "Not_In_The_KG" not in set(result.entities["uri"])


def test_ids_are_compact_with_every_movie_an_item_first():
    result = build(hops=1)
    entities = result.entities
    assert entities["entity_id"].to_list() == list(range(entities.height))
    items = entities.filter("is_item")
    assert items["entity_id"].to_list() == [0, 1, 2, 3]
    assert items["movie_id"].to_list() == [1, 2, 3, 4]
    assert items["uri"].to_list() == [
        R + "Heat_(1995_film)",
        R + "Why_Me%3F_(2015_film)",
        "redial:3",
        R + "Isolated_Film",
    ]
    others = entities.filter(~pl.col("is_item"))
    assert others["uri"].to_list() == sorted(others["uri"]) and others["movie_id"].null_count() == others.height
    assert result.metrics["items"] == 4 and result.metrics["items_without_uri"] == 1
    assert result.metrics["items_with_edges"] == 2  # movies 3 and 4 are items without edges, with a self loop
    assert result.edges.filter(pl.col("src").is_in([2, 3]) | pl.col("dst").is_in([2, 3]))["rel"].unique().to_list() == [
        result.relations.height - 1
    ]
    assert result.edges.schema == kg.EDGE_SCHEMA and result.entities.schema == kg.ENTITY_SCHEMA
    assert result.relations.schema == kg.RELATION_SCHEMA


def test_two_movies_with_one_uri_stay_two_items():
    movies = pl.DataFrame({"movie_id": [7, 8], "dbpedia_uri": [R + "Heat_(1995_film)"] * 2, "title": ["a", "b"]})
    result = build(movies=movies, hops=1)
    assert result.entities.filter("is_item")["uri"].to_list() == [R + "Heat_(1995_film)", "redial:8"]
    assert result.metrics["movies_sharing_uri"] == 1


def test_labels():
    labels = dict(zip(build(hops=3).entities["uri"].str.replace(R, "", literal=True), build(hops=3).entities["label"]))
    assert labels["Heat_(1995_film)"] == "Heat"  # the ReDial title wins
    assert labels["Why_Me%3F_(2015_film)"] == "Why Me?"  # no title: from the URI
    assert labels["redial:3"] == "Lost Movie"
    assert labels["Robert_De_Niro"] == "Robert De Niro"


@pytest.mark.parametrize(
    ("uri", "label"),
    [
        ("<http://dbpedia.org/resource/Tom_Hanks>", "Tom Hanks"),
        ("http://dbpedia.org/resource/Heat_(1995_film)", "Heat"),
        ("<http://dbpedia.org/resource/Why_Me%3F_(2015_film)>", "Why Me?"),
        ("<http://dbpedia.org/resource/Christopher_%22Play%22_Martin>", 'Christopher "Play" Martin'),
        ("<http://dbpedia.org/resource/Am%C3%A9lie>", "Amélie"),
        ("<http://dbpedia.org/resource/(500)_Days_of_Summer>", "(500) Days of Summer"),
        ("<http://dbpedia.org/resource/Up_(2009_film)_(soundtrack)>", "Up (2009 film)"),
        ("meta:person:Tom Hanks", "Tom Hanks"),
        ("<http://www.imdb.com/name/nm0404181/>", "http://www.imdb.com/name/nm0404181/"),
    ],
)
def test_label_from_uri(uri, label):
    assert kg.label_from_uri(uri) == label


def test_reference_counts_follow_crslab_rule():
    # heads: Heat, Why_Me, Al_Pacino, Robert_De_Niro, New_York -> 5 self loops; listed both ways: starring 6,
    # birthPlace 4, genre 2, country 2; CRSLab keeps "> threshold"
    three = kg.reference_counts(TINY, min_exclusive=3)
    assert three == {"relations": 3, "edges": 6 + 4 + 5, "entities": 7 + 1, "entities_with_edges": 5}
    four = kg.reference_counts(TINY, min_exclusive=4)
    assert four == {"relations": 2, "edges": 6 + 5, "entities": 8, "entities_with_edges": 5}
    assert build().metrics["reference"] == kg.reference_counts(TINY)


def test_reference_counts_merge_reciprocal_triples_but_ours_keep_both():
    pair = triples_of(("A", "knows", "B"), ("B", "knows", "A"))
    assert kg.reference_counts(pair, min_exclusive=0)["edges"] == 2 + 1 + 1  # (A,B), (B,A) + two self loops
    movies = pl.DataFrame({"movie_id": [1], "dbpedia_uri": [R + "A"]})
    assert build(pair, movies, add_self_loops=False).edges.height == 4  # knows and knows^-1 both ways


def test_bad_inputs_to_build():
    with pytest.raises(KgDataError, match="empty"):
        build(TINY.clear())
    with pytest.raises(KgDataError, match="lacks column"):
        build(TINY.drop("source"))
    with pytest.raises(KgDataError, match="movie_id 1 appears more than once"):
        build(movies=pl.concat([MOVIES, MOVIES.filter(pl.col("movie_id") == 1)]))
    with pytest.raises(KgDataError, match="null tail_uri"):
        build(TINY.with_columns(pl.lit(None, dtype=pl.String).alias("tail_uri")))


# ---------------------------------------------------------------- safe loading


def test_restricted_unpickler_admits_containers_and_defaultdict(tmp_path):
    data = defaultdict(list, {1: [(2, 3)], 4: [(5, 6), (7, 8)]})
    obj = {"a": data, "b": {1, 2}, "c": frozenset([3]), "d": (1.5, "x", True, None, 2j)}
    for protocol in (0, 2, 3, pickle.HIGHEST_PROTOCOL):  # KGSF's files are protocol 3
        path = tmp_path / f"ok{protocol}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        assert kg.load_pickle_restricted(path) == obj
    path.write_bytes(pickle.dumps({"bytes": b"\x00\xff"}, protocol=3))
    assert kg.load_pickle_restricted(path) == {"bytes": b"\x00\xff"}


class Sneaky:
    pass


def test_restricted_unpickler_rejects_other_classes(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")  # never run: rejected first
    with pytest.raises(KgDataError, match=r"evil.pkl: pickle holds os.system; only builtin containers"):
        kg.load_pickle_restricted(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"x": Sneaky()}))
    with pytest.raises(KgDataError, match=r"pickle holds (tests\.)?test_kg\.Sneaky;"):
        kg.load_pickle_restricted(path)
    path.write_bytes(pickle.dumps({"x": 1})[:-3])
    with pytest.raises(KgDataError, match="not a readable pickle"):
        kg.load_pickle_restricted(path)


# ---------------------------------------------------------------- loaders


META = KG_FIXTURES / "movie_metadata"

# A five-entity KG in KGSF's pickle form: Heat -starring(7)-> Al Pacino, Robert De Niro; Al Pacino -birthPlace(19)->
# New York City; self edges of relation 86 on the movies, as in the real file; 4 is the ReDial movie 3, which has no
# DBpedia URI (KGSF keys it by the int).
KGSF_SUBKG = {0: [(7, 1), (7, 2), (86, 0)], 1: [(19, 3)], 4: [(86, 4)]}
KGSF_ENTITIES = {
    "<http://dbpedia.org/resource/Heat_(1995_film)>": 0,
    "<http://dbpedia.org/resource/Al_Pacino>": 1,
    "<http://dbpedia.org/resource/Robert_De_Niro>": 2,
    "<http://dbpedia.org/resource/New_York_City>": 3,
    3: 4,
}


def write_kgsf(directory: Path, subkg, entity2id) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "subkg.pkl").write_bytes(pickle.dumps(subkg))
    (directory / "entity2entityId.pkl").write_bytes(pickle.dumps(entity2id))
    return directory / "subkg.pkl", directory / "entity2entityId.pkl"


def metadata(directory: Path = META, movies=None, **optional) -> kg.KgSource:
    paths = {"item_ids_path": directory / "item_ids.json", "entity2type_path": directory / "entity2type.json"}
    return kg.load_movie_metadata_kg(
        META_MOVIES if movies is None else movies,
        directory / "kg.json",
        directory / "entity2id.json",
        directory / "relation2id.json",
        directory / "id2info.json",
        **(paths | optional),
    )


def test_kgsf_pickles_give_uri_triples(tmp_path):
    source = kg.load_kgsf_kg(*write_kgsf(tmp_path, defaultdict(list, KGSF_SUBKG), KGSF_ENTITIES))
    assert set(source.triples.rows()) == {
        (R + "Heat_(1995_film)", "dbpedia:7", R + "Al_Pacino", "dbpedia"),
        (R + "Heat_(1995_film)", "dbpedia:7", R + "Robert_De_Niro", "dbpedia"),
        (R + "Heat_(1995_film)", "dbpedia:86", R + "Heat_(1995_film)", "dbpedia"),
        (R + "Al_Pacino", "dbpedia:19", R + "New_York_City", "dbpedia"),
        ("redial:3", "dbpedia:86", "redial:3", "dbpedia"),
    }
    assert source.entity_uris == frozenset(
        [R + "Heat_(1995_film)", R + "Al_Pacino", R + "Robert_De_Niro", R + "New_York_City", "redial:3"]
    )


@pytest.mark.parametrize(
    ("subkg", "entity2id", "message"),
    [
        ({0: [(7, 99)]}, None, r"subkg.pkl: head 0: tail entity id 99 is not in entity2entityId.pkl"),
        ({77: [(7, 1)]}, None, r"subkg.pkl: head 77: head entity id 77 is not in entity2entityId.pkl"),
        ({0: [(-1, 1)]}, None, r"subkg.pkl: head 0: relation id -1 is not an integer >= 0"),
        ({0: [(7, "x")]}, None, r"subkg.pkl: head 0: id 'x' is not an integer"),
        ({0: [(7, 1, 3)]}, None, r"subkg.pkl: head 0: expected a \[relation, tail\] pair"),
        ({0: 5}, None, r"subkg.pkl: head 0: expected a list"),
        ({}, None, r"subkg.pkl: the subgraph has no triples"),
        ({0: []}, None, r"subkg.pkl: the subgraph has no triples"),
        (None, {"<a>": 0, "<b>": 0}, r"entity2entityId.pkl: id 0 is used by more than one entity"),
        (None, {"<a>": -1}, r"entity2entityId.pkl: entity '<a>': id -1 is not an integer >= 0"),
    ],
)
def test_bad_ids_name_file_head_and_id(tmp_path, subkg, entity2id, message):
    paths = write_kgsf(
        tmp_path, KGSF_SUBKG if subkg is None else subkg, KGSF_ENTITIES if entity2id is None else entity2id
    )
    with pytest.raises(KgDataError, match=message):
        kg.load_kgsf_kg(*paths)


def test_bad_pickle_ids(tmp_path):
    paths = write_kgsf(tmp_path, defaultdict(list, {0: [(3, 9)]}), {"<a>": 0, "<b>": 1})
    with pytest.raises(KgDataError, match=r"subkg.pkl: head 0: tail entity id 9 is not in entity2entityId.pkl"):
        kg.load_kgsf_kg(*paths)
    with pytest.raises(FileNotFoundError, match="nowhere.pkl: file not found"):
        kg.load_kgsf_kg(tmp_path / "nowhere.pkl", paths[1])


META_MOVIES = pl.DataFrame(
    {
        "movie_id": [1, 3, 5, 6],
        "dbpedia_uri": [R + "Heat_(1995_film)", None, None, R + "Twin_(2000_film)"],
        "title": ["Heat", "Lost Movie", "Twin", "Twin"],
    }
)


def test_movie_metadata_lands_on_the_items(tmp_path):
    source = metadata()
    assert set(source.triples.select("head_uri", "relation", "tail_uri").rows()) == {
        (R + "Heat_(1995_film)", "meta:genre", "meta:genre:crime"),
        (R + "Heat_(1995_film)", "meta:star", "meta:person:Al Pacino"),
        ("redial:3", "meta:genre", "meta:genre:crime"),
        ("redial:5", "meta:star", "meta:person:Al Pacino"),  # one title, two ReDial ids: both get the edges
        (R + "Twin_(2000_film)", "meta:star", "meta:person:Al Pacino"),
    }
    assert (source.triples["source"] == "movie_metadata").all()
    merged = kg.merge_sources(kg.load_kgsf_kg(*write_kgsf(tmp_path, KGSF_SUBKG, KGSF_ENTITIES)), source)
    result = kg.build_kg(merged.triples, META_MOVIES, (), min_relation_edges=1, hops=2)
    assert result.metrics["items_with_edges"] == 4
    assert result.entities.filter(pl.col("uri") == "meta:person:Al Pacino")["label"].item() == "Al Pacino"


def test_movie_metadata_bad_relation(tmp_path):
    directory = tmp_path / "meta"
    shutil.copytree(META, directory)
    (directory / "kg.json").write_text(json.dumps({"0": [[0, 1], [7, 2]]}))
    with pytest.raises(KgDataError, match=r"kg.json: head 0: relation id 7 is not one of the ids in relation2id"):
        metadata(directory)
    (directory / "kg.json").write_text(json.dumps({"0": [[0, 1]], "9": [[0, 1]]}))
    with pytest.raises(KgDataError, match=r"kg.json: head 9: head entity id 9 is not in entity2id.json"):
        metadata(directory)
    shutil.copy(META / "kg.json", directory / "kg.json")
    (directory / "item_ids.json").write_text("[0, 42]")
    with pytest.raises(KgDataError, match=r"item_ids.json: item id 42 is not in entity2id.json"):
        metadata(directory)


def test_movie_metadata_optional_files():
    plain = metadata(item_ids_path=None, entity2type_path=None)  # items = heads of kg.json; untyped names
    assert set(plain.triples["tail_uri"]) == {"meta:entity:crime", "meta:entity:Al Pacino"}
    assert plain.triples.height == metadata().triples.height


# ---------------------------------------------------------------- the real mirror

MIRROR = Path(os.environ.get("C2CRS_DATA_DIR", "/nonexistent"))
real = pytest.mark.skipif(
    not (MIRROR / "dbpedia_kgsf" / "subkg.pkl").is_file()
    or not (MIRROR / "crslab_redial" / "dbpedia_subkg.json").is_file(),
    reason="real data mirror absent: set C2CRS_DATA_DIR to a directory with dbpedia_kgsf/ and crslab_redial/",
)


@pytest.fixture(scope="module")
def real_kgsf():
    return kg.load_kgsf_kg(MIRROR / "dbpedia_kgsf" / "subkg.pkl", MIRROR / "dbpedia_kgsf" / "entity2entityId.pkl")


@pytest.fixture(scope="module")
def real_movies():
    """movie_id, dbpedia_uri (with the file's angle brackets) and title, as the ingest stage has them."""
    uris = json.loads((MIRROR / "crslab_redial" / "id2entity.jsonl").read_text())
    titles = json.loads((MIRROR / "crslab_redial" / "mid2name_redial.json").read_text())
    return pl.DataFrame(
        {"movie_id": [int(k) for k in uris], "dbpedia_uri": list(uris.values()), "title": [titles.get(k) for k in uris]}
    )


@real
def test_real_kgsf_subgraph_size(real_kgsf):
    assert real_kgsf.triples.height == 165_696
    assert len(real_kgsf.entity_uris) == 64_362


@real
def test_real_reference_counts_match_design(real_kgsf):
    assert kg.reference_counts(real_kgsf.triples) == {
        "relations": 35,
        "edges": 316_884,
        "entities": 64_363,
        "entities_with_edges": 59_809,
    }


@real
def test_real_default_build(real_kgsf, real_movies):
    start = time.perf_counter()
    result = kg.build_kg(real_kgsf.triples, real_movies, (), min_relation_edges=1001, hops=2)
    assert time.perf_counter() - start < 10  # about 1 s on 2 idle cores
    m = result.metrics
    assert m["items"] == 6_924 and m["items_without_uri"] == 812
    assert m["relations_passing_filter"] == 34 and m["relations"] == 2 * 34 + 1  # the reference's 35 = 34 + self loop
    assert m["entities"] == 59_016 and m["edges"] == 352_480 and m["items_with_edges"] == 5_947
    assert m["self_loops"] == m["entities"] and m["triples_beyond_hops"] == 916
    assert m["reference"]["relations"] == 35 and m["reference"]["edges"] == 316_884
    edges = result.edges
    assert edges["src"].max() < m["entities"] and edges["dst"].max() < m["entities"]
    assert edges.n_unique() == edges.height
    heat = result.entities.filter(pl.col("uri") == R + "Heat_(1995_film)")
    assert heat["is_item"].item() and heat["entity_id"].item() < 6_924


@real
def test_real_movie_metadata(real_kgsf, real_movies):
    meta = metadata(MIRROR / "movie_metadata", real_movies)
    assert meta.triples.height == 56_965 + 53  # 7 titles name two ReDial ids each
    result = kg.build_kg(kg.merge_sources(real_kgsf, meta).triples, real_movies, (), min_relation_edges=1001, hops=2)
    assert result.metrics["items_with_edges"] == 6_847


def test_vectorised_labels_equal_label_from_uri():
    uris = [
        kg.normalize_uri(u)
        for u in (
            "<http://dbpedia.org/resource/Why_Me%3F_(2015_film)>",
            "http://dbpedia.org/resource/Heat_(1995_film)",
            "http://dbpedia.org/resource/(500)_Days_of_Summer",
            "http://dbpedia.org/resource/_(x)",
            "meta:person:Tom Hanks",
            "meta:genre",
            "redial:12",
            "http://www.sva.edu",
        )
    ]
    assert kg.uri_labels(pl.Series(uris)).to_list() == [kg.label_from_uri(u) for u in uris]
