"""`python -m pipeline study run|report`: does coarse-to-fine pre-training improve the recommender?

The runs are pipeline/study_runs.py's: `run_study` trains those not done yet, one after another in this process, or
as flow runs of the study's Prefect deployment (pipeline/study_flows.py) several at a time; `write_report` writes
reports/pretraining.md and its data from whatever runs have finished.
"""

import json
import logging
from pathlib import Path

import polars as pl

from pipeline.config import Params
from pipeline.study_runs import jobs, prerequisites, run_job
from stages.evaluation import rec_metrics, study_markdown, study_report
from stages.io.outputs import settle_workspace, write_outputs
from stages.training import runs

logger = logging.getLogger(__name__)


def run_study(
    params: Params,
    workspace: Path,
    settings: list[str] | None = None,
    seeds: list[int] | None = None,
    workers: int | None = None,
    arms: list[str] | None = None,
    api_url: str | None = None,
) -> list[dict]:
    """Every job not yet done (and the runs they start from), one after another in this process, or with `workers` >
    1 as flow runs of the study deployment on the local process pool, that many at a time (pipeline/study_flows.py;
    api_url: the Prefect API, default the configured one or a temporary server). Returns the runs' results."""
    settle_workspace(workspace)  # a killed writer's half-made set, completed before any run reads it
    todo = [job for job in jobs(params, settings, seeds, arms) if not job.done(params, workspace)]
    needed = (n for job in todo for n in prerequisites(params, job))
    missing = [job for job in dict.fromkeys(needed) if job not in todo and not job.done(params, workspace)]
    todo = missing + todo  # a dependency outside the selection is run too
    workers = workers or params.study.workers
    logger.info("study: %d runs to do, %d at a time", len(todo), min(workers, len(todo)))
    if not todo:
        return []
    if workers == 1:
        results = []
        for job in todo:
            results.append(run_job(params, workspace, job))
            logger.info("study: %s done in %.0f s", job, results[-1]["seconds"])
        return results
    from pipeline import study_flows

    with study_flows.prefect_api(api_url) as url:
        states = study_flows.run_on_pool(todo, workspace, min(workers, len(todo)), url)
    failed = [job for job, state in zip(todo, states.values()) if state != "COMPLETED"]
    if failed:
        raise RuntimeError(
            f"study: {len(failed)} run(s) did not complete ({failed[0]} first); the Prefect UI has "
            "their logs; `study run` again resumes them"
        )
    return [json.loads((job.results(params, workspace) / f"{job.arm}.json").read_text()) for job in todo]


def write_report(params: Params, workspace: Path) -> str:
    """reports/pretraining.md, its numbers as JSON beside the runs, and the DVC plots' data, from the finished runs."""
    settle_workspace(workspace)
    inputs = {name: workspace / path for name, path in runs.TRAINING_INPUTS.items()}
    samples = pl.read_parquet(inputs["samples"])
    test = samples.filter(pl.col("split") == "test").sort("sample_id")
    rows = rec_metrics.expand_mentions(test)
    n_items = int(pl.read_parquet(inputs["entities"])["is_item"].sum())
    train_targets = samples.filter(pl.col("split") == "train")["target_item_ids"].explode().drop_nulls().to_numpy()
    naive = study_report.naive_ranks(test, rows, train_targets, n_items)
    order = list(params.study.all_settings())
    finished = sorted(
        study_report.load_runs(workspace / params.study.results_dir),
        key=lambda r: order.index(r["setting"]) if r["setting"] in order else len(order),
    )
    curve = params.study.learning_curve
    summary = study_report.summarise(
        finished,
        rows,
        naive,
        rec_metrics.context_size_masks(rows),
        params.evaluate.bootstrap_resamples,
        params.seed,
        params.study.curve_settings(),
        curve.setting if curve else None,
    )
    report = study_markdown.report(summary, params)
    plots = study_report.plot_files(summary, workspace / params.study.plots_dir)
    write_outputs(
        {
            workspace / params.study.report: report,
            workspace / params.study.results_dir / "summary.json": summary,
            **plots,
        }
    )
    for stale in set((workspace / params.study.plots_dir).rglob("*.json")) - set(plots):  # of runs no longer there
        stale.unlink()
    return report
