"""Stage simulate: every recommender in conversation with a simulated seeker, offline, from the real test data.

Table 1 scores one turn at a time against whatever the human recommender said next. Here a seeker built from a test
conversation (stages/chat/seeker.py: its target is a movie the real seeker liked and the recommender suggested;
its opening the real first message; its hints from the movie metadata, never the title) talks with the chat engine
(stages/chat/engine.py: the recommender under test ranks, the C2-CRS generator words the answer with the
recommender's movies), for T turns. The measures (stages/evaluation/simulation_metrics.py): success within T turns
at k = 1, 3, 10, mean turns to success, recall by turn, intervals over conversations, C2-CRS minus KBRD-style
paired; a sensitivity part repeats the simulation of simulate.sensitivity_models with no hints and with each kind
of hint alone.

Each turn of every simulated conversation is scored in one pass per model (Chat.respond_all), as evaluate scores a
split, so the whole simulation takes minutes. Deterministic: the seekers are a seeded sample, their messages fixed
by rules, the C2-CRS generator decoded with the setting choose_decoding chose for it (reports/decoding.json).
"""

import logging
import time
from pathlib import Path

import numpy as np
import polars as pl

from stages import evaluate
from stages.chat import catalogue, seeker
from stages.chat.engine import Chat, Knowledge, Turn
from stages.evaluation import rec_metrics, simulation_metrics
from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.stage_log import NO_LOG, StageLog, StageOutcome
from stages.reviews import read_movie_info
from stages.sources import raw
from stages.training import conv_runs

logger = logging.getLogger(__name__)

ALL_HINTS, NO_HINTS = simulation_metrics.ALL_HINTS, "none"
REFERENCE, COMPARED = "c2crs", "kbrd"  # the paired difference: C2-CRS minus KBRD-style (= w/o Coarse-Fine)


def chosen_seekers(params, workspace: Path, knowledge: Knowledge) -> tuple[list[seeker.Seeker], dict]:
    """The simulated seekers (a seeded sample of the test conversations that have a target) and how they were
    chosen: test conversations, those left out by reason, the sample's size."""
    ingest_stage = STAGES["ingest"]
    conversations = pl.read_parquet(workspace / ingest_stage.output("conversations"))
    test = sorted(conversations.filter(pl.col("split") == "test")["conv_id"].to_list())
    movie_info = raw.raw_files(params.data, workspace, "movie_info")["movie_info"]
    seekers, left_out = seeker.build_seekers(
        test,
        pl.read_parquet(workspace / ingest_stage.output("utterances")),
        pl.read_parquet(workspace / ingest_stage.output("movie_forms")),
        knowledge.movies,
        read_movie_info(movie_info),
        set(knowledge.item_entity),
    )
    if not seekers:
        raise ValueError(
            f"no test conversation has a target for the simulated seeker (a movie the seeker liked in its form that "
            f"the recommender suggested, an item of the KG with metadata): left out {left_out}"
        )
    size = min(params.simulate.conversations, len(seekers))
    picked = np.sort(np.random.default_rng(params.seed).choice(len(seekers), size, replace=False))
    chosen = [seekers[i] for i in picked]
    return chosen, {"test_conversations": len(test), "with_target": len(seekers), "left_out": left_out, "size": size}


def simulate(
    chat: Chat, seekers: list[seeker.Seeker], kinds: tuple[str, ...], turns: int, top_k: int
) -> tuple[np.ndarray, list[list[Turn]], list[list[list[int]]]]:
    """Every seeker in conversation with the chat for `turns` system turns, all conversations' turn t in one pass.

    Returns the target's place in the system's top_k at each turn [seekers, turns] (0: not among them), the
    conversations, and each turn's top_k movies per conversation."""
    knowledge = chat.knowledge
    conversations = [[knowledge.read_turn("seeker", s.opening)[0]] for s in seekers]
    said = [s.messages(kinds, turns - 1) for s in seekers]
    ranks = np.zeros((len(seekers), turns), dtype=np.int64)
    shown: list[list[list[int]]] = [[] for _ in seekers]
    for t in range(turns):
        for i, reply in enumerate(chat.respond_all(conversations, top_k, explain=False)):
            movies = [r.movie_id for r in reply.recommendations]
            ranks[i, t] = movies.index(seekers[i].target) + 1 if seekers[i].target in movies else 0
            shown[i].append(movies)
            conversations[i].append(knowledge.read_turn("recommender", reply.text_with_ids)[0])
            if t + 1 < turns:
                conversations[i].append(knowledge.read_turn("seeker", said[i][t])[0])
    return ranks, conversations, shown


