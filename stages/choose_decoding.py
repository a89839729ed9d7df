"""Stage choose_decoding: one decoding setting per generator, chosen on validation by one rule, for evaluate.

Every generator that evaluate scores (conv_runs.conv_model_files) answers a seeded sample of choose_decoding.valid_turns
validation recommender turns under every setting of choose_decoding.grid (greedy or beam, n-gram blocking, the
repetition penalty, the ban on the previous token; models/decoding.py) and under evaluate.decoding's own setting,
the reference ("before"). Each setting is scored with the measures of Table 2 and its quality columns: BLEU-2,
Dist-2, the shares of responses with a word repeated in a row, a bigram or trigram twice, at the length cap, and the
fluency model's perplexity (stages/evaluation/conv_metrics.py, fluency.py). The rule that picks one setting per
generator is stages/evaluation/decoding_choice.py's (its docstring; it was written before any result was seen).
The test split is never read.

Movies: a generated movie placeholder and a gold movie are both the k-th movie of their response ("@1", "@2", ...),
so the choice depends on no recommender (the fill is the same under every setting: each placeholder gets the next
of the recommender's distinct top items, so it never makes a word repeat; repeats_unfilled in the report counts
the placeholders as one word, for comparison).

Why the generators repeat a word: the report's causes section decodes evaluate.decoding's setting
without n-gram blocking (the decoder alone) and, for a generator with a copy path, with its copy path off
(the vocabulary softmax alone), and gives each one's share of responses with a word repeated in a row.
"""

import dataclasses
import re
from pathlib import Path

import numpy as np
import polars as pl

from models.hred import HRED
from stages import triples
from stages.evaluation import conv_metrics, decoding_choice, fluency
from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.stage_log import NO_LOG, StageLog, StageOutcome
from stages.training import baseline_models, conv_runs, conv_train, runs

_MOVIE = re.compile(r"^@\d+$")


def numbered_movies(words: list[str]) -> list[str]:
    """The response with its k-th movie (a placeholder, or an "@id" of a gold response) as "@k"."""
    out, k = [], 0
    for word in words:
        if word == conv_train.PLACEHOLDER or _MOVIE.match(word):
            k += 1
            out.append(f"@{k}")
        else:
            out.append(word)
    return out


def setting_metrics(said: list[list[str]], gold: list[list[str]], max_tokens: int, language_model) -> dict:
    """BLEU-2, Dist-2 (corpus) and quality_metrics' shares of responses as words (movies numbered)."""
    quality = conv_metrics.quality_metrics(said, max_tokens, None, language_model)
    return {
        "bleu@2": conv_metrics.bleu(said, gold, 2),
        "dist@2": conv_metrics.distinct(said, 2)["corpus"],
        "avg_len": float(np.mean([len(r) for r in said])) if said else 0.0,
        **{key: value for key, value in quality.items() if key != "names_movie"},
    }


def _metric_name(setting: dict) -> str:
    """A setting as an MLflow metric name allows (no commas): greedy_block3_penalty1.2_ban."""
    return f"{setting['method']}_block{setting['block_ngram']}_penalty{setting['repetition_penalty']:g}" + (
        "_ban" if setting["block_repeat_word"] else ""
    )


def _turn_copy_off(model) -> bool:
    """Switch the generator's copy path off (its next-token distribution: the vocabulary softmax alone); False if it
    has none. The model is this stage's own copy, read from its file for this stage only."""
    if isinstance(model, HRED) or not model.generator.cfg.copy:
        return False
    model.generator.cfg = dataclasses.replace(model.generator.cfg, copy=False)
    return True


