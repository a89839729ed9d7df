"""The trained models a conversation can use, each loaded, scored and explained as far as it allows.

Recommenders: C2-CRS, the baselines, the ablations and C2-CRS with the learned repeat choice, by evaluate's model
names (evaluate.model_files). Each ranks with evaluate's own scorer (evaluate.trained_scorers) on the conversation's
samples, built as the triples stage builds a test sample, so the chat ranks a sample exactly as evaluate does.

What an explanation can show depends on what a model reads. The models of C2-CRS's kind (C2-CRS, its ablations,
KBRD-style, KECRS) pool the conversation's entities into a user vector with self-attention, so their weights are
shown. KGSF and RevCore read the entities (and words) without a weight to show; ReDial's recommender reads only the
movies named, so it has no KG paths; TextCNN reads only the words, so it has neither entities nor paths. Each
explanation's `note` says so in words rather than showing an empty section.

Generators: finetune_conv's and every conv_baselines variant's, each answering with the generation function of its
architecture (ReDial's HRED has its own), RevCore's on contexts its review retrieval enriches, as evaluate's
conversation scoring reads them.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from models.c2crs import C2CRS
from models.generator import ConversationModel
from models.hred import HRED
from stages import evaluate, ingest
from stages.evaluation import conv_metrics, decoding_choice, rec_metrics, standard_protocol
from stages.evaluation.rec_metrics import ABLATION_PREFIX, REPEAT_CHOICE
from stages.training import baseline_models, c2crs_train, conv_runs, revcore_train, runs

# The models whose user vector is C2-CRS's self-attentive pooling of the context entities (runs.load_c2crs files).
POOLING = ("c2crs", REPEAT_CHOICE, "kbrd", "kecrs")
READS_ENTITIES = ("kgsf", "revcore", "redial")  # entities without a weight per entity (ReDial: the movies only)
NO_KG_PATHS = ("redial", "textcnn", *rec_metrics.NAIVE_MODELS)
NOTES = {
    REPEAT_CHOICE: "C2-CRS's scores turned into the learned choice between a movie the conversation named and a "
    "new one; the weights are C2-CRS's",
    "kgsf": "KGSF reads the conversation's entities and words (its word graph) and has no weight per entity to "
    "show: the entities it read are listed, most recent first",
    "revcore": "RevCore is KGSF's recommender on the conversation enriched with retrieved review sentences; it has "
    "no weight per entity to show: the conversation's entities are listed, most recent first",
    "redial": "ReDial's recommender reads only the movies named (an autoencoder over them): no KG paths",
    "textcnn": "TextCNN reads only the words: no context entities or KG paths",
    "popularity": "the movies most often recommended in the train conversations, whatever is said: nothing read",
    "repeat": "the movies the conversation named, most recent first (then nothing): no KG read",
    "repeat_popularity": "the movies the conversation named, most recent first, then the most popular: no KG read",
}
NO_KG_EDGES_NOTE = (
    "this ablation's KG encoder saw no KG edges (self loops only): the paths show how the KG links the entities "
    "to the movie, not what the model used"
)


def recommender_label(name: str) -> str:
    """A recommender's name as the result tables write it (KBRD-style, C2-CRS w/o SD, ...)."""
    ablation = rec_metrics.PAPER_TABLE4.get(name)
    if name.startswith(ABLATION_PREFIX) and ablation is not None:
        return f"C2-CRS {ablation[0]}"
    return standard_protocol.STANDARD_LABELS.get(name, name)


def generator_label(name: str) -> str:
    return conv_metrics.MODEL_NAMES.get(name, name)


@dataclass
class Recommender:
    """A trained recommender: evaluate's scorer for it and what its explanation can show."""

    name: str  # evaluate's model name: c2crs, kgsf, c2crs_wo_sd, c2crs-repeat-choice, ...
    score: Callable  # evaluate.trained_scorers': (table, recent, states) -> score blocks
    pooling: tuple[C2CRS, c2crs_train.Run] | None  # the model (and its graph) whose pooling weights are shown
    max_positions: int | None  # the longest context its encoder reads (None: no position limit)
    note: str | None  # what it reads, when its explanation is not C2-CRS's full one

    def scores(self, samples: pl.DataFrame, table, rows: np.ndarray) -> np.ndarray:
        """The scores [rows, n_items] of the table's `rows` (conversations' next turns), from evaluate's scorer over
        the conversations' samples with score_split's history (each sample's context movies by recency, its state)."""
        ordered = samples.filter(pl.col("split") == "test").sort("sample_id")
        history = rec_metrics.context_items_by_recency(ordered), rec_metrics.choice_states(ordered)
        out: np.ndarray | None = None
        found = np.zeros(len(rows), dtype=bool)
        for block_rows, block in self.score(table, *history):
            wanted = np.isin(rows, block_rows)
            if not wanted.any():
                continue
            if out is None:
                out = np.empty((len(rows), np.shape(block)[1]), dtype=np.float32)
            out[wanted] = np.asarray(block)[np.searchsorted(block_rows, rows[wanted])]
            found |= wanted
        if out is None or not found.all():
            raise ValueError(f"recommender {self.name}: no scores for some conversations' next turns")
        return out

    def attended(self, knowledge, table, row: int) -> list:
        """The entities of the table's row as this model reads them (weighted where it pools them), for
        explanations."""
        if self.pooling is not None:
            model, run = self.pooling
            _, entity_ids, weights = c2crs_train.scores_with_pooling_weights(model, run, table, np.array([row]))
            return knowledge.explainer.context_entities(entity_ids[0], weights[0])
        if self.name in READS_ENTITIES:
            read = table.context_items[row] if self.name == "redial" else table.context_entities[row]
            return knowledge.explainer.read_entities(read)
        return []

    @property
    def kg_paths(self) -> bool:
        return self.name not in NO_KG_PATHS


