"""Why the model recommends a movie: what it attended to, how the KG connects that to the movie, what reviews say.

An explanation has three parts, each read off the trained model or the data it was trained on, never invented:
- context entities: the entities of the conversation the recommender pools into the user vector (Eq. 8's e_u),
  with their softmax weight in that pooling, heaviest first;
- KG paths: from the heaviest context entities to the recommended movie, the direct edge or the two-hop paths
  through the most specific entity they share (fewest neighbours first: a shared actor says more than a shared
  country), at most two per context entity so that several of them can speak. The KGSF subgraph of DBpedia carries
  numeric relation ids ("dbpedia:68", "^-1" for the inverse edge); where the relation_names stage derived a name
  from the movie metadata ("starring", "star of") the path shows it, else "related (dbpedia:68)", and without that
  stage's table the KG's own names;
- review sentences: the movie's review sentences ranked by BM25 against the context entities' names, the entities
  on the paths and the seeker's words (the triples stage's rule for the sentence of a mention); sentences of
  negative reviews (rated 4/10 or less) come after the others, as they hardly back a recommendation.

That is C2-CRS's explanation (and that of the models of its kind). A recommender that reads less says so in the
explanation's `note` (stages/chat/catalogue.py): KGSF's entities come without weights, ReDial's recommender has no
KG paths, TextCNN (words only) neither entities nor paths.
"""

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from stages.triples import SentenceChooser

SELF_LOOP = "self_loop"
NEGATIVE_RATING = 4  # of 10: a review rated this or lower is negative (aclImdb's own split is <= 4 vs >= 7)


@dataclass
class WeightedEntity:
    entity_id: int
    label: str
    weight: float | None  # its softmax weight in the user vector (None: the model reads it without a weight)
    movie_id: int | None  # the ReDial movie when the entity is one


@dataclass
class KGNode:
    entity_id: int
    label: str


@dataclass
class KGPath:
    """entities[0] (a context entity) -relations[0]-> entities[1] ... -> entities[-1] (the recommended movie)."""

    entities: list[KGNode]
    relations: list[str]


@dataclass
class ReviewSentence:
    sentence_id: int
    text: str
    source: str  # plots, revcore, aclimdb, imdb
    rating: float | None  # of the review the sentence comes from, where known (1-10)
    score: float  # BM25 against the conversation


@dataclass
class Explanation:
    movie_id: int
    context_entities: list[WeightedEntity] = field(default_factory=list)
    kg_paths: list[KGPath] = field(default_factory=list)
    review_sentences: list[ReviewSentence] = field(default_factory=list)
    note: str | None = None  # what the recommender reads, where it cannot give every part (None: C2-CRS's kind)


class KnowledgeGraph:
    """The KG's edges as compressed rows (src -> its (relation, dst) pairs, self loops left out) and its labels.

    `names` (relation id -> name, stages/relation_names.py's display_names) overrides the KG's relation names."""

    def __init__(
        self,
        entities: pl.DataFrame,
        relations: pl.DataFrame,
        edges: pl.DataFrame,
        names: dict[int, str] | None = None,
    ):
        self_loops = relations.filter(pl.col("name") == SELF_LOOP)["relation_id"].to_list()
        kept = edges.filter((pl.col("src") != pl.col("dst")) & ~pl.col("rel").is_in(self_loops)).sort("src", "dst")
        n = int(entities["entity_id"].max()) + 1 if entities.height else 0
        self.starts = np.searchsorted(kept["src"].to_numpy(), np.arange(n + 1))
        self.dst, self.rel = kept["dst"].to_numpy(), kept["rel"].to_numpy()
        self.labels = dict(zip(entities["entity_id"], entities["label"]))
        self.relation_names = dict(zip(relations["relation_id"], relations["name"])) | (names or {})

    def neighbours(self, entity: int) -> np.ndarray:
        return self.dst[self.starts[entity] : self.starts[entity + 1]]

    def relation(self, src: int, dst: int) -> str | None:
        """The name of the first relation of an edge src -> dst; None when there is no such edge."""
        block = slice(self.starts[src], self.starts[src + 1])
        at = int(np.searchsorted(self.dst[block], dst))
        if at == len(self.dst[block]) or self.dst[block][at] != dst:
            return None
        return self.relation_names[int(self.rel[block][at])]

    def label(self, entity: int) -> str:
        return self.labels.get(entity, str(entity))

    def paths(self, source: int, target: int, limit: int) -> list[KGPath]:
        """The direct edge source -> target, else up to `limit` two-hop paths, most specific middle entity first."""
        if source == target or limit <= 0:
            return []
        ends = [KGNode(source, self.label(source)), KGNode(target, self.label(target))]
        direct = self.relation(source, target)
        if direct is not None:
            return [KGPath(ends, [direct])]
        shared = np.intersect1d(self.neighbours(source), self.neighbours(target))
        degrees = self.starts[shared + 1] - self.starts[shared]
        paths = []
        for middle in shared[np.lexsort((shared, degrees))].tolist():
            onward = self.relation(middle, target)
            if onward is not None:
                paths.append(
                    KGPath(
                        [ends[0], KGNode(middle, self.label(middle)), ends[1]], [self.relation(source, middle), onward]
                    )
                )
            if len(paths) == limit:
                break
        return paths


