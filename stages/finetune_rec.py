"""The finetune_rec stage: recommendation fine-tuning (paper 4.3.1) from the pre-trained model: the context
entities' user vector scored against every item, early stopping on validation recall@50
(stages/training/c2crs_train.py, finetune_recommender)."""

from pathlib import Path

from stages.io.stage_log import NO_LOG, StageLog, StageOutcome
from stages.training import runs


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    return runs.rec_path_stage("finetune_rec", params, workspace, log)
