"""Measures of simulated conversations (stages/simulate.py) and their report.

A simulation of one recommender gives ranks [conversations, T]: where the seeker's target stood in the system's
top items at each of its T turns (1 = first; 0 = not among them). The seeker accepts at the first turn whose top k
holds the target, and never stops early, so every k is read from the same ranks:
- success@k: the share of conversations where the target was among the top k at some turn (within T turns);
- mean turns to success@k: over the conversations with a success, the turn of the first one (1 = the system's
  answer to the opening);
- success by turn: success within t turns, t = 1..T (cumulative); recall@k by turn: the share whose target is among
  the top k at turn t itself (movies the conversation named are not recommended again, so a target the system
  named at one turn is not among its next turn's items).
Intervals: 95 % percentile bootstrap over conversations (one simulated conversation per test conversation); the same
resamples for every model, which makes C2-CRS minus KBRD-style paired.
"""

import numpy as np

from stages.evaluation.rec_metrics import percentiles, resample_weights

LEVEL = 0.95
ALL_HINTS = "all kinds in turn"  # the main setting's name (stages/simulate.py): every recommender, every kind of hint


def first_success(ranks: np.ndarray, k: int) -> np.ndarray:
    """The turn (1..T) of each conversation's first success at k; 0 where none."""
    hits = (ranks >= 1) & (ranks <= k)
    return np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)


def _interval(stats: np.ndarray) -> list[float | None]:
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return [None, None]
    low, high = percentiles(stats, LEVEL)
    return [float(low), float(high)]


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def measures(ranks: np.ndarray, ks: list[int], n_resamples: int, seed: int) -> dict:
    """success@k, mean turns to success@k (each with its interval), success by turn and recall@k by turn."""
    n, turns = ranks.shape
    weights = resample_weights(n, n_resamples, seed)
    out = {}
    for k in ks:
        first = first_success(ranks, k)
        hit = (first > 0).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            turns_stats = (weights @ (first * hit)) / (weights @ hit)
        out[f"success@{k}"] = {"value": float(hit.mean()), "ci95": _interval(weights @ hit / n)}
        out[f"mean_turns@{k}"] = {"value": _mean_or_none(first[first > 0]), "ci95": _interval(turns_stats)}
        out[f"success_by_turn@{k}"] = [float(((first > 0) & (first <= t)).mean()) for t in range(1, turns + 1)]
        out[f"recall_by_turn@{k}"] = [float(((ranks[:, t] >= 1) & (ranks[:, t] <= k)).mean()) for t in range(turns)]
    return out


def paired_difference(ranks_a: np.ndarray, ranks_b: np.ndarray, ks: list[int], n_resamples: int, seed: int) -> dict:
    """success@k of model a minus model b on the same seekers, with its paired bootstrap interval."""
    if ranks_a.shape != ranks_b.shape:
        raise ValueError(f"paired ranks must have one shape, got {ranks_a.shape} and {ranks_b.shape}")
    n = ranks_a.shape[0]
    weights = resample_weights(n, n_resamples, seed)
    out = {}
    for k in ks:
        difference = (first_success(ranks_a, k) > 0).astype(np.float64) - (first_success(ranks_b, k) > 0)
        out[f"success@{k}"] = {"difference": float(difference.mean()), "ci95": _interval(weights @ difference / n)}
    return out


def _cell(entry: dict) -> str:
    value, (low, high) = entry["value"], entry["ci95"]
    if value is None:
        return "-"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if low is not None else f"{value:.3f}"


