"""The commands that start long-running processes: the UIs (`ui`), a Prefect worker with the stage deployments
(`worker`), and deployments on another work pool (`deploy`). pipeline/cli.py parses the arguments."""

import json
import signal
import sys
import time

from pipeline.config import ConfigError, read_yaml
from pipeline.servers import prefect_api

PREFECT_UI_PORT = 4200
MLFLOW_UI_PORT = 5000


def parse_overrides(pairs: list[str]) -> dict:
    """KEY=VALUE pairs, each VALUE read as YAML (0.001, true, [a, b]) as `dvc exp run -S` reads it."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE (finetune_rec.lr=0.0005)")
        overrides[key] = read_yaml(value)
    return overrides


def deploy_command(args) -> int:
    from pipeline.deployments import deploy

    api = prefect_api()
    if not api:
        print("error: no Prefect server: start `make ui` or set PREFECT_API_URL", file=sys.stderr)
        return 2
    job_variables = {}
    if args.job_variables:
        try:
            job_variables = json.loads(args.job_variables.read_text())
        except (OSError, ValueError) as exc:
            print(f"error: --job-variables {args.job_variables}: {exc}", file=sys.stderr)
            return 2
    names = deploy(args.pool, args.checkout, parse_overrides(args.set_params), job_variables, args.pool_type, api)
    print(f"{len(names)} deployments on work pool {args.pool!r} ({api}): {', '.join(names)}")
    print(f"run one: prefect deployment run '{names[1]}'   (or from the Prefect UI's Deployments page)")
    return 0


def worker_command(args) -> int:
    from pipeline import servers
    from pipeline.deployments import deploy
    from pipeline.study_flows import deploy_study

    api = prefect_api()
    if not api:
        print(
            "error: no Prefect server: start `make ui` (it starts a worker too) or set PREFECT_API_URL", file=sys.stderr
        )
        return 2
    names = [*deploy(args.pool, api_url=api), deploy_study(args.pool, api)]
    print(
        f"{len(names)} deployments on work pool {args.pool!r}; worker polling it (log: logs/prefect-worker.log). "
        "Ctrl-C stops it.",
        flush=True,
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    worker = servers.start_worker(args.pool, api, args.limit)
    try:
        return worker.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        worker.stop()


def ui_command(args) -> int:
    from pipeline import servers
    from pipeline.tracking import artifact_root, experiment_id, tracking_uri

    experiment_id()  # the store and its experiment exist before the UI lists them
    # Ctrl-C and `kill` both end in the cleanup below, even when started from a shell that ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = []
    try:
        started.append(servers.start_prefect(PREFECT_UI_PORT))
        started.append(servers.start_mlflow(MLFLOW_UI_PORT, tracking_uri(), artifact_root()))
        for server in started:
            server.wait_until_healthy()
        servers.record_ui_server(started[0])  # this checkout's `pipeline repro` reports to it while it runs
        print(f"Prefect UI: {started[0].url}")
        print(f"MLflow UI:  {started[1].url}")
        if not args.no_worker:
            from pipeline.deployments import LOCAL_POOL, deploy
            from pipeline.study_flows import deploy_study

            names = [
                *deploy(LOCAL_POOL, api_url=f"{started[0].url}/api"),
                deploy_study(LOCAL_POOL, f"{started[0].url}/api"),
            ]
            started.append(servers.start_worker(LOCAL_POOL, f"{started[0].url}/api"))
            print(
                f"{len(names)} deployments (every stage, and the study) on work pool {LOCAL_POOL!r}, a worker polls it "
                "(logs/prefect-worker.log): run stages from the Deployments page"
            )
        print("Ctrl-C stops them all.", flush=True)
        while all(server.process.poll() is None for server in started):
            time.sleep(1)
        print("a server exited; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping the servers")
        return 0
    finally:
        servers.forget_ui_server()
        for server in started:
            server.stop()
