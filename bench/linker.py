"""Benchmark: entity linker build time, throughput and agreement with CRSLab's annotations, on the data mirror.

Why: the triples stage links every ReDial utterance; this tells how long building the automaton over the 57k
non-movie DBpedia labels takes, how many utterances per second linking sustains, and how the filter settings trade
precision against recall. Labels, degrees and stopwords come from the mirror's CRSLab/KGSF files
(stages.linking.mirror_linker_inputs); the throughput text is the raw message text of redial/test_data.jsonl.

The evaluation scores against DBpedia Spotlight's output as kept by KGSF/CRSLab (see evaluate_linker): about half of
the gold URIs are outside the KG, so recall is bounded near 0.45 and F1 is a consistency check, not accuracy.

    C2CRS_DATA_DIR=/work/shared/data .venv/bin/python bench/linker.py [--repeats N] [--sweep]

Prints a table and writes bench/results/linker.json.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for common, also when run with runpy
from common import require_data_dir, write_results  # noqa: E402  (puts the project root on sys.path)

from stages.text.linking import EntityLinker, evaluate_linker, mirror_linker_inputs  # noqa: E402

# Settings compared by --sweep: each changes one build() argument from the defaults.
SWEEP = {
    "defaults": {},
    "no label variants": {"use_variants": False},
    "no chat stopwords": {"add_chat_stopwords": False},
    "no qualifier filter": {"kept_qualifiers": None},
    "keep all-stopword labels": {"skip_all_stopword_labels": False},
    "min_label_chars=2": {"min_label_chars": 2},
    "min_label_chars=4": {"min_label_chars": 4},
    "dominance_ratio=1.5": {"dominance_ratio": 1.5},
    "dominance_ratio=2": {"dominance_ratio": 2.0},
    "dominance_ratio=5": {"dominance_ratio": 5.0},
    "no degrees (shared labels never link)": {"degree": None},
}


def read_utterances(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                texts += [str(message["text"]) for message in json.loads(line)["messages"]]
            except (ValueError, KeyError, TypeError) as exc:
                sys.exit(f"error: {path}, line {line_no}: expected a ReDial record with messages[].text: {exc}")
    return texts


def evaluate(inputs, data_dir: Path, overrides: dict) -> tuple[dict, float, EntityLinker]:
    kwargs = {"degree": inputs.degree, **overrides}
    start = time.perf_counter()
    linker = EntityLinker.build(inputs.labels, inputs.stopwords, **kwargs)
    build = time.perf_counter() - start
    result = evaluate_linker(
        linker, data_dir / "crslab_redial" / "valid_data.json", inputs.uri_to_entity_id, inputs.movie_uris
    )
    return result, build, linker


def print_summary(summary: dict, evaluations: dict, repeats: int) -> None:
    """The timings, then the linker's precision and recall against CRSLab's annotations per setting."""
    print(f"labels: {summary['labels']:,} non-movie entities -> {summary['surfaces']:,} surfaces in the automaton")
    print(
        f"inputs: {summary['input_load_seconds']:.2f} s to read; automaton build "
        f"{summary['build_seconds_median']:.2f} s "
        f"(median of {repeats})"
    )
    print(
        f"linking: {summary['utterances']:,} raw test-split messages, {summary['mentions']:,} mentions, "
        f"{summary['link_seconds_median']:.2f} s median -> "
        f"{summary['utterances_per_second']:,.0f} utterances/s"
    )
    print()
    print(
        f"{'setting (against CRSLab valid_data.json)':<40}  {'P':>6}  {'R':>6}  {'F1':>6}  {'R map':>6}  "
        f"{'F1 map':>6}  {'macroF1':>7}  {'pred':>5}  {'TP':>5}"
    )
    for name, r in evaluations.items():
        c = r["counts"]
        print(
            f"{name:<40}  {r['precision']:>6.3f}  {r['recall']:>6.3f}  {r['f1']:>6.3f}  {r['recall_mapped']:>6.3f}  "
            f"{r['f1_mapped']:>6.3f}  {r['macro_f1']:>7.3f}  {c['predicted']:>5}  {c['true_positives']:>5}"
        )
    c = evaluations["defaults"]["counts"]
    print(
        f"\ngold: {c['gold']} entity annotations in {c['utterances']:,} utterances, {c['gold_unmapped']} outside the "
        f"KG (recall bound {evaluations['defaults']['recall_bound']:.3f}); 'map' columns score the mapped gold only"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the utterances (default 3)")
    parser.add_argument("--sweep", action="store_true", help="also evaluate the filter settings in SWEEP")
    args = parser.parse_args()

    data_dir = require_data_dir()
    if args.repeats < 1:
        sys.exit("error: --repeats must be at least 1")
    mirror = data_dir.expanduser().resolve()

    start = time.perf_counter()
    inputs = mirror_linker_inputs(mirror)
    load_seconds = time.perf_counter() - start
    builds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        linker = EntityLinker.build(inputs.labels, inputs.stopwords, degree=inputs.degree)
        builds.append(time.perf_counter() - start)

    texts = read_utterances(mirror / "redial" / "test_data.jsonl")
    passes, mentions = [], 0
    for _ in range(args.repeats):
        start = time.perf_counter()
        mentions = sum(len(linker.link(text)) for text in texts)
        passes.append(time.perf_counter() - start)
    link_seconds = statistics.median(passes)

    settings = {name: overrides for name, overrides in SWEEP.items() if args.sweep or name == "defaults"}
    evaluations = {}
    for name, overrides in settings.items():
        result, _, _ = evaluate(inputs, mirror, overrides)
        evaluations[name] = result

    summary = {
        "labels": len(inputs.labels),
        "surfaces": linker.stats.surfaces,
        "build_stats": linker.stats.as_dict(),
        "input_load_seconds": load_seconds,
        "build_seconds_median": statistics.median(builds),
        "utterances": len(texts),
        "mentions": mentions,
        "link_seconds_median": link_seconds,
        "utterances_per_second": len(texts) / link_seconds,
    }
    print_summary(summary, evaluations, args.repeats)

    write_results(
        "linker",
        {
            "data_dir": str(data_dir),
            "repeats": args.repeats,
            "build_seconds": builds,
            "link_seconds": passes,
            "summary": summary,
            "evaluation": evaluations,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
