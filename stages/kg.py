"""Stage 3, kg: the DBpedia subgraph around the ReDial movies, with entity and relation id maps.

Over 400 lines: three KG readers and the build rules share one triples layout and its checks (KgDataError names
the file and record), and the stage's run() is here as every stage's is.

Sources come as a uniform triples table (head_uri, relation, tail_uri, source) so that the KGSF pickles, CRSLab's
JSON copy of the same graph and the optional movie-metadata KG can be combined. URIs are kept without angle brackets
("http://dbpedia.org/resource/Tom_Hanks"), as in the ingest stage's movies table; ReDial movies that have no DBpedia
URI are "redial:<movie_id>" and metadata entities "meta:<type>:<name>".

The build keeps frequent relations, adds inverse relations and self loops, keeps what lies within a few hops of the
movies and the entities linked in conversations, and numbers entities with the items first. Every ReDial movie is an
item, with or without edges, so the recommender can score all of them.
"""

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import polars as pl

from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.progress import progress
from stages.io.stage_log import NO_LOG, StageLog, StageOutcome
from stages.sources import raw, safe_pickle
from stages.text import linking

log = logging.getLogger(__name__)

DBPEDIA_RESOURCE = "http://dbpedia.org/resource/"
SELF_LOOP = "self_loop"
INVERSE_SUFFIX = "^-1"
REFERENCE_MIN_EXCLUSIVE = 1000  # CRSLab keeps a relation when its count is "> 1000"
DISAMBIGUATION = re.compile(r"\s*\([^()]*\)$")
TRIPLE_SCHEMA = {"head_uri": pl.String, "relation": pl.String, "tail_uri": pl.String, "source": pl.String}
ENTITY_SCHEMA = {
    "entity_id": pl.Int64,
    "uri": pl.String,
    "label": pl.String,
    "is_item": pl.Boolean,
    "movie_id": pl.Int64,
}
RELATION_SCHEMA = {"relation_id": pl.Int64, "name": pl.String, "n_edges": pl.Int64, "is_inverse": pl.Boolean}
EDGE_SCHEMA = {"src": pl.Int64, "rel": pl.Int64, "dst": pl.Int64}


class KgDataError(ValueError):
    """A KG input that cannot be used; the message names the file, the record (head id) and the problem."""


@dataclass(frozen=True)
class KgSource:
    """One loaded KG: its triples (TRIPLE_SCHEMA, raw: self edges and duplicates kept) and all its entity URIs."""

    triples: pl.DataFrame
    entity_uris: frozenset[str]


@dataclass
class KgResult:
    entities: pl.DataFrame
    relations: pl.DataFrame
    edges: pl.DataFrame
    metrics: dict


# ---------------------------------------------------------------- safe loading


def load_pickle_restricted(path: Path) -> object:
    """stages.safe_pickle's loader, with its refusals reported as KgDataError like every other KG input problem."""
    try:
        return safe_pickle.load_pickle_restricted(path)
    except safe_pickle.PickleSafetyError as exc:
        raise KgDataError(str(exc)) from None


