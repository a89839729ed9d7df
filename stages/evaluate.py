"""The evaluate stage: every trained model on the test split (read here and by the simulate stage, nowhere else).

Over 400 lines: recommendation and conversation are scored from one loading of the models and samples, and
`score` (a user's conversations) runs the same functions.

Recommendation: C2-CRS, the baselines, the ablations and the naive scorers in every protocol of
stages/evaluation/rec_metrics.py, with 95 % bootstrap intervals and paired differences (reports/rec.json,
reports/rec.md; the headline numbers flat in metrics/rec.json). Conversation: each generator's perplexity and its
responses, decoded with the setting choose_decoding chose for it on validation (reports/decoding.json), scored with
stages/evaluation/conv_metrics.py (reports/conv.json, reports/conv.md, metrics/conv.json),
responses to read and a blind rating sheet.
score_file runs the same recommendation evaluation on conversations a user brings (`python -m pipeline score`).
"""

import functools
import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import torch

from models.baselines import popularity_scores
from models.hred import HRED
from stages import ingest, triples
from stages.evaluation import conv_metrics, decoding_choice, fluency, rec_metrics, standard_protocol
from stages.io.graph import STAGES, params_value, stage_making
from stages.io.outputs import write_outputs
from stages.io.stage_log import NO_LOG, StageLog, StageOutcome, registered_name
from stages.sources import raw
from stages.text import linking
from stages.training import (
    baseline_models,
    c2crs_data,
    c2crs_train,
    conv_runs,
    conv_train,
    hred_train,
    kgsf_train,
    redial_train,
    repeat_choice,
    runs,
    textcnn_train,
)

logger = logging.getLogger(__name__)


def model_files(params, workspace: Path) -> dict[str, Path]:
    """Each trained recommender that evaluate scores, and the file it is read from (c2crs-repeat-choice is C2-CRS's
    scores re-ranked, so it reads C2-CRS's)."""
    c2crs = workspace / STAGES["finetune_rec"].model_file
    files = {name: workspace / STAGES["baselines"].for_variant(name).model_file for name in params.baselines.train}
    files.update({"c2crs": c2crs, rec_metrics.REPEAT_CHOICE: c2crs})
    for variant in params.ablations.variants:
        files[rec_metrics.ABLATION_PREFIX + variant] = runs.ablation_model_path(workspace, variant)
    return files


def score_split(
    params,
    workspace: Path,
    samples: pl.DataFrame,
    triple_table: pl.DataFrame,
    split: str = "test",
    loaded=None,
    skip: frozenset[str] = frozenset(),
    files: dict[str, Path] | None = None,
    forms: pl.DataFrame | None = None,
    history: tuple[list[list[int]], list[int]] | None = None,
) -> tuple[c2crs_data.SampleTable, dict[str, Callable]]:
    """For each model (but those in skip), a function giving its score blocks (row indices, [rows, n_items]) on a
    split's samples; the models are read from `files` (default: model_files, the workspace's). forms: the movie
    forms of the samples' conversations, which ReDial's recommender reads (default: the ingest stage's). history:
    each sample's context movies by recency and its new-or-repeat state, when the samples are only some turns of
    their conversations (default: replayed from the samples)."""
    loaded = loaded or runs.training_run(params, workspace)  # training_run's, reused
    run, model_config, _ = loaded
    table = c2crs_data.sample_table(samples, triple_table, split)
    ordered = samples.filter(pl.col("split") == split).sort("sample_id")
    recent, states = history or (rec_metrics.context_items_by_recency(ordered), rec_metrics.choice_states(ordered))
    files = files or model_files(params, workspace)  # a model not in files: not trained here, or not asked for
    scorers = naive_scorers(run, model_config.n_items, params.evaluate.batch_size)
    scorers.update(trained_scorers(params, workspace, files, skip, loaded, forms))
    return table, {name: (lambda score=score: score(table, recent, states)) for name, score in scorers.items()}


def naive_scorers(run, n_items: int, batch: int) -> dict[str, Callable]:
    """The models that need no training (rec_metrics.naive_scorers; popularity counted on the train targets), each
    as trained_scorers' functions are: (table, recent, states) -> its score blocks."""
    train_targets = torch.as_tensor([item for targets in run.train.targets for item in targets], dtype=torch.long)
    popularity = popularity_scores(train_targets, n_items).numpy()

    def scorer(name: str) -> Callable:
        def blocks(table, recent, states):
            score = rec_metrics.naive_scorers(recent, popularity)[name]
            for start in range(0, len(table), batch):
                rows = np.arange(start, min(start + batch, len(table)))
                yield rows, score(rows)

        return blocks

    return {name: scorer(name) for name in rec_metrics.NAIVE_MODELS}


