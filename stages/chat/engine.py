"""Talking with the trained models: a conversation so far in; the recommender's ranking, the reasons for each
recommended movie and the generator's next utterance out. The terminal chat (`pipeline talk`) and the HTTP API
(`pipeline serve`) both use it; stages/chat/catalogue.py loads, scores and explains each kind of model.

The conversation is handled as a test sample is: consecutive messages of one speaker merged into a turn, each turn
linked to the KG (movies through "@id", other entities by name), its mentions given review sentences by the triples
stage's rule; then the recommender ranks every movie with evaluate's scorer and the generator answers, its movie
placeholders filled with the recommender's top items. Movies already named in the conversation are not recommended
again unless asked (evaluation does not exclude them). A movie is named as "@<ReDial id>" or by its title in double
quotes.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import torch

from stages import ingest, relation_names, triples
from stages.chat.catalogue import Generator, Recommender, load_generator, load_recommender
from stages.chat.explain import Explainer, Explanation, KnowledgeGraph
from stages.io.graph import STAGES
from stages.sources import raw
from stages.text import linking
from stages.training import c2crs_data, conv_train, runs

__all__ = ["Chat", "Knowledge", "Session", "load_generator", "load_recommender"]  # the loaders: catalogue's

QUOTED_TITLE = re.compile(r'"([^"]+)"')
MOVIE_ID = re.compile(r"@(\d+)")
ROLES = ("seeker", "recommender")


@dataclass
class Turn:
    role: str  # seeker (the user) or recommender (the model)
    text: str  # with movies as "@id"
    movie_ids: list[int] = field(default_factory=list)


@dataclass
class Recommendation:
    movie_id: int
    title: str
    score: float  # the recommender's score, as evaluate ranks by it (C2-CRS: e_u . n_i, Eq. 8 before the softmax)
    explanation: Explanation | None = None


@dataclass
class Reply:
    text: str  # movies as titles
    text_with_ids: str  # movies as "@id": what the conversation keeps, to send back as the recommender's turn
    recommendations: list[Recommendation]
    # The generator's text may name none of the recommendations (it wrote no movie placeholder): then the reply and
    # the cards do not talk to each other. `template` is a fixed sentence naming the top one, shown apart from the
    # model's words and marked as a template; it never enters the conversation the models read.
    names_recommendation: bool
    template: str | None


TEMPLATE = "How about {title}?"  # Reply.template: not the model's words, and always shown as a template


class NextSamples(NamedTuple):
    """Conversations built into samples as the triples stage builds a test split: what evaluate.score_split reads
    (samples, triples), their table, and each conversation's row of the model's next turn (in the order given)."""

    samples: pl.DataFrame
    triples: pl.DataFrame
    table: c2crs_data.SampleTable
    next_rows: np.ndarray


class Knowledge:
    """The tables a conversation needs (movies, the KG, the linker, the vocabulary, the review sentences), read once
    from a workspace and shared by every pair of models trained on it."""

    def __init__(self, params, workspace: Path):
        self.params, self.workspace = params, workspace
        self.training = runs.training_run(params, workspace)  # evaluate's scorers reuse it
        self.run, _, inputs = self.training
        entities, edges = pl.read_parquet(inputs["entities"]), pl.read_parquet(inputs["edges"])
        self.movies = pl.read_parquet(workspace / STAGES["ingest"].output("movies"))
        items = entities.filter(pl.col("is_item"))
        self.item_entity = dict(zip(items["movie_id"], items["entity_id"]))
        self.entity_movie = {e: m for m, e in self.item_entity.items()}
        self.titles = {
            m: f"{t} ({y})" if y else t for m, t, y in self.movies.select("movie_id", "title", "year").iter_rows()
        }
        by_popularity = self.movies.sort("mentions_ingested", descending=True)
        self.title_to_movie: dict[str, int] = {}
        for movie_id, title in by_popularity.select("movie_id", "title").iter_rows():
            for name in (title, self.titles[movie_id]):
                self.title_to_movie.setdefault(name.lower(), movie_id)
        stopwords = raw.raw_files(params.data, workspace, "stopwords")["stopwords"]
        self.linker = linking.kg_entity_linker(entities, edges, stopwords, params.linking)
        self.vocab_table = pl.read_parquet(inputs["vocab"])
        self.vocabulary = conv_train.conv_vocabulary(self.vocab_table)
        sentences = pl.read_parquet(inputs["review_sentences"])
        self.chooser = triples.sentence_chooser(
            params.triples,
            entities,
            edges,
            self.movies,
            sentences,
            pl.read_parquet(workspace / STAGES["reviews"].output("reviews")),
        )
        relations = pl.read_parquet(inputs["relations"])
        names = workspace / STAGES["relation_names"].output("relation_names")  # none yet: the KG's own names
        self.explainer = Explainer(
            KnowledgeGraph(entities, relations, edges, relation_names.display_names(names, relations)),
            self.chooser,
            sentences,
            self.entity_movie,
        )

    def find(self, words: str, limit: int = 10) -> list[dict]:
        """Movies whose title contains `words` (any case), most mentioned in ReDial first."""
        hits = self.movies.filter(pl.col("title").str.to_lowercase().str.contains(words.lower(), literal=True))
        hits = hits.filter(pl.col("movie_id").is_in(list(self.item_entity)))
        return [
            {"movie_id": m, "title": self.titles[m], "mentions": n}
            for m, n in hits.sort("mentions_ingested", "movie_id", descending=[True, False])
            .head(limit)
            .select("movie_id", "mentions_ingested")
            .iter_rows()
        ]

    def read_turn(self, role: str, text: str) -> tuple[Turn, list[str]]:
        """A message as a turn: quoted titles become "@id"; returns the turn and the quoted titles not found."""
        if role not in ROLES:
            raise ValueError(f"a message's role must be one of {ROLES}, got {role!r}")
        unknown = []

        def replace(match: re.Match) -> str:
            movie = self.title_to_movie.get(match.group(1).strip().lower())
            if movie is None:
                unknown.append(match.group(1))
                return match.group(1)
            return f"@{movie}"

        text = QUOTED_TITLE.sub(replace, text)
        movies = [int(m) for m in MOVIE_ID.findall(text) if int(m) in self.item_entity]
        return Turn(role, text, list(dict.fromkeys(movies))), unknown

    def titled(self, text: str) -> str:
        """A turn's text with "@id" shown as the movie's title."""
        return MOVIE_ID.sub(lambda m: self.titles.get(int(m.group(1)), m.group(0)), text)

    def next_samples(self, conversations: list[list[Turn]], longest: int) -> NextSamples:
        """Each conversation so far plus an empty recommender turn, built into samples as the triples stage builds a
        split: all of them in one table, so a model scores the next turn of every conversation in one pass."""
        rows = []
        for conv_id, turns in enumerate(conversations):
            merged = merged_turns(turns) + [Turn("recommender", "")]
            rows += [(conv_id, i, t.role, t.text, t.movie_ids) for i, t in enumerate(merged)]
        utterances = pl.DataFrame(rows, schema=ingest.UTTERANCE_SCHEMA, orient="row").with_columns(split=pl.lit("test"))
        linked = triples.link_all(utterances, self.linker, self.item_entity)
        samples, mentions = triples.build_samples(
            utterances, linked, self.vocab_table, self.item_entity, longest, self.params.triples.response_max_tokens
        )
        triple_table = triples.build_triples(mentions, linked, utterances, self.chooser)
        table = c2crs_data.sample_table(samples, triple_table, "test")
        next_rows = np.flatnonzero(np.append(table.conv_ids[1:] != table.conv_ids[:-1], True))
        if not np.array_equal(table.conv_ids[next_rows], np.arange(len(conversations))):
            raise ValueError("every conversation needs a turn before the model's (an empty conversation has no sample)")
        return NextSamples(samples, triple_table, table, next_rows)


def merged_turns(turns: list[Turn]) -> list[Turn]:
    """Consecutive turns of one speaker merged into one, as ingest merges a speaker's consecutive messages."""
    merged: list[Turn] = []
    for turn in turns:
        if merged and merged[-1].role == turn.role:
            last = merged[-1]
            merged[-1] = Turn(
                turn.role, f"{last.text} {turn.text}", list(dict.fromkeys(last.movie_ids + turn.movie_ids))
            )
        else:
            merged.append(turn)
    return merged


