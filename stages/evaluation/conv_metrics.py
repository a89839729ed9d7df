"""Conversation evaluation: generation metrics, the paper's Table 2 beside ours, responses to read, and the human
rating sheet with its scoring (means and inter-rater agreement).

Metric definitions (over word tokens, special tokens removed; the caller decides what a movie is: stages/evaluate.py
scores what the system says, every movie placeholder filled with a recommended movie's id token):
    dist@n corpus        distinct n-grams / all n-grams, over all responses (what the C2-CRS code computes)
    dist@n per_sentence  distinct n-grams over all responses / number of responses (KGSF's and CRSLab's)
    bleu@n               mean over responses of NLTK's sentence BLEU with all weight on n-grams of order n and the
                         gold response as the one reference (CRSLab's bleu@n); no smoothing
    perplexity           exp of the mean negative log-likelihood of the gold response's tokens (end token included)
    avg_len              mean words per response
    entity_rate          share of responses that name a movie or a KG entity (the triples linker)
"""

import csv
import io
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from stages.evaluation.fluency import TrigramLM

DIST_NS = (2, 3, 4)
PAPER_NOTE = (
    "Zhou et al., WSDM 2022, Table 2 (ReDial): Dist-n as the C2-CRS code computes it (corpus), trained on "
    "the full ReDial train split"
)
PAPER_TABLE2 = {  # Dist-2, Dist-3, Dist-4
    "Transformer": (0.067, 0.139, 0.227),
    "ReDial": (0.082, 0.143, 0.245),
    "KBRD": (0.086, 0.153, 0.265),
    "KGSF": (0.114, 0.204, 0.282),
    "KECRS": (0.040, 0.090, 0.149),
    "RevCore": (0.092, 0.163, 0.221),
    "C2-CRS": (0.163, 0.291, 0.417),
}
PAPER_TABLE3 = {  # Fluency, Informativeness (0-2, mean of three annotators)
    "Transformer": (0.97, 0.92),
    "ReDial": (1.35, 1.04),
    "KBRD": (1.23, 1.15),
    "KGSF": (1.48, 1.37),
    "KECRS": (1.39, 1.19),
    "RevCore": (1.52, 1.34),
    "C2-CRS": (1.55, 1.47),
}
MODEL_NAMES = {
    "transformer": "Transformer",
    "redial": "ReDial (HRED)",
    "kbrd": "KBRD",
    "kgsf": "KGSF",
    "kecrs": "KECRS",
    "revcore": "RevCore",
    "wo_iw": "C2-CRS w/o instance weighting",
    "c2crs": "C2-CRS",
    "human": "human (gold responses)",
}
RATING_ASPECTS = ("fluency", "informativeness")
RATING_COLUMNS = ("item", "sample_id", "context", "response", *RATING_ASPECTS)


class RatingError(ValueError):
    """A rating sheet that cannot be scored; names the file, the row and what was expected."""


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct(responses: Sequence[Sequence[str]], n: int) -> dict[str, float]:
    """dist@n under both definitions (see the module docstring)."""
    grams = [g for words in responses for g in ngrams(words, n)]
    unique = len(set(grams))
    return {
        "corpus": unique / len(grams) if grams else 0.0,
        "per_sentence": unique / len(responses) if responses else 0.0,
    }


def bleu(responses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], n: int) -> float:
    from nltk.translate.bleu_score import sentence_bleu

    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")
    weights = tuple(1.0 if k == n else 0.0 for k in range(1, 5))
    with warnings.catch_warnings():  # NLTK warns for every response without an n-gram match; that is a 0
        warnings.simplefilter("ignore")
        scores = [
            sentence_bleu([list(ref)], list(hyp), weights=weights) if hyp and ref else 0.0
            for hyp, ref in zip(responses, references)
        ]
    return float(np.mean(scores)) if scores else 0.0


def generation_metrics(
    responses: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]] | None,
    names_entity: Callable[[Sequence[str]], bool],
    perplexity: float | None,
) -> dict:
    """The reports/conv.json entry of one model (references None: no BLEU, e.g. for the gold responses)."""
    metrics: dict = {f"dist@{n}": distinct(responses, n) for n in DIST_NS}
    if references is not None:
        metrics.update({"bleu@1": bleu(responses, references, 1), "bleu@2": bleu(responses, references, 2)})
    metrics["perplexity"] = perplexity
    metrics["avg_len"] = float(np.mean([len(r) for r in responses])) if responses else 0.0
    metrics["entity_rate"] = float(np.mean([names_entity(r) for r in responses])) if responses else 0.0
    metrics["n"] = len(responses)
    return metrics


CARDS = 3  # the recommendations a reply sits beside (the chat page's cards): a reply "names a recommended movie"
# when it names one of its recommender's top CARDS items


def _repeats_ngram(words: Sequence[str], n: int) -> bool:
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)


