"""`python -m pipeline repro`: DVC's stages, side by side where they do not depend on each other.

`dvc repro` runs one stage at a time. On a small CPU two single-threaded trainings get more done than one using both
cores (README, "Running time"), and after `triples` most stages are trainings that do not need each other (the
baselines, the ablation variants, the generators). So this runs `dvc repro --single-item STAGE` for every stage of
DVC's own graph, each starting once the stages it depends on have finished, at most `jobs` at once, each with its
share of the cores as its thread count. DVC still decides whether a stage changed and keeps the lock file and the
cache: DVC 3 holds its repository lock only while it checks and records a stage, not while the command runs.
"""

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# what `dvc repro` prints when another DVC process holds the repository lock at that moment: try again
LOCK_BUSY = "Unable to acquire lock"
UNCHANGED = "didn't change, skipping"


@dataclass
class StageResult:
    name: str
    status: str  # ran | unchanged | failed | not run (a stage it depends on failed)
    seconds: float = 0.0
    threads: int = 0
    log: Path | None = None


def dvc_stage_graph(root: Path) -> dict[str, list[str]]:
    """Every stage of the project's dvc.yaml as DVC expands it (a foreach stage once per variant), in the file's
    order, with the stages whose outputs it reads."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        stages = [stage for stage in repo.index.stages if isinstance(stage, PipelineStage)]  # not .dvc files
        return {
            stage.name: [dep.name for dep in graph.successors(stage) if isinstance(dep, PipelineStage)]
            for stage in stages
        }


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class _Running:
    process: subprocess.Popen
    started: float
    threads: int
    log: Path
    attempts: int


def run_stages(
    upstream: dict[str, list[str]],
    command: Callable[[str], list[str]],
    jobs: int,
    cwd: Path,
    env: dict[str, str],
    log_dir: Path,
    echo: Callable[[str], None] = print,
    lock_retries: int = 20,
    poll_seconds: float = 0.2,
) -> list[StageResult]:
    """Run command(stage) for every stage, in `upstream`'s order as far as the dependencies allow, `jobs` at once.

    Each stage's output goes to log_dir/<stage>.log. After a failure no new stage starts; the running ones finish.
    A stage that found DVC's lock busy starts again (up to lock_retries times). Interrupted (Ctrl-C, or SIGTERM,
    which this turns into the same), it stops the running stages with their child processes and re-raises.
    """
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, StageResult] = {}
    running: dict[str, _Running] = {}
    waiting = list(upstream)
    failed = False

    def ready() -> list[str]:
        return [
            name
            for name in waiting
            if all(results.get(dep) and results[dep].status in ("ran", "unchanged") for dep in upstream[name])
        ]

    def start(name: str, attempts: int = 1) -> None:
        can_run_now = len(running) + len(ready())  # this stage is among the ready ones
        threads = max(1, cores() // max(1, min(jobs, can_run_now)))
        log = log_dir / f"{name}.log"
        stage_env = {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with log.open("w", encoding="utf-8") as out:
            # its own process group: stopping the stage stops dvc and the stage process dvc started
            process = subprocess.Popen(
                command(name), cwd=cwd, env=stage_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        running[name] = _Running(process, time.monotonic(), threads, log, attempts)
        waiting.remove(name)
        echo(f"started  {name} ({threads} thread{'s' if threads > 1 else ''})")

    try:
        while waiting or running:
            if not failed:
                for name in ready()[: max(0, jobs - len(running))]:
                    start(name)
            if not running:  # nothing can start: the rest depend on a failed stage
                break
            time.sleep(poll_seconds)
            for name, job in list(running.items()):
                code = job.process.poll()
                if code is None:
                    continue
                del running[name]
                output = job.log.read_text(encoding="utf-8", errors="replace")
                if code != 0 and LOCK_BUSY in output and job.attempts < lock_retries:
                    waiting.insert(0, name)
                    time.sleep(1.0)
                    start(name, job.attempts + 1)
                    continue
                status = "failed" if code else ("unchanged" if UNCHANGED in output else "ran")
                seconds = time.monotonic() - job.started
                results[name] = StageResult(name, status, seconds, job.threads, job.log)
                echo(f"{status:8} {name} in {_duration(seconds)}" + (f"; its output: {job.log}" if code else ""))
                failed = failed or code != 0
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        for name, job in running.items():  # interrupted: stop what still runs, and wait until it has
            echo(f"stopping {name}")
            _stop_group(job.process)
    return [results.get(name) or StageResult(name, "not run") for name in upstream]


def _stop_group(process: subprocess.Popen, grace_seconds: float = 60.0) -> None:
    """SIGTERM to a stage's process group (dvc and the stage process it started), then wait until every process
    of the group is gone, so that the stage can still end its MLflow and Prefect runs while their servers are up;
    SIGKILL after the grace period."""
    group = process.pid
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        process.poll()  # reap dvc, the group leader, once it exits
        if not _group_alive(group):
            return
        time.sleep(0.2)
    _signal_group(group, signal.SIGKILL)
    process.wait()


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def summary(results: list[StageResult], wall_seconds: float) -> str:
    """A markdown table of what each stage did and how long it took (the README's per-stage split)."""
    lines = ["| stage | status | threads | wall time |", "|---|---|---|---|"]
    lines += [
        f"| {r.name} | {r.status} | {r.threads or ''} | {_duration(r.seconds) if r.seconds else ''} |" for r in results
    ]
    lines.append(f"| **all** (wall clock, stages side by side) | | | **{_duration(wall_seconds)}** |")
    return "\n".join(lines)
