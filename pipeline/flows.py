"""Prefect flows: one per stage, and `all`, which runs every stage as a subflow of one parent flow.

A stage's flow loads params and wraps the stage's run() (stages/<stage>.py) in an MLflow run that logs params,
input hashes and metrics. A foreach stage's flow runs one variant (its `variant` parameter), or every variant of
the params when none is given.
"""

import os
from pathlib import Path

from prefect import flow, tags
from prefect.runtime import flow_run as current_flow_run

from pipeline.config import load_params
from pipeline.invocation import TRIGGERED_BY_ENV, new_invocation
from pipeline.paths import git_commit
from pipeline.tracking import stage_run
from stages.io.graph import STAGES, params_value, stage_body, stage_instances, stage_spec
from stages.io.outputs import settle_workspace, stage_lock

FINISHED: dict[str, dict] = {}  # stages of this process whose body ran and whose MLflow run ended: name -> metrics


def _run_stage(name: str, params_file: str) -> dict:
    """One stage (a foreach stage's variant: family@variant) in an MLflow run."""
    params = load_params(params_file)
    workspace = Path(params_file).resolve().parent  # paths in params are relative to the params file
    dumped = params.model_dump()
    sections = {key: params_value(dumped, key) for key in stage_spec(name).params}
    with stage_lock(workspace, name), stage_run(name, sections, flow_run_id=current_flow_run.id) as run:
        settle_workspace(workspace)  # a killed stage's half-made commit, completed before this stage reads
        outcome = stage_body(name)(params, workspace, run)
        run.log_inputs(outcome.inputs)
        run.log_metrics(outcome.metrics)
        run.log_reports([workspace / report for report in stage_spec(name).reports])
    FINISHED[name] = outcome.metrics
    return outcome.metrics


def _stage_flow(stage: str):
    """A stage's Prefect flow; a foreach stage's takes the variant to run (none: every variant in the params)."""
    if not STAGES[stage].foreach:

        @flow(name=stage, description=STAGES[stage].summary)
        def stage_flow(params_file: str = "params.yaml") -> dict:
            return _run_stage(stage, params_file)

        return stage_flow

    @flow(name=stage, description=STAGES[stage].summary)
    def variant_flow(params_file: str = "params.yaml", variant: str = "") -> dict:
        if variant:
            return _run_stage(f"{stage}@{variant}", params_file)
        return {
            name: STAGE_FLOWS[stage](params_file, name.partition("@")[2])
            for name in stage_instances(load_params(params_file), [stage])
        }

    return variant_flow


STAGE_FLOWS = {name: _stage_flow(name) for name in STAGES}


@flow(name="all")
def all_flow(params_file: str = "params.yaml") -> dict:
    """Every stage in order (a foreach stage once per variant), each a subflow of this one, all MLflow runs under
    one parent run."""
    return {name: run_stage_flow(name, params_file) for name in stage_instances(load_params(params_file))}


def run_stage_flow(stage: str, params_file: str = "params.yaml") -> dict:
    """Run one stage (family@variant for one variant of a foreach stage, or `all`) as a flow, tagged with the stage
    name and the git commit."""
    if stage == "all":
        new_invocation()
        with tags("stage:all", f"git:{git_commit()}"):
            return all_flow(params_file)
    family, _, variant = stage.partition("@")
    triggered = [f"triggered-by:{os.environ[TRIGGERED_BY_ENV]}"] if os.environ.get(TRIGGERED_BY_ENV) else []
    with tags(f"stage:{stage}", f"git:{git_commit()}", *triggered):
        if STAGES[family].foreach:
            return STAGE_FLOWS[family](params_file, variant)
        return STAGE_FLOWS[family](params_file)
