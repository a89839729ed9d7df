"""What a stage's run() reports back: progress while it runs (StageLog) and what it read and measured
(StageOutcome). The orchestration (pipeline/tracking.py) logs both to MLflow; direct calls drop the progress."""

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


class StageLog:
    """Where a stage's run() reports progress while it runs: per-epoch metrics, trained models and test results.
    This default drops them (benchmarks, direct calls); the flows log them to MLflow and its model registry
    (pipeline.tracking.StageRun)."""

    def epoch(self, epoch: int, metrics: dict) -> None:
        pass

    def model(self, name: str, model, file: Path, validation: dict | None = None) -> None:
        """A trained model, saved at `file` (the DVC output). `name` is its registered model name (registered_name
        below);
        None keeps it out of the registry (a pre-training step's encoders). `validation` holds its validation
        metrics, which decide which version is the champion."""

    def evaluated(self, name: str, file: Path, test: dict, champion_metric, min_improvement: float) -> None:
        """Test metrics of the registered model `name` whose weights are `file`; its version becomes the champion
        when it beats the champion on `champion_metric` (a pipeline.config.ChampionMetric, a validation metric)."""


def registered_name(model: str, kind: str) -> str:
    """The registry's name of evaluate's model `model` (c2crs, kbrd, c2crs_wo_coarse, transformer, ...) of a kind
    (recommender or generator): c2crs-recommender, c2crs-wo-coarse-recommender, transformer-generator."""
    return f"{model}-{kind}".replace("_", "-")


NO_LOG = StageLog()


@dataclass
class StageOutcome:
    inputs: dict[str, Path]  # what the stage read, hashed into its MLflow run
    metrics: dict


class PrefixedLog(StageLog):
    """Per-epoch metrics of one step of a stage that trains several (an ablation's pretrain_coarse, ...), named
    '<step>.<metric>' in the stage's run."""

    def __init__(self, log: StageLog, prefix: str):
        self.log, self.prefix = log, prefix

    def epoch(self, epoch: int, metrics: dict) -> None:
        self.log.epoch(epoch, {f"{self.prefix}.{k}": v for k, v in metrics.items()})


class CurveLog(StageLog):
    """Passes everything on to `log` and keeps the per-epoch numbers for the stage's curve file (a DVC plot): one
    row per epoch, the steps or models of one stage side by side under their prefixed names."""

    def __init__(self, log: StageLog):
        self.log, self.by_epoch = log, {}

    def epoch(self, epoch: int, metrics: dict) -> None:
        self.log.epoch(epoch, metrics)
        row = self.by_epoch.setdefault(epoch, {"epoch": epoch})
        row.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def model(self, name, model, file, validation=None) -> None:
        self.log.model(name, model, file, validation)

    def evaluated(self, name, file, test, champion_metric, min_improvement) -> None:
        self.log.evaluated(name, file, test, champion_metric, min_improvement)

    def rows(self) -> list[dict]:
        return [self.by_epoch[epoch] for epoch in sorted(self.by_epoch)]


class WarningTally:
    """Skipped-record warnings: each kind logged the first `shown` times, then only counted, so a file with
    thousands of bad records gives a few lines; summary() logs the count of each kind that was cut short."""

    def __init__(self, logger: logging.Logger, shown: int = 3):
        self.logger, self.shown, self.counts = logger, shown, Counter()

    def warn(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= self.shown:
            self.logger.warning("skipped: %s", message)

    def summary(self) -> None:
        for kind, count in sorted(self.counts.items()):
            if count > self.shown:
                self.logger.warning(
                    "skipped %d records of kind %r in all (%d not shown above)", count, kind, count - self.shown
                )
