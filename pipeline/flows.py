"""Prefect flows: one per stage, and `all`, which runs every stage as a subflow of one parent flow.

A stage's flow loads params and wraps the stage's run() (stages/<stage>.py) in an MLflow run that logs params,
input hashes and metrics.
"""

from collections.abc import Callable
from pathlib import Path

from prefect import flow, tags

from pipeline.config import load_params
from pipeline.invocation import new_invocation
from pipeline.paths import git_commit
from stages.io.graph import STAGES, stage_body, stage_names
from stages.io.stage_log import StageOutcome
from pipeline.tracking import stage_run


def _stage_flow(stage: str, body: Callable[..., StageOutcome]):
    """Wrap a stage body in a Prefect flow with an MLflow run that logs its params, inputs and metrics."""

    @flow(name=stage, description=STAGES[stage].summary)
    def stage_flow(params_file: str = "params.yaml") -> dict:
        params = load_params(params_file)
        workspace = Path(params_file).resolve().parent  # paths in params are relative to the params file
        sections = {key: params.model_dump()[key] for key in STAGES[stage].params}
        with stage_run(stage, sections) as run:
            outcome = body(params, workspace, run)
            run.log_inputs(outcome.inputs)
            run.log_metrics(outcome.metrics)
        return outcome.metrics

    return stage_flow


STAGE_FLOWS = {name: _stage_flow(name, stage_body(name)) for name in STAGES}


@flow(name="all")
def all_flow(params_file: str = "params.yaml") -> dict:
    """Every stage in order, each a subflow of this one, all MLflow runs under one parent run."""
    return {name: run_stage_flow(name, params_file) for name in stage_names()}


def run_stage_flow(stage: str, params_file: str = "params.yaml") -> dict:
    """Run one stage (or `all`) as a flow, tagged with the stage name and the git commit."""
    if stage == "all":
        new_invocation()
        with tags("stage:all", f"git:{git_commit()}"):
            return all_flow(params_file)
    with tags(f"stage:{stage}", f"git:{git_commit()}"):
        return STAGE_FLOWS[stage](params_file)
