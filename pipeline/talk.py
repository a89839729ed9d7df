"""`python -m pipeline talk`: a conversation with the trained C2-CRS model in the terminal.

Each of your turns is handled as a test sample is: merged into the conversation, linked to the KG (movies through
"@id", other entities by name), its mentions given review sentences by the triples stage's rule; then the
recommender ranks every movie and the generator answers, its movie placeholders filled with the recommender's top
items. Movies already named in the conversation are not recommended again here (evaluation does not exclude them).
Name a movie as "@<ReDial id>" or by its title in double quotes ("The Matrix"); `/find WORDS` lists matching titles.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline.config import Params
from stages import ingest, triples
from stages.io.graph import STAGES, stage_making
from stages.io.stage_log import registered_name
from stages.sources import raw
from stages.text import linking
from stages.training import c2crs_data, c2crs_train, conv_train, runs

QUOTED_TITLE = re.compile(r'"([^"]+)"')


@dataclass
class Turn:
    role: str  # seeker (you) or recommender (the model)
    text: str  # with movies as "@id"
    movie_ids: list[int] = field(default_factory=list)


class Chat:
    """The models and tables a conversation needs, and the conversation so far."""

    def __init__(self, params: Params, workspace: Path, top_k: int = 3, recommender_file: Path | None = None,
                 generator_file: Path | None = None):
        self.params, self.workspace, self.top_k = params, workspace, top_k
        self.run, _, inputs = runs.training_run(params, workspace)
        entities, edges = pl.read_parquet(inputs["entities"]), pl.read_parquet(inputs["edges"])
        self.movies = pl.read_parquet(workspace / "data/ingest/movies.parquet")
        items = entities.filter(pl.col("is_item"))
        self.item_entity = dict(zip(items["movie_id"], items["entity_id"]))
        self.entity_movie = {e: m for m, e in self.item_entity.items()}
        self.titles = {m: f"{t} ({y})" if y else t for m, t, y in self.movies.select("movie_id", "title", "year")
                       .iter_rows()}
        by_popularity = self.movies.sort("mentions_ingested", descending=True)
        self.title_to_movie: dict[str, int] = {}
        for movie_id, title in by_popularity.select("movie_id", "title").iter_rows():
            for name in (title, self.titles[movie_id]):
                self.title_to_movie.setdefault(name.lower(), movie_id)
        stopwords = raw.raw_files(params.data, workspace, "stopwords")["stopwords"]
        self.linker = linking.kg_entity_linker(entities, edges, stopwords, params.linking)
        self.vocab_table = pl.read_parquet(inputs["vocab"])
        self.vocabulary = conv_train.conv_vocabulary(self.vocab_table)
        self.chooser = triples.sentence_chooser(params.triples, entities, edges, self.movies,
                                               pl.read_parquet(inputs["review_sentences"]),
                                               pl.read_parquet(workspace / "data/reviews/reviews.parquet"))
        device = self.run.device
        self.recommender = runs.load_c2crs(recommender_file or workspace / STAGES["finetune_rec"].outs[0])
        self.recommender.to(device).eval()
        self.generator, _ = runs.load_conversation_model(generator_file or runs.conv_model_path(workspace))
        self.generator.to(device).eval()
        self.turns: list[Turn] = []

    def find(self, words: str, limit: int = 10) -> list[str]:
        wanted = words.lower()
        hits = self.movies.filter(pl.col("title").str.to_lowercase().str.contains(wanted, literal=True)).sort(
            "mentions_ingested", descending=True).head(limit)
        return [f"@{m}  {self.titles[m]}" for m in hits["movie_id"]]

    def _with_movie_ids(self, text: str) -> tuple[str, list[int], list[str]]:
        """Quoted titles become "@id"; returns the text, the movies named and the titles not found."""
        unknown = []

        def replace(match: re.Match) -> str:
            movie = self.title_to_movie.get(match.group(1).strip().lower())
            if movie is None:
                unknown.append(match.group(1))
                return match.group(1)
            return f"@{movie}"

        text = QUOTED_TITLE.sub(replace, text)
        movies = [int(m) for m in re.findall(r"@(\d+)", text) if int(m) in self.item_entity]
        return text, movies, unknown

    def _next_sample(self) -> c2crs_data.SampleTable:
        """The conversation so far plus an empty recommender turn, built into samples as the triples stage does."""
        turns = self.turns + [Turn("recommender", "")]
        utterances = pl.DataFrame([(0, i, t.role, t.text, t.movie_ids) for i, t in enumerate(turns)],
                                  schema=ingest.UTTERANCE_SCHEMA, orient="row").with_columns(split=pl.lit("test"))
        linked = triples.link_all(utterances, self.linker, self.item_entity)
        longest = min(self.params.triples.context_max_tokens, self.recommender.cfg.max_positions,
                      self.generator.encoders.cfg.max_positions)  # the encoders know no later positions
        samples, mentions = triples.build_samples(utterances, linked, self.vocab_table, self.item_entity, longest,
                                                  self.params.triples.response_max_tokens)
        triple_table = triples.build_triples(mentions, linked, utterances, self.chooser)
        return c2crs_data.sample_table(samples, triple_table, "test")

    @torch.no_grad()
    def reply(self, text: str) -> tuple[str, list[str], list[str]]:
        """Your turn in, the model's answer out: (answer, recommended titles, quoted titles not found)."""
        text, movies, unknown = self._with_movie_ids(text)
        self.turns.append(Turn("seeker", text, movies))
        table = self._next_sample()
        row = np.array([len(table) - 1])
        blocks = c2crs_train.score_samples(self.recommender, self.run, table, len(table))
        scores = np.concatenate([block for _, block in blocks])[-1].copy()
        mentioned = [self.item_entity[m] for t in self.turns for m in t.movie_ids]
        scores[mentioned] = -np.inf
        top = [int(e) for e in np.argsort(-scores, kind="stable")[: self.top_k] if np.isfinite(scores[e])]
        tokens = conv_train.generate(self.generator, self.run, table, row, self.params.evaluate.decoding,
                                     self.vocabulary.banned_ids)[0]
        words = [self.vocabulary.tokens[t] for t in tokens]
        ids = [f"@{self.entity_movie[e]}" for e in top]
        said = conv_train.fill_movies(words, ids)
        self.turns.append(Turn("recommender", " ".join(said), [int(w[1:]) for w in said if w in ids]))
        shown = conv_train.fill_movies(words, [self.titles[self.entity_movie[e]] for e in top])
        return " ".join(shown), [self.titles[self.entity_movie[e]] for e in top], unknown


