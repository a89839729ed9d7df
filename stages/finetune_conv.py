"""The finetune_conv stage: response generation (paper 4.3.2) from the pre-trained encoders: a Transformer decoder
over the history, the KG entities and the review sentences, a copy mechanism and the instance-weighted loss, early
stopping on validation perplexity (stages/training/conv_train.py)."""

from pathlib import Path

from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.stage_log import NO_LOG, CurveLog, StageLog, StageOutcome, registered_name
from stages.training import conv_runs


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    spec = STAGES["finetune_conv"]
    log = CurveLog(log)
    model, metrics, inputs = conv_runs.train_conversation(params, workspace, log, workspace / spec.model_file)
    write_outputs({workspace / spec.metrics_file: metrics, workspace / spec.report("finetune_conv"): log.rows()})
    log.model(registered_name("c2crs", "generator"), model, workspace / spec.model_file, metrics)
    return StageOutcome(inputs, metrics)
