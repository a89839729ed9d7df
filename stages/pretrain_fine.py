"""The pretrain_fine stage: fine-grained contrastive pre-training (paper 4.2.2), word vs. entity vs. review
sentence, plus lambda x the coarse loss, from the coarse stage's model (stages/training/c2crs_train.py,
pretrain_fine)."""

from pathlib import Path

from stages.io.stage_log import NO_LOG, StageLog, StageOutcome
from stages.training import runs


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    return runs.rec_path_stage("pretrain_fine", params, workspace, log)