class Explainer:
    """Builds the Explanation of a recommended movie from the recommender's pooling weights and the data."""

    def __init__(
        self,
        graph: KnowledgeGraph,
        chooser: SentenceChooser,
        sentences: pl.DataFrame,
        entity_movie: dict[int, int],
        top_entities: int = 5,
        max_paths: int = 4,
        paths_per_entity: int = 2,
        max_sentences: int = 2,
    ):
        self.graph, self.chooser, self.entity_movie = graph, chooser, entity_movie
        self.top_entities, self.max_paths, self.max_sentences = top_entities, max_paths, max_sentences
        self.paths_per_entity = paths_per_entity
        ordered = sentences.sort("sentence_id")
        self.sources = ordered["source"].to_list()
        by_movie = ordered.group_by("movie_id", maintain_order=True).agg("sentence_id")
        self.movie_sentences = {m: np.asarray(s) for m, s in by_movie.iter_rows()}

    def context_entities(self, entity_ids: np.ndarray, weights: np.ndarray) -> list[WeightedEntity]:
        """The recommender's context entities (-1 padding) with their weights, heaviest first (ties: most recent)."""
        real = [(float(w), i, int(e)) for i, (e, w) in enumerate(zip(entity_ids, weights)) if e >= 0]
        real.sort(key=lambda item: (-item[0], -item[1]))
        return [WeightedEntity(e, self.graph.label(e), round(w, 4), self.entity_movie.get(e)) for w, _, e in real]

    def read_entities(self, entity_ids: list[int]) -> list[WeightedEntity]:
        """The entities a recommender reads without weighing them, most recent first, each once."""
        recent = dict.fromkeys(int(e) for e in reversed(entity_ids) if e >= 0)
        return [WeightedEntity(e, self.graph.label(e), None, self.entity_movie.get(e)) for e in recent]

    def explain(
        self,
        movie_entity: int,
        attended: list[WeightedEntity],
        seeker_words: str,
        kg_paths: bool = True,
        note: str | None = None,
    ) -> Explanation:
        """The movie's explanation from the entities the recommender read (attended); kg_paths False for a model
        that does not read the KG; note: what the recommender reads, said in the explanation."""
        movie_id = self.entity_movie[movie_entity]
        paths: list[KGPath] = []
        for entity in attended[: self.top_entities] if kg_paths else []:
            room = min(self.paths_per_entity, self.max_paths - len(paths))
            paths += self.graph.paths(entity.entity_id, movie_entity, room)
        names = [e.label for e in attended[: self.top_entities]] + [n.label for p in paths for n in p.entities[1:-1]]
        pool = self.movie_sentences.get(movie_id, np.zeros(0, dtype=np.int64))
        ranked = self.chooser.rank(pool, " ".join(names + [seeker_words])) if len(pool) else []
        ranked.sort(key=lambda ranked_sentence: _negative(self.chooser.ratings[ranked_sentence[0]]))  # stable
        sentences = [
            ReviewSentence(s, self.chooser.texts[s], self.sources[s], _rating(self.chooser.ratings[s]), round(score, 3))
            for s, score in ranked[: self.max_sentences]
        ]
        return Explanation(movie_id, attended[: self.top_entities], paths, sentences, note)


def _rating(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _negative(rating: float) -> bool:
    return bool(rating <= NEGATIVE_RATING)  # NaN (no rating: plots, RevCore snippets) is not negative
