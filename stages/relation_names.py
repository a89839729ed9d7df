"""Stage relation_names: a human name for each relation of the KG, derived from the movie metadata where it agrees.

KGSF's DBpedia subgraph numbers its relations, so an explanation read "Christopher Nolan —dbpedia:121^-1→ Dunkirk".
The movie metadata (data.files.movie_info, CFCRS's id2info.json: the source of its metadata KG) lists each ReDial
movie's director, writers, top-billed stars and genres. A relation whose edges name the same people (or genres) as
one of these fields on most of its edges is named after that field; the others stay "related (dbpedia:70)".

The rule, in the order it is applied:
- Only movie edges are compared: one end a ReDial movie (an item of the KG), the other not. The KG's entity types
  are items and everything else, so (movie, movie) and (entity, entity) edges cannot be checked and are not.
- Labels are compared with accents, case and punctuation folded away (the KG's labels already drop DBpedia's
  disambiguation, "Ben Johnson (actor)" -> "Ben Johnson"); for genres a trailing "film(s)" too ("Comedy film").
- An edge is compared against a field where the metadata lists that field for its movie with at least as many
  names as the relation has edges on the movie. The metadata lists three stars per movie: a movie with ten cast
  edges could confirm at most three of them and would count the other seven against a relation that is right.
- Agreement: the share of the compared edges whose entity the field names, with the movie at the end the relation
  puts it most often (movie -> entity, or entity -> movie). The best field wins; its name is kept when the agreement
  is above relation_names.majority on at least relation_names.min_edges compared edges.
- Names read along the arrow, left to right: "Dunkirk —directed by→ Christopher Nolan", and the inverse edge (^-1)
  the other way, "Christopher Nolan —director of→ Dunkirk".
"""

from pathlib import Path

import polars as pl

from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.stage_log import NO_LOG, StageLog, StageOutcome
from stages.kg import INVERSE_SUFFIX, SELF_LOOP
from stages.reviews import read_movie_info
from stages.sources import raw

# field -> (the name of an edge movie -> entity, of an edge entity -> movie)
FIELD_NAMES = {
    "director": ("directed by", "director of"),
    "writer": ("written by", "writer of"),
    "star": ("starring", "star of"),
    "genre": ("genre", "genre of"),
}
MOVIE_TO_ENTITY, ENTITY_TO_MOVIE = "movie->entity", "entity->movie"
NAMES_SCHEMA = {
    "relation_id": pl.Int64,  # the forward relation in data/kg/relations.parquet
    "inverse_relation_id": pl.Int64,  # its "^-1" relation (null without inverses)
    "relation": pl.String,  # its name in the KG (dbpedia:121)
    "field": pl.String,  # the metadata field that agrees best (null: no edge could be compared)
    "direction": pl.String,  # where the movie is on the agreeing edges: movie->entity or entity->movie
    "agreement": pl.Float64,  # share of the compared edges that the field confirms
    "edges_compared": pl.Int64,
    "movie_edges": pl.Int64,  # the relation's edges between a movie and a non-movie
    "named": pl.Boolean,  # agreement above the majority on enough edges
    "name": pl.String,  # what an edge of the relation reads as ("directed by", or "related (dbpedia:70)")
    "inverse_name": pl.String,  # and its inverse edge ("director of", or "related (dbpedia:70^-1)")
}
KG_COLUMNS = {
    "entities": ("entity_id", "label", "is_item", "movie_id"),
    "relations": ("relation_id", "name", "is_inverse"),
    "edges": ("src", "rel", "dst"),
}


class RelationNamesError(ValueError):
    """An input or the names table cannot be used; the message names the file and what was expected."""


