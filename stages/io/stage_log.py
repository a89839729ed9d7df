"""What a stage's run() reports back: progress while it runs (StageLog) and what it read and measured
(StageOutcome). The orchestration (pipeline/tracking.py) logs both to MLflow; direct calls drop the progress."""

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