def quality_metrics(
    responses: Sequence[Sequence[str]],
    max_tokens: int,
    recommended: Sequence[Sequence[str]] | None,
    language_model: TrigramLM | None = None,
) -> dict:
    """What degenerate text cannot raise, as shares of the responses (movies as their "@id" word):
    - repeat_in_a_row: a word right after itself ("so so"); repeat@2 / repeat@3: some bigram / trigram twice;
    - at_length_cap: as long as decoding allows (max_tokens words), so probably cut off;
    - names_movie: names any movie; names_recommended: names one of its recommender's top CARDS items
      (`recommended`, per response; None for the gold responses, which no recommender wrote);
    - lm_perplexity: the independent language model's perplexity of the responses (fluency.py), when given."""
    n = max(len(responses), 1)
    metrics = {
        "repeat_in_a_row": sum(any(a == b for a, b in zip(r, r[1:])) for r in responses) / n,
        "repeat@2": sum(_repeats_ngram(r, 2) for r in responses) / n,
        "repeat@3": sum(_repeats_ngram(r, 3) for r in responses) / n,
        "at_length_cap": sum(len(r) >= max_tokens for r in responses) / n,
        "names_movie": sum(any(w.startswith("@") for w in r) for r in responses) / n,
    }
    if recommended is not None:
        metrics["names_recommended"] = (
            sum(bool(set(r) & set(top[:CARDS])) for r, top in zip(responses, recommended)) / n
        )
    if language_model is not None:
        metrics["lm_perplexity"] = language_model.perplexity(responses)
    return metrics