def _load_json(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: KG file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise KgDataError(f"{path}: not valid JSON: {exc}") from None


# ---------------------------------------------------------------- loaders


def normalize_uri(key) -> str:
    """One spelling per entity: DBpedia URIs without angle brackets; a bare ReDial movie id becomes redial:<id>.

    KGSF's entity2entityId.pkl keys the 812 movies without a DBpedia URI by their ReDial id (an int), CRSLab's
    entity2id.json by the same id as a string; both must give the item's key.
    """
    if isinstance(key, bool):
        raise TypeError(f"entity key must be a URI or a ReDial movie id, got {key!r}")
    if isinstance(key, int) or (isinstance(key, str) and key.isascii() and key.isdigit()):
        return f"redial:{key}"
    if not isinstance(key, str):
        raise TypeError(f"entity key must be a URI or a ReDial movie id, got {key!r}")
    key = key.strip()
    return key[1:-1] if key.startswith("<") and key.endswith(">") else key


def _uri_expr(column: str) -> pl.Expr:
    """normalize_uri for a column of strings (no int keys there): strip <...>, digits -> redial:<id>."""
    col = pl.col(column).str.strip_chars()
    bracketed = col.str.starts_with("<") & col.str.ends_with(">")
    col = pl.when(bracketed).then(col.str.strip_prefix("<").str.strip_suffix(">")).otherwise(col)
    return pl.when(col.str.contains(r"^[0-9]+$")).then(pl.lit("redial:") + col).otherwise(col).alias(column)


def _entity_table(mapping, path: Path) -> pl.DataFrame:
    """entity id -> normalized URI; ids must be unique non-negative integers."""
    if not isinstance(mapping, dict) or not mapping:
        raise KgDataError(f"{path}: expected a non-empty mapping entity URI -> id, got {type(mapping).__name__}")
    ids, uris = [], []
    for key, value in mapping.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise KgDataError(f"{path}: entity {key!r}: id {value!r} is not an integer >= 0")
        try:
            uris.append(normalize_uri(key))
        except TypeError as exc:
            raise KgDataError(f"{path}: {exc}") from None
        ids.append(value)
    table = pl.DataFrame({"id": ids, "uri": uris}, schema={"id": pl.Int64, "uri": pl.String})
    for column in ("id", "uri"):
        repeated = table.filter(pl.col(column).is_duplicated()).sort(column, "uri")
        if repeated.height:
            first = repeated.row(0, named=True)
            raise KgDataError(
                f"{path}: {column} {first[column]!r} is used by more than one entity "
                f"({', '.join(repeated.filter(pl.col(column) == first[column])['uri'].head(3))})"
            )
    return table


def _flatten_adjacency(adjacency, path: Path) -> pl.DataFrame:
    """{head: [(relation, tail), ...]} -> (head, rel, tail) int columns."""
    if not isinstance(adjacency, dict):
        raise KgDataError(
            f"{path}: expected a mapping head id -> [[relation, tail], ...], got {type(adjacency).__name__}"
        )
    heads, rels, tails = [], [], []
    for head, pairs in progress(adjacency.items(), desc=path.name, unit=" heads", leave=False):
        try:
            head_id = int(head)
        except (TypeError, ValueError):
            raise KgDataError(f"{path}: head {head!r} is not an integer entity id") from None
        if not isinstance(pairs, (list, tuple)):
            raise KgDataError(
                f"{path}: head {head}: expected a list of [relation, tail] pairs, got {type(pairs).__name__}"
            )
        for pair in pairs:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise KgDataError(f"{path}: head {head}: expected a [relation, tail] pair, got {pair!r}")
            rels.append(pair[0])
            tails.append(pair[1])
        heads.extend([head_id] * len(pairs))
    if not heads:
        raise KgDataError(f"{path}: the subgraph has no triples")
    try:
        table = pl.DataFrame(
            {"head": heads, "rel": rels, "tail": tails},
            schema={"head": pl.Int64, "rel": pl.Int64, "tail": pl.Int64},
            strict=True,
        )
    except (TypeError, pl.exceptions.PolarsError):
        for head, rel, tail in zip(heads, rels, tails):
            bad = [v for v in (rel, tail) if not isinstance(v, int) or isinstance(v, bool)]
            if bad:
                raise KgDataError(f"{path}: head {head}: id {bad[0]!r} is not an integer") from None
        raise
    return table


def _check_ids(
    table: pl.DataFrame,
    entities: pl.DataFrame,
    path: Path,
    entity_path: Path,
    relation_ids: pl.Series | None = None,
) -> None:
    """Every head and tail id must be an entity of entity_path; relation ids must be known (or >= 0 if unnamed)."""
    known = entities["id"].implode()
    for column, what in (("head", "head"), ("tail", "tail")):
        bad = table.filter(~pl.col(column).is_in(known))
        if bad.height:
            row = bad.row(0, named=True)
            raise KgDataError(
                f"{path}: head {row['head']}: {what} entity id {row[column]} is not in "
                f"{entity_path.name} (ids {entities['id'].min()}..{entities['id'].max()}; "
                f"{bad.height} such triple(s))"
            )
    bad = (
        table.filter(~pl.col("rel").is_in(relation_ids.implode()))
        if relation_ids is not None
        else table.filter(pl.col("rel") < 0)
    )
    if bad.height:
        row = bad.row(0, named=True)
        allowed = (
            f"one of the ids in relation2id.json ({', '.join(map(str, relation_ids.sort()))})"
            if relation_ids is not None
            else "an integer >= 0"
        )
        raise KgDataError(
            f"{path}: head {row['head']}: relation id {row['rel']} is not {allowed} ({bad.height} such triple(s))"
        )


def _dbpedia_source(adjacency, entity_map, subkg_path: Path, entity_path: Path, source: str) -> KgSource:
    entities = _entity_table(entity_map, entity_path)
    table = _flatten_adjacency(adjacency, subkg_path)
    _check_ids(table, entities, subkg_path, entity_path)
    triples = (
        table.join(entities.rename({"id": "head", "uri": "head_uri"}), on="head", how="left")
        .join(entities.rename({"id": "tail", "uri": "tail_uri"}), on="tail", how="left")
        .select(
            "head_uri",
            ("dbpedia:" + pl.col("rel").cast(pl.String)).alias("relation"),
            "tail_uri",
            pl.lit(source).alias("source"),
        )
    )
    return KgSource(triples.cast(TRIPLE_SCHEMA), frozenset(entities["uri"]))


def load_kgsf_kg(subkg_path: Path, entity2id_path: Path) -> KgSource:
    """KGSF's DBpedia subgraph: subkg.pkl {head_id: [(rel_id, tail_id)]} and entity2entityId.pkl {URI: id}.

    Relation names are not in this source, so relation r is "dbpedia:<r>" (KGSF's id).
    """
    subkg_path, entity2id_path = Path(subkg_path), Path(entity2id_path)
    return _dbpedia_source(
        load_pickle_restricted(subkg_path),
        load_pickle_restricted(entity2id_path),
        subkg_path,
        entity2id_path,
        source="dbpedia",
    )


def load_movie_metadata_kg(
    movies: pl.DataFrame,
    kg_path: Path,
    entity2id_path: Path,
    relation2id_path: Path,
    id2info_path: Path,
    item_ids_path: Path | None = None,
    entity2type_path: Path | None = None,
) -> KgSource:
    """CFCRS's metadata KG: ReDial movies -> genre, star, director, writer (kg.json {str(head): [[rel, tail], ...]},
    entity2id.json {name: id}, relation2id.json {name: id}).

    Its item entities (item_ids.json; without it, the heads of kg.json) are named like the ReDial titles
    ("Pari (1995)"); id2info.json gives their ReDial movie ids. They become the movie's DBpedia URI from `movies`
    (movie_id, dbpedia_uri) when it has one, else "redial:<movie_id>", so the metadata edges land on the same items
    as the DBpedia ones. A title that id2info gives to two ReDial ids (7 in the mirror: duplicate ReDial entries)
    puts its edges on both. Other entities are "meta:<type>:<name>" with the type from entity2type.json (person,
    genre; "entity" without that file), one key per name, as one person can be star and director.
    """
    kg_path, entity_path, relation_path = Path(kg_path), Path(entity2id_path), Path(relation2id_path)
    entities = _metadata_entities(_load_json(entity_path), entity_path)
    relations = _load_json(relation_path)
    if (
        not isinstance(relations, dict)
        or not all(isinstance(v, int) for v in relations.values())
        or len(set(relations.values())) != len(relations)
    ):
        raise KgDataError(f"{relation_path}: expected a mapping relation name -> integer id, one id per name")
    relation_table = pl.DataFrame(
        {"rel": list(relations.values()), "relation": [f"meta:{k}" for k in relations]},
        schema={"rel": pl.Int64, "relation": pl.String},
    )
    table = _flatten_adjacency(_load_json(kg_path), kg_path)
    _check_ids(table, entities, kg_path, entity_path, relation_table["rel"])

    types = _load_json(Path(entity2type_path)) if entity2type_path else {}
    if not isinstance(types, dict) or not all(isinstance(v, str) for v in types.values()):
        raise KgDataError(f"{entity2type_path}: expected a mapping entity name -> type name")
    items = _load_json(Path(item_ids_path)) if item_ids_path else table["head"].unique().to_list()
    if not isinstance(items, list):
        raise KgDataError(f"{item_ids_path}: expected a list of entity ids")
    item_ids = pl.Series("id", items, dtype=pl.Int64, strict=False)
    unknown_items = item_ids.filter(~item_ids.is_in(entities["id"].implode()) | item_ids.is_null())
    if unknown_items.len():
        raise KgDataError(f"{item_ids_path}: item id {unknown_items[0]} is not in {entity_path.name}")
    info = _load_json(Path(id2info_path))
    try:
        title_to_movie = pl.DataFrame({"name": [v["name"] for v in info.values()], "movie_id": [int(k) for k in info]})
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise KgDataError(f"{id2info_path}: expected a mapping movieId -> {{name, ...}}: {exc!r}") from None
    movie_uris = _movie_keys(movies).select("movie_id", pl.col("uri").alias("movie_uri"))
    keyed = entities.with_columns(
        pl.col("name").replace_strict(types, default="entity", return_dtype=pl.String).alias("type"),
        pl.col("id").is_in(item_ids.implode()).alias("is_item"),
    )
    item_keys = (
        keyed.filter("is_item")
        .join(title_to_movie, on="name", how="left")
        .join(movie_uris, on="movie_id", how="left")
        .drop("movie_id")
    )
    keyed = pl.concat([item_keys, keyed.filter(~pl.col("is_item"))], how="diagonal").with_columns(
        pl.coalesce("movie_uri", "meta:" + pl.col("type") + ":" + pl.col("name")).alias("uri")
    )
    # duplicates only where one title names two ReDial movies; the joins below give such heads both movies' edges
    triples = (
        table.join(keyed.select(pl.col("id").alias("head"), pl.col("uri").alias("head_uri")), on="head")
        .join(keyed.select(pl.col("id").alias("tail"), pl.col("uri").alias("tail_uri")), on="tail")
        .join(relation_table, on="rel")
        .select("head_uri", "relation", "tail_uri", pl.lit("movie_metadata").alias("source"))
    )
    return KgSource(triples.cast(TRIPLE_SCHEMA), frozenset(keyed["uri"]))


def _metadata_entities(mapping, path: Path) -> pl.DataFrame:
    if not isinstance(mapping, dict) or not mapping:
        raise KgDataError(f"{path}: expected a non-empty mapping entity name -> id")
    bad = next(((k, v) for k, v in mapping.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0), None)
    if bad:
        raise KgDataError(f"{path}: entity {bad[0]!r}: id {bad[1]!r} is not an integer >= 0")
    table = pl.DataFrame(
        {"id": list(mapping.values()), "name": list(mapping)}, schema={"id": pl.Int64, "name": pl.String}
    )
    repeated = table.filter(pl.col("id").is_duplicated())
    if repeated.height:
        raise KgDataError(f"{path}: id {repeated['id'][0]} is used by more than one entity")
    return table


def merge_sources(*sources: KgSource) -> KgSource:
    """Several KGs as one input to build_kg (e.g. DBpedia + movie metadata)."""
    if not sources:
        raise ValueError("merge_sources needs at least one KgSource")
    return KgSource(pl.concat([s.triples for s in sources]), frozenset().union(*(s.entity_uris for s in sources)))


# ---------------------------------------------------------------- labels


def label_from_uri(uri: str) -> str:
    """A readable name: "<http://dbpedia.org/resource/Heat_(1995_film)>" -> "Heat", "meta:person:Tom Hanks" ->
    "Tom Hanks". Percent-escapes are decoded and a trailing disambiguation in parentheses is dropped."""
    uri = normalize_uri(uri)
    if uri.startswith(DBPEDIA_RESOURCE):
        name = unquote(uri[len(DBPEDIA_RESOURCE) :]).replace("_", " ").strip()
        short = DISAMBIGUATION.sub("", name).strip()
        return short or name
    if uri.startswith("meta:"):
        return uri.split(":", 2)[-1]
    return uri


def uri_labels(uris: pl.Series) -> pl.Series:
    """label_from_uri for a column of normalized URIs, vectorised; only the few with percent-escapes go through
    Python (polars has no URL decoding)."""
    uri = pl.col("uri")
    name = uri.str.slice(len(DBPEDIA_RESOURCE)).str.replace_all("_", " ", literal=True).str.strip_chars()
    short = name.str.replace(DISAMBIGUATION.pattern, "").str.strip_chars()
    label = (
        pl.when(uri.str.starts_with(DBPEDIA_RESOURCE))
        .then(pl.when(short != "").then(short).otherwise(name))
        .when(uri.str.starts_with("meta:"))
        .then(uri.str.replace(r"^meta:(?:[^:]*:)?", ""))
        .otherwise(uri)
    )
    uris = uris.rename("uri")
    labels = uris.to_frame().select(label.alias("label"))["label"]
    escaped = (uris.str.starts_with(DBPEDIA_RESOURCE) & uris.str.contains("%", literal=True)).arg_true()
    if escaped.len():
        labels = labels.scatter(escaped, [label_from_uri(u) for u in uris.gather(escaped)])
    return labels


# ---------------------------------------------------------------- building the graph


def _movie_keys(movies: pl.DataFrame) -> pl.DataFrame:
    """movie_id -> entity key (normalized DBpedia URI, else redial:<movie_id>) and title, in movie_id order.

    Two movies with one URI cannot share one item: the lower movie_id keeps the URI, the others get redial:<id>.
    """
    missing = [c for c in ("movie_id", "dbpedia_uri") if c not in movies.columns]
    if missing:
        raise KgDataError(f"movies table lacks column(s) {', '.join(missing)} (has {', '.join(movies.columns)})")
    if movies["movie_id"].null_count():
        raise KgDataError("movies table: movie_id has null values")
    repeated = movies.filter(pl.col("movie_id").is_duplicated())
    if repeated.height:
        raise KgDataError(f"movies table: movie_id {repeated['movie_id'][0]} appears more than once")
    title = pl.col("title") if "title" in movies.columns else pl.lit(None, dtype=pl.String)
    keyed = (
        movies.select(
            pl.col("movie_id").cast(pl.Int64),
            pl.col("dbpedia_uri").cast(pl.String),
            title.cast(pl.String).alias("title"),
        )
        .sort("movie_id")
        .with_columns(_uri_expr("dbpedia_uri"))
        .with_columns(pl.when(pl.col("dbpedia_uri") != "").then(pl.col("dbpedia_uri")).alias("dbpedia_uri"))
    )
    shared = pl.col("dbpedia_uri").is_not_null() & (pl.col("dbpedia_uri").cum_count().over("dbpedia_uri") > 1)
    return keyed.with_columns(
        pl.when(pl.col("dbpedia_uri").is_null() | shared)
        .then("redial:" + pl.col("movie_id").cast(pl.String))
        .otherwise(pl.col("dbpedia_uri"))
        .alias("uri"),
        shared.alias("shares_uri"),
    )


def _check_triples(triples: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in TRIPLE_SCHEMA if c not in triples.columns]
    if missing:
        raise KgDataError(f"triples table lacks column(s) {', '.join(missing)}")
    if triples.height == 0:
        raise KgDataError("triples table is empty: the KG source has no triples")
    nulls = [c for c in ("head_uri", "relation", "tail_uri") if triples[c].null_count()]
    if nulls:
        row = triples.filter(pl.any_horizontal(pl.col(nulls).is_null())).row(0, named=True)
        raise KgDataError(f"triples table ({row['source']}): null {', '.join(nulls)} in triple {row}")
    return (
        triples.select(list(TRIPLE_SCHEMA))
        .cast(TRIPLE_SCHEMA)
        .with_columns(_uri_expr("head_uri"), _uri_expr("tail_uri"))
    )


def _encode(triples: pl.DataFrame, *extra: pl.Series) -> tuple[pl.DataFrame, pl.DataFrame]:
    """URIs -> integer codes in URI order (joins and set work on ints are several times faster than on strings).

    Returns (head, relation, tail) with int codes and the vocabulary (code, uri) of the triples' and extra URIs.
    """
    vocab = (
        pl.concat([triples["head_uri"], triples["tail_uri"], *(e.rename("head_uri") for e in extra)])
        .unique()
        .sort()
        .rename("uri")
        .to_frame()
        .with_row_index("code")
        .cast({"code": pl.Int64})
    )
    coded = (
        triples.join(vocab.rename({"uri": "head_uri", "code": "head"}), on="head_uri", how="left")
        .join(vocab.rename({"uri": "tail_uri", "code": "tail"}), on="tail_uri", how="left")
        .select("head", "relation", "tail")
    )
    return coded, vocab


def count_relation_edges(triples: pl.DataFrame) -> pl.DataFrame:
    """Per relation, the edges it would have after adding inverses: 2 x its distinct triples between two different
    entities (self edges are replaced by the self-loop relation, so they do not count). Columns head/tail may be
    URIs or codes."""
    head, tail = ("head", "tail") if "head" in triples.columns else ("head_uri", "tail_uri")
    return (
        triples.filter(pl.col(head) != pl.col(tail))
        .unique([head, "relation", tail])
        .group_by("relation")
        .len(name="n")
        .select("relation", (2 * pl.col("n")).alias("n_both_directions"))
    )


def within_hops(edges: pl.DataFrame, seeds: pl.Series, hops: int | None) -> pl.Series:
    """The nodes at most `hops` undirected steps over edges (head, tail) from a seed, seeds included; None = all."""
    if hops is None:
        return pl.concat([edges["head"], edges["tail"], seeds.rename("head")]).unique().rename("node")
    if hops < 0:
        raise ValueError(f"hops must be >= 0 or None, got {hops}")
    pairs = pl.concat(
        [
            edges.select(pl.col("head").alias("a"), pl.col("tail").alias("b")),
            edges.select(pl.col("tail").alias("a"), pl.col("head").alias("b")),
        ]
    ).unique()
    reached = seeds.rename("node").unique().to_frame()
    frontier = reached
    for _ in range(hops):
        step = (
            pairs.join(frontier, left_on="a", right_on="node", how="semi")
            .select(pl.col("b").alias("node"))
            .unique()
            .join(reached, on="node", how="anti")
        )
        if step.height == 0:
            break
        reached = pl.concat([reached, step])
        frontier = step
    return reached["node"]


def build_kg(
    triples: pl.DataFrame,
    movies: pl.DataFrame,
    seed_uris=(),
    min_relation_edges: int = 1001,
    hops: int | None = 2,
    add_inverse: bool = True,
    add_self_loops: bool = True,
) -> KgResult:
    """The KG the models use, with compact ids.

    Rules, in this order:
    1. Self edges (head == tail) and repeated triples are dropped; the self-loop relation stands for the former.
    2. A relation is kept when it has at least `min_relation_edges` edges counted in both directions, i.e.
       2 x its distinct non-self triples in the whole input (before the hop restriction, so a relation's fate does
       not depend on the seeds). CRSLab counts each non-self triple once per direction and keeps "> 1000"; its
       input has no repeated triples, so min_relation_edges=1001 keeps exactly its relations.
    3. Only the induced subgraph on the nodes within `hops` undirected hops of the seeds is kept (kept relations
       only; None = no restriction). Seeds: every ReDial movie (its DBpedia URI, or redial:<movie_id>) and
       `seed_uris` (entities linked in conversations; those absent from the input are counted in metrics, not
       added; those present are kept even without edges).
    4. Entities: every ReDial movie is an item (ids 0..n_items-1 in movie_id order), even without edges; then the
       other entities of the kept edges and the known seeds, in URI order.
    5. Relations: kept relations by name (ids 0..K-1), their inverses "<name>^-1" in the same order (id r + K), then
       "self_loop", which links every entity (items without edges too) to itself.
    """
    if min_relation_edges < 0:
        raise ValueError(f"min_relation_edges must be >= 0, got {min_relation_edges}")
    triples = _check_triples(triples)
    items = _movie_keys(movies)
    seeds = pl.Series("uri", [normalize_uri(u) for u in seed_uris], dtype=pl.String).unique()
    coded, vocab = _encode(triples, items["uri"], seeds)
    reference = reference_counts(triples)

    distinct = coded.unique(["head", "relation", "tail"], keep="first")
    proper = distinct.filter(pl.col("head") != pl.col("tail"))
    counts = count_relation_edges(distinct)
    kept_relations = counts.filter(pl.col("n_both_directions") >= min_relation_edges)
    kept = proper.join(kept_relations, on="relation", how="semi")

    uri_code = vocab.rename({"code": "node"})
    known = pl.concat([coded["head"], coded["tail"]]).unique().implode()
    seed_codes = seeds.to_frame().join(uri_code, on="uri", how="left")["node"]
    item_codes = items.select("uri").join(uri_code, on="uri", how="left")["node"]
    unknown_seeds = seed_codes.filter(~seed_codes.is_in(known) & ~seed_codes.is_in(item_codes.implode()))
    seed_codes = seed_codes.filter(seed_codes.is_in(known))
    reached = within_hops(kept, pl.concat([item_codes, seed_codes]), hops).implode()
    in_reach = kept.filter(pl.col("head").is_in(reached) & pl.col("tail").is_in(reached))

    entities = _kg_entities(items, in_reach, seed_codes, item_codes, uri_code)
    edges, all_edges, relations = _edges_and_relations(in_reach, entities, uri_code, add_inverse, add_self_loops)
    _warn_about_seeds(unknown_seeds, vocab, items)
    linked = pl.concat([edges["src"], edges["dst"]]).unique()
    metrics = {
        "entities": entities.height,
        "items": items.height,
        "items_with_edges": linked.filter(linked < items.height).len(),
        "items_without_uri": int(items["uri"].str.starts_with("redial:").sum()),
        "movies_sharing_uri": int(items["shares_uri"].sum()),
        "relations": relations.height,
        "relations_input": distinct["relation"].n_unique(),
        "relations_passing_filter": kept_relations.height,
        "edges": all_edges.height,
        "self_loops": entities.height if add_self_loops else 0,
        "triples_input": triples.height,
        "triples_repeated": triples.height - distinct.height,
        "self_edges_dropped": distinct.height - proper.height,
        "triples_dropped_by_relation_filter": proper.height - kept.height,
        "triples_beyond_hops": kept.height - in_reach.height,
        "seeds_unknown": unknown_seeds.len(),
        "min_relation_edges": min_relation_edges,
        "hops": hops,
        "reference": reference,
    }
    return KgResult(entities, relations, all_edges, metrics)


def _kg_entities(items: pl.DataFrame, in_reach: pl.DataFrame, seed_codes, item_codes, uri_code) -> pl.DataFrame:
    """Rule 4: the items first (movie_id order), then the other entities of the kept edges and the known seeds."""
    other_codes = pl.concat([in_reach["head"], in_reach["tail"], seed_codes]).unique().sort()
    others = (
        other_codes.filter(~other_codes.is_in(item_codes.implode()))
        .rename("node")
        .to_frame()
        .join(uri_code, on="node", how="left", maintain_order="left")["uri"]
    )
    return (
        pl.concat(
            [
                items.select(
                    "uri",
                    pl.coalesce("title", uri_labels(items["uri"])).alias("label"),
                    pl.lit(True).alias("is_item"),
                    "movie_id",
                ),
                pl.DataFrame(
                    {"uri": others, "label": uri_labels(others)}, schema={"uri": pl.String, "label": pl.String}
                ).with_columns(pl.lit(False).alias("is_item"), pl.lit(None, dtype=pl.Int64).alias("movie_id")),
            ]
        )
        .with_row_index("entity_id")
        .select(list(ENTITY_SCHEMA))
        .cast(ENTITY_SCHEMA)
    )


def _edges_and_relations(
    in_reach: pl.DataFrame, entities: pl.DataFrame, uri_code, add_inverse: bool, add_self_loops: bool
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Rule 5: (the forward edges, every edge with inverses and self loops, the relation table)."""
    names = sorted(in_reach["relation"].unique().to_list(), key=_natural_key)
    forward = pl.DataFrame(
        {"relation": names, "rel": range(len(names))}, schema={"relation": pl.String, "rel": pl.Int64}
    )
    node_to_id = entities.select("uri", "entity_id").join(uri_code, on="uri").select("node", "entity_id")
    edges = (
        in_reach.join(node_to_id.rename({"node": "head", "entity_id": "src"}), on="head")
        .join(node_to_id.rename({"node": "tail", "entity_id": "dst"}), on="tail")
        .join(forward, on="relation")
        .select("src", "rel", "dst")
    )
    parts = [edges]
    if add_inverse:
        parts.append(edges.select(pl.col("dst").alias("src"), pl.col("rel") + len(names), pl.col("src").alias("dst")))
    relation_names = names + ([name + INVERSE_SUFFIX for name in names] if add_inverse else [])
    if add_self_loops:
        parts.append(
            entities.select(
                pl.col("entity_id").alias("src"),
                pl.lit(len(relation_names)).alias("rel"),
                pl.col("entity_id").alias("dst"),
            )
        )
        relation_names.append(SELF_LOOP)
    all_edges = pl.concat([p.cast(EDGE_SCHEMA) for p in parts]).sort("src", "rel", "dst")
    n_edges = all_edges.group_by("rel").len()
    relations = (
        pl.DataFrame(
            {
                "relation_id": range(len(relation_names)),
                "name": relation_names,
                "is_inverse": [len(names) <= i < 2 * len(names) and add_inverse for i in range(len(relation_names))],
            }
        )
        .join(n_edges.rename({"rel": "relation_id", "len": "n_edges"}), on="relation_id", how="left")
        .with_columns(pl.col("n_edges").fill_null(0))
        .select(list(RELATION_SCHEMA))
        .cast(RELATION_SCHEMA)
    )
    return edges, all_edges, relations


def _warn_about_seeds(unknown_seeds, vocab: pl.DataFrame, items: pl.DataFrame) -> None:
    if unknown_seeds.len():
        log.warning(
            "%d seed URI(s) are not in the KG and were ignored, e.g. %s",
            unknown_seeds.len(),
            vocab.filter(pl.col("code").is_in(unknown_seeds.implode()))["uri"][0],
        )
    if items["shares_uri"].any():
        log.warning(
            "%d movie(s) share a DBpedia URI with a lower movie_id and are keyed redial:<movie_id>",
            items["shares_uri"].sum(),
        )


def _natural_key(name: str) -> tuple:
    """ "dbpedia:9" before "dbpedia:10"."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def reference_counts(triples: pl.DataFrame, min_exclusive: int = REFERENCE_MIN_EXCLUSIVE) -> dict:
    """The graph size by CRSLab's documented rule (ReDial KG processing), for comparison with ours.

    Every entity that heads a triple gets a self loop; each non-self triple is listed once per direction under its
    own relation (no inverse relations); a relation (the self-loop one included) is kept when that list holds more
    than `min_exclusive` (1000) of its entries; the edges are the distinct (head, tail, relation) of kept relations.
    CRSLab sizes its entity table as max id + 1 with ids from 1, i.e. entities in the vocabulary + 1.
    (CRSLab gives the self loop the id of a real, rare relation and drops that relation's own triples; on the
    ReDial KG that relation is below the threshold anyway, so a separate self-loop relation counts the same.)
    """
    coded, vocab = _encode(_check_triples(triples))
    return _reference_counts_coded(coded, vocab.height, min_exclusive)


def _reference_counts_coded(
    coded: pl.DataFrame, n_vocabulary: int, min_exclusive: int = REFERENCE_MIN_EXCLUSIVE
) -> dict:
    heads = coded["head"].unique()
    proper = coded.filter(pl.col("head") != pl.col("tail"))
    listed = pl.concat(
        [
            proper,
            proper.select(pl.col("tail").alias("head"), "relation", pl.col("head").alias("tail")),
            heads.to_frame().select("head", pl.lit("\0self_loop").alias("relation"), pl.col("head").alias("tail")),
        ]
    )
    kept = listed.group_by("relation").len().filter(pl.col("len") > min_exclusive)
    edges = listed.join(kept, on="relation", how="semi").unique()
    touched = pl.concat([edges["head"], edges["tail"]]).n_unique()
    return {
        "relations": kept.height,
        "edges": edges.height,
        "entities": n_vocabulary + 1,
        "entities_with_edges": touched,
    }


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    cfg = params.kg
    spec = STAGES["kg"]
    movies_path, utterances_path = workspace / spec.input("movies"), workspace / spec.input("utterances")
    movies = pl.read_parquet(movies_path)
    metadata = (
        "metadata_kg",
        "metadata_entity_ids",
        "metadata_relation_ids",
        "metadata_item_ids",
        "metadata_entity_types",
        "movie_info",
    )
    files = raw.raw_files(
        params.data,
        workspace,
        "dbpedia_subkg",
        "dbpedia_entity_ids",
        "stopwords",
        *(metadata if cfg.merge_metadata_kg else ()),
    )
    sources = [load_kgsf_kg(files["dbpedia_subkg"], files["dbpedia_entity_ids"])]
    if cfg.merge_metadata_kg:
        sources.append(
            load_movie_metadata_kg(
                movies,
                files["metadata_kg"],
                files["metadata_entity_ids"],
                files["metadata_relation_ids"],
                files["movie_info"],
                files["metadata_item_ids"],
                files["metadata_entity_types"],
            )
        )
    source = merge_sources(*sources)
    seeds: set[str] = set()
    if cfg.link_seeds:
        # Seeds are entities named in the conversations, found by linking against the whole input graph.
        uris = sorted(source.entity_uris - set(movies["dbpedia_uri"].drop_nulls()))
        ends = pl.concat([source.triples["head_uri"], source.triples["tail_uri"]])
        degree_by_uri = dict(ends.value_counts().iter_rows())
        linker = linking.build_linker(
            linking.entity_labels(dict(enumerate(uris))),
            {i: degree_by_uri.get(uri, 0) for i, uri in enumerate(uris)},
            files["stopwords"],
            params.linking,
        )
        texts = pl.read_parquet(utterances_path)["text"]
        seeds = {
            uris[m.entity_id] for text in progress(texts, desc="linking seeds", unit=" utt") for m in linker.link(text)
        }
    result = build_kg(
        source.triples,
        movies,
        seed_uris=sorted(seeds),
        min_relation_edges=cfg.min_relation_edges,
        hops=cfg.hops,
        add_inverse=cfg.add_inverse,
        add_self_loops=cfg.add_self_loops,
    )
    metrics = {**result.metrics, "linked_seeds": len(seeds)}
    entities_out, relations_out, edges_out = (
        workspace / spec.output(name) for name in ("entities", "relations", "edges")
    )
    write_outputs(
        {
            entities_out: result.entities,
            relations_out: result.relations,
            edges_out: result.edges,
            workspace / spec.metrics_file: metrics,
        }
    )
    return StageOutcome({**files, **{Path(d).name: workspace / d for d in spec.deps}}, metrics)