def trained_scorers(
    params,
    workspace: Path,
    files: dict[str, Path],
    skip: frozenset[str] = frozenset(),
    loaded=None,
    forms: pl.DataFrame | None = None,
) -> dict[str, Callable]:
    """Each trained model of `files` (but skip's; other names are ignored), loaded once, as a function
    (table, recent, states) -> its score blocks on a sample table; recent and states (score_split's history, aligned
    with the table) are read by the repeat choice only. score_split binds them to a split's samples, the chat
    (stages/chat) to a conversation's, so both score a sample alike. forms: as score_split's."""
    run, model_config, _ = loaded or runs.training_run(params, workspace)
    batch = params.evaluate.batch_size
    wanted = set(files) - skip
    models = {}
    if "textcnn" in wanted:
        textcnn = textcnn_train.load_textcnn(files["textcnn"]).to(run.device)
        models["textcnn"] = lambda table, *_: textcnn_train.score_textcnn(textcnn, run, table, batch)
    for name in ("kbrd", "kecrs"):
        if name not in wanted:
            continue
        model = runs.load_c2crs(files[name]).to(run.device)
        models[name] = lambda table, *_, model=model: c2crs_train.score_samples(model, run, table, batch)
    if {"kgsf", "revcore"} & wanted:
        words = kgsf_train.load_word_graph(workspace, model_config.vocab_size, run.device)
    if "kgsf" in wanted:
        kgsf = baseline_models.load_kgsf(files["kgsf"]).to(run.device)
        models["kgsf"] = lambda table, *_: kgsf_train.score_kgsf(kgsf, run, table, words, batch)
    if "revcore" in wanted:  # KGSF's recommender on the contexts its retrieval enriches
        retrieval = baseline_models.revcore_retrieval(params, workspace, run, path=files["revcore"])
        models["revcore"] = lambda table, *_: kgsf_train.score_kgsf(
            retrieval.model.kgsf, run, retrieval.augment(table), words, batch
        )
    if "redial" in wanted:
        redial = baseline_models.load_redial(files["redial"]).to(run.device)
        if forms is None:
            forms = pl.read_parquet(workspace / redial_train.FORMS_INPUT)
        likes = redial_train.seeker_likes(forms, pl.read_parquet(workspace / runs.TRAINING_INPUTS["entities"]))
        models["redial"] = lambda table, *_: redial_train.score_redial(redial, run, table, likes, batch)
    if {"c2crs", rec_metrics.REPEAT_CHOICE} & wanted:
        c2crs = runs.load_c2crs(files["c2crs" if "c2crs" in files else rec_metrics.REPEAT_CHOICE]).to(run.device)
    if "c2crs" in wanted:
        models["c2crs"] = lambda table, *_: c2crs_train.score_samples(c2crs, run, table, batch)
    if rec_metrics.REPEAT_CHOICE in wanted:
        choice = repeat_choice.fitted(params, workspace, run)
        models[rec_metrics.REPEAT_CHOICE] = lambda table, recent, states: repeat_choice.with_repeat_choice(
            c2crs_train.score_samples(c2crs, run, table, batch),
            repeat_choice.recent_items_tensor(recent),
            table,
            choice,
            torch.as_tensor(states),
        )
    models.update(_ablation_scorers(params, workspace, files, wanted, run, batch))
    return models


def _ablation_scorers(params, workspace: Path, files: dict[str, Path], wanted: set[str], run, batch: int) -> dict:
    """The ablation variants' score functions (each variant's own graph when its model section changes it)."""
    models, variant_runs = {}, {params.model.model_dump_json(): run}  # w/o SD: only self loops
    for variant in params.ablations.variants:
        if rec_metrics.ABLATION_PREFIX + variant not in wanted:
            continue
        variant_params = params.variant(variant)
        key = variant_params.model.model_dump_json()
        if key not in variant_runs:
            variant_runs[key] = runs.training_run(variant_params, workspace)[0]
        model = runs.load_c2crs(files[rec_metrics.ABLATION_PREFIX + variant]).to(run.device)
        models[rec_metrics.ABLATION_PREFIX + variant] = lambda table, *_, model=model, run=variant_runs[key]: (
            c2crs_train.score_samples(model, run, table, batch)
        )
    return models