def transcript(knowledge: Knowledge, who: seeker.Seeker, turns: list[Turn], shown, ranks, *, top: int) -> dict:
    """One simulated conversation to read: movies as titles, the system's top items after each of its turns."""
    messages, system_turn = [], 0
    for turn in turns:
        message = {"role": "seeker" if turn.role == "seeker" else "system", "text": knowledge.titled(turn.text)}
        if turn.role == "recommender":
            message["top"] = [knowledge.titles[m] for m in shown[system_turn][:top]]
            message["rank"] = int(ranks[system_turn]) or None
            system_turn += 1
        messages.append(message)
    return {"conv_id": who.conv_id, "target": knowledge.titles[who.target], "messages": messages}


def _recommenders(
    params, workspace: Path, knowledge: Knowledge, names: list[str] | None
) -> dict[str, catalogue.Recommender]:
    """Every recommender evaluate scores (or those of `names`): the naive ones and each trained model of
    evaluate.model_files."""
    files = evaluate.model_files(params, workspace)
    unknown = sorted(set(names or ()) - set(files) - set(rec_metrics.NAIVE_MODELS))
    if unknown:
        raise ValueError(
            f"unknown model(s) {', '.join(unknown)}; the trained ones are {', '.join(files)} "
            f"(and the naive {', '.join(rec_metrics.NAIVE_MODELS)})"
        )
    wanted = [*rec_metrics.NAIVE_MODELS, *files] if names is None else names
    return {
        name: catalogue.naive_recommender(knowledge, name)
        if name in rec_metrics.NAIVE_MODELS
        else catalogue.load_recommender(files[name], knowledge, name)
        for name in wanted
    }


def hint_settings(kinds: list[str]) -> dict[str, tuple[str, ...]]:
    """The main setting (every kind in turn), then the sensitivity settings: no hints, each kind alone."""
    return {ALL_HINTS: tuple(kinds), NO_HINTS: (), **{f"{kind} only": (kind,) for kind in kinds}}


def simulation_report(params, workspace: Path, models: list[str] | None = None) -> dict:
    """reports/simulate.json's content: every recommender of the workspace (or `models`, evaluate's names) with
    every kind of hint, the sensitivity settings for simulate.sensitivity_models (those of `models`), the paired
    difference, and transcripts of C2-CRS (or the first model) with every kind of hint."""
    config = params.simulate
    knowledge = Knowledge(params, workspace)
    seekers, chosen = chosen_seekers(params, workspace, knowledge)
    generator = catalogue.load_generator(conv_runs.conv_model_path(workspace), knowledge)
    recommenders = _recommenders(params, workspace, knowledge, models)
    unknown = [name for name in config.sensitivity_models if name not in recommenders and models is None]
    if unknown:
        raise ValueError(
            f"params simulate.sensitivity_models: {', '.join(unknown)} is not a recommender of this workspace "
            f"(those are {', '.join(recommenders)})"
        )
    results, paired, transcripts = {}, {}, []
    for setting, kinds in hint_settings(config.hint_kinds).items():
        names = (
            list(recommenders) if setting == ALL_HINTS else [m for m in config.sensitivity_models if m in recommenders]
        )
        ranks = {}
        for name in names:
            started = time.perf_counter()
            chat = Chat(knowledge, recommenders[name], generator)
            ranks[name], conversations, shown = simulate(chat, seekers, kinds, config.turns, max(config.ks))
            logger.info("simulated %s, hints %s: %.0f s", name, setting, time.perf_counter() - started)
            if setting == ALL_HINTS and (name == REFERENCE or not transcripts):
                read = list(zip(seekers, conversations, shown, ranks[name]))[: config.transcripts]
                transcripts = [transcript(knowledge, *conversation, top=3) for conversation in read]
        results[setting] = {
            name: simulation_metrics.measures(r, config.ks, params.evaluate.bootstrap_resamples, params.seed)
            for name, r in ranks.items()
        }
        if {REFERENCE, COMPARED} <= set(ranks):
            paired[setting] = simulation_metrics.paired_difference(
                ranks[REFERENCE], ranks[COMPARED], config.ks, params.evaluate.bootstrap_resamples, params.seed
            )
    return {
        "protocol": {
            **chosen,
            "turns": config.turns,
            "ks": config.ks,
            "hint_kinds": config.hint_kinds,
            "models": list(recommenders),  # the tables' row order (JSON objects keep none)
            "settings": [setting for setting in results if results[setting]],
        },
        "labels": {name: catalogue.recommender_label(name) for name in recommenders},
        "settings": {setting: values for setting, values in results.items() if values},
        "paired": {"models": [REFERENCE, COMPARED], "by_setting": paired},
        "transcripts": transcripts,
    }


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    spec = STAGES["simulate"]
    report = simulation_report(params, workspace)
    flat = {
        f"{model}.success@{k}": values[f"success@{k}"]["value"]
        for model, values in report["settings"][ALL_HINTS].items()
        for k in params.simulate.ks
    }
    write_outputs(
        {
            workspace / spec.report("simulate.json"): report,
            workspace / spec.report("simulate.md"): simulation_metrics.report_markdown(report),
            workspace / spec.metrics_file: flat,
        }
    )
    return StageOutcome({Path(d).name: workspace / d for d in spec.deps}, flat)
