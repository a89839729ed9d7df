"""The result tables of the README and docs/, written from the committed reports by `python -m pipeline report`
(pipeline/report.py), never by hand: each is a function of the reports' JSON, named by the block it fills.
"""

import json
from collections.abc import Callable
from pathlib import Path

from stages.evaluation import (
    conv_metrics,
    decoding_choice,
    rec_metrics,
    simulation_metrics,
    standard_protocol,
    study_markdown,
)

REC_JSON, CONV_JSON = "reports/rec.json", "reports/conv.json"
STUDY_SUMMARY = "reports/pretraining_runs/summary.json"
RELATION_NAMES_JSON = "reports/relation_names.json"
SIMULATE_JSON = "reports/simulate.json"
DECODING_JSON = decoding_choice.DECODING_JSON

REC_LABELS = {
    "popularity": "Popularity",
    "repeat": "repeat (the context's movies, most recent first)",
    "repeat_popularity": "repeat, then popularity",
    "textcnn": "TextCNN",
    "redial": "ReDial",
    "kbrd": "KBRD-style (= w/o Coarse-Fine)",
    "kecrs": "KECRS",
    "kgsf": "KGSF",
    "revcore": "RevCore",
    "c2crs": "**C2-CRS**",
    rec_metrics.REPEAT_CHOICE: "C2-CRS + learned repeat choice (beyond the paper)",
}
CONV_LABELS = {
    "transformer": "Transformer",
    "redial": "ReDial",
    "kbrd": "KBRD",
    "kgsf": "KGSF",
    "kecrs": "KECRS",
    "revcore": "RevCore",
    "c2crs": "**C2-CRS**",
    "wo_iw": "C2-CRS w/o instance weighting",
    "human": "human (the test responses)",
}


def _value(metrics: dict, key: str, interval: bool = True) -> str:
    value = metrics.get(key)
    if value is None:
        return "–"
    low, high = (metrics.get("ci95") or {}).get(key) or (None, None)
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if interval and low is not None else f"{value:.3f}"


def _rec_models(rec: dict) -> list[str]:
    ablations = sorted(m for m in rec if m.startswith(rec_metrics.ABLATION_PREFIX))
    return [m for m in REC_LABELS if m in rec] + ablations


def _rec_label(model: str) -> str:
    if model.startswith(rec_metrics.ABLATION_PREFIX):
        return "C2-CRS " + rec_metrics.PAPER_TABLE4.get(model, (model,))[0]
    return REC_LABELS[model]


