"""Benchmark: wall time and peak memory of each data stage (ingest, reviews, kg, triples) on the data mirror.

Why: this tells how long each stage takes and how much memory it needs on its own, without Prefect or MLflow
(bench/overhead.py measures what those add). Each stage is run by calling its run() (stages/<stage>.py)
with the values of params.yaml: the body reads its inputs, runs the stage and writes its outputs, so the outputs in
data/ and metrics/ are rewritten with the same content `python -m pipeline run <stage>` writes. The stages run in
stage order (dvc.yaml, read by stages/io/graph.py), because each reads what the earlier ones wrote to data/.

Each stage and repeat runs in a fresh interpreter, so the peak RSS is that stage's alone and not what earlier
stages or repeats left behind. Memory is read from /proc/self/status: VmRSS after the imports, and VmHWM (the
high-water mark) after the stage. getrusage()'s ru_maxrss is not used: on Linux a child started with vfork/exec
inherits the parent's peak. Throughput comes from the metrics the body returns (StageOutcome.metrics), at the
median wall time.

A separate line measures the entity linker alone (stages.linking), which the kg and triples stages both use:
the build is stages.text.linking.kg_entity_linker, as the triples stage calls it (labels of the non-item entities of
data/kg/entities.parquet, degrees from data/kg/edges.parquet, settings from params.yaml's linking section; the
label preparation counts as build), then EntityLinker.link over every utterance of data/ingest/utterances.parquet.
It needs the outputs of ingest and kg.

    C2CRS_DATA_DIR=/work/shared/data .venv/bin/python bench/stages.py [--stages ingest kg linker ...] [--repeats N]

Prints a table and writes bench/results/stages.json.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for common, also when run with runpy
# common puts the project root first on sys.path and takes bench/ off it: bench/stages.py would shadow stages/.
from common import ROOT, proc_status_mib, require_data_dir, write_results  # noqa: E402

from stages.io.graph import STAGES, stage_names  # noqa: E402  (plain dataclasses: imports nothing heavy)

LINKER = "linker"  # the extra line: the entity linker alone
LINKER_DEPS = ("data/ingest/utterances.parquet", "data/kg/entities.parquet", "data/kg/edges.parquet")
CHILD_TIMEOUT_SECONDS = 1800


def throughput_count(stage: str, metrics: dict) -> tuple[int, str]:
    """The amount of work a stage did, read from the metrics its body returns, and its unit."""
    if stage == "ingest":
        return sum(metrics[split]["conversations"] for split in ("train", "valid", "test")), "conversations"
    if stage == "reviews":
        return sum(metrics["reviews"].values()), "reviews"
    if stage == "kg":
        return metrics["triples_input"], "input triples"
    if stage == "triples":
        return sum(metrics["samples"].values()), "samples"
    raise ValueError(f"no throughput figure for stage {stage!r}")


# --- in the child process -------------------------------------------------------------------------------------


def measure_stage(stage: str) -> dict:
    """One repeat of one stage: import, then time its body (which reads its inputs and writes its outputs)."""
    import pipeline  # noqa: F401  (first: sets the environment the libraries read at import)
    from pipeline.config import load_params
    from stages.io.graph import stage_body

    params = load_params(ROOT / "params.yaml")
    rss_after_imports = proc_status_mib("VmRSS")

    start = time.perf_counter()
    outcome = stage_body(stage)(params, ROOT)
    wall = time.perf_counter() - start

    count, unit = throughput_count(stage, outcome.metrics)
    return {
        "wall_seconds": wall,
        "rss_after_imports_mib": rss_after_imports,
        "peak_rss_mib": proc_status_mib("VmHWM"),
        "count": count,
        "unit": unit,
        "orchestration_imported": sorted({"prefect", "mlflow"} & set(sys.modules)),  # expected: none
    }


def measure_linker() -> dict:
    """One repeat of the linker alone: build it as the triples stage does, then link every utterance."""
    import polars as pl

    import pipeline  # noqa: F401
    from pipeline.config import load_params
    from stages.text.linking import kg_entity_linker

    params = load_params(ROOT / "params.yaml")
    rss_after_imports = proc_status_mib("VmRSS")

    # The triples stage's linker inputs (stages/triples.py, run); reading them is not timed as build.
    start = time.perf_counter()
    entities = pl.read_parquet(ROOT / "data/kg/entities.parquet")
    edges = pl.read_parquet(ROOT / "data/kg/edges.parquet")
    stopwords_path = require_data_dir().expanduser().resolve() / params.data.files.stopwords
    texts = pl.read_parquet(ROOT / "data/ingest/utterances.parquet")["text"].to_list()
    prepare = time.perf_counter() - start

    # The build as the triples stage does it, label preparation and stopword reading included.
    start = time.perf_counter()
    linker = kg_entity_linker(entities, edges, stopwords_path, params.linking)
    build = time.perf_counter() - start

    start = time.perf_counter()
    mentions = sum(len(linker.link(text)) for text in texts)
    link = time.perf_counter() - start

    return {
        "wall_seconds": build + link,
        "prepare_seconds": prepare,
        "build_seconds": build,
        "link_seconds": link,
        "rss_after_imports_mib": rss_after_imports,
        "peak_rss_mib": proc_status_mib("VmHWM"),
        "labels": linker.stats.entities,
        "mentions": mentions,
        "count": len(texts),
        "unit": "utterances",
    }


# --- in the parent process ------------------------------------------------------------------------------------


def run_repeat(stage: str) -> dict:
    """Start a fresh interpreter measuring one stage and read its JSON line from stdout."""
    child = subprocess.run(
        [sys.executable, __file__, "--child", stage],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=CHILD_TIMEOUT_SECONDS,
    )
    if child.returncode != 0:
        sys.exit(f"error: the {stage} child process failed (exit {child.returncode}):\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    walls = [run["wall_seconds"] for run in runs]
    median = statistics.median(walls)
    summary = {
        "wall_seconds_min": min(walls),
        "wall_seconds_median": median,
        "rss_after_imports_mib": statistics.median(run["rss_after_imports_mib"] for run in runs),
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        "stage_rss_increment_mib": max(run["peak_rss_mib"] - run["rss_after_imports_mib"] for run in runs),
        "count": runs[0]["count"],
        "unit": runs[0]["unit"],
    }
    if "link_seconds" in runs[0]:  # the linker: utterances/s over the linking pass only, not the build
        summary["build_seconds_median"] = statistics.median(run["build_seconds"] for run in runs)
        summary["link_seconds_median"] = statistics.median(run["link_seconds"] for run in runs)
        summary["per_second"] = summary["count"] / summary["link_seconds_median"]
    else:
        summary["per_second"] = summary["count"] / median
    return summary


def print_table(summaries: dict[str, dict], repeats: int) -> None:
    print(f"\nwall seconds over {repeats} fresh-process repeat(s); memory in MiB; throughput at the median time")
    print(
        f"{'stage':<8}  {'wall min':>8}  {'median':>7}  {'RSS after imports':>17}  {'peak RSS':>8}  "
        f"{'increment':>9}  throughput"
    )
    for stage, s in summaries.items():
        rate = f"{s['per_second']:>9,.0f} {s['unit']}/s ({s['count']:,} {s['unit']})"
        if stage == LINKER:
            rate += f"; build {s['build_seconds_median']:.2f} s + link {s['link_seconds_median']:.2f} s"
        print(
            f"{stage:<8}  {s['wall_seconds_min']:>8.2f}  {s['wall_seconds_median']:>7.2f}  "
            f"{s['rss_after_imports_mib']:>17.0f}  {s['peak_rss_mib']:>8.0f}  {s['stage_rss_increment_mib']:>9.0f}  "
            f"{rate}"
        )
    if LINKER in summaries:
        print(
            f"\n{LINKER}: EntityLinker.build + link over data/ingest/utterances.parquet with the triples stage's "
            f"labels; utterances/s counts the linking pass only"
        )


def main() -> int:
    data_stages = stage_names()[: stage_names().index("triples") + 1]  # the training stages: bench/train.py
    choices = [*data_stages, LINKER]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=choices,
        default=choices,
        metavar="STAGE",
        help=f"what to measure, run in this order whatever the order given: {' '.join(choices)} (default all)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="fresh-process repeats per stage (default 2)")
    parser.add_argument("--child", choices=choices, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure_linker() if args.child == LINKER else measure_stage(args.child)))
        return 0

    data_dir = require_data_dir()
    if args.repeats < 1:
        sys.exit("error: --repeats must be at least 1")
    selected = [name for name in choices if name in args.stages]

    # Inputs that no selected stage produces must already be in data/ (from an earlier run).
    produced: set[str] = set()
    for name in selected:
        deps = LINKER_DEPS if name == LINKER else STAGES[name].deps
        missing = [dep for dep in deps if dep not in produced and not (ROOT / dep).is_file()]
        if missing:
            sys.exit(f"error: {name} needs {', '.join(missing)}; run the earlier stages first (or include them)")
        produced.update(() if name == LINKER else STAGES[name].outs)

    print(f"{' '.join(selected)} on {data_dir}: {args.repeats} repeat(s) each, every one in a fresh interpreter")
    runs: dict[str, list[dict]] = {}
    for name in selected:
        runs[name] = []
        for i in range(1, args.repeats + 1):
            run = run_repeat(name)
            runs[name].append(run)
            print(
                f"  {name} repeat {i}: {run['wall_seconds']:.2f} s, peak RSS {run['peak_rss_mib']:.0f} MiB", flush=True
            )
    summaries = {name: summarize(stage_runs) for name, stage_runs in runs.items()}
    print_table(summaries, args.repeats)

    write_results("stages", {"data_dir": str(data_dir), "repeats": args.repeats, "runs": runs, "summary": summaries})
    return 0


if __name__ == "__main__":
    sys.exit(main())
