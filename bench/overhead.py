"""Benchmark: what Prefect + MLflow add to a stage, against calling the stage's functions directly.

Why: every stage runs as a Prefect flow with an MLflow run; the target is at most 3 s of overhead per stage when a
Prefect server is running (as under `python -m pipeline repro`). Three variants of the ingest stage, each a fresh
process whose whole wall time is measured (interpreter start, imports, the stage's work, the writing of outputs):

  a. direct     `python -c ...`: load params, call the stage functions, write outputs with
                stages.io.outputs.write_outputs
                (the same work as the flow, without Prefect or MLflow);
  b. ephemeral  `python -m pipeline run ingest` with PREFECT_API_URL unset: Prefect starts a temporary server in
                the process (the first run also creates Prefect's database);
  c. server     `python -m pipeline run ingest` against a Prefect server started here and stopped at the end; the
                time the server takes to become healthy is reported but not counted.
  d. in-process one warm process against the same server: the stage body alone, then as a flow with its MLflow
                run, alternately. This is what orchestration costs a stage once the imports are paid, as in
                `python -m pipeline run all`; a - c differ mostly by importing Prefect and MLflow (about 3 s here).

Overhead = flow time - direct time (median of the direct runs). The flow runs log into a temporary MLflow store
and a temporary PREFECT_HOME, so the project's own stores are not touched; the stage outputs still land in
data/ingest/ and metrics/ingest.json, as with `python -m pipeline run ingest` (same content).

    C2CRS_DATA_DIR=/work/shared/data .venv/bin/python bench/overhead.py [--repeats N]

Prints a table and writes bench/results/overhead.json.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for common, also when run with runpy
from common import ROOT, require_data_dir, write_results  # noqa: E402  (puts the project root on sys.path)

import pipeline  # noqa: E402,F401  (sets DO_NOT_TRACK etc. in os.environ; the subprocesses inherit them)
from pipeline import servers  # noqa: E402

STAGE = "ingest"
TARGET_SECONDS = 3.0
RUN_TIMEOUT_SECONDS = 900

# Variant a: the stage body, which is the flow minus Prefect and MLflow (neither is imported).
DIRECT_INGEST = """
from pathlib import Path
import pipeline
from pipeline.config import load_params
from stages.ingest import run as ingest_stage
ingest_stage(load_params(Path.cwd() / "params.yaml"), Path.cwd())
"""
# Variant d: one warm process (imports done, stores open): the stage body alone, then the same body as a flow.
IN_PROCESS = """
import json, sys, time
from pathlib import Path
import pipeline
from pipeline.config import load_params
from pipeline.flows import run_stage_flow
from stages.ingest import run as ingest_stage
params_file = Path.cwd() / "params.yaml"
run_stage_flow("ingest", str(params_file))  # warm-up: flow engine, MLflow store, caches
timings = {"direct": [], "flow": []}
for _ in range(int(sys.argv[1])):
    start = time.perf_counter(); ingest_stage(load_params(params_file), Path.cwd())
    timings["direct"].append(time.perf_counter() - start)
    start = time.perf_counter(); run_stage_flow("ingest", str(params_file))
    timings["flow"].append(time.perf_counter() - start)
print("TIMINGS " + json.dumps(timings))
"""
DIRECT_COMMAND = [sys.executable, "-c", DIRECT_INGEST]
FLOW_COMMAND = [sys.executable, "-m", "pipeline", "run", STAGE]


def timed_run(command: list[str], env: dict, log_path: Path) -> float:
    """Run one command from the project root; return its wall time. On failure, show the log's tail and stop."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=RUN_TIMEOUT_SECONDS,
        )
    wall = time.perf_counter() - start
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        sys.exit(f"error: {' '.join(command[:4])} ... exited with {process.returncode}; log {log_path}:\n{tail}")
    return wall


def run_variant(name: str, command: list[str], env: dict, repeats: int, logs: Path) -> list[float]:
    walls = []
    for i in range(1, repeats + 1):
        wall = timed_run(command, env, logs / f"{name}-{i}.log")
        print(f"  {name} run {i}: {wall:.2f} s", flush=True)
        walls.append(wall)
    return walls


