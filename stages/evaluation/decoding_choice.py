"""One decoding setting per generator, chosen on validation by one rule (the choose_decoding stage applies it;
evaluate and the chat read its choice from reports/decoding.json).

The rule, fixed before any result was looked at:
- A setting qualifies when its share of responses with a word repeated in a row ("so so") and its share with a
  bigram twice are both no higher than the gold validation responses' own shares on the same turns: people repeat
  themselves that often, a generator should not repeat itself more.
- Among the qualifying settings, the highest validation BLEU-2 (the overlap with what people said on these turns,
  the measure Table 2 reports beside Dist-n; Dist-n is not chosen on, since degenerate text can raise it), BLEU-2
  compared at 4 decimals; a tie goes to the simpler setting (greedy before beam, then fewer rules on).
- If no setting qualifies, the lowest share with a word repeated in a row, then the lowest share with a bigram twice,
  then the highest BLEU-2, then the simpler setting.
"""

import itertools
import json
from pathlib import Path

CHOSEN_KEYS = ("method", "block_ngram", "repetition_penalty", "block_repeat_word")
REPEAT_KEYS = ("repeat_in_a_row", "repeat@2")  # quality_metrics' shares the rule bounds by the gold responses'
OVERLAP_KEY = "bleu@2"
BLEU_DIGITS = 4
DECODING_JSON = "reports/decoding.json"


class DecodingChoiceError(ValueError):
    """reports/decoding.json missing, or without a generator's choice, or not what choose_decoding writes."""


def simplicity(setting: dict) -> tuple:
    """Sort key, simplest first: greedy before beam, then fewer rules on, then milder values."""
    rules_on = (setting["block_ngram"] > 0) + (setting["repetition_penalty"] > 1) + setting["block_repeat_word"]
    return (
        setting["method"] == "beam",
        rules_on,
        setting["repetition_penalty"],
        setting["block_repeat_word"],
        setting["block_ngram"],
    )


def grid_settings(grid: dict, default: dict) -> list[dict]:
    """Every combination of the grid's values, and the default setting (evaluate.decoding's) if the grid lacks it;
    simplest first."""
    settings = [dict(zip(CHOSEN_KEYS, values)) for values in itertools.product(*(grid[k] for k in CHOSEN_KEYS))]
    reference = {key: default[key] for key in CHOSEN_KEYS}
    if reference not in settings:
        settings.append(reference)
    return sorted(settings, key=simplicity)


def qualifies(metrics: dict, gold: dict) -> bool:
    return all(metrics[key] <= gold[key] for key in REPEAT_KEYS)


def pick(rows: list[dict], gold: dict) -> dict:
    """The rule (module docstring) over rows {"setting": {...}, "metrics": {...}}; returns the chosen row."""
    if not rows:
        raise ValueError("no decoding setting to choose from")
    qualified = [row for row in rows if qualifies(row["metrics"], gold)]
    if qualified:
        return min(qualified, key=lambda r: (-round(r["metrics"][OVERLAP_KEY], BLEU_DIGITS), simplicity(r["setting"])))
    return min(
        rows,
        key=lambda r: (
            *(r["metrics"][key] for key in REPEAT_KEYS),
            -round(r["metrics"][OVERLAP_KEY], BLEU_DIGITS),
            simplicity(r["setting"]),
        ),
    )


def describe(setting: dict, beam_size: int) -> str:
    """A setting in words, e.g. "greedy, 3-gram blocking, repetition penalty 1.2, no word twice in a row"."""
    parts = [f"beam {beam_size}" if setting["method"] == "beam" else "greedy"]
    parts.append(f"{setting['block_ngram']}-gram blocking" if setting["block_ngram"] else "no n-gram blocking")
    if setting["repetition_penalty"] > 1:
        parts.append(f"repetition penalty {setting['repetition_penalty']:g}")
    if setting["block_repeat_word"]:
        parts.append("no word twice in a row")
    return ", ".join(parts)


def with_setting(default, setting: dict):
    """A decoding config (evaluate.decoding) with a setting's keys replaced, validated as the config is."""
    return type(default).model_validate({**default.model_dump(), **setting})


