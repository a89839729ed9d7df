"""The MLflow model registry: versions tagged with what made them, champion decided on validation only, list and
compare tables, loading a version's weights back."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import registry
from pipeline.config import ChampionMetric
from pipeline.paths import git_commit
from pipeline.tracking import EXPERIMENT, EXPERIMENT_KIND, MODEL_DEVELOPMENT, stage_run

RECALL = ChampionMetric(metric="valid_recall@50", higher_is_better=True)
PERPLEXITY = ChampionMetric(metric="valid_perplexity", higher_is_better=False)


def train(tmp_path: Path, name: str, recall: float, lr: float, data: bytes = b"samples v1") -> Path:
    """A 'training stage': a model saved to a file and registered with its validation metrics and inputs."""
    weights = tmp_path / f"{name}-{recall}-{lr}.pt"
    model = torch.nn.Linear(2, 2)
    torch.save({"state_dict": model.state_dict(), "lr": lr}, weights)
    samples = tmp_path / "samples.parquet"
    samples.write_bytes(data)
    with stage_run("finetune_rec", {"finetune_rec": {"lr": lr}}) as run:
        run.model(name, model, weights, {"best_epoch": 2, "valid_recall@50": recall, "train_loss": 1.0})
        run.log_inputs({"samples": samples})
    return weights


def evaluate(weights: Path, name: str = "c2crs-recommender", rule=RECALL) -> None:
    test = {
        "all_turns": {
            "recall@10": 0.2,
            "n": 100,
            "ci95": {"recall@10": [0.15, 0.25]},
            "margin_over": {"kbrd": {"difference": 0.01}},
        }
    }
    with stage_run("evaluate", {}) as run:
        run.evaluated(name, weights, test, rule, 0.0)


def test_the_champion_moves_only_to_a_version_that_is_better_on_validation(mlflow_store, tmp_path):
    client = MlflowClient(mlflow_store)
    name = "c2crs-recommender"
    first = train(tmp_path, name, recall=0.30, lr=1e-3)
    assert str(registry.alias_version(client, name, registry.CHALLENGER).version) == "1"
    assert registry.alias_version(client, name, registry.CHAMPION) is None  # evaluate decides, not training
    evaluate(first)
    assert str(registry.alias_version(client, name, registry.CHAMPION).version) == "1"

    worse = train(tmp_path, name, recall=0.25, lr=1e-2)
    evaluate(worse)
    assert str(registry.alias_version(client, name, registry.CHAMPION).version) == "1"
    assert str(registry.alias_version(client, name, registry.CHALLENGER).version) == "2"

    better = train(tmp_path, name, recall=0.35, lr=5e-4)
    evaluate(better)
    assert str(registry.alias_version(client, name, registry.CHAMPION).version) == "3"
    [evaluate_run] = [
        r
        for r in client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
        if r.info.run_name == "evaluate" and "version 3" in r.data.tags.get(f"champion.{name}", "")
    ]
    assert "new champion" in evaluate_run.data.tags[f"champion.{name}"]


def test_lower_is_better_for_perplexity(mlflow_store, tmp_path):
    client = MlflowClient(mlflow_store)
    name = "c2crs-generator"
    for perplexity in (40.0, 30.0, 35.0):
        weights = tmp_path / f"g{perplexity}.pt"
        torch.save({"p": perplexity}, weights)
        with stage_run("finetune_conv", {}) as run:
            run.model(name, torch.nn.Linear(1, 1), weights, {"best_epoch": 1, "valid_perplexity": perplexity})
        evaluate(weights, name, PERPLEXITY)
    assert str(registry.alias_version(client, name, registry.CHAMPION).version) == "2"


def test_a_version_carries_what_made_it_and_its_test_metrics(mlflow_store, tmp_path):
    client = MlflowClient(mlflow_store)
    weights = train(tmp_path, "kbrd-recommender", recall=0.3, lr=1e-3)
    evaluate(weights, "kbrd-recommender")
    version = registry.resolve(client, "kbrd-recommender@champion")
    assert version.tags[registry.GIT_TAG] == git_commit()
    assert len(version.tags[registry.PARAMS_TAG]) == 64
    assert len(version.tags["data.samples"]) == 64
    assert version.tags[registry.FILE_NAME_TAG] == weights.name
    metrics = registry.logged_metrics(client, version)
    assert metrics["valid_recall_at_50"] == 0.3 and "train_loss" not in metrics
    assert metrics["test.all_turns.recall_at_10"] == 0.2
    assert metrics["test.all_turns.recall_at_10.ci95_low"] == 0.15
    assert not any("margin_over" in key for key in metrics)  # comparisons stay in the report
    assert registry.model_file(client, version, tmp_path / "download").read_bytes() == weights.read_bytes()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags[EXPERIMENT_KIND] == MODEL_DEVELOPMENT
    run = client.get_run(version.run_id)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["samples"]


def test_compare_shows_differing_params_metrics_with_intervals_and_data(mlflow_store, tmp_path):
    client = MlflowClient(mlflow_store)
    evaluate(train(tmp_path, "c2crs-recommender", recall=0.30, lr=1e-3))
    train(tmp_path, "c2crs-recommender", recall=0.31, lr=1e-2, data=b"samples v2")
    table = registry.compare(client, ["c2crs-recommender@champion", "c2crs-recommender/2"])
    rows = {row[0]: row[1:] for row in table.rows}
    assert table.header == ["version", "c2crs-recommender/1", "c2crs-recommender/2"]
    assert rows["param finetune_rec.lr"] == ["0.001", "0.01"]
    assert rows["valid_recall_at_50"] == ["0.3000", "0.3100"]
    assert rows["test.all_turns.recall_at_10"] == ["0.2000 [0.1500, 0.2500]", "–"]
    assert "data.samples *" in rows  # the data differ between the two
    markdown = table.render(markdown=True)
    assert markdown.splitlines()[1] == "|---|---|---|"
    listing = {row[0]: row for row in registry.list_models(client).rows}
    assert listing["c2crs-recommender"][1:4] == ["2", "1", "2"]


def test_unknown_references_say_what_there_is(mlflow_store, tmp_path):
    client = MlflowClient(mlflow_store)
    train(tmp_path, "c2crs-recommender", recall=0.3, lr=1e-3)
    with pytest.raises(registry.RegistryError, match="registered models: c2crs-recommender"):
        registry.resolve(client, "nope-recommender")
    with pytest.raises(registry.RegistryError, match="no version 7 .* it has versions 1"):
        registry.resolve(client, "c2crs-recommender/7")
    with pytest.raises(registry.RegistryError, match="alias 'champion'"):
        registry.resolve(client, "models:/c2crs-recommender@champion")
    assert str(registry.resolve(client, "c2crs-recommender").version) == "1"  # no champion yet: the newest


def test_test_metrics_of_an_unregistered_file_are_skipped_with_a_warning(mlflow_store, tmp_path, caplog):
    weights = tmp_path / "elsewhere.pt"
    weights.write_bytes(b"not registered")
    evaluate(weights)
    assert "no registered version holds the weights" in caplog.text