def evaluate_samples(
    params,
    workspace: Path,
    samples: pl.DataFrame,
    triple_table: pl.DataFrame,
    split: str = "test",
    log: StageLog = NO_LOG,
    loaded=None,
    skip: frozenset[str] = frozenset(),
    files: dict[str, Path] | None = None,
    top: dict[str, np.ndarray] | None = None,
    forms: pl.DataFrame | None = None,
    rows: pl.DataFrame | None = None,
    history: tuple[list[list[int]], list[int]] | None = None,
) -> dict:
    """Every model's (but skip's) metrics on one split's samples: {model: {protocol: metrics}} (the reports/rec.json
    shape). top: {model: None} to fill, while the models are scored, with each named model's best items for every
    sample row ([rows, TOP_ITEMS] entity ids; the generators' responses name them), instead of scoring it twice.
    rows: the evaluation rows (default: rec_metrics.expand_mentions of the split's samples); history: score_split's."""
    table, models = score_split(params, workspace, samples, triple_table, split, loaded, skip, files, forms, history)
    if rows is None:
        rows = rec_metrics.expand_mentions(samples.filter(pl.col("split") == split).sort("sample_id"))
    ranks, masked = {}, {}
    for name, blocks in models.items():  # one pass per model gives both rankings
        scored = blocks()
        if top is not None and name in top:
            scored = _keeping_top(scored, top, name, len(table))
        ranks[name], masked[name] = rec_metrics.ranks_and_masked_ranks(
            ((table.sample_ids[r], scores) for r, scores in scored), rows, rows["context_item_ids"]
        )
    results = {}
    for name in models:
        compare = name == "c2crs"
        results[name] = rec_metrics.evaluate_model(
            rows,
            ranks[name],
            params.evaluate.bootstrap_resamples,
            params.seed,
            compare_with={other: r for other, r in ranks.items() if other != name} if compare else None,
            masked_ranks=masked[name],
            compare_masked={other: r for other, r in masked.items() if other != name} if compare else None,
        )
        log.epoch(
            0, {name: {p: {k: v for k, v in m.items() if not isinstance(v, dict)} for p, m in results[name].items()}}
        )
    return results


TOP_ITEMS = 5  # movies a generated response can name: its placeholders are filled from these, in order


def _keeping_top(blocks, top: dict[str, np.ndarray], name: str, n_rows: int):
    """Pass the score blocks through, writing each row's best items (best first) into top[name] [rows, k]."""
    for rows, scores in blocks:
        if top[name] is None:
            top[name] = np.zeros((n_rows, min(TOP_ITEMS, scores.shape[1])), dtype=np.int64)
        k = top[name].shape[1]
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1, kind="stable")
        top[name][rows] = np.take_along_axis(best, order, axis=1)
        yield rows, scores


def _setting(params, samples: pl.DataFrame) -> str:
    """One paragraph on how this run's setting differs from the paper's, from the data and params it used."""
    conversations = dict(samples.group_by("split").agg(pl.col("conv_id").n_unique()).iter_rows())
    pre = f"{params.pretrain_coarse.epochs} coarse + {params.pretrain_fine.epochs} fine pre-training epochs"
    per_conversation = params.pretrain_coarse.samples_per_conversation
    if per_conversation is not None:
        pre += f" over {per_conversation} turns per conversation and epoch"
    return (
        f"trained on {conversations.get('train', 0):,} train conversations (validation "
        f"{conversations.get('valid', 0):,}), tested on {conversations.get('test', 0):,}; token dim "
        f"{params.model.token_dim}, KG dim {params.model.kg_dim}, {pre}, at most {params.finetune_rec.epochs} "
        "recommender epochs with early stopping on validation recall@50. The paper trained on the full ReDial "
        "train split (about 10k conversations), with token dim 300 and 12 + 13 pre-training epochs over every "
        "turn, and scored all turns: compare directions and gaps between rows, not levels."
    )