def score_generator(params, context: dict, name: str, path: Path, log: StageLog) -> dict:
    """Every setting's metrics for one generator, the rule's choice, and the causes measurements."""
    run, table, rows, vocabulary = context["run"], context["table"], context["rows"], context["vocabulary"]
    default, max_tokens = params.evaluate.decoding, params.evaluate.decoding.max_tokens
    model, config = conv_runs.load_conversation_model(path)
    model.to(run.device)
    if config.pretrained == "revcore":  # RevCore's generator reads the contexts its retrieval enriches
        table = baseline_models.revcore_retrieval(params, context["workspace"], run, config.encoders["max_positions"])
        table = table.augment(context["table"])

    def words(tokens: list[int]) -> list[str]:
        return [vocabulary.tokens[t] for t in tokens if vocabulary.tokens[t] not in triples.SPECIAL_TOKENS]

    results = []
    for setting in context["settings"]:
        said = [
            words(t)
            for t in conv_runs.generate(
                model, run, table, rows, decoding_choice.with_setting(default, setting), context["banned"]
            )
        ]
        metrics = setting_metrics([numbered_movies(r) for r in said], context["gold"], max_tokens, context["lm"])
        metrics["repeat_in_a_row_unfilled"] = conv_metrics.quality_metrics(said, max_tokens, None)["repeat_in_a_row"]
        metrics["qualifies"] = decoding_choice.qualifies(metrics, context["gold_metrics"])
        results.append({"setting": setting, "metrics": metrics})
        log.epoch(0, {f"{name}.{_metric_name(setting)}.bleu@2": metrics["bleu@2"]})
    chosen = decoding_choice.pick(results, context["gold_metrics"])
    reference = {key: getattr(default, key) for key in decoding_choice.CHOSEN_KEYS}
    causes = {}
    if _turn_copy_off(model):
        said = [words(t) for t in conv_runs.generate(model, run, table, rows, default, context["banned"])]
        causes["reference_copy_off"] = conv_metrics.quality_metrics(
            [numbered_movies(r) for r in said], max_tokens, None
        )["repeat_in_a_row"]
    return {
        "chosen": chosen["setting"],
        "chosen_metrics": chosen["metrics"],
        "reference_metrics": next(r["metrics"] for r in results if r["setting"] == reference),
        "causes": causes,
        "settings": results,
    }


def _context(params, workspace: Path) -> dict:
    """What every generator's scoring shares: the validation sample, its gold responses, the fluency model."""
    run, _, inputs = runs.training_run(params, workspace)
    samples = pl.read_parquet(inputs["samples"])
    vocabulary = conv_train.conv_vocabulary(pl.read_parquet(inputs["vocab"]))
    data = conv_train.responses(samples, run.valid, "valid", vocabulary)
    count = min(params.choose_decoding.valid_turns, len(data))
    picked = np.sort(np.random.default_rng(params.seed).choice(len(data), count, replace=False))
    gold = [numbered_movies(words) for words in conv_runs.gold_words(workspace, samples, run.valid, data, "valid")]
    gold = [gold[i] for i in picked.tolist()]
    train_data = conv_train.responses(samples, run.train, "train", vocabulary)
    language_model = fluency.TrigramLM(conv_runs.gold_words(workspace, samples, run.train, train_data, "train"))
    default = params.evaluate.decoding
    return {
        "workspace": workspace,
        "run": run,
        "table": run.valid,
        "rows": data.rows[picked],
        "vocabulary": vocabulary,
        "banned": vocabulary.banned_ids,
        "gold": gold,
        "lm": language_model,
        "gold_metrics": {**setting_metrics(gold, gold, default.max_tokens, language_model), "bleu@2": None},
        "settings": decoding_choice.grid_settings(params.choose_decoding.grid.model_dump(), default.model_dump()),
    }


def report(params, context: dict, generators: dict) -> dict:
    """reports/decoding.json: the rule, the grid, the gold responses' measures and every generator's settings."""
    return {
        "rule": decoding_choice.__doc__.split("The rule, fixed before any result was looked at:")[1].strip(),
        "valid_turns": len(context["rows"]),
        "grid": params.choose_decoding.grid.model_dump(),
        "reference": {key: getattr(params.evaluate.decoding, key) for key in decoding_choice.CHOSEN_KEYS},
        "fixed": {key: getattr(params.evaluate.decoding, key) for key in ("beam_size", "max_tokens", "length_penalty")},
        "gold": context["gold_metrics"],
        "generators": generators,
    }


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    spec = STAGES["choose_decoding"]
    context = _context(params, workspace)
    paths = conv_runs.conv_model_files(params, workspace)
    generators = {name: score_generator(params, context, name, path, log) for name, path in paths.items()}
    content = report(params, context, generators)
    metrics = {"valid_turns": len(context["rows"]), "settings": len(context["settings"])}
    for name, result in generators.items():
        metrics |= {f"{name}.{key}": result["chosen_metrics"][key] for key in ("bleu@2", "repeat_in_a_row")}
    write_outputs(
        {
            workspace / spec.report("decoding.json"): content,
            workspace / spec.report("decoding.md"): decoding_choice.markdown(content),
            workspace / spec.metrics_file: metrics,
        }
    )
    return StageOutcome({Path(d).name: workspace / d for d in spec.deps}, metrics)