class Chat:
    """A recommender and (optionally) a generator over one workspace's Knowledge. Holds no conversation: every call
    takes the conversation so far, so one Chat serves many users."""

    def __init__(self, knowledge: Knowledge, recommender: Recommender, generator: Generator | None = None):
        self.knowledge, self.recommender, self.generator = knowledge, recommender, generator

    def _longest(self) -> int:
        """The longest context the models read (the encoders know no later positions)."""
        sizes = [self.knowledge.params.triples.context_max_tokens, self.recommender.max_positions]
        if self.generator is not None:
            sizes.append(self.generator.max_positions)
        return min(size for size in sizes if size is not None)

    @torch.no_grad()
    def _ranked(
        self, conversations: list[list[Turn]], exclude_mentioned: bool
    ) -> tuple[NextSamples, list[list[int]], np.ndarray]:
        """The samples of the conversations, each conversation's item entities best first by the recommender's
        scores (evaluate's scorer) for the model's next turn, and those scores [conversations, n_items]."""
        knowledge = self.knowledge
        built = knowledge.next_samples(conversations, self._longest())
        scores = self.recommender.scores(built.samples, built.table, built.next_rows)
        ranked = []
        for row, turns in zip(scores, conversations):
            if exclude_mentioned:
                named = [knowledge.item_entity[m] for t in turns for m in t.movie_ids if m in knowledge.item_entity]
                row[named] = -np.inf
            order = np.argsort(-row, kind="stable")
            ranked.append(order[np.isfinite(row[order])].tolist())
        return built, ranked, scores

    @torch.no_grad()
    def _recommendations(
        self, turns: list[Turn], table, row: int, entities: list[int], scores: np.ndarray, explain: bool
    ) -> list[Recommendation]:
        """The entities as recommendations for the table's row (a conversation's next turn), each explained (when
        asked) as far as the recommender allows."""
        knowledge, recommender = self.knowledge, self.recommender
        attended, seeker_words = [], ""
        if explain:  # what only an explanation reads
            attended = recommender.attended(knowledge, table, row)
            seeker_words = knowledge.titled(" ".join(t.text for t in turns if t.role == "seeker"))
        return [
            Recommendation(
                knowledge.entity_movie[e],
                knowledge.titles[knowledge.entity_movie[e]],
                round(float(scores[e]), 4),
                knowledge.explainer.explain(e, attended, seeker_words, recommender.kg_paths, recommender.note)
                if explain
                else None,
            )
            for e in entities
        ]

    def recommend(
        self, turns: list[Turn], top_k: int, exclude_mentioned: bool = True, explain: bool = True
    ) -> list[Recommendation]:
        """The top_k movies for the model's next turn, best first, with their explanations."""
        built, [ranked], [scores] = self._ranked([turns], exclude_mentioned)
        return self._recommendations(turns, built.table, built.next_rows[0], ranked[:top_k], scores, explain)

    def explain_movie(self, turns: list[Turn], movie_id: int) -> tuple[int, Recommendation]:
        """Any movie's rank among all movies for the model's next turn (1 = first; named movies included) and its
        explanation: why it is, or is not, recommended."""
        built, [ranked], [scores] = self._ranked([turns], exclude_mentioned=False)
        entity = self.knowledge.item_entity[movie_id]
        explained = self._recommendations(turns, built.table, built.next_rows[0], [entity], scores, True)
        return ranked.index(entity) + 1, explained[0]

    def respond(self, turns: list[Turn], top_k: int, exclude_mentioned: bool = True, explain: bool = True) -> Reply:
        """The model's next turn: the generator's utterance, its movie placeholders filled with the recommender's
        items in rank order, and the top_k recommendations."""
        return self.respond_all([turns], top_k, exclude_mentioned, explain)[0]

    @torch.no_grad()
    def respond_all(
        self, conversations: list[list[Turn]], top_k: int, exclude_mentioned: bool = True, explain: bool = True
    ) -> list[Reply]:
        """respond() to many conversations at once: one pass of each model over all of them (the simulated
        seeker's turns, stages/simulate.py)."""
        if self.generator is None:
            raise ValueError("this chat has no generator")
        knowledge = self.knowledge
        built, ranked, scores = self._ranked(conversations, exclude_mentioned)
        responses = self.generator.generate(knowledge, built.table, built.next_rows)
        replies = []
        for turns, row, order, row_scores, tokens in zip(conversations, built.next_rows, ranked, scores, responses):
            words = [knowledge.vocabulary.tokens[t] for t in tokens]
            filling = order[: max(top_k, words.count(conv_train.PLACEHOLDER))]
            said = conv_train.fill_movies(words, [f"@{knowledge.entity_movie[e]}" for e in filling])
            shown = conv_train.fill_movies(words, [knowledge.titles[knowledge.entity_movie[e]] for e in filling])
            recommendations = self._recommendations(turns, built.table, row, order[:top_k], row_scores, explain)
            named = bool(set(said) & {f"@{r.movie_id}" for r in recommendations})
            template = None if named or not recommendations else TEMPLATE.format(title=recommendations[0].title)
            replies.append(Reply(" ".join(shown), " ".join(said), recommendations, named, template))
        return replies