def _context_turns(
    utterances: pl.DataFrame, conv_id: int, turn_idx: int, titles: dict[str, str], turns: int = 4
) -> list[str]:
    """The last turns before a sample's turn, as "role: text" with "@123" shown as the movie's title."""
    earlier = utterances.filter((pl.col("conv_id") == conv_id) & (pl.col("turn_idx") < turn_idx)).sort("turn_idx")
    return [
        f"{role}: " + re.sub(r"@\d+", lambda m: titles.get(m.group(0), m.group(0)), text)
        for role, text in earlier.select("role", "text").tail(turns).iter_rows()
    ]


def evaluate_conversation(
    params, workspace: Path, top: dict[str, np.ndarray], log: StageLog = NO_LOG, loaded=None
) -> tuple[dict, str, str, str]:
    """Every generator on the test split's recommender turns: reports/conv.json's content, the report, the rating
    sheet and its key.

    A model's response is scored as the system says it: each movie placeholder filled with the next of its
    recommender's top items, as that movie's own "@id" token (the reference code's vocabulary has a token per
    movie), against the gold response's words with its movies as "@id" too. generator_only holds Dist-n of the
    responses with the placeholders left as they are. top: each recommender's best items per test row
    (evaluate_samples fills it).
    """
    run, _, inputs = loaded or runs.training_run(params, workspace)
    samples = pl.read_parquet(inputs["samples"])
    table = c2crs_data.sample_table(samples, pl.read_parquet(inputs["triples"]), "test")
    vocabulary = conv_train.conv_vocabulary(pl.read_parquet(inputs["vocab"]))
    data = conv_train.responses(samples, table, "test", vocabulary)
    max_tokens = params.evaluate.decoding.max_tokens
    entities = pl.read_parquet(inputs["entities"])
    linker = linking.kg_entity_linker(
        entities,
        pl.read_parquet(inputs["edges"]),
        raw.raw_files(params.data, workspace, "stopwords")["stopwords"],
        params.linking,
    )
    items = entities.filter(pl.col("is_item"))
    movie_token = dict(zip(items["entity_id"], (f"@{m}" for m in items["movie_id"])))
    movies = pl.read_parquet(workspace / STAGES["ingest"].output("movies"))
    title = {f"@{m}": f"{t} ({y})" if y else t for m, t, y in movies.select("movie_id", "title", "year").iter_rows()}

    def names_entity(words) -> bool:
        return any(w.startswith("@") or w == conv_train.PLACEHOLDER for w in words) or bool(
            linker.link(" ".join(words))
        )

    def words(tokens: list[int]) -> list[str]:
        return [vocabulary.tokens[t] for t in tokens if vocabulary.tokens[t] not in triples.SPECIAL_TOKENS]

    gold = conv_runs.gold_words(workspace, samples, table, data)
    paths = conv_runs.conv_model_files(params, workspace)
    rank = {name: i for i, name in enumerate(conv_metrics.MODEL_NAMES)}  # the paper's order; others before C2-CRS
    paths = dict(sorted(paths.items(), key=lambda item: rank.get(item[0], rank["c2crs"] - 0.5)))
    results = {"human": conv_metrics.generation_metrics(gold, None, names_entity, None)}
    train_data = conv_train.responses(samples, run.train, "train", vocabulary)
    language_model = fluency.TrigramLM(conv_runs.gold_words(workspace, samples, run.train, train_data, "train"))
    results["human"]["quality"] = conv_metrics.quality_metrics(gold, max_tokens, None, language_model)
    said, decodings = {}, {}
    reviewed = functools.cache(  # RevCore's generator reads the contexts its retrieval enriches
        lambda max_positions: baseline_models.revcore_retrieval(params, workspace, run, max_positions).augment(table)
    )
    for name, path in paths.items():
        model, config = conv_runs.load_conversation_model(path)
        model.to(run.device)
        score = hred_train.perplexity_and_responses if isinstance(model, HRED) else conv_train.perplexity_and_responses
        read = reviewed(config.encoders["max_positions"]) if config.pretrained == "revcore" else table
        decodings[name] = decoding_choice.chosen_decoding(workspace, params.evaluate.decoding, name)
        scored, responses = score(model, run, read, data, decodings[name], vocabulary.banned_ids)
        perplexity, generated = scored["perplexity"], [words(t) for t in responses]
        recommended = top[conv_runs.conv_recommender(config)]
        said[name] = [
            conv_train.fill_movies(response, [movie_token[e] for e in recommended[row]])
            for response, row in zip(generated, data.rows)
        ]
        cards = [[movie_token[e] for e in recommended[row][: conv_metrics.CARDS]] for row in data.rows]
        results[name] = {
            **conv_metrics.generation_metrics(said[name], gold, names_entity, perplexity),
            "generator_only": {f"dist@{n}": conv_metrics.distinct(generated, n) for n in conv_metrics.DIST_NS},
            "quality": conv_metrics.quality_metrics(said[name], max_tokens, cards, language_model),
        }
        log.epoch(0, {f"conv.{name}": {k: v for k, v in results[name].items() if not isinstance(v, dict)}})
        logger.info("conversation %s: %s", name, results[name])

    readable = _responses_to_read(params, workspace, samples, table, data, gold, said, title)
    protocol = _conversation_protocol(data, table, decodings)
    report = conv_metrics.conversation_report(results, protocol, readable, list(paths))
    sheet, key = conv_metrics.rating_sheet(readable, list(paths), params.seed)
    return results, report, sheet, key


