"""relation_names: the KG's numbered relations named from the movie metadata where it agrees on most edges, and the
chat's explanations reading those names.

The fixture mirror's KG (tests/conftest.py): Alpha -7-> Tom Hanks and Gamma -7-> Meryl Streep, the stars its
id2info.json lists for them; Alpha -9-> Comedy film and Gamma -9-> Comedy film, where the metadata calls Alpha a
comedy and Gamma a drama (one of two edges agrees: no majority).
"""

import json

import polars as pl
import pytest
import yaml

from pipeline.config import ConfigError, load_params
from stages import relation_names
from stages.chat import engine
from stages.chat.explain import Explanation, KnowledgeGraph
from stages.io.graph import STAGES, stage_body

NAMES = STAGES["relation_names"].output("relation_names")


@pytest.fixture
def workspace(params_file):
    """The fixture mirror's KG built and the relation_names stage run on it (min_edges 1: the graph is tiny)."""
    raw = yaml.safe_load(params_file.read_text())
    raw["relation_names"]["min_edges"] = 1
    params_file.write_text(yaml.safe_dump(raw))
    params, workspace = load_params(params_file), params_file.parent
    for stage in ("ingest", "kg", "relation_names"):
        stage_body(stage)(params, workspace)
    return workspace


def test_a_relation_that_agrees_is_named_and_one_without_a_majority_is_not(workspace):
    table = pl.read_parquet(workspace / NAMES)
    starring, genre = (table.filter(pl.col("relation") == f"dbpedia:{r}").row(0, named=True) for r in (7, 9))
    assert starring["named"] and (starring["name"], starring["inverse_name"]) == ("starring", "star of")
    assert (starring["field"], starring["direction"]) == ("star", "movie->entity")
    assert (starring["agreement"], starring["edges_compared"], starring["movie_edges"]) == (1.0, 2, 2)
    # "Comedy film" is Alpha's genre (comedy) but not Gamma's (drama): 1 of 2 is no majority
    assert (genre["field"], genre["agreement"], genre["edges_compared"], genre["named"]) == ("genre", 0.5, 2, False)
    assert (genre["name"], genre["inverse_name"]) == ("related (dbpedia:9)", "related (dbpedia:9^-1)")
    report = json.loads((workspace / STAGES["relation_names"].report("relation_names.json")).read_text())
    assert (report["majority"], report["min_edges"]) == (0.5, 1)
    assert [r["relation"] for r in report["relations"] if r["named"]] == ["dbpedia:7"]
    metrics = json.loads((workspace / STAGES["relation_names"].metrics_file).read_text())
    assert (metrics["relations"], metrics["named"]) == (2, 1)


def test_too_few_compared_edges_keep_a_relation_unnamed(workspace):
    tables = {name: pl.read_parquet(workspace / f"data/kg/{name}.parquet") for name in relation_names.KG_COLUMNS}
    info = json.loads((workspace / "mirror/movie_metadata/id2info.json").read_text())
    names = relation_names.metadata_names(info, workspace / "id2info.json")
    table = relation_names.derive_names(*tables.values(), names, majority=0.5, min_edges=3)
    assert not table["named"].any() and "related (dbpedia:7)" in table["name"].to_list()


def test_explanations_read_the_derived_names(workspace):
    entities, relations, edges = (
        pl.read_parquet(workspace / f"data/kg/{n}.parquet") for n in relation_names.KG_COLUMNS
    )
    graph = KnowledgeGraph(entities, relations, edges, relation_names.display_names(workspace / NAMES, relations))
    entity = dict(zip(entities["label"], entities["entity_id"]))
    [direct] = graph.paths(entity["Tom Hanks"], entity["Alpha"], limit=2)
    assert direct.relations == ["star of"]  # Tom Hanks —star of→ Alpha: the inverse edge, read the right way round
    [shared] = graph.paths(entity["Gamma"], entity["Alpha"], limit=2)
    assert shared.relations == ["related (dbpedia:9)", "related (dbpedia:9^-1)"]
    why = engine.Recommendation(100, "Alpha", 1.0, Explanation(100, kg_paths=[direct, shared]))
    text = engine.describe(why)  # talk's /why; /v1/explain and the page show the same KGPath.relations
    assert "KG: Tom Hanks -[star of]-> Alpha" in text
    assert "KG: Gamma -[related (dbpedia:9)]-> Comedy film -[related (dbpedia:9^-1)]-> Alpha" in text
    # a workspace that has not run the stage keeps the KG's own names
    assert relation_names.display_names(workspace / "nowhere.parquet", relations) == {}
    plain = KnowledgeGraph(entities, relations, edges)
    assert plain.paths(entity["Tom Hanks"], entity["Alpha"], limit=2)[0].relations == ["dbpedia:7^-1"]


def test_a_bad_names_table_is_named_with_what_was_expected(workspace, tmp_path):
    relations = pl.read_parquet(workspace / "data/kg/relations.parquet")
    garbage = tmp_path / "names.parquet"
    garbage.write_text("not parquet")
    with pytest.raises(relation_names.RelationNamesError, match=r"names.parquet: not a Parquet table"):
        relation_names.display_names(garbage, relations)
    pl.read_parquet(workspace / NAMES).drop("inverse_name").write_parquet(garbage)
    with pytest.raises(relation_names.RelationNamesError, match=r"names.parquet: lacks column\(s\) inverse_name"):
        relation_names.display_names(garbage, relations)
    shuffled = relations.with_columns(pl.col("name").reverse())
    with pytest.raises(relation_names.RelationNamesError, match=r"made from another KG; run `python -m pipeline run"):
        relation_names.display_names(workspace / NAMES, shuffled)


def test_bad_inputs_name_the_file_and_what_was_expected(workspace):
    params = load_params(workspace / "params.yaml")
    info = workspace / "mirror/movie_metadata/id2info.json"
    broken = json.loads(info.read_text())
    broken["100"]["star"] = "Tom Hanks"  # a name, not a list of names
    info.write_text(json.dumps(broken))
    with pytest.raises(relation_names.RelationNamesError, match=r"id2info.json: movie 100: star must be a list"):
        stage_body("relation_names")(params, workspace)
    (workspace / "data/kg/edges.parquet").unlink()
    with pytest.raises(relation_names.RelationNamesError, match=r"edges.parquet: not found; expected the kg stage"):
        stage_body("relation_names")(params, workspace)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("majority", 1.0, "less than 1"), ("majority", "0.5", "valid number"), ("min_edges", 0, "greater than or equal")],
)
def test_the_params_are_validated(params_file, key, value, message):
    raw = yaml.safe_load(params_file.read_text())
    raw["relation_names"][key] = value
    params_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"relation_names.{key}: .*{message}"):
        load_params(params_file)
    del raw["relation_names"][key]
    params_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"relation_names.{key}: required key is missing"):
        load_params(params_file)