def load_recommender(path: Path, knowledge, name: str = "c2crs") -> Recommender:
    """Recommender `name`'s file (evaluate's model names), checked against the workspace's vocabulary and KG and
    loaded by evaluate's loader for it."""
    label = recommender_label(name)
    try:
        config = runs.load_saved(path)["config"]
        _check_sizes(path, config, knowledge)
        scorers = evaluate.trained_scorers(
            knowledge.params,
            knowledge.workspace,
            {name: path},
            loaded=knowledge.training,
            forms=pl.DataFrame(schema=ingest.FORM_SCHEMA),  # a chat has no movie forms: ReDial reads "did not say"
        )
    except (TypeError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a {label} recommender file ({type(exc).__name__}: {exc})") from None
    if name not in scorers:
        raise ValueError(f"{name}: not a recommender the chat knows (evaluate's: {', '.join(_known(knowledge))})")
    pooling, note = None, NOTES.get(name)
    if name in POOLING or name.startswith(ABLATION_PREFIX):
        pooling = (runs.load_c2crs(path).to(knowledge.run.device).eval(), _run_of(name, knowledge))
    if name.startswith(ABLATION_PREFIX) and not knowledge.params.variant(name[len(ABLATION_PREFIX) :]).model.kg_edges:
        note = NO_KG_EDGES_NOTE
    max_positions = pooling[0].cfg.max_positions if pooling else None
    return Recommender(name, scorers[name], pooling, max_positions, note)


def naive_recommender(knowledge, name: str) -> Recommender:
    """A model that needs no training (evaluate.naive_scorers: popularity, repeat, repeat_popularity), as a chat's
    recommender: the simulated seeker (stages/simulate.py) talks to them as to the trained ones."""
    scorers = evaluate.naive_scorers(knowledge.run, knowledge.run.graph.n_items, knowledge.params.evaluate.batch_size)
    if name not in scorers:
        raise ValueError(f"{name}: not a naive recommender (those are {', '.join(scorers)})")
    return Recommender(name, scorers[name], None, None, NOTES[name])


def _run_of(name: str, knowledge) -> c2crs_train.Run:
    """The graph a C2-CRS-kind model was trained and is scored on: an ablation's own when its model section differs
    (w/o SD: self loops only), as evaluate's ablation scorers read it."""
    if not name.startswith(ABLATION_PREFIX):
        return knowledge.run
    variant = knowledge.params.variant(name[len(ABLATION_PREFIX) :])
    if variant.model == knowledge.params.model:
        return knowledge.run
    return runs.training_run(variant, knowledge.workspace)[0]


def _known(knowledge) -> list[str]:
    return list(evaluate.model_files(knowledge.params, knowledge.workspace))


@dataclass
class Generator:
    """A trained generator, the table transformation its training read (RevCore: the review-enriched contexts) and
    its decoding setting: the one choose_decoding chose for its name (reports/decoding.json), as evaluate decodes it;
    evaluate.decoding where that file is missing or has no choice for the name."""

    name: str
    model: ConversationModel | HRED
    retrieval: revcore_train.ReviewRetrieval | None
    max_positions: int | None
    decoding: object

    def generate(self, knowledge, table, rows: np.ndarray) -> list[list[int]]:
        """Its responses (output-vocabulary ids) to the table's rows, as evaluate's conversation scoring decodes."""
        read = self.retrieval.augment(table) if self.retrieval is not None else table
        banned = knowledge.vocabulary.banned_ids
        return conv_runs.generate(self.model, knowledge.run, read, np.asarray(rows), self.decoding, banned)


def load_generator(path: Path, knowledge, name: str = "c2crs") -> Generator:
    """A generator file (finetune_conv's or a conv_baselines variant's), checked against the workspace's data."""
    try:
        config = runs.load_saved(path)["config"]
        _check_sizes(path, config, knowledge)
        model, config = conv_runs.load_conversation_model(path)
    except (TypeError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a generator file ({type(exc).__name__}: {exc})") from None
    model = model.to(knowledge.run.device).eval()
    retrieval, max_positions = None, None
    if config.architecture != "hred":
        max_positions = model.encoders.cfg.max_positions
    if config.pretrained == "revcore":
        retrieval = baseline_models.revcore_retrieval(
            knowledge.params, knowledge.workspace, knowledge.run, config.encoders["max_positions"]
        )
    decoding = decoding_choice.chosen_decoding(
        knowledge.workspace, knowledge.params.evaluate.decoding, name, required=False
    )
    return Generator(name, model, retrieval, max_positions, decoding)


def _check_sizes(path: Path, config: dict, knowledge) -> None:
    """A model of another vocabulary or KG cannot read this workspace's samples: say so, with both sizes."""
    expected = {
        "vocab_size": len(knowledge.vocab_table),
        "n_entities": knowledge.run.graph.n_entities,
        "n_items": knowledge.run.graph.n_items,
    }
    trained = {}
    for part in (config, config.get("kgsf") or {}, config.get("encoders") or {}):
        trained |= {key: part[key] for key in expected if isinstance(part, dict) and key in part}
    differs = [key for key, value in trained.items() if value != expected[key]]
    if differs:
        said = ", ".join(f"{key} {trained[key]}" for key in differs)
        has = ", ".join(f"{expected[key]}" for key in differs)
        raise ValueError(f"{path}: trained on other data ({said}; this workspace has {has})")