def quality_table(results: dict[str, dict]) -> str:
    """Each generator's quality shares (quality_metrics) beside the gold responses'."""
    keys = ("repeat_in_a_row", "repeat@2", "repeat@3", "at_length_cap", "names_movie", "names_recommended")
    lines = [
        "| model | word repeated in a row | a bigram twice | a trigram twice | at the length cap | names a movie | "
        f"names one of its recommender's top {CARDS} | LM perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, m in results.items():
        if "quality" in m:
            lines.append(
                f"| {MODEL_NAMES.get(model, model)} | "
                + " | ".join(_number(m["quality"].get(k)) for k in keys)
                + f" | {_number(m['quality'].get('lm_perplexity'), 1)} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------- the report


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def table2(results: dict[str, dict]) -> str:
    """The paper's Table 2 rows (Dist-n, corpus) above ours (both Dist-n definitions and the other metrics)."""
    lines = [
        "| model | Dist-2 | Dist-3 | Dist-4 | Dist-2/3/4 per response | BLEU-1 | BLEU-2 | perplexity | "
        "words | entity rate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, dist in PAPER_TABLE2.items():
        lines.append(f"| paper: {name} | " + " | ".join(f"{d:.3f}" for d in dist) + " | | | | | | |")
    for model, m in results.items():
        per = "/".join(f"{m[f'dist@{n}']['per_sentence']:.2f}" for n in DIST_NS)
        lines.append(
            f"| {MODEL_NAMES.get(model, model)} | "
            + " | ".join(_number(m[f"dist@{n}"]["corpus"]) for n in DIST_NS)
            + f" | {per} | {_number(m.get('bleu@1'))} | {_number(m.get('bleu@2'))} | "
            f"{_number(m['perplexity'], 1)} | {m['avg_len']:.1f} | {m['entity_rate']:.3f} |"
        )
    return "\n".join(lines)


def generator_only_table(results: dict[str, dict]) -> str:
    """Dist-n (corpus / per response) of the responses as generated, placeholders unfilled: the generator alone."""
    lines = ["| model | Dist-2 | Dist-3 | Dist-4 |", "|---|---|---|---|"]
    for model, m in results.items():
        if "generator_only" in m:
            dist = [m["generator_only"][f"dist@{n}"] for n in DIST_NS]
            lines.append(
                f"| {MODEL_NAMES.get(model, model)} | "
                + " | ".join(f"{d['corpus']:.3f} / {d['per_sentence']:.2f}" for d in dist)
                + " |"
            )
    return "\n".join(lines)


def samples_section(samples: list[dict], models: Sequence[str]) -> str:
    """Sampled test contexts with the gold response and each model's (placeholders filled by its recommender)."""
    parts = []
    for i, sample in enumerate(samples, 1):
        lines = [f"**{i}. sample {sample['sample_id']}**", ""]
        lines += [f"> {turn}  " for turn in sample["context"]]
        lines += ["", f"- gold: {sample['gold']}"]
        lines += [f"- {MODEL_NAMES.get(m, m)}: {sample['responses'][m]}" for m in models]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def conversation_report(results: dict[str, dict], protocol: str, samples: list[dict], models: Sequence[str]) -> str:
    return (
        "\n\n".join(
            [
                "# Conversation task: automatic evaluation (the paper's Table 2) and responses to read",
                f"Protocol: {protocol}",
                f"The paper's rows: {PAPER_NOTE}. Ours: every model trained by the same code on the same splits "
                "(finetune_conv, conv_baselines); Dist-2/3/4 columns are the corpus definition, comparable with the "
                "paper's; "
                "'per response' is KGSF's and CRSLab's definition (distinct n-grams / responses). The gold row is "
                "the test "
                "set's own responses, a reference for what people write.",
                table2(results),
                "The generators alone, movie placeholders left unfilled (Dist-n corpus / per response): what the fill "
                "adds is the recommenders' variety of movies.",
                generator_only_table(results),
                "Response quality (shares of the responses, movies filled): repetition and cut-off responses raise "
                "Dist-n without being better text; 'names one of its recommender's top 3' says how often the reply "
                "talks about the cards shown beside it; 'LM perplexity' is an independent trigram model's, trained on "
                "the train split's gold responses only (stages/evaluation/fluency.py): lower is more like what people "
                "write, the gold test responses' own row the reference.",
                quality_table(results),
                "Human evaluation (the paper's Table 3: fluency / informativeness, 0-2, mean of three annotators): "
                + ", ".join(f"{k} {f:.2f} / {i:.2f}" for k, (f, i) in PAPER_TABLE3.items())
                + ". Ours is not measured: fill reports/conv_rating.csv (one copy per rater) and run "
                "`python -m pipeline rate FILLED.csv ...` for the means and Krippendorff's alpha.",
                "## Responses to read",
                "Movie placeholders are filled with the top items of each model's recommender (C2-CRS's for C2-CRS and "
                "w/o instance weighting, KGSF's for KGSF, ReDial's for ReDial, TextCNN's for the Transformer); "
                "movies are shown as "
                "titles.",
                samples_section(samples, models),
            ]
        )
        + "\n"
    )


# ---------------------------------------------------------------- the rating sheet


def rating_sheet(samples: list[dict], models: Sequence[str], seed: int) -> tuple[str, str]:
    """(the sheet, the key) as CSV text. The sheet lists each sampled context with each model's response in a
    shuffled order under an opaque item id, and empty fluency / informativeness columns; the key maps items to
    models, kept apart so that raters do not see which model wrote what."""
    rng = random.Random(seed)
    rows = [(sample, model) for sample in samples for model in models]
    order = list(range(len(rows)))
    rng.shuffle(order)
    sheet, key = io.StringIO(), io.StringIO()
    sheet_writer, key_writer = csv.writer(sheet), csv.writer(key)
    sheet_writer.writerow(RATING_COLUMNS)
    key_writer.writerow(("item", "model"))
    for item, index in enumerate(order, 1):
        sample, model = rows[index]
        sheet_writer.writerow(
            (item, sample["sample_id"], " / ".join(sample["context"]), sample["responses"][model], "", "")
        )
        key_writer.writerow((item, model))
    return sheet.getvalue(), key.getvalue()


def read_ratings(path: Path) -> dict[int, dict[str, int]]:
    """item -> {aspect: score} from one rater's filled sheet. Every score must be 0, 1 or 2."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(RATING_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise RatingError(f"{path}: missing columns {sorted(missing)}; expected {list(RATING_COLUMNS)}")
        ratings = {}
        for line, row in enumerate(reader, 2):
            scores = {}
            for aspect in RATING_ASPECTS:
                value = (row[aspect] or "").strip()
                if value not in ("0", "1", "2"):
                    raise RatingError(
                        f"{path}, line {line} (item {row['item']}): {aspect} must be 0, 1 or 2, got {value!r}"
                    )
                scores[aspect] = int(value)
            ratings[int(row["item"])] = scores
    if not ratings:
        raise RatingError(f"{path}: no rated rows")
    return ratings


def score_ratings(sheets: dict[str, dict[int, dict[str, int]]], key: dict[int, str]) -> dict:
    """Per model: each aspect's mean over raters and items; per aspect: Krippendorff's alpha (ordinal) over raters."""
    import krippendorff

    items = sorted(key)
    for name, ratings in sheets.items():
        if set(ratings) != set(items):
            raise RatingError(
                f"{name}: rates items {len(ratings)} items, the key has {len(items)}; "
                f"missing {sorted(set(items) - set(ratings))[:5]}, unknown "
                f"{sorted(set(ratings) - set(items))[:5]}"
            )
    models = sorted(set(key.values()))
    result = {"raters": len(sheets), "items": len(items), "models": {}, "agreement": {}}
    for model in models:
        mine = [i for i in items if key[i] == model]
        result["models"][model] = {
            a: float(np.mean([r[i][a] for r in sheets.values() for i in mine])) for a in RATING_ASPECTS
        }
    for aspect in RATING_ASPECTS:
        matrix = np.array([[ratings[i][aspect] for i in items] for ratings in sheets.values()], dtype=float)
        alpha = (
            krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal")
            if len(sheets) > 1 and len(np.unique(matrix)) > 1
            else None
        )
        result["agreement"][aspect] = {"krippendorff_alpha_ordinal": None if alpha is None else float(alpha)}
    return result


def read_key(path: Path) -> dict[int, str]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if set(reader.fieldnames or ()) != {"item", "model"}:
            raise RatingError(f"{path}: expected the columns item, model (reports/conv_rating_key.csv)")
        return {int(row["item"]): row["model"] for row in reader}