def main_table(results: dict, ks: list[int], labels: dict[str, str]) -> str:
    """One row per model: success@k with intervals, mean turns to success at the largest k, recall by turn."""
    top = max(ks)
    turns = len(next(iter(results.values()))[f"recall_by_turn@{top}"])
    header = [
        "model",
        *(f"success@{k}" for k in ks),
        f"mean turns to success@{top}",
        *(f"recall@{top} turn {t}" for t in range(1, turns + 1)),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, values in results.items():
        cells = [labels.get(model, model), *(_cell(values[f"success@{k}"]) for k in ks)]
        cells.append(_cell(values[f"mean_turns@{top}"]))
        cells += [f"{r:.3f}" for r in values[f"recall_by_turn@{top}"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sensitivity_table(settings: dict, ks: list[int], labels: dict[str, str]) -> str:
    """success@k of each model under each hint setting (the hint rules' weight)."""
    header = ["hints", "model", *(f"success@{k}" for k in ks)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    everywhere = set.intersection(*(set(results) for results in settings.values()))  # the sensitivity models
    for setting, results in settings.items():
        for model, values in ((m, v) for m, v in results.items() if m in everywhere):
            cells = [setting, labels.get(model, model), *(_cell(values[f"success@{k}"]) for k in ks)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_table(paired: dict, ks: list[int]) -> str:
    """C2-CRS minus KBRD-style, success@k, per hint setting."""
    header = ["hints", *(f"success@{k}" for k in ks)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, differences in paired.items():
        cells = [setting]
        for k in ks:
            entry = differences[f"success@{k}"]
            low, high = entry["ci95"]
            cells.append(f"{entry['difference']:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def transcripts_markdown(transcripts: list[dict]) -> str:
    """Simulated conversations to read: the hidden target, each message, the system's top items per turn."""
    parts = []
    for number, transcript in enumerate(transcripts, 1):
        lines = [f"**{number}. Test conversation {transcript['conv_id']}**, target: {transcript['target']}", ""]
        for message in transcript["messages"]:
            line = f"- {message['role']}: {message['text']}"
            if message.get("top"):
                found = f" (target at {message['rank']})" if message.get("rank") else ""
                line += f"  \n  top {len(message['top'])}: {'; '.join(message['top'])}{found}"
            lines.append(line)
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def report_markdown(report: dict) -> str:
    """reports/simulate.md from reports/simulate.json's content (stages/simulate.py)."""
    return (
        "# Simulated conversations\n\n"
        + protocol_paragraph(report)
        + "\n## Every recommender (hints: all kinds in turn)\n\n"
        + results_tables(report)
        + "\n## Transcripts (C2-CRS; hints: all kinds in turn)\n\n"
        + transcripts_markdown(report["transcripts"])
    )


def protocol_paragraph(report: dict) -> str:
    """What was simulated: how many seekers of how many test conversations, T, k, the hints."""
    protocol = report["protocol"]
    left = "; ".join(f"{reason}: {n:,}" for reason, n in protocol["left_out"].items() if n)
    return (
        f"{protocol['size']:,} simulated seekers, a seeded sample of the {protocol['with_target']:,} test "
        f"conversations (of {protocol['test_conversations']:,}) that have a target ({left or 'none left out'}); "
        f"{protocol['turns']} system turns each; the seeker accepts at k = {', '.join(map(str, protocol['ks']))}; "
        f"hints in turn: {', '.join(protocol['hint_kinds'])}. Rules: stages/chat/seeker.py; measures: "
        "stages/evaluation/simulation_metrics.py. 95 % bootstrap intervals over the simulated conversations.\n"
    )


def in_order(results: dict, models: list[str]) -> dict:
    """A mapping with its keys in the given order, those it has (the report JSON keeps no order)."""
    return {model: results[model] for model in models if model in results}


def results_tables(report: dict) -> str:
    """The main table, C2-CRS minus KBRD-style per hint setting, and the sensitivity table."""
    ks, labels, models = report["protocol"]["ks"], report["labels"], report["protocol"]["models"]
    order = report["protocol"]["settings"]
    settings = {setting: in_order(report["settings"][setting], models) for setting in order}
    paired = in_order(report["paired"]["by_setting"], order)
    main = order[0]
    first, second = (labels.get(m, m) for m in report["paired"]["models"])
    return (
        main_table(settings[main], ks, labels)
        + f"\n{first} minus {second}, success@k, paired over the same seekers:\n\n"
        + paired_table(paired, ks)
        + '\nHow much the hints matter: the same seekers with no hints (the seeker says "Anything else?") and with '
        "one kind of hint only:\n\n" + sensitivity_table(settings, ks, labels)
    )
