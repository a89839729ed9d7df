"""What a stage's run() reports back: progress while it runs (StageLog) and what it read and measured
(StageOutcome). The orchestration (pipeline/tracking.py) logs both to MLflow; direct calls drop the progress."""

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


class StageLog:
    """Where a stage's run() reports progress while it runs: per-epoch metrics and trained models. This default drops
    them (benchmarks, direct calls); the flows log them to MLflow (pipeline.tracking.StageRun)."""

    def epoch(self, epoch: int, metrics: dict) -> None:
        pass

    def model(self, name: str, model) -> None:
        pass


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
                self.logger.warning("skipped %d records of kind %r in all (%d not shown above)", count, kind,
                                    count - self.shown)
