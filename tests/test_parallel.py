"""`python -m pipeline repro` runs independent stages side by side: dependencies first, `jobs` at once, each with its
share of the cores, no new stage after a failure, and a stage that met DVC's busy lock tried again."""

import json
import os
import subprocess
import sys

import yaml

from pipeline.parallel import LOCK_BUSY, run_stages, summary
from tests.conftest import PROJECT

# a stage: record when it starts and ends and its thread count, then sleep; "fail" exits 1
STAGE = """
import json, os, sys, time
name, seconds = sys.argv[1], float(sys.argv[2])
record = {"name": name, "start": time.time(), "threads": os.environ["OMP_NUM_THREADS"]}
time.sleep(seconds)
record["end"] = time.time()
with open(sys.argv[3], "a") as out:
    out.write(json.dumps(record) + "\\n")
sys.exit(1 if name == "fail" else 0)
"""


def run(tmp_path, upstream, jobs=2, seconds=0.5):
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    records = tmp_path / "records.jsonl"
    results = run_stages(
        upstream,
        lambda name: [sys.executable, str(script), name, str(seconds), str(records)],
        jobs,
        tmp_path,
        dict(os.environ),
        tmp_path / "logs",
        echo=lambda line: None,
    )
    ran = {r["name"]: r for r in map(json.loads, records.read_text().splitlines())} if records.exists() else {}
    return results, ran


def test_independent_stages_overlap_and_dependents_wait(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.parallel.cores", lambda: 4)
    results, ran = run(tmp_path, {"a": [], "b": [], "c": ["a", "b"]})
    assert [r.status for r in results] == ["ran", "ran", "ran"]
    assert ran["b"]["start"] < ran["a"]["end"] and ran["a"]["start"] < ran["b"]["end"]  # side by side
    assert ran["c"]["start"] >= max(ran["a"]["end"], ran["b"]["end"])
    assert (ran["a"]["threads"], ran["b"]["threads"], ran["c"]["threads"]) == ("2", "2", "4")  # a share of 4 cores
    table = summary(results, 1.5)
    assert "| c | ran | 4 |" in table and "**all**" in table


def test_one_job_runs_one_stage_at_a_time(tmp_path):
    _, ran = run(tmp_path, {"a": [], "b": []}, jobs=1, seconds=0.2)
    assert ran["b"]["start"] >= ran["a"]["end"]


def test_after_a_failure_nothing_new_starts_and_dependents_do_not_run(tmp_path):
    results, ran = run(tmp_path, {"fail": [], "slow": [], "after": ["fail"], "later": ["slow"]}, jobs=2)
    status = {r.name: r.status for r in results}
    assert status == {"fail": "failed", "slow": "ran", "after": "not run", "later": "not run"}
    assert set(ran) == {"fail", "slow"}
    assert "its output" not in summary(results, 1.0)


def test_a_stage_that_found_the_lock_busy_runs_again(tmp_path):
    marker = tmp_path / "tried"
    script = tmp_path / "busy.py"
    script.write_text(f"""import pathlib, sys
marker = pathlib.Path({str(marker)!r})
if not marker.exists():
    marker.write_text("1")
    print("ERROR: {LOCK_BUSY}. Most likely another DVC process is running")
    sys.exit(255)
print("done")
""")
    results = run_stages(
        {"a": []},
        lambda name: [sys.executable, str(script)],
        2,
        tmp_path,
        dict(os.environ),
        tmp_path / "logs",
        echo=lambda line: None,
    )
    assert results[0].status == "ran" and (tmp_path / "logs/a.log").read_text().strip() == "done"


def test_real_dvc_stages_side_by_side_keep_one_lock_file(tmp_path):
    """Two `dvc repro --single-item` at once in one repository: both run, DVC's lock file records both, and a second
    pass finds every stage unchanged."""
    dvc = os.path.join(os.path.dirname(sys.executable), "dvc")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "params.yaml").write_text("variants: {x: {k: 1}, y: {k: 2}}\n")
    (tmp_path / "dvc.yaml").write_text(
        """stages:
  make:
    foreach: ${variants}
    do:
      cmd: python -c "import time; time.sleep(1); open('${key}.txt', 'w').write('${item.k}')"
      outs: [${key}.txt]
  join:
    cmd: cat x.txt y.txt > both.txt
    deps: [x.txt, y.txt]
    outs: [both.txt]
""".replace("outs: [${key}.txt]", "outs:\n        - ${key}.txt")
    )
    from pipeline.parallel import dvc_stage_graph

    graph = dvc_stage_graph(tmp_path)
    assert {k: set(v) for k, v in graph.items()} == {"make@x": set(), "make@y": set(), "join": {"make@x", "make@y"}}
    command = lambda name: [dvc, "repro", "--single-item", name]  # noqa: E731
    results = run_stages(graph, command, 2, tmp_path, env, tmp_path / "logs", echo=lambda line: None)
    assert [r.status for r in results] == ["ran", "ran", "ran"]
    assert (tmp_path / "both.txt").read_text() == "12"
    assert set(yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]) == {"make@x", "make@y", "join"}
    again = run_stages(graph, command, 2, tmp_path, env, tmp_path / "logs", echo=lambda line: None)
    assert [r.status for r in again] == ["unchanged"] * 3


def test_sigterm_stops_the_running_stages_and_their_children(tmp_path):
    """`pipeline repro` killed with SIGTERM leaves no stage process behind (each stage runs in its own process
    group, which the scheduler stops)."""
    import signal
    import textwrap
    import time

    runner = tmp_path / "runner.py"
    runner.write_text(
        textwrap.dedent(f"""
        import os, subprocess, sys
        sys.path.insert(0, {str(PROJECT)!r})
        from pathlib import Path
        from pipeline.parallel import run_stages
        here = Path({str(tmp_path)!r})
        # the stage starts a grandchild that needs a second to exit after SIGTERM (as a stage ending its runs)
        slow_exit = ("import signal, sys, time; "
                     "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1), sys.exit(0))); time.sleep(60)")
        child = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', %r]); "
                 "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(60)" % slow_exit)
        try:
            run_stages({{"a": []}}, lambda name: [sys.executable, "-c", child, str(here / "grandchild.pid")], 1, here,
                       dict(os.environ), here / "logs", echo=lambda line: None)
        except KeyboardInterrupt:
            gone = subprocess.run(["ps", "-p", open(here / "grandchild.pid").read()], capture_output=True).returncode
            open(here / "interrupted", "w").write(str(gone))
    """)
    )
    process = subprocess.Popen([sys.executable, str(runner)])
    pid_file = tmp_path / "grandchild.pid"
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    grandchild = int(pid_file.read_text())
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    assert (tmp_path / "interrupted").read_text() == "1"  # the grandchild had exited before the scheduler returned
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(grandchild, signal.SIGKILL)
        raise AssertionError("the stage's child process outlived the scheduler")
