"""`python -m pipeline ...`: run stages as Prefect flows, list them, run `dvc repro`, start the UIs.

Over 400 lines: one argparse tree for every command, so `--help` and the dispatch read in one place."""

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline import operate
from pipeline.config import ConfigError, load_params
from pipeline.paths import project_root
from stages.io.graph import STAGES, stage_body, stage_instances, stage_names, variants_of
from stages.io.outputs import is_main_process

MODELS_FROM_HELP = (
    "registry (default): each model's champion in the MLflow registry (models:/NAME@champion) when it "
    "was trained on the workspace's data, else the workspace's file; workspace: the DVC outputs"
)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per task."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    parser.add_argument(
        "--debug",
        action="store_true",
        default=bool(os.environ.get("C2CRS_DEBUG")),
        help="on an error, show its traceback (also: C2CRS_DEBUG=1); without, one `error:` line",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _pipeline_commands(commands)
    _model_commands(commands)
    _operating_commands(commands)
    return parser


def _pipeline_commands(commands) -> None:
    """The pipeline's own commands: run, stages, repro, report, reference, study."""
    run = commands.add_parser("run", help="run one stage, or all of them, as a Prefect flow")
    run.add_argument(
        "stage",
        help=f"one of: {', '.join(stage_names())}, all; a foreach stage's variant as "
        "STAGE@VARIANT (ablations@wo_coarse; the stage alone: every variant)",
    )
    run.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")

    commands.add_parser("stages", help="list the stages with their inputs and outputs")

    repro = commands.add_parser(
        "repro",
        help="`dvc repro` with one Prefect server and one MLflow parent run; "
        "without dvc options, independent stages run side by side",
    )
    repro.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="stages at once, each with its share of the cores (default 2; 1: plain `dvc repro`)",
    )
    repro.add_argument(
        "dvc_args",
        nargs=argparse.REMAINDER,
        help="passed to dvc repro (then stages run one at a time, as dvc repro runs them)",
    )

    commands.add_parser(
        "report",
        help="write the result tables of README.md and docs/ anew from the committed reports/ (never typed by hand)",
    )

    study = commands.add_parser(
        "study",
        help="does pre-training help? `run` trains C2-CRS and the KBRD-style "
        "model per setting and seed (resumable); `report` writes "
        "reports/pretraining.md from the finished runs",
    )
    study.add_argument("action", choices=("run", "report", "list"))
    study.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    study.add_argument("--settings", nargs="+", help="only these settings of params.study.settings")
    study.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    study.add_argument("--arms", nargs="+", help="only these arms (c2crs, kbrd, or an extension of params.study)")
    study.add_argument(
        "--workers",
        type=int,
        help="runs at once (default: params.study.workers); above 1 they are flow "
        "runs of the Prefect deployment c2crs-study/run on the local process pool",
    )
    study.add_argument(
        "--pool",
        help="only submit the runs not done as flow runs to this work pool's workers "
        "(deployed there; Prefect API: PREFECT_API_URL or `make ui`)",
    )

    reference = commands.add_parser(
        "reference", help="print the `dvc exp run` command that sets the authors' configuration (params/reference.yaml)"
    )
    reference.add_argument("--file", default="params/reference.yaml")


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _model_commands(commands) -> None:
    """Using the trained models: score, rate, talk, serve, models."""
    score = commands.add_parser("score", help="evaluate the trained recommenders on a ReDial-format JSONL file")
    score.add_argument("--data", required=True, help="conversations in ReDial's JSONL format")
    score.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    score.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="only these models (default: every trained model whose file exists, and the naive ones)",
    )
    score.add_argument("--models-from", choices=("registry", "workspace"), default="registry", help=MODELS_FROM_HELP)

    simulate = commands.add_parser(
        "simulate",
        help="simulated seekers in conversation with the workspace's trained recommenders (the simulate stage's "
        "rules, docs/simulation.md); prints the report, writes no stage output",
    )
    simulate.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    simulate.add_argument(
        "--models", nargs="+", metavar="MODEL", help="only these recommenders (default: every trained one, the naive)"
    )
    simulate.add_argument(
        "--conversations", type=_at_least_one, help="seekers (default: params simulate.conversations)"
    )
    simulate.add_argument("--turns", type=_at_least_one, help="system turns each (default: params simulate.turns)")
    simulate.add_argument("--json", help="also write the report (reports/simulate.json's shape) to this file")

    rate = commands.add_parser(
        "rate",
        help="score filled copies of reports/conv_rating.csv: each model's mean "
        "fluency and informativeness, and inter-rater agreement",
    )
    rate.add_argument("sheets", nargs="+", help="one filled rating sheet per rater (CSV)")
    rate.add_argument(
        "--key",
        default="reports/conv_rating_key.csv",
        help="which model wrote each item (default: reports/conv_rating_key.csv)",
    )

    talk = commands.add_parser("talk", help="talk with the trained C2-CRS model in the terminal")
    talk.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    talk.add_argument("--models-from", choices=("registry", "workspace"), default="registry", help=MODELS_FROM_HELP)

    serve = commands.add_parser(
        "serve",
        help="the trained C2-CRS model behind an HTTP API and a chat page (http://127.0.0.1:8000/), until Ctrl-C",
    )
    serve.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    serve.add_argument("--models-from", choices=("registry", "workspace"), default="registry", help=MODELS_FROM_HELP)
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (default: 127.0.0.1, this machine only; the API has no authentication)",
    )
    serve.add_argument("--port", type=int, default=8000, help="default: 8000")
    serve.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds a request may wait and run before it gets 503 (default: 30)",
    )

    models = commands.add_parser(
        "models",
        help="the MLflow model registry: `list` the registered models with their "
        "champion; `compare` versions side by side",
    )
    models.add_argument("action", choices=("list", "compare"))
    models.add_argument(
        "references",
        nargs="*",
        metavar="MODEL",
        help="compare: NAME (its champion, else its newest version), NAME@ALIAS or NAME/VERSION",
    )
    models.add_argument("--markdown", action="store_true", help="a markdown table (default: aligned text)")