def read_table(path: Path, columns: tuple[str, ...], made_by: str) -> pl.DataFrame:
    """A Parquet table with at least `columns`; a missing, unreadable or incomplete file is named with what it
    should hold and the stage that writes it."""
    if not path.is_file():
        raise RelationNamesError(f"{path}: not found; expected {made_by}'s table ({', '.join(columns)})")
    try:
        table = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise RelationNamesError(f"{path}: not a Parquet table ({exc}); expected {made_by}'s output") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise RelationNamesError(
            f"{path}: lacks column(s) {', '.join(missing)}; expected {made_by}'s table with {', '.join(columns)} "
            f"(found {', '.join(table.columns)})"
        )
    return table


def folded(column: pl.Expr, genre: bool = False) -> pl.Expr:
    """A label as it is compared: accents, case and punctuation folded; for a genre also a trailing "film(s)"."""
    text = (
        column.str.normalize("NFKD")
        .str.replace_all(r"\p{M}", "")
        .str.to_lowercase()
        .str.replace_all(r"[^\p{L}\p{N}]+", " ")
        .str.strip_chars()
    )
    return text.str.replace(r" (film|films|movie|movies)$", "") if genre else text


def metadata_names(movie_info, path: Path) -> pl.DataFrame:
    """(movie_id, field, key): every name each movie's metadata lists per field, folded for comparison.

    movie_info is id2info.json as read: {ReDial movie id: {field: [names], ...}}; a missing or empty field is
    simply not listed, anything else that is not a list of names is an error naming the file, movie and field.
    """
    if not isinstance(movie_info, dict):
        raise RelationNamesError(f"{path}: expected a mapping ReDial movie id -> {{field: [names]}}")
    rows = []
    for movie, info in movie_info.items():
        if not (isinstance(movie, str) and movie.isdigit()) or not isinstance(info, dict):
            raise RelationNamesError(f"{path}: movie {movie!r}: expected a ReDial id mapped to {{field: [names]}}")
        for field in FIELD_NAMES:
            names = info.get(field) or []
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise RelationNamesError(f"{path}: movie {movie}: {field} must be a list of names, got {names!r}")
            rows += [(int(movie), field, name) for name in names]
    table = pl.DataFrame(rows, schema={"movie_id": pl.Int64, "field": pl.String, "key": pl.String}, orient="row")
    return table.with_columns(
        pl.when(pl.col("field") == "genre").then(folded(pl.col("key"), genre=True)).otherwise(folded(pl.col("key")))
    ).unique(maintain_order=True)


def movie_edges(entities: pl.DataFrame, relations: pl.DataFrame, edges: pl.DataFrame) -> pl.DataFrame:
    """(relation_id, movie_id, key, genre_key, direction): each forward relation's edges between a movie and a
    non-movie, with the non-movie's label folded (plainly and as a genre)."""
    forward = relations.filter(~pl.col("is_inverse") & (pl.col("name") != SELF_LOOP))["relation_id"]
    ends = entities.select(
        "entity_id",
        pl.when(pl.col("is_item")).then(pl.col("movie_id")).alias("movie_id"),
        folded(pl.col("label")).alias("key"),
        folded(pl.col("label"), genre=True).alias("genre_key"),
    )
    kept = edges.filter(pl.col("rel").is_in(forward.implode()) & (pl.col("src") != pl.col("dst")))
    return _pair_ends(kept, ends)


def _pair_ends(kept: pl.DataFrame, ends: pl.DataFrame) -> pl.DataFrame:
    """The movie edges of `kept`, each with its movie at whichever end it is."""
    joined = kept.join(ends.rename({c: f"src_{c}" for c in ends.columns}), left_on="src", right_on="src_entity_id")
    joined = joined.join(ends.rename({c: f"dst_{c}" for c in ends.columns}), left_on="dst", right_on="dst_entity_id")

    def movie_at(movie: str, other: str, direction: str) -> pl.DataFrame:
        """The edges with a movie at end `movie` and a non-movie at end `other` (src or dst)."""
        return joined.filter(pl.col(f"{movie}_movie_id").is_not_null() & pl.col(f"{other}_movie_id").is_null()).select(
            pl.col("rel").alias("relation_id"),
            pl.col(f"{movie}_movie_id").alias("movie_id"),
            pl.col(f"{other}_key").alias("key"),
            pl.col(f"{other}_genre_key").alias("genre_key"),
            pl.lit(direction).alias("direction"),
        )

    return pl.concat([movie_at("src", "dst", MOVIE_TO_ENTITY), movie_at("dst", "src", ENTITY_TO_MOVIE)])


