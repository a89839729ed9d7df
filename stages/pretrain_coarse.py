"""The pretrain_coarse stage: coarse-grained contrastive pre-training (paper 4.2.1): the conversation, the user's KG
subgraph and her review document, pulled together by InfoNCE over the three pairs
(stages/training/c2crs_train.py, pretrain_coarse)."""

from pathlib import Path

from stages.io.stage_log import NO_LOG, StageLog, StageOutcome
from stages.training import runs


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    return runs.rec_path_stage("pretrain_coarse", params, workspace, log)