def talk(params: Params, workspace: Path, models_from: str = "registry") -> int:
    """models_from: "registry" loads the champions (models:/c2crs-recommender@champion, c2crs-generator) when they
    were trained on the workspace's data, else the workspace's files; "workspace" the DVC outputs."""
    from pipeline.registry import model_sources

    print("loading the models ...", flush=True)
    recommender, generator = registered_name("c2crs", "recommender"), registered_name("c2crs", "generator")
    files = model_sources({recommender: workspace / STAGES["finetune_rec"].outs[0],
                           generator: workspace / STAGES["finetune_conv"].outs[0]}, workspace, models_from)
    for file in files.values():
        if not file.is_file():
            needed = str(file.relative_to(workspace))
            stage = stage_making(needed)
            print(f"error: {needed} is missing; stage {stage} makes it: python -m pipeline repro {stage}")
            return 2
    chat = Chat(params, workspace, recommender_file=files[recommender], generator_file=files[generator])
    print(__doc__.split("\n\n")[1].replace("\n", " "))
    print("Empty line, Ctrl-D or Ctrl-C ends the conversation.\n")
    return converse(chat)


def converse(chat, read=input, write=print) -> int:
    """The session: read a line, answer it, until an empty line, end of input or Ctrl-C at the prompt. A reply
    that fails (or is stopped with Ctrl-C) is reported in one line and forgotten: the conversation goes on from
    the turn before it."""
    while True:
        try:
            text = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return 0
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").strip()
        if "\ufffd" in text:
            write("(your line held bytes that are not UTF-8; they are read as \ufffd)")
        if not text:
            return 0
        if text.startswith("/find "):
            write("\n".join(chat.find(text[6:].strip())) or "no title contains that")
            continue
        before = len(chat.turns)
        try:
            answer, recommended, unknown = chat.reply(text)
        except KeyboardInterrupt:
            del chat.turns[before:]
            write("(stopped; that line is forgotten)")
            continue
        except Exception as exc:  # a reply that fails must not end the conversation
            del chat.turns[before:]
            write(f"error: this reply failed ({type(exc).__name__}: {exc}); that line is forgotten, go on")
            continue
        if unknown:
            write(f"(not a ReDial title, kept as words: {', '.join(unknown)}; try /find)")
        write(f"c2crs> {answer}")
        write(f"       recommends: {'; '.join(recommended)}")