def agreement_by_field(pairs: pl.DataFrame, names: pl.DataFrame) -> pl.DataFrame:
    """(relation_id, field, edges_compared, direction, agreement) for every field that some edge is compared with.

    An edge is compared where the metadata lists the field for its movie with at least as many names as the
    relation has edges on that movie (a capped list cannot confirm more); it agrees when the field names its entity.
    """
    on_movie = pairs.group_by("relation_id", "movie_id").len("on_movie")
    listed = names.group_by("movie_id", "field").len("listed")
    compared = (
        pairs.join(on_movie, on=["relation_id", "movie_id"])
        .join(listed, on="movie_id")  # one row per field the movie's metadata lists
        .filter(pl.col("listed") >= pl.col("on_movie"))
        .with_columns(pl.when(pl.col("field") == "genre").then("genre_key").otherwise("key").alias("match"))
        .join(
            names.select("movie_id", "field", pl.col("key").alias("match"), pl.lit(True).alias("hit")),
            on=["movie_id", "field", "match"],
            how="left",
        )
        .with_columns(pl.col("hit").fill_null(False))
    )
    hits = {
        d: pl.col("hit").filter(pl.col("direction") == d).sum().alias(d) for d in (MOVIE_TO_ENTITY, ENTITY_TO_MOVIE)
    }
    return (
        compared.group_by("relation_id", "field")
        .agg(pl.len().alias("edges_compared"), *hits.values())
        .select(
            "relation_id",
            "field",
            "edges_compared",
            pl.when(pl.col(ENTITY_TO_MOVIE) > pl.col(MOVIE_TO_ENTITY))
            .then(pl.lit(ENTITY_TO_MOVIE))
            .otherwise(pl.lit(MOVIE_TO_ENTITY))
            .alias("direction"),
            (pl.max_horizontal(MOVIE_TO_ENTITY, ENTITY_TO_MOVIE) / pl.col("edges_compared")).alias("agreement"),
        )
    )


def derive_names(
    entities: pl.DataFrame,
    relations: pl.DataFrame,
    edges: pl.DataFrame,
    names: pl.DataFrame,
    majority: float,
    min_edges: int,
) -> pl.DataFrame:
    """NAMES_SCHEMA: one row per forward relation of the KG (self loop aside), in the KG's order."""
    pairs = movie_edges(entities, relations, edges)
    order = {field: rank for rank, field in enumerate(FIELD_NAMES)}
    best = (
        agreement_by_field(pairs, names)
        .sort(
            "agreement",
            "edges_compared",
            pl.col("field").replace_strict(order, return_dtype=pl.Int64),
            descending=[True, True, False],
        )
        .group_by("relation_id", maintain_order=True)
        .first()
    )
    inverses = relations.filter(pl.col("is_inverse")).select(
        pl.col("relation_id").alias("inverse_relation_id"),
        pl.col("name").str.strip_suffix(INVERSE_SUFFIX).alias("relation"),
    )
    table = (
        relations.filter(~pl.col("is_inverse") & (pl.col("name") != SELF_LOOP))
        .select("relation_id", pl.col("name").alias("relation"))
        .join(inverses, on="relation", how="left", maintain_order="left")
        .join(pairs.group_by("relation_id").len("movie_edges"), on="relation_id", how="left", maintain_order="left")
        .join(best, on="relation_id", how="left", maintain_order="left")
        .with_columns(pl.col("movie_edges", "edges_compared").fill_null(0))
        .with_columns(
            ((pl.col("agreement") > majority) & (pl.col("edges_compared") >= min_edges)).fill_null(False).alias("named")
        )
    )
    # the name of an edge with the movie first ("directed by") and of one with the movie last ("director of")
    along, against = (
        pl.col("field").replace_strict({field: pair[i] for field, pair in FIELD_NAMES.items()}, default=None)
        for i in (0, 1)
    )
    movie_first = pl.col("direction") == MOVIE_TO_ENTITY
    return table.with_columns(
        pl.when(~pl.col("named"))
        .then(pl.format("related ({})", "relation"))
        .otherwise(pl.when(movie_first).then(along).otherwise(against))
        .alias("name"),
        pl.when(~pl.col("named"))
        .then(pl.format("related ({}{})", "relation", pl.lit(INVERSE_SUFFIX)))
        .otherwise(pl.when(movie_first).then(against).otherwise(along))
        .alias("inverse_name"),
    ).select([pl.col(c).cast(t) for c, t in NAMES_SCHEMA.items()])


