"""The conv_baselines stage: one row of the paper's Table 2 by the same code, finetune_conv with one
params.conv_baselines variant's overrides (Transformer, ReDial, KGSF, C2-CRS w/o instance weighting). dvc.yaml runs
it once per variant (conv_baselines@transformer, ...)."""

from pathlib import Path

from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.stage_log import NO_LOG, CurveLog, StageLog, StageOutcome, registered_name
from stages.training import conv_runs


def run(params, workspace: Path, log: StageLog = NO_LOG, *, variant: str) -> StageOutcome:
    """Train the variant's generator. A variant equal to the main model resumes finetune_conv's finished checkpoint;
    a killed stage resumes where it stopped."""
    spec = STAGES["conv_baselines"].for_variant(variant)
    variant_params = params.variant(variant, kind="conv_baselines")
    log = CurveLog(log)
    model, outcome, inputs = conv_runs.train_conversation(
        variant_params, workspace, log, conv_runs.conv_model_path(workspace, variant)
    )
    metrics = {"overrides": params.conv_baselines.variants[variant], **outcome}
    write_outputs({workspace / spec.metrics_file: metrics, workspace / spec.report(variant): log.rows()})
    log.model(registered_name(variant, "generator"), model, conv_runs.conv_model_path(workspace, variant), outcome)
    return StageOutcome(inputs, metrics)