def _responses_to_read(params, workspace: Path, samples, table, data, gold, said: dict, title: dict) -> list[dict]:
    """A seeded sample of test contexts with the gold response and every generator's, movies shown as titles."""
    picked = np.sort(
        np.random.default_rng(params.seed).choice(
            len(data), min(params.evaluate.samples_for_reading, len(data)), replace=False
        )
    )

    def shown(response: list[str]) -> str:
        return " ".join(title.get(w, w) for w in response)

    utterances = pl.read_parquet(workspace / STAGES["ingest"].output("utterances"))
    turn_of = dict(zip(samples["sample_id"], zip(samples["conv_id"], samples["turn_idx"])))
    readable = [
        {
            "sample_id": int(table.sample_ids[data.rows[i]]),
            "context": _context_turns(utterances, *turn_of[int(table.sample_ids[data.rows[i]])], title),
            "gold": shown(gold[i]),
            "responses": {name: shown(responses[i]) for name, responses in said.items()},
        }
        for i in picked.tolist()
    ]
    return readable


def _conversation_protocol(data, table, decodings: dict) -> str:
    """The protocol line of reports/conv.md: the turns, and the decoding setting of each generator."""
    settings = "; ".join(
        f"{conv_metrics.MODEL_NAMES.get(name, name)}: "
        + decoding_choice.describe({key: getattr(d, key) for key in decoding_choice.CHOSEN_KEYS}, d.beam_size)
        for name, d in decodings.items()
    )
    max_tokens = next(iter(decodings.values())).max_tokens if decodings else 0
    return (
        f"the {len(data):,} recommender turns of the test split that have a response (every such turn of "
        f"the {len(set(table.conv_ids[data.rows].tolist())):,} test conversations); each generator decoded "
        f"with the setting choose_decoding chose for it on validation (reports/decoding.md), at most {max_tokens} "
        f"tokens ({settings}); each movie "
        "placeholder filled with the next of the model's recommender's top items, every movie one word "
        "(its id), as the reference code's vocabulary has it; the gold responses likewise; perplexity of "
        "the gold responses under each model (movies as the placeholder). Definitions in "
        "stages/evaluation/conv_metrics.py."
    )


# What metrics/rec.json and metrics/conv.json hold, flat, so `dvc metrics show/diff` stays readable in a terminal;
# every protocol, interval and comparison is in reports/rec.json and reports/conv.json (and the MLflow runs).
REC_HEADLINE = ("all_turns.recall@10", "all_turns.recall@50")
CONV_HEADLINE = ("bleu@2", "dist@2.corpus", "perplexity")


def headline(results: dict, keys: tuple[str, ...]) -> dict[str, float]:
    """{"<model>.<key>": value} for each model and each dotted key it has."""
    flat = {}
    for model, values in results.items():
        for key in keys:
            try:
                value = params_value(values, key)
            except (KeyError, TypeError):  # a model without it (the human responses have no perplexity)
                continue
            if isinstance(value, (int, float)):
                flat[f"{model}.{key}"] = value
    return flat


def recall_at_k_plot(results: dict, protocol: str = "all_turns") -> list[dict]:
    """The DVC plot of recall@k (k = 1..50) under a protocol: one row per k, one column per model."""
    curves = {
        model: by_protocol[protocol]["recall_curve"]
        for model, by_protocol in results.items()
        if by_protocol.get(protocol, {}).get("recall_curve")
    }
    longest = max((len(curve) for curve in curves.values()), default=0)
    return [
        {"k": k + 1, **{model: curve[k] for model, curve in curves.items() if k < len(curve)}} for k in range(longest)
    ]


