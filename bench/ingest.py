"""Benchmark: wall time and peak memory of the ingest stage on the data mirror.

Why: ingest is the first stage of every run; this tells how long it takes and how much memory it needs on its
own, without Prefect or MLflow (bench/overhead.py measures those). It calls the stage's plain functions
(stages.ingest.locate_mirror_files + stages.ingest.ingest) with the values of params.yaml; outputs are not written.

Each repeat runs in a fresh interpreter, so the peak RSS is this stage's alone and not what earlier repeats left
behind. Memory is read from /proc/self/status: VmRSS after the imports, and VmHWM (the high-water mark) after the
stage. getrusage()'s ru_maxrss is not used: on Linux a child started with vfork/exec inherits the parent's peak.

    C2CRS_DATA_DIR=/work/shared/data .venv/bin/python bench/ingest.py [--repeats N]

Prints a table and writes bench/results/ingest.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "ingest.json"
DATA_DIR_ENV = "C2CRS_DATA_DIR"  # the same name as pipeline.config.DATA_DIR_ENV
MIB = 1024 * 1024


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_once() -> dict:
    """One repeat, run in its own interpreter (--child): import, then time the stage's plain functions."""
    sys.path.insert(0, str(ROOT))
    import pipeline  # noqa: F401  (first: sets the environment the libraries read at import)
    from pipeline.config import load_params
    from stages import ingest

    params = load_params(ROOT / "params.yaml")
    mirror = Path(os.environ[DATA_DIR_ENV]).expanduser().resolve()  # C2CRS_DATA_DIR wins over data.mirror_dir
    rss_after_imports = proc_status_bytes("VmRSS")

    start = time.perf_counter()
    files = ingest.locate_mirror_files(mirror, **params.data.files.model_dump())
    result = ingest.ingest(files, seed=params.seed, **params.ingest.model_dump())
    wall = time.perf_counter() - start

    return {
        "wall_seconds": wall,
        "rss_after_imports_mib": rss_after_imports / MIB,
        "peak_rss_mib": proc_status_bytes("VmHWM") / MIB,
        "conversations": result.conversations.height,
        "utterances": result.utterances.height,
        "movies": result.movies.height,
    }


def run_repeat() -> dict:
    """Start a fresh interpreter running measure_once() and read its JSON line from stdout."""
    child = subprocess.run([sys.executable, __file__, "--child"], cwd=ROOT, capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"the ingest child process failed (exit {child.returncode}):\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    walls = [run["wall_seconds"] for run in runs]
    median = statistics.median(walls)
    conversations = runs[0]["conversations"]
    return {
        "wall_seconds_min": min(walls),
        "wall_seconds_median": median,
        "rss_after_imports_mib": statistics.median(run["rss_after_imports_mib"] for run in runs),
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        "stage_rss_increment_mib": max(run["peak_rss_mib"] - run["rss_after_imports_mib"] for run in runs),
        "conversations": conversations,
        "conversations_per_second": conversations / median,
    }


def print_table(runs: list[dict], summary: dict) -> None:
    print(f"{'repeat':>6}  {'wall s':>7}  {'RSS after imports MiB':>21}  {'peak RSS MiB':>12}  {'conv/s':>8}")
    for i, run in enumerate(runs, start=1):
        print(f"{i:>6}  {run['wall_seconds']:>7.2f}  {run['rss_after_imports_mib']:>21.0f}  "
              f"{run['peak_rss_mib']:>12.0f}  {run['conversations'] / run['wall_seconds']:>8.0f}")
    print()
    print(f"wall time:          min {summary['wall_seconds_min']:.2f} s, median {summary['wall_seconds_median']:.2f} s")
    print(f"peak RSS:           {summary['peak_rss_mib']:.0f} MiB "
          f"(interpreter after imports {summary['rss_after_imports_mib']:.0f} MiB, "
          f"stage increment {summary['stage_rss_increment_mib']:.0f} MiB)")
    print(f"throughput:         {summary['conversations_per_second']:.0f} conversations/s "
          f"({summary['conversations']} conversations, at the median time)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process repeats (default 3)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure_once()))
        return 0

    data_dir = os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        sys.exit(f"error: {DATA_DIR_ENV} is not set; point it at the data mirror, e.g. {DATA_DIR_ENV}=/work/shared/data")
    if not Path(data_dir).is_dir():
        sys.exit(f"error: {DATA_DIR_ENV}={data_dir} is not a directory")
    if args.repeats < 1:
        sys.exit("error: --repeats must be at least 1")

    print(f"ingest on {data_dir}: {args.repeats} repeat(s), each in a fresh interpreter")
    runs = [run_repeat() for _ in range(args.repeats)]
    summary = summarize(runs)
    print_table(runs, summary)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "ingest",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data_dir": data_dir,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
        "runs": runs,
        "summary": summary,
    }, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