class Session:
    """One conversation in the terminal: the turns so far and the last recommendations (for /why)."""

    def __init__(self, chat: Chat, top_k: int = 3):
        self.chat, self.top_k = chat, top_k
        self.turns: list[Turn] = []
        self.last: list[Recommendation] = []
        self.template: str | None = None  # the last reply's template sentence (Reply.template), if it needed one

    def find(self, words: str, limit: int = 10) -> list[str]:
        return [f"@{hit['movie_id']}  {hit['title']}" for hit in self.chat.knowledge.find(words, limit)]

    def reply(self, text: str) -> tuple[str, list[str], list[str]]:
        """Your turn in, the model's answer out: (answer, recommended titles, quoted titles not found)."""
        turn, unknown = self.chat.knowledge.read_turn("seeker", text)
        self.turns.append(turn)
        reply = self.chat.respond(self.turns, self.top_k)
        said, _ = self.chat.knowledge.read_turn("recommender", reply.text_with_ids)
        self.turns.append(said)
        self.last, self.template = reply.recommendations, reply.template
        return reply.text, [r.title for r in reply.recommendations], unknown

    def why(self, which: int | None = None) -> str:
        """The explanation of the last reply's recommendations (all of them, or the `which`-th, from 1)."""
        if not self.last:
            return "no recommendation yet: say something first"
        if which is not None and not 1 <= which <= len(self.last):
            return f"/why takes a number from 1 to {len(self.last)}"
        chosen = self.last if which is None else [self.last[which - 1]]
        return "\n".join([describe_attention(self.last[0].explanation)] + [describe(r) for r in chosen])