def measure_in_process(env: dict, repeats: int, logs: Path) -> dict[str, list[float]]:
    log_path = logs / "in-process.log"
    with open(log_path, "w") as log:
        done = subprocess.run(
            [sys.executable, "-c", IN_PROCESS, str(repeats)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            timeout=RUN_TIMEOUT_SECONDS,
        )
    if done.returncode != 0:
        sys.exit(f"error: in-process measurement exited with {done.returncode}; log {log_path}")
    timings = json.loads(done.stdout.split("TIMINGS ", 1)[1])
    for direct, flow in zip(timings["direct"], timings["flow"]):
        print(f"  direct {direct:.2f} s, flow {flow:.2f} s (+{flow - direct:.2f})", flush=True)
    return timings


def create_mlflow_store(tracking_uri: str, artifacts: Path) -> None:
    """Create the temporary store and the project's experiment with artifacts beside it, not in mlartifacts/."""
    import logging

    from mlflow.tracking import MlflowClient

    from pipeline.tracking import EXPERIMENT

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not "Creating initial MLflow database tables..."
    MlflowClient(tracking_uri=tracking_uri).create_experiment(EXPERIMENT, artifact_location=artifacts.as_uri())


def print_table(walls: dict[str, list[float]], direct: float, server_startup: float, target_met: bool) -> None:
    labels = {
        "direct": "a. direct (no Prefect, no MLflow)",
        "ephemeral": "b. flow, ephemeral Prefect",
        "server": "c. flow, Prefect server running",
    }
    print(f"\nstage {STAGE}: whole-process wall time, seconds (overhead vs the direct median in brackets)")
    print(f"{'variant':<36}  {'runs':<36}  {'median':>7}  {'overhead':>8}")
    for name, runs in walls.items():
        median = statistics.median(runs)
        if name == "direct":
            cells, overhead = [f"{w:.2f}" for w in runs], "-"
        else:
            cells, overhead = [f"{w:.2f} (+{w - direct:.2f})" for w in runs], f"+{median - direct:.2f}"
        print(f"{labels[name]:<36}  {'  '.join(cells):<36}  {median:>7.2f}  {overhead:>8}")
    print(f"\nPrefect server healthy after {server_startup:.2f} s (not counted in c)")
    verdict = "met" if target_met else "NOT met"
    print(
        f"target: overhead <= {TARGET_SECONDS:.0f} s per stage with a server running: {verdict} "
        f"(c median overhead {statistics.median(walls['server']) - direct:+.2f} s)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant (default 2)")
    args = parser.parse_args()

    data_dir = require_data_dir()
    if args.repeats < 1:
        sys.exit("error: --repeats must be at least 1")

    # Temporary stores. They go into os.environ itself, because the Prefect server started below (with
    # pipeline.servers) inherits this process's environment, and it must use the same temporary PREFECT_HOME.
    tmp = Path(tempfile.mkdtemp(prefix="c2crs-bench-overhead-"))
    logs = tmp / "logs"
    logs.mkdir()
    overrides = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlruns.db", "PREFECT_HOME": str(tmp / "prefect")}
    os.environ.update(overrides)
    os.environ.pop("PREFECT_API_URL", None)  # b is the ephemeral mode; c sets it per run
    print(f"temporary stores and run logs in {tmp}", flush=True)

    start = time.perf_counter()
    create_mlflow_store(overrides["MLFLOW_TRACKING_URI"], tmp / "mlartifacts")
    mlflow_setup_seconds = time.perf_counter() - start

    walls: dict[str, list[float]] = {}
    print("a. direct", flush=True)
    walls["direct"] = run_variant("direct", DIRECT_COMMAND, dict(os.environ), args.repeats, logs)
    print("b. flow, ephemeral Prefect (PREFECT_API_URL unset)", flush=True)
    walls["ephemeral"] = run_variant("ephemeral", FLOW_COMMAND, dict(os.environ), args.repeats, logs)

    print("c. flow, Prefect server: starting the server", flush=True)
    start = time.perf_counter()
    server = servers.start_prefect(servers.free_port())
    try:
        server.wait_until_healthy()
        server_startup = time.perf_counter() - start
        print(f"  server {server.url} healthy after {server_startup:.2f} s", flush=True)
        env = dict(os.environ, PREFECT_API_URL=f"{server.url}/api")
        walls["server"] = run_variant("server", FLOW_COMMAND, env, args.repeats, logs)
        print("d. in one warm process, with the server", flush=True)
        in_process = measure_in_process(env, args.repeats, logs)
    finally:
        server.stop()

    direct = statistics.median(walls["direct"])
    overhead = {name: [w - direct for w in walls[name]] for name in ("ephemeral", "server")}
    server_overhead = statistics.median(overhead["server"])
    target_met = server_overhead <= TARGET_SECONDS
    in_process_overhead = statistics.median(f - d for d, f in zip(in_process["direct"], in_process["flow"]))
    print_table(walls, direct, server_startup, target_met)
    print(
        f"in one warm process: flow overhead {in_process_overhead:+.2f} s per stage (median), "
        f"stage body {statistics.median(in_process['direct']):.2f} s"
    )

    write_results(
        "overhead",
        {
            "stage": STAGE,
            "data_dir": str(data_dir),
            "repeats": args.repeats,
            "wall_seconds": walls,
            "direct_median_seconds": direct,
            "overhead_seconds": overhead,
            "overhead_median_seconds": {name: statistics.median(runs) for name, runs in overhead.items()},
            "prefect_server_startup_seconds": server_startup,
            "mlflow_import_and_store_creation_seconds": mlflow_setup_seconds,
            "in_process_seconds": in_process,
            "in_process_overhead_median_seconds": in_process_overhead,
            "target_overhead_seconds": TARGET_SECONDS,
            "target_met_with_server": target_met,
        },
    )

    shutil.rmtree(tmp)  # kept when a run fails (sys.exit above), for its logs
    return 0


if __name__ == "__main__":
    sys.exit(main())