def distinct_plot(conversation: dict) -> list[dict]:
    """The DVC plot of Dist-2/3/4 (corpus level) per generator and the human responses: one row per model."""
    return [
        {"model": model, **{f"dist@{n}": values[f"dist@{n}"]["corpus"] for n in conv_metrics.DIST_NS}}
        for model, values in conversation.items()
    ]


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    """Test-split metrics (the test split is read here and by simulate only): recommendation in both protocols with
    95 % intervals, and conversation (generation metrics, responses to read, a rating sheet)."""
    spec = STAGES["evaluate"]
    inputs = {Path(d).name: workspace / d for d in spec.deps}
    samples = pl.read_parquet(workspace / runs.TRAINING_INPUTS["samples"])
    loaded = runs.training_run(params, workspace)  # read once for both tasks
    # the recommenders whose movies the generators name
    top = dict.fromkeys([*conv_runs.CONV_RECOMMENDER.values(), conv_runs.HRED_RECOMMENDER])
    results = evaluate_samples(
        params,
        workspace,
        samples,
        pl.read_parquet(workspace / runs.TRAINING_INPUTS["triples"]),
        "test",
        log,
        loaded,
        top=top,
    )
    for model, standard in evaluate_standard(params, workspace, loaded).items():
        results[model].update(standard)
    report = rec_metrics.recommendation_report(results, _setting(params, samples)) + "\n".join(
        [
            "",
            "## The standardized protocol (Kostric and Balog)",
            "",
            "standard_full / standard_dedup (stages/evaluation/standard_protocol.py): every recommender message that "
            "names a movie and has context, on the raw test messages (not merged turns); dedup keeps only the movies "
            "no earlier message named. Nothing masked.",
            "",
            standard_protocol.peer_table(results),
            "Dialogue level (their Table 4): SR, the share of test dialogues where the top-1 item of some instance is "
            "one of its targets that the seeker liked or saw (the seeker's form); RDL, a dialogue's rewards (1 liked, "
            "0.5 seen) over its number of messages, averaged over dialogues.",
            "",
            standard_protocol.peer_dialogue_table(results),
        ]
    )
    conversation, conv_report, sheet, key = evaluate_conversation(params, workspace, top, log, loaded)
    rec_metrics_path, conv_metrics_path = workspace / spec.metric("rec"), workspace / spec.metric("conv")
    out = {Path(r).name: workspace / r for r in spec.reports}
    write_outputs(
        {
            rec_metrics_path: headline(results, REC_HEADLINE),
            conv_metrics_path: headline(conversation, CONV_HEADLINE),
            out["rec.json"]: results,
            out["conv.json"]: conversation,
            out["rec.md"]: report,
            out["conv.md"]: conv_report,
            out["conv_rating.csv"]: sheet,
            out["conv_rating_key.csv"]: key,
            out["recall_at_k.json"]: recall_at_k_plot(results),
            out["distinct.json"]: distinct_plot(conversation),
        }
    )
    rule = params.evaluate.champion
    for name, file in model_files(params, workspace).items():
        if name != rec_metrics.REPEAT_CHOICE:  # C2-CRS's own model, re-ranked: nothing of its own to register
            log.evaluated(
                registered_name(name, "recommender"), file, results[name], rule.recommender, rule.min_improvement
            )
    for name, file in conv_runs.conv_model_files(params, workspace).items():
        log.evaluated(
            registered_name(name, "generator"), file, conversation[name], rule.generator, rule.min_improvement
        )
    return StageOutcome(inputs, {"rec": results, "conv": conversation})


def _linking(params, workspace: Path):
    """The triples stage's linker, vocabulary and movie -> item entity map, for conversations read here."""
    entities = pl.read_parquet(workspace / runs.TRAINING_INPUTS["entities"])
    items = entities.filter(pl.col("is_item"))
    stopwords = raw.raw_files(params.data, workspace, "stopwords")["stopwords"]
    linker = linking.kg_entity_linker(
        entities, pl.read_parquet(workspace / runs.TRAINING_INPUTS["edges"]), stopwords, params.linking
    )
    return (
        linker,
        pl.read_parquet(workspace / runs.TRAINING_INPUTS["vocab"]),
        dict(zip(items["movie_id"], items["entity_id"])),
    )