def chosen_decoding(workspace: Path, default, name: str, required: bool = True):
    """The decoding setting to decode generator `name` with: `default` (evaluate.decoding) with the chosen keys
    replaced by choose_decoding's choice for it. Without reports/decoding.json, or without `name` in it: an error
    when required (evaluate), else `default` itself (the chat on a workspace where choose_decoding has not run)."""
    path = workspace / DECODING_JSON
    if not path.is_file():
        if required:
            raise DecodingChoiceError(f"{path}: not found; run `python -m pipeline run choose_decoding` first")
        return default
    try:
        chosen = json.loads(path.read_text())["generators"][name]["chosen"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        if not required and isinstance(exc, KeyError):
            return default
        raise DecodingChoiceError(
            f"{path}: no chosen setting for generator {name!r} ({type(exc).__name__}: {exc}); run "
            "`python -m pipeline run choose_decoding`"
        ) from None
    if set(chosen) != set(CHOSEN_KEYS):
        raise DecodingChoiceError(f"{path}: {name}'s choice has keys {sorted(chosen)}, expected {list(CHOSEN_KEYS)}")
    try:
        return with_setting(default, chosen)
    except ValueError as exc:
        raise DecodingChoiceError(f"{path}: {name}'s choice is not a decoding setting: {exc}") from None


# ---------------------------------------------------------------- reports/decoding.md

COLUMNS = {  # metric -> (column, digits)
    "bleu@2": ("BLEU-2", 4),
    "dist@2": ("Dist-2", 3),
    "repeat_in_a_row": ("word repeated in a row", 3),
    "repeat@2": ("a bigram twice", 3),
    "repeat@3": ("a trigram twice", 3),
    "at_length_cap": ("at the length cap", 3),
    "lm_perplexity": ("LM perplexity", 1),
    "avg_len": ("words", 1),
}


def _cells(metrics: dict) -> str:
    return " | ".join("—" if metrics.get(k) is None else f"{metrics[k]:.{d}f}" for k, (_, d) in COLUMNS.items())


def _header(first: str) -> list[str]:
    names = [name for name, _ in COLUMNS.values()]
    return [f"| {first} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]


def markdown(report: dict) -> str:
    """reports/decoding.md from reports/decoding.json's content: the rule, before and after per generator, causes,
    and every setting tried."""
    beam = report["fixed"]["beam_size"]
    reference = describe(report["reference"], beam)
    lines = [
        "# Decoding settings chosen on validation (choose_decoding)",
        "",
        f"{report['valid_turns']:,} validation recommender turns (a seeded sample; the test split is never read); "
        f"at most {report['fixed']['max_tokens']} tokens; movies as the k-th movie of their response. Before: "
        f"evaluate.decoding's own setting ({reference}). Definitions: stages/evaluation/conv_metrics.py "
        "(quality_metrics), fluency.py (LM perplexity).",
        "",
        "The rule (stages/evaluation/decoding_choice.py):",
        "",
        report["rule"],
        "",
        "## Before and after",
        "",
        *_header("model: setting"),
        f"| gold responses | {_cells(report['gold'])} |",
    ]
    for name, result in report["generators"].items():
        lines.append(f"| {name} before: {reference} | {_cells(result['reference_metrics'])} |")
        lines.append(f"| {name} after: {describe(result['chosen'], beam)} | {_cells(result['chosen_metrics'])} |")
    lines += ["", "## Where the repeated words come from", "", *_causes(report), ""]
    for name, result in report["generators"].items():
        lines += [f"## {name}: every setting", "", *_header("setting (✓: qualifies; **chosen**)")]
        for row in result["settings"]:
            label = describe(row["setting"], beam) + (" ✓" if row["metrics"]["qualifies"] else "")
            label = f"**{label}**" if row["setting"] == result["chosen"] else label
            lines.append(f"| {label} | {_cells(row['metrics'])} |")
        lines.append("")
    return "\n".join(lines)


def _causes(report: dict) -> list[str]:
    """Shares of responses with a word repeated in a row: evaluate.decoding's setting, the same without n-gram
    blocking (the decoder alone), with the copy path off, and with the movie placeholders unfilled."""
    reference = report["reference"]
    unblocked = {**reference, "block_ngram": 0}
    lines = [
        "Share of responses with a word repeated in a row under evaluate.decoding's setting; the same without n-gram "
        "blocking; with the copy path off (generators that have one); the placeholders counted as one word "
        "(unfilled: two placeholders in a row count).",
        "",
        "| model | before | no n-gram blocking | copy path off | placeholders unfilled |",
        "|---|---|---|---|---|",
    ]
    for name, result in report["generators"].items():
        found = {json.dumps(r["setting"], sort_keys=True): r["metrics"] for r in result["settings"]}
        free = found.get(json.dumps(unblocked, sort_keys=True), {})
        copy_off = result["causes"].get("reference_copy_off")
        cells = [
            result["reference_metrics"]["repeat_in_a_row"],
            free.get("repeat_in_a_row"),
            copy_off,
            result["reference_metrics"]["repeat_in_a_row_unfilled"],
        ]
        lines.append(f"| {name} | " + " | ".join("—" if c is None else f"{c:.3f}" for c in cells) + " |")
    return lines