def describe_attention(explanation: Explanation | None) -> str:
    """What the recommender weighted (the same for every movie of one reply), as a line of text; a recommender that
    weighs no entity says what it reads instead."""
    entities = explanation.context_entities if explanation else []
    attended = ", ".join(e.label + ("" if e.weight is None else f" {e.weight:.2f}") for e in entities)
    note = f" ({explanation.note})" if explanation and explanation.note else ""
    if explanation and explanation.note and not entities:
        return f"read: {explanation.note}"
    if entities and entities[0].weight is None:
        return f"read: {attended}{note}"
    return f"attended to: {attended or 'nothing (no entity in the conversation: the ranking is its prior)'}{note}"


def describe(recommendation: Recommendation) -> str:
    """A recommended movie's KG paths and review sentences as lines of text (the terminal's /why)."""
    why = recommendation.explanation
    lines = [f"{recommendation.title} (score {recommendation.score:.2f})"]
    for path in why.kg_paths if why else []:
        steps = [path.entities[0].label]
        for relation, node in zip(path.relations, path.entities[1:]):
            steps.append(f"-[{relation}]-> {node.label}")
        lines.append(f"  KG: {' '.join(steps)}")
    for sentence in why.review_sentences if why else []:
        rating = f", rated {sentence.rating:g}/10" if sentence.rating is not None else ""
        match = "" if sentence.score > 0 else ", no word in common with the conversation"
        lines.append(f"  review ({sentence.source}{rating}{match}): {sentence.text}")
    return "\n".join(lines)