def evaluate_standard(params, workspace: Path, loaded=None, skip: frozenset[str] = frozenset()) -> dict:
    """Every model under Kostric and Balog's standard_full and standard_dedup (stages/evaluation/standard_protocol.py),
    on the raw test file's recommender messages: {model: {protocol: metrics}}."""
    linker, vocabulary, item_entity = _linking(params, workspace)
    test_file = ingest.redial_raw_files(params.data, workspace).redial_test
    samples, rows, history = standard_protocol.instances(
        test_file,
        linker,
        vocabulary,
        item_entity,
        params.triples.context_max_tokens,
        params.triples.response_max_tokens,
    )
    top = dict.fromkeys(set(model_files(params, workspace)) | set(rec_metrics.NAIVE_MODELS))
    by_rows = evaluate_samples(
        params,
        workspace,
        samples,
        pl.DataFrame(schema=triples.TRIPLE_SCHEMA),
        "test",
        loaded=loaded,
        skip=skip,
        top=top,
        rows=rows,
        history=history,
    )
    rewards, lengths = standard_protocol.seeker_rewards(test_file, item_entity)
    sample_ids = samples.sort("sample_id")["sample_id"].to_list()  # the order evaluate scores them in
    results = {}
    for model in by_rows:
        top1 = dict(zip(sample_ids, top[model][:, 0].tolist()))
        results[model] = {}
        for name, mask in standard_protocol.PROTOCOLS.items():
            dialogue = standard_protocol.dialogue_measures(
                rows.filter(pl.Series(rec_metrics.protocol_rows(rows, mask))),
                top1,
                rewards,
                lengths,
                params.evaluate.bootstrap_resamples,
                params.seed,
            )
            metrics = by_rows[model][mask]
            results[model][name] = {**metrics, **dialogue, "ci95": {**metrics["ci95"], **dialogue["ci95"]}}
    return results


def score_file(
    params, workspace: Path, path: Path, names: list[str] | None = None, files: dict[str, Path] | None = None
) -> dict:
    """The trained models on conversations a user brings (ReDial JSONL), with the pipeline's own rules: merged
    turns, the kg stage's entities and linker, the triples stage's vocabulary; every conversation is scored.

    Scores the models whose files exist (of `names`, when given; the naive scorers always), read from `files`
    (default: the workspace's, model_files), and says in "missing" which are not there and which stage makes each."""
    files = files or model_files(params, workspace)
    unknown = sorted(set(names or ()) - set(files) - set(rec_metrics.NAIVE_MODELS))
    if unknown:
        raise ValueError(
            f"unknown model(s) {', '.join(unknown)}; the trained ones are {', '.join(files)} "
            f"(and the naive {', '.join(rec_metrics.NAIVE_MODELS)})"
        )
    wanted = set(names) if names else set(files)
    missing = {
        name: f"{file.relative_to(workspace)} (made by stage {stage_making(str(file.relative_to(workspace)))})"
        for name, file in files.items()
        if name in wanted and not file.is_file()
    }
    skip = frozenset(set(files) - wanted | set(missing))
    bad = ingest.BadRecords(params.ingest.on_bad_record)
    conversations, utterance_rows, form_rows = ingest.read_conversations(Path(path), "test", bad, {})
    if not conversations:
        raise ValueError(f"{path}: no conversation could be read")
    utterances = (
        pl.DataFrame(utterance_rows, schema=ingest.UTTERANCE_SCHEMA)
        .join(pl.DataFrame(conversations, schema=ingest.CONVERSATION_SCHEMA).select("conv_id", "split"), on="conv_id")
        .sort("conv_id", "turn_idx")
    )
    linker, vocabulary, item_entity = _linking(params, workspace)
    linked = triples.link_all(utterances, linker, item_entity)
    samples, _ = triples.build_samples(
        utterances,
        linked,
        vocabulary,
        item_entity,
        params.triples.context_max_tokens,
        params.triples.response_max_tokens,
    )
    no_triples = pl.DataFrame(schema=triples.TRIPLE_SCHEMA)
    return {
        "conversations": len(conversations),
        "bad_records": dict(bad.counts),
        "missing": missing,
        "results": evaluate_samples(
            params,
            workspace,
            samples,
            no_triples,
            "test",
            skip=skip,
            files=files,
            forms=pl.DataFrame(form_rows, schema=ingest.FORM_SCHEMA),
        ),
    }
