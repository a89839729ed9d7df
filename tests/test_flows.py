"""Stages as Prefect flows, tracked in MLflow: outputs, tags, runs grouped under a parent, the CLI end to end."""

import json
import os
import re
import subprocess
import sys

import mlflow
import polars as pl
import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

from pipeline import registry
from pipeline.config import load_params
from pipeline.flows import run_stage_flow
from pipeline.paths import git_commit
from stages.io.graph import stage_instances
from stages.io.stage_log import registered_name
from tests.conftest import PROJECT

pytestmark = pytest.mark.usefixtures("prefect_harness")


def flow_runs_tagged(tag: str, params_file):
    """This test's flow runs with the tag (the Prefect database is shared by the session's tests)."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
    return [run for run in runs if run.parameters.get("params_file") == str(params_file)]


def test_ingest_flow_writes_outputs_and_tracks_the_run(params_file, mlflow_store):
    metrics = run_stage_flow("ingest", str(params_file))

    workspace = params_file.parent
    conversations = pl.read_parquet(workspace / "data/ingest/conversations.parquet")
    assert conversations.height == 6
    assert json.loads((workspace / "metrics/ingest.json").read_text()) == metrics

    runs = mlflow.search_runs(experiment_names=["c2crs"], output_format="list")
    [run] = [r for r in runs if r.info.run_name == "ingest"]
    assert run.data.tags["stage"] == "ingest"
    assert run.data.tags["git_commit"] == git_commit()
    assert run.data.params["ingest.on_bad_record"] == "error"
    assert len(run.data.params["input_sha256.redial_train"]) == 64
    assert run.data.metrics["test.conversations"] == 2
    assert run.data.tags["validation_rule"] == "fraction"

    [flow_run] = flow_runs_tagged("stage:ingest", params_file)
    assert f"git:{git_commit()}" in flow_run.tags
    assert flow_run.state.is_completed()


def test_all_runs_every_stage_as_a_subflow_under_one_mlflow_parent(params_file, mlflow_store, capsys):
    results = run_stage_flow("all", str(params_file))
    instances = stage_instances(load_params(params_file))  # a foreach stage once per variant: ablations@wo_ch, ...
    assert list(results) == instances and "ablations@wo_ch" in instances
    workspace = params_file.parent
    entities = pl.read_parquet(workspace / "data/kg/entities.parquet")
    tom = entities.filter(pl.col("label") == "Tom Hanks")["entity_id"].item()
    triples = pl.read_parquet(workspace / "data/triples/triples.parquet")
    assert tom in triples["entity_id"].to_list()  # linked in "Any comedy with Tom Hanks?" and paired with a sentence
    assert results["triples"]["samples"] == {"test": 3, "train": 10}  # 4 train conversations: none to valid at 10 %
    assert (workspace / "reports/linking.md").read_text().startswith("# Entity linking")

    client = MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("c2crs").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = {r.info.run_id for r in runs if "c2crs.invocation" in r.data.tags}
    assert sorted(r.info.run_name for r in children) == sorted(instances)
    assert {child.data.tags["mlflow.parentRunId"] for child in children} == parents
    assert all(client.get_run(p).info.status == "FINISHED" for p in parents)

    # Subflows inherit the parent's tags and add their own stage tag.
    [parent_flow] = [run for run in flow_runs_tagged("stage:all", params_file) if run.parent_task_run_id is None]
    with get_client(sync_client=True) as prefect:
        subflows = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [parent_flow.id]}))
    assert len(subflows) == len(instances) and all(flow.state.is_completed() for flow in subflows)
    assert all("stage:all" in flow.tags for flow in subflows)

    # Every trained model is a registered version; evaluate made each the champion (the first of its name).
    params = load_params(params_file)
    registered = {m.name for m in client.search_registered_models()}
    assert registered == (
        {"c2crs-recommender", "c2crs-generator"}
        | {registered_name(v, "recommender") for v in params.baselines.train}
        | {registered_name(f"c2crs_{v}", "recommender") for v in params.ablations.variants}
        | {registered_name(v, "generator") for v in params.conv_baselines.train}
    )
    for name in registered:
        champion = client.get_model_version_by_alias(name, "champion")
        assert registry.logged_metrics(client, champion).keys() & {"test.all_turns.recall_at_10", "test.perplexity"}
        assert champion.tags["data.samples"] and champion.tags[registry.FILE_TAG]
    [evaluate_run] = [r for r in children if r.info.run_name == "evaluate"]
    assert {a.path for a in client.list_artifacts(evaluate_run.info.run_id, "reports")} >= {
        "reports/rec.md",
        "reports/conv.md",
        "reports/conv_rating.csv",
    }

    from pipeline.cli import main

    assert main(["models", "compare", "c2crs-recommender", "kbrd-recommender@champion", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| version | c2crs-recommender/1 | kbrd-recommender/1 |")
    assert re.search(r"\| test\.all_turns\.recall_at_10 \| \d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\] \|", table)
    assert "| stage run | finetune_rec " in table
    assert main(["models", "list"]) == 0
    assert "c2crs-generator" in capsys.readouterr().out


def test_a_failing_stage_marks_its_runs_failed_and_keeps_old_outputs(params_file, mlflow_store, mirror):
    run_stage_flow("ingest", str(params_file))
    before = (params_file.parent / "data/ingest/utterances.parquet").read_bytes()
    with open(mirror / "redial/train.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(Exception, match=r"train.jsonl, line 5: malformed JSON"):
        run_stage_flow("ingest", str(params_file))
    assert (params_file.parent / "data/ingest/utterances.parquet").read_bytes() == before
    statuses = [r.info.status for r in mlflow.search_runs(experiment_names=["c2crs"], output_format="list")]
    assert sorted(statuses) == ["FAILED", "FINISHED"]


def test_cli_runs_a_stage_against_a_prefect_server(params_file, mlflow_store):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": mlflow_store}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "ingest", "--params", str(params_file)],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    [summary] = [line for line in done.stdout.splitlines() if line.startswith("ingest: done in ")]
    assert (
        "conversations" in summary and len(summary) < 300 and "{" not in done.stdout
    )  # one line, not the metrics as JSON
    assert "Starting temporary server" not in done.stderr  # the given server was used, not an ephemeral one