def display_names(path: Path, relations: pl.DataFrame) -> dict[int, str]:
    """relation id -> the name an explanation shows (both directions), from this stage's table at `path`; {} when
    the stage has not run in the workspace, so the KG's own names (dbpedia:121) stay. A table made from another KG
    (its relation ids name other relations) is an error saying to rerun the stage."""
    if not path.exists():
        return {}
    table = read_table(path, tuple(NAMES_SCHEMA), "the relation_names stage")
    kg = dict(zip(relations["relation_id"], relations["name"]))
    for relation_id, inverse_id, relation in table.select("relation_id", "inverse_relation_id", "relation").iter_rows():
        expected = {relation_id: relation} | ({inverse_id: relation + INVERSE_SUFFIX} if inverse_id is not None else {})
        stale = {i: n for i, n in expected.items() if kg.get(i) != n}
        if stale:
            i = next(iter(stale))
            raise RelationNamesError(
                f"{path}: relation {i} is {stale[i]} there but {kg.get(i)} in the KG's relations: the table was made "
                "from another KG; run `python -m pipeline run relation_names`"
            )
    names = dict(zip(table["relation_id"], table["name"]))
    names.update((i, n) for i, n in zip(table["inverse_relation_id"], table["inverse_name"]) if i is not None)
    return names


def report(table: pl.DataFrame, majority: float, min_edges: int) -> dict:
    """reports/relation_names.json: the rule's settings and every relation's row, most movie edges first."""
    rows = table.sort("movie_edges", "relation_id", descending=[True, False]).with_columns(pl.col("agreement").round(3))
    return {
        "majority": majority,
        "min_edges": min_edges,
        "fields": {field: {"movie->entity": a, "entity->movie": b} for field, (a, b) in FIELD_NAMES.items()},
        "relations": rows.to_dicts(),
    }


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    cfg, spec = params.relation_names, STAGES["relation_names"]
    tables = {
        name: read_table(workspace / spec.input(name), columns, "the kg stage") for name, columns in KG_COLUMNS.items()
    }
    files = raw.raw_files(params.data, workspace, "movie_info")
    names = metadata_names(read_movie_info(files["movie_info"]), files["movie_info"])
    table = derive_names(tables["entities"], tables["relations"], tables["edges"], names, cfg.majority, cfg.min_edges)
    named = table.filter("named")
    metrics = {
        "relations": table.height,
        "named": named.height,
        "movie_edges": int(table["movie_edges"].sum()),
        "edges_compared_named": int(named["edges_compared"].sum()),
    }
    write_outputs(
        {
            workspace / spec.output("relation_names"): table,
            workspace / spec.report("relation_names.json"): report(table, cfg.majority, cfg.min_edges),
            workspace / spec.metrics_file: metrics,
        }
    )
    return StageOutcome({**files, **{Path(d).name: workspace / d for d in spec.deps}}, metrics)