def rec_table(reports: dict) -> str:
    """Table 1 (and Table 4's variants): R@1/10/50 in all turns and recommender turns, 95 % intervals, the paper's
    numbers (all turns, full ReDial) beside."""
    rec = reports[REC_JSON]
    lines = [
        "| model | all turns R@1 | R@10 | R@50 | recommender turns R@1 | R@10 | R@50 | paper R@1 / R@10 / R@50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in _rec_models(rec):
        paper = rec_metrics.PAPER_TABLE1.get(model) or rec_metrics.PAPER_TABLE4.get(model)
        cells = [
            _value(rec[model]["all_turns"], "recall@1", False),
            _value(rec[model]["all_turns"], "recall@10"),
            _value(rec[model]["all_turns"], "recall@50"),
            _value(rec[model]["recommender_turns"], "recall@1", False),
            _value(rec[model]["recommender_turns"], "recall@10"),
            _value(rec[model]["recommender_turns"], "recall@50"),
            " / ".join(f"{paper[1][k]:.3f}" for k in ("recall@1", "recall@10", "recall@50")) if paper else "–",
        ]
        lines.append(f"| {_rec_label(model)} | " + " | ".join(cells) + " |")
    n = {p: rec["c2crs"][p]["n"] for p in ("all_turns", "recommender_turns")}
    return "\n".join(lines) + (
        f"\n\nRows: {n['all_turns']} target mentions (all turns), {n['recommender_turns']} "
        f"(recommender turns); [95 % bootstrap interval over test conversations]. Paper: "
        f"{rec_metrics.PAPER_NOTE}.\n"
    )


def rec_margins(reports: dict) -> str:
    """C2-CRS minus every other model, paired on the same rows."""
    rec = reports[REC_JSON]
    lines = ["| C2-CRS minus | all turns R@10 | R@50 | recommender turns R@10 | R@50 |", "|---|---|---|---|---|"]
    for model in _rec_models(rec):
        margins = [rec["c2crs"][p].get("margin_over", {}).get(model) for p in ("all_turns", "recommender_turns")]
        if all(margins):
            cells = [_signed(m[k]) for m in margins for k in ("recall@10", "recall@50")]
            lines.append(f"| {_rec_label(model)} | " + " | ".join(cells) + " |")
    return (
        "\n".join(lines) + "\n\n[95 % paired bootstrap interval over test conversations]; better / worse: it "
        "excludes 0.\n"
    )


def _signed(difference: dict) -> str:
    low, high = difference["ci95"]
    word = "better" if low > 0 else "worse" if high < 0 else "tie"
    return f"{difference['difference']:+.3f} [{low:+.3f}, {high:+.3f}] {word}"


def conv_table(reports: dict) -> str:
    """Table 2, rebuilt: every generator's decoding (chosen on validation by choose_decoding's rule), distinct
    n-grams, BLEU and perplexity on the test responses, and the columns that degenerate text cannot raise:
    repetition, the length cap and an independent language model's perplexity (conv_metrics.quality_metrics)."""
    conv, decoding = reports[CONV_JSON], reports[DECODING_JSON]
    lines = [
        "| generator | decoding (chosen on validation) | Dist-2 | Dist-3 | Dist-4 | BLEU-1 | BLEU-2 | perplexity | "
        "mean length | word repeated in a row | a bigram twice | at the length cap | LM perplexity |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in [m for m in CONV_LABELS if m in conv]:
        m, chosen = conv[model], decoding["generators"].get(model, {}).get("chosen")
        how = decoding_choice.describe(chosen, decoding["fixed"]["beam_size"]) if chosen else "–"
        cells = [how, *(f"{m[f'dist@{n}']['corpus']:.3f}" for n in (2, 3, 4))]
        cells += [f"{m[k]:.3f}" if m.get(k) is not None else "–" for k in ("bleu@1", "bleu@2")]
        cells += [f"{m['perplexity']:.1f}" if m.get("perplexity") is not None else "–", f"{m['avg_len']:.1f}"]
        quality = m["quality"]
        cells += [f"{quality[k]:.3f}" for k in ("repeat_in_a_row", "repeat@2", "at_length_cap")]
        cells.append(f"{quality['lm_perplexity']:.1f}")
        lines.append(f"| {CONV_LABELS[model]} | " + " | ".join(cells) + " |")
    return (
        "\n".join(lines) + "\n\nDist-n: distinct n-grams over all n-grams of the generated test responses "
        "(corpus); perplexity of the gold responses under each generator; word repeated in a row, a bigram twice, at "
        "the length cap: shares of the responses; LM perplexity: of the responses under a trigram model of the train "
        "split's responses (lower: more predictable text). Decoding: one setting per generator, chosen on "
        f"{decoding['valid_turns']:,} validation turns by one rule (among the settings that repeat no more than "
        "the gold responses, the best BLEU-2).\n"
    )


DIGITS = {"bleu@2": 4, "lm_perplexity": 1}  # decoding_before_after's; the other shares: 3


def decoding_before_after(reports: dict) -> str:
    """On the validation turns choose_decoding reads: each generator under the setting evaluate used for every
    generator before (evaluate.decoding) and under its chosen one, beside the gold responses."""
    decoding = reports[DECODING_JSON]
    beam = decoding["fixed"]["beam_size"]
    keys = ("bleu@2", "dist@2", "repeat_in_a_row", "repeat@2", "at_length_cap", "lm_perplexity")
    lines = [
        "| generator | decoding | BLEU-2 | Dist-2 | word repeated in a row | a bigram twice | at the length cap | "
        "LM perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cells(metrics: dict, shown: tuple[str, ...] = keys) -> str:
        return " | ".join(f"{metrics[k]:.{DIGITS.get(k, 3)}f}" for k in shown)

    lines.append(f"| human (the validation responses) | – | – | {cells(decoding['gold'], keys[1:])} |")
    for model in [m for m in CONV_LABELS if m in decoding["generators"]]:
        result = decoding["generators"][model]
        before = decoding_choice.describe(decoding["reference"], beam)
        lines.append(f"| {CONV_LABELS[model]} | before: {before} | {cells(result['reference_metrics'])} |")
        lines.append(
            f"| {CONV_LABELS[model]} | after: {decoding_choice.describe(result['chosen'], beam)} | "
            f"{cells(result['chosen_metrics'])} |"
        )
    lines += [
        "",
        "Each generator at its most diverse among the settings that repeat no more than the gold responses (the "
        "rule's qualifying settings; Dist-2 on the same validation turns):",
        "",
        "| generator | most diverse qualifying setting | Dist-2 | BLEU-2 |",
        "|---|---|---|---|",
    ]
    for model in [m for m in CONV_LABELS if m in decoding["generators"]]:
        qualifying = [r for r in decoding["generators"][model]["settings"] if r["metrics"]["qualifies"]]
        if qualifying:
            best = max(qualifying, key=lambda r: r["metrics"]["dist@2"])
            lines.append(
                f"| {CONV_LABELS[model]} | {decoding_choice.describe(best['setting'], beam)} | "
                f"{best['metrics']['dist@2']:.3f} | {best['metrics']['bleu@2']:.4f} |"
            )
        else:
            lines.append(f"| {CONV_LABELS[model]} | none qualifies | – | – |")
    return "\n".join(lines) + f"\n\n{decoding['valid_turns']:,} validation turns (a seeded sample).\n"


def conv_quality(reports: dict) -> str:
    """Table 2's quality columns (conv_metrics.quality_metrics), and C2-CRS's Dist-2 lead over each generator set
    beside its repetition, so a reader sees whether the lead comes with more repeated words."""
    conv = reports[CONV_JSON]
    ours, lines = conv["c2crs"], []

    def minus(other: dict, key: str) -> str:
        mine, theirs = (m["dist@2"]["corpus"] if key == "dist@2" else m["quality"][key] for m in (ours, other))
        return f"{mine - theirs:+.3f}"

    for model in [m for m in CONV_LABELS if m in conv and m not in ("c2crs", "human")]:
        lines.append(
            f"- C2-CRS minus {CONV_LABELS[model]}: Dist-2 {minus(conv[model], 'dist@2')}, word repeated in a row "
            f"{minus(conv[model], 'repeat_in_a_row')}, a bigram twice {minus(conv[model], 'repeat@2')}."
        )
    table = conv_metrics.quality_table({m: conv[m] for m in CONV_LABELS if m in conv})
    return table + "\n\n" + "\n".join(lines) + "\n"


def pretraining_answer(reports: dict) -> str:
    """The pre-training study's answer, as reports/pretraining.md gives it."""
    return "\n".join(study_markdown.answer(reports[STUDY_SUMMARY])) + "\n"


def pretraining_table(reports: dict) -> str:
    """Per setting, C2-CRS minus KBRD-style with the seed-level interval, and both arms' validation R@50."""
    lines = [
        "| setting | seeds | all turns R@10 | R@50 | recommender turns R@10 | R@50 | validation R@50, C2-CRS vs "
        "KBRD-style |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, entry in study_markdown.settings_in_order(reports[STUDY_SUMMARY]):
        minus = entry["minus_kbrd"].get("c2crs")
        if not minus:
            continue
        cells = [
            study_markdown.difference(minus[p][k])
            for p in ("all_turns", "recommender_turns")
            for k in ("recall@10", "recall@50")
        ]
        valid = entry["valid_recall@50"]
        lines.append(
            f"| `{setting}` | {len(minus['seeds'])} | "
            + " | ".join(cells)
            + f" | {valid['c2crs']['mean']:.3f} vs {valid['kbrd']['mean']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def standard_tables(reports: dict) -> str:
    """Kostric and Balog's standardized protocol: our R@1/10/50 (their Table 2) and SR / RDL (their Table 4) beside
    their published rows."""
    rec = reports[REC_JSON]
    return (
        standard_protocol.peer_table(rec)
        + "\nDialogue level (their Table 4):\n\n"
        + standard_protocol.peer_dialogue_table(rec)
    )


def relation_names_table(reports: dict) -> str:
    """The relation_names stage's names with their agreement, most movie edges first; the relations that no movie
    edge could be checked for are listed after the table."""
    derived = reports[RELATION_NAMES_JSON]

    def field(row: dict) -> str:
        return f"{row['field']} ({row['direction']})" if row["agreement"] else "– (no edge agrees)"

    lines = [
        "| KG relation | movie edges | best field | edges compared | agreement | reads as (edge / inverse edge) |",
        "|---|---|---|---|---|---|",
    ]
    for row in (r for r in derived["relations"] if r["edges_compared"]):
        reads = f"**{row['name']}** / **{row['inverse_name']}**" if row["named"] else row["name"]
        lines.append(
            f"| `{row['relation']}` | {row['movie_edges']:,} | {field(row)} | "
            f"{row['edges_compared']:,} | {row['agreement']:.3f} | {reads} |"
        )
    unchecked = [f"`{r['relation']}`" for r in derived["relations"] if not r["edges_compared"]]
    named = sum(r["named"] for r in derived["relations"])
    return (
        "\n".join(lines)
        + f"\n\n{named} of {len(derived['relations'])} relations named (agreement above {derived['majority']} on at "
        f"least {derived['min_edges']} compared edges); no edge of {', '.join(unchecked) or 'none'} could be compared "
        "(no movie at either end, or no metadata list long enough): they stay related.\n"
    )


def simulation_tables(reports: dict) -> str:
    """The simulated seekers (stages/simulate.py): what was simulated, every recommender's success and turns, C2-CRS
    minus KBRD-style and the hint sensitivity."""
    report = reports[SIMULATE_JSON]
    return simulation_metrics.protocol_paragraph(report) + "\n" + simulation_metrics.results_tables(report)


SIMULATION_HEADLINE = ("popularity", "repeat_popularity", "textcnn", "kbrd", "kgsf", "c2crs", rec_metrics.REPEAT_CHOICE)


def simulation_headline(reports: dict) -> str:
    """The README's view of the simulation: the main models' success and turns, and C2-CRS minus KBRD-style."""
    report = reports[SIMULATE_JSON]
    ks, labels = report["protocol"]["ks"], report["labels"]
    main = simulation_metrics.ALL_HINTS
    shown = simulation_metrics.in_order(report["settings"][main], list(SIMULATION_HEADLINE))
    first, second = (labels.get(m, m) for m in report["paired"]["models"])
    paired = {main: report["paired"]["by_setting"][main]} if main in report["paired"]["by_setting"] else {}
    return (
        simulation_metrics.main_table(shown, ks, labels)
        + f"\n{first} minus {second} (paired):\n\n"
        + simulation_metrics.paired_table(paired, ks)
    )


def _verdict(entry: dict) -> str:
    low, high = entry["ci95"]
    return "ahead" if low > 0 else "behind" if high < 0 else "tie"


def simulation_answer(reports: dict) -> str:
    """The simulation's answer in sentences: C2-CRS against KBRD-style (the same recommender without pre-training)
    per hint setting, and the turns each needed."""
    report = reports[SIMULATE_JSON]
    ks, order = report["protocol"]["ks"], report["protocol"]["settings"]
    by_setting = report["paired"]["by_setting"]
    lines = []
    for setting in [s for s in order if s in by_setting]:
        cells = []
        for k in ks:
            entry = by_setting[setting][f"success@{k}"]
            low, high = entry["ci95"]
            cells.append(f"@{k} {entry['difference']:+.3f} [{low:+.3f}, {high:+.3f}] {_verdict(entry)}")
        lines.append(f"- hints {setting}: C2-CRS minus KBRD-style, success " + "; ".join(cells) + ".")
    main, top = report["settings"][simulation_metrics.ALL_HINTS], max(ks)
    turns = {m: main[m][f"mean_turns@{top}"]["value"] for m in ("c2crs", "kbrd") if m in main}
    if len(turns) == 2:
        lines.append(
            f"- Mean turns to success@{top} among the conversations that had one (all kinds of hints): C2-CRS "
            f"{turns['c2crs']:.2f}, KBRD-style {turns['kbrd']:.2f}."
        )
    return "\n".join(lines) + "\n"


def conversation_answer(reports: dict) -> str:
    """Whether C2-CRS's Dist-n lead survives at equal repetition, in sentences from the test responses: each
    generator's repetition against the human responses', and C2-CRS's Dist-2 against each."""
    conv = reports[CONV_JSON]
    human, ours = conv["human"]["quality"], conv["c2crs"]
    others = [m for m in CONV_LABELS if m in conv and m not in ("c2crs", "human")]
    within = [
        m for m in [*others, "c2crs"] if all(conv[m]["quality"][k] <= human[k] for k in decoding_choice.REPEAT_KEYS)
    ]
    named = ", ".join(CONV_LABELS[m] for m in within) or "none"
    mine, theirs = ours["dist@2"]["corpus"], {m: conv[m]["dist@2"]["corpus"] for m in others}
    against = [f"{CONV_LABELS[m]}'s {d:.3f} ({'above' if mine > d else 'not above'})" for m, d in theirs.items()]
    lines = [
        f"- Repeating no more than the human test responses (a word in a row at most {human['repeat_in_a_row']:.3f}, "
        f"a bigram twice at most {human['repeat@2']:.3f} of the responses): {named}.",
        f"- C2-CRS's Dist-2 {mine:.3f} against " + ", ".join(against) + ".",
    ]
    return "\n".join(lines) + "\n"


def simulation_transcripts(reports: dict) -> str:
    return simulation_metrics.transcripts_markdown(reports[SIMULATE_JSON]["transcripts"])


TABLES: dict[str, tuple[Callable[[dict], str], tuple[str, ...]]] = {
    "rec_table": (rec_table, (REC_JSON,)),
    "rec_margins": (rec_margins, (REC_JSON,)),
    "standard_tables": (standard_tables, (REC_JSON,)),
    "conv_table": (conv_table, (CONV_JSON, DECODING_JSON)),
    "decoding_before_after": (decoding_before_after, (DECODING_JSON,)),
    "conversation_answer": (conversation_answer, (CONV_JSON,)),
    "conv_quality": (conv_quality, (CONV_JSON,)),
    "pretraining_answer": (pretraining_answer, (STUDY_SUMMARY,)),
    "pretraining_table": (pretraining_table, (STUDY_SUMMARY,)),
    "relation_names_table": (relation_names_table, (RELATION_NAMES_JSON,)),
    "simulation_headline": (simulation_headline, (SIMULATE_JSON,)),
    "simulation_tables": (simulation_tables, (SIMULATE_JSON,)),
    "simulation_answer": (simulation_answer, (SIMULATE_JSON,)),
    "simulation_transcripts": (simulation_transcripts, (SIMULATE_JSON,)),
}


def read_reports(root: Path) -> dict:
    """Every report a table reads, by its path under root."""
    paths = {path for _, needs in TABLES.values() for path in needs}
    return {path: json.loads((root / path).read_text(encoding="utf-8")) for path in paths}