def _operating_commands(commands) -> None:
    """The UIs and the Prefect workers: ui, worker, deploy."""
    ui = commands.add_parser(
        "ui",
        help="start the Prefect and MLflow UIs on 127.0.0.1 and a Prefect worker for "
        "the stage deployments, until Ctrl-C",
    )
    ui.add_argument("--no-worker", action="store_true", help="the UIs only: no deployments, no worker")

    worker = commands.add_parser(
        "worker",
        help="deploy every stage to a process work pool and run its worker (flow "
        "runs started in the Prefect UI run here) until Ctrl-C",
    )
    worker.add_argument("--pool", default="c2crs-local", help="work pool (default: c2crs-local; made if missing)")
    worker.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1: stages share a checkout)")

    deploy = commands.add_parser("deploy", help="register one Prefect deployment per stage and `all` on a work pool")
    deploy.add_argument("--pool", default="c2crs-local", help="work pool (default: c2crs-local)")
    deploy.add_argument(
        "--type",
        default="process",
        dest="pool_type",
        help="type of the pool when it has to be made: process (default), docker, kubernetes",
    )
    deploy.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        dest="set_params",
        help="default params overrides of the deployments, as `dvc exp run -S` (device=cuda)",
    )
    deploy.add_argument(
        "--job-variables",
        type=Path,
        help="JSON file of job variables for the pool's job template (image, volumes, GPU request: deploy/README.md)",
    )
    deploy.add_argument(
        "--checkout",
        type=Path,
        help="the project directory the runs use (default: this one; for Docker mount it at the same path)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "repro":
        args.dvc_args = unknown + args.dvc_args  # options such as -f go to dvc as they are
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    command = {
        "run": _run,
        "stages": _stages,
        "repro": _repro,
        "ui": operate.ui_command,
        "score": _score,
        "simulate": _simulate,
        "rate": _rate,
        "talk": _talk,
        "serve": _serve,
        "study": _study,
        "reference": _reference,
        "report": _report,
        "models": _models,
        "worker": operate.worker_command,
        "deploy": operate.deploy_command,
    }[args.command]
    if not args.debug:
        quiet_tracebacks()
    try:
        _settle(args)
        return command(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        expected = isinstance(exc, PROJECT_ERRORS)
        where = _data_key(exc, args) if expected else None
        print(
            f"error: {where + ': ' if where else ''}{error_message(exc)}"
            + ("" if expected else " (an unexpected error: rerun with --debug for its traceback, and report it)"),
            file=sys.stderr,
        )
        return 2 if expected else 1


# What bad input, a missing file or no network raise (every error class of ours is a ValueError): the user can fix
# these, so they get one line and exit code 2; anything else is a bug, reported as one too (exit 1, --debug).
def _project_errors() -> tuple[type[BaseException], ...]:
    import httpx

    return ValueError, OSError, httpx.HTTPError


PROJECT_ERRORS = _project_errors()


def _settle(args) -> None:
    """Before any command reads the workspace: complete the commits a killed stage left half done and remove dead
    writers' temporaries (stages/io/outputs.settle_workspace). The workspace is the params file's folder."""
    from stages.io.outputs import settle_workspace

    params_file = Path(getattr(args, "params", None) or "params.yaml").resolve()
    if params_file.is_file():
        settle_workspace(params_file.parent)


def _data_key(exc: BaseException, args) -> str | None:
    """'<params file>: data.files.X' when exc is about a raw file a params key points at (pipeline/data_errors)."""
    from pipeline.data_errors import data_key_of

    params_file = Path(getattr(args, "params", None) or "params.yaml").resolve()
    if isinstance(exc, ConfigError) or not params_file.is_file():
        return None
    try:
        params = load_params(params_file)
    except ConfigError:
        return None
    return data_key_of(exc, params, params_file)


def error_message(exc: BaseException) -> str:
    """One line for an error: the URL a download could not reach, the path an OS error is about, else the message."""
    import httpx

    if isinstance(exc, httpx.HTTPError):
        try:
            url = exc.request.url
        except RuntimeError:  # an error raised before any request was made
            url = None
        return (
            f"cannot download {url}: {type(exc).__name__}: {exc} (check the network, or use the mirror: "
            f"data.source: mirror with C2CRS_DATA_DIR)"
            if url
            else f"{type(exc).__name__}: {exc}"
        )
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = " ".join(str(exc).split()) if not isinstance(exc, ConfigError) else str(exc)
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


class _NoTraceback(logging.Filter):
    """Keeps a log record's message and drops its traceback (the CLI prints the error once, as one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def quiet_tracebacks() -> None:
    """Prefect logs a failed flow's traceback, and the stage logs its own errors: without --debug only the CLI's one
    `error:` line says what went wrong."""
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.engine", "stages", "pipeline"):
        logging.getLogger(name).addFilter(_NoTraceback())


def _run(args) -> int:
    family, _, variant = args.stage.partition("@")
    if family not in STAGES and args.stage != "all":
        print(f"error: unknown stage {args.stage!r}; choose one of: {', '.join(stage_names())}, all", file=sys.stderr)
        return 2
    params_file = Path(args.params).resolve()
    params = load_params(params_file)  # fail fast, before Prefect starts, on bad params
    if variant and not STAGES[family].foreach:
        print(f"error: {args.stage!r}: stage {family!r} has no variants", file=sys.stderr)
        return 2
    if variant and variant not in variants_of(STAGES[family], params):
        known = ", ".join(variants_of(STAGES[family], params)) or "none"
        print(
            f"error: {args.stage!r}: {params_file.name} {STAGES[family].foreach} has no {variant!r}; it has {known}",
            file=sys.stderr,
        )
        return 2
    stage_logging()

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.stage == "all":
        print("error: under torchrun, run one stage at a time (python -m pipeline run STAGE)", file=sys.stderr)
        return 2
    if not is_main_process():  # torchrun's other processes train their share; the first one tracks and writes
        for name in stage_instances(params, [family]) if args.stage == family else [args.stage]:
            stage_body(name)(params, params_file.parent)
        return 0

    from pipeline.flows import run_stage_flow
    from pipeline.tracking import interrupt_on_sigterm

    interrupt_on_sigterm()  # a stopped stage ends its MLflow run as KILLED and its Prefect flow run as crashed
    from pipeline.flows import FINISHED

    started = time.monotonic()
    try:
        metrics = run_stage_flow(args.stage, str(params_file))
    except Exception as exc:
        if args.stage not in FINISHED or not lost_connection(exc):
            raise
        # The stage's outputs are written and its MLflow run ended; only Prefect's bookkeeping failed. Failing here
        # would make DVC discard a finished stage (no dvc.lock entry) and rerun it.
        print(summary_line(args.stage, FINISHED[args.stage], time.monotonic() - started))
        print(
            f"warning: {args.stage} finished and wrote its outputs, but the Prefect API was lost "
            f"({type(exc).__name__}: {exc}); its flow run's final state is not recorded",
            file=sys.stderr,
        )
        exit_now(0)
    print(summary_line(args.stage, metrics, time.monotonic() - started))
    return 0


def lost_connection(exc: BaseException) -> bool:
    """Whether an error comes from a server that stopped answering (anywhere in its chain of causes)."""
    import httpx

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (httpx.TransportError, ConnectionError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def exit_now(code: int) -> None:
    """Leave without waiting for Prefect's background clients, which keep retrying a lost server (busy, forever)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def stage_logging() -> None:
    """Our progress (epochs, skipped records) shows in the terminal and the Prefect UI; libraries say only what
    matters (bm25s logs every index build at DEBUG, which Prefect's handler would print)."""
    for name in ("stages", "pipeline"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("bm25s").setLevel(logging.WARNING)


def summary_line(stage: str, metrics: dict, seconds: float, shown: int = 6) -> str:
    """One line for a finished stage: its time and its first few numbers; the whole set is in its metrics file and
    MLflow run (`dvc metrics show`)."""
    from pipeline.tracking import flatten

    numbers = [
        (key, value)
        for key, value in flatten(metrics).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    text = ", ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in numbers[:shown]
    )
    more = f" (+{len(numbers) - shown} more)" if len(numbers) > shown else ""
    return f"{stage}: done in {seconds:.1f} s; {text}{more}"


def _study(args) -> int:
    from pipeline import study, study_runs

    params_file = Path(args.params).resolve()
    params = load_params(params_file)
    workspace = params_file.parent
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        todo = study_runs.jobs(params, args.settings, args.seeds, args.arms)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.action == "list":
        for job in todo:
            print(
                f"{job.setting:24} seed {job.seed:<4} {job.arm:16} {'done' if job.done(params, workspace) else 'to do'}"
            )
    elif args.action == "run" and args.pool:
        return _submit_study(params, workspace, [job for job in todo if not job.done(params, workspace)], args.pool)
    elif args.action == "run":
        study.run_study(params, workspace, args.settings, args.seeds, args.workers, args.arms)
        print(study.write_report(params, workspace))
    else:
        print(study.write_report(params, workspace))
    return 0


def _submit_study(params, workspace: Path, todo: list, pool: str) -> int:
    from pipeline import study_flows
    from pipeline.servers import prefect_api

    api = prefect_api()
    if not api:
        print("error: no Prefect server: start `make ui` or set PREFECT_API_URL", file=sys.stderr)
        return 2
    deployment = study_flows.deploy_study(pool, api)
    ids = study_flows.submit(todo, workspace, 1, api)
    print(
        f"{len(ids)} flow runs of {deployment} submitted to work pool {pool!r} ({api}); `study report` once they finish"
    )
    return 0


def _models(args) -> int:
    from mlflow.tracking import MlflowClient

    from pipeline import registry
    from pipeline.tracking import experiment_id, tracking_uri

    experiment_id()  # the project's store, made when missing
    client = MlflowClient(tracking_uri())
    if args.action == "list":
        if args.references:
            print("error: `models list` takes no model names", file=sys.stderr)
            return 2
        table = registry.list_models(client)
        if not table.rows:
            print("no registered models yet: the training stages register them (make run)")
            return 0
    else:
        if not args.references:
            print("error: `models compare` needs one or more MODEL (NAME, NAME@ALIAS or NAME/VERSION)", file=sys.stderr)
            return 2
        try:
            table = registry.compare(client, args.references)
        except registry.RegistryError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(table.render(markdown=args.markdown))
    return 0


def _report(args) -> int:
    """README.md's and docs/'s generated blocks from reports/."""
    from pipeline import report

    changed = report.write(project_root())
    print(
        "rewritten: " + ", ".join(str(p.relative_to(project_root())) for p in changed)
        if changed
        else "every generated table is up to date"
    )
    return 0


def _reference(args) -> int:
    """The reference overrides as one command line; validated against params.yaml first."""
    from pipeline.config import reference_overrides

    print(
        " ".join(
            ["dvc exp run"]
            + [f"-S '{key}={json.dumps(value)}'" for key, value in reference_overrides(Path(args.file)).items()]
        )
    )
    return 0


def _score(args) -> int:
    """Prints the metrics of every trained model on the file, in the reports/rec.json shape and as tables."""
    from pipeline import tracking
    from stages.evaluate import model_files, score_file
    from stages.evaluation.rec_metrics import REPEAT_CHOICE, markdown_table
    from stages.io.stage_log import registered_name

    params_file = Path(args.params).resolve()
    params = load_params(params_file)
    data = Path(args.data)
    if not data.is_file():
        print(f"error: --data {data}: file not found", file=sys.stderr)
        return 2
    workspace = params_file.parent
    trained = {
        name: file
        for name, file in model_files(params, workspace).items()
        if name != REPEAT_CHOICE
        and (not args.models or name in args.models or (name == "c2crs" and REPEAT_CHOICE in args.models))
    }
    by_registered = tracking.model_sources(
        {registered_name(name, "recommender"): file for name, file in trained.items()}, workspace, args.models_from
    )
    files = {name: by_registered[registered_name(name, "recommender")] for name in trained}
    if "c2crs" in files:
        files[REPEAT_CHOICE] = files["c2crs"]
    try:
        scored = score_file(params, workspace, data, args.models, files or None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{scored['conversations']} conversations read from {data}; bad records: {scored['bad_records'] or 0}")
    for name, where in scored["missing"].items():
        print(f"not scored: {name}: {where} is missing")
    print(markdown_table(scored["results"]))
    print(json.dumps(scored["results"], indent=2, sort_keys=True))
    return 0


def _simulate(args) -> int:
    """Prints the simulation's report (stages/simulate.py) for the chosen models and sizes."""
    from pipeline.config import SimulateConfig
    from stages.evaluation.simulation_metrics import report_markdown
    from stages.io.outputs import write_outputs
    from stages.simulate import simulation_report

    params_file = Path(args.params).resolve()
    params = load_params(params_file)
    sizes = {
        key: value for key, value in (("conversations", args.conversations), ("turns", args.turns)) if value is not None
    }
    config = SimulateConfig.model_validate({**params.simulate.model_dump(), **sizes})
    report = simulation_report(params.model_copy(update={"simulate": config}), params_file.parent, args.models)
    if args.json:
        write_outputs({Path(args.json): report})
    print(report_markdown(report))
    return 0


def _rate(args) -> int:
    """Means per model over raters and items, Krippendorff's alpha (ordinal) per aspect; also as JSON."""
    from stages.evaluation.conv_metrics import (
        MODEL_NAMES,
        RATING_ASPECTS,
        RatingError,
        read_key,
        read_ratings,
        score_ratings,
    )

    try:
        for path in [args.key, *args.sheets]:
            if not Path(path).is_file():
                raise RatingError(f"{path}: file not found")
        scored = score_ratings({sheet: read_ratings(Path(sheet)) for sheet in args.sheets}, read_key(Path(args.key)))
    except RatingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{scored['raters']} rater(s), {scored['items']} items")
    print("| model | " + " | ".join(RATING_ASPECTS) + " |")
    print("|---|" + "---|" * len(RATING_ASPECTS))
    for model, means in scored["models"].items():
        print(f"| {MODEL_NAMES.get(model, model)} | " + " | ".join(f"{means[a]:.2f}" for a in RATING_ASPECTS) + " |")
    for aspect, agreement in scored["agreement"].items():
        alpha = agreement["krippendorff_alpha_ordinal"]
        print(
            f"{aspect}: Krippendorff's alpha (ordinal) = "
            + ("n/a (needs two raters and more than one distinct score)" if alpha is None else f"{alpha:.3f}")
        )
    print(json.dumps(scored, indent=2, sort_keys=True))
    return 0


def _talk(args) -> int:
    from pipeline.talk import talk
    from stages.io import progress

    progress.turn_off()  # a turn runs the stages' linking and sample code: no bar per turn

    params_file = Path(args.params).resolve()
    return talk(load_params(params_file), params_file.parent, args.models_from)


def _serve(args) -> int:
    from pipeline.serve import serve
    from stages.io import progress

    progress.turn_off()  # a request runs the stages' linking and sample code: no bar per request in the log

    if not 0 < args.port < 65536 or args.timeout <= 0:
        raise ValueError(f"--port must be 1-65535 and --timeout positive, got {args.port} and {args.timeout}")
    params_file = Path(args.params).resolve()
    return serve(load_params(params_file), params_file.parent, args.host, args.port, args.models_from, args.timeout)


def _stages(args) -> int:
    for spec in STAGES.values():
        print(f"{spec.name}: {spec.summary}")
        if spec.foreach:
            print(f"  one stage per variant of params {spec.foreach}: {spec.name}@<variant>")
        print(f"  params:  {', '.join(spec.params)}")
        if spec.external_inputs:
            print(f"  reads:   {spec.external_inputs}")
        for dep in spec.deps:
            print(f"  input:   {dep}")
        for out in spec.outs:
            print(f"  output:  {out}")
        for metric in spec.metrics:
            print(f"  metrics: {metric}")
        for report in spec.reports:
            print(f"  report:  {report}")
    return 0


def _repro(args) -> int:
    """One pipeline invocation: one MLflow parent run, and one Prefect server for all stages instead of one
    ephemeral server per stage process (8-20 s each). The Prefect server of this checkout's `make ui`, when it runs,
    is used as it is; never another checkout's."""
    from pipeline import servers
    from pipeline.invocation import new_invocation

    if args.jobs < 1:
        print(f"error: --jobs {args.jobs}: expected a whole number >= 1", file=sys.stderr)
        return 2
    dvc = servers.dvc_executable()
    invocation = new_invocation()
    env = dict(os.environ)
    server = None
    has_work = _pipeline_has_work(dvc)
    if has_work:  # made here, so stages that start together do not each make one
        from pipeline.tracking import parent_run

        parent_run(invocation)
    if "PREFECT_API_URL" not in env and has_work:
        ui_url = servers.own_ui_server()  # `make ui` of this checkout, if it runs
        if ui_url:
            env["PREFECT_API_URL"] = f"{ui_url}/api"
        else:
            server = servers.start_prefect(servers.free_port())
            server.wait_until_healthy()
            env["PREFECT_API_URL"] = f"{server.url}/api"
        print(f"Prefect API: {env['PREFECT_API_URL']}", flush=True)
    try:
        if args.dvc_args or args.jobs == 1 or not has_work:
            return subprocess.run([dvc, "repro", *args.dvc_args], cwd=project_root(), env=env).returncode
        return _repro_side_by_side(dvc, args.jobs, env)
    finally:
        if server:
            server.stop()


def _repro_side_by_side(dvc: str, jobs: int, env: dict[str, str]) -> int:
    """Every stage through `dvc repro --single-item`, independent ones at once; a per-stage time table at the end
    (also in logs/repro/times.md)."""
    from pipeline import parallel

    root = project_root()
    started = time.monotonic()
    results = parallel.run_stages(
        parallel.dvc_stage_graph(root),
        lambda stage: [dvc, "repro", "--single-item", stage],
        jobs,
        root,
        env,
        root / "logs" / "repro",
        echo=lambda line: print(line, flush=True),
    )
    table = parallel.summary(results, time.monotonic() - started)
    (root / "logs" / "repro" / "times.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 1 if any(result.status in ("failed", "not run") for result in results) else 0


def _pipeline_has_work(dvc: str) -> bool:
    status = subprocess.run([dvc, "status", "--json"], cwd=project_root(), capture_output=True, text=True)
    return status.returncode != 0 or status.stdout.strip() not in ("{}", "")
