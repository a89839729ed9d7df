"""The ablations stage: one row of the paper's Table 4, the recommendation path retrained with one
params.ablations variant's overrides (w/o Coarse, w/o Fine, multi-task, w/o CH / SD / UD). dvc.yaml runs it once per
variant (ablations@wo_coarse, ...), so a variant whose overrides change retrains alone."""

from pathlib import Path

from stages.evaluation.rec_metrics import ABLATION_PREFIX
from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.stage_log import NO_LOG, CurveLog, PrefixedLog, StageLog, StageOutcome, registered_name
from stages.training import runs


def run(params, workspace: Path, log: StageLog = NO_LOG, *, variant: str) -> StageOutcome:
    """The variant's pretrain_coarse -> pretrain_fine -> finetune_rec, each saved in the variant's folder. A step whose
    params and inputs equal the main run's (e.g. w/o Fine's coarse step) resumes the main run's finished checkpoint
    instead of training again; a killed stage resumes where it stopped."""
    spec = STAGES["ablations"].for_variant(variant)
    variant_params = params.variant(variant)
    start_from, metrics, inputs = None, {"overrides": params.ablations.variants[variant]}, {}
    loaded = runs.training_run(variant_params, workspace)  # read once for the variant's three steps
    log = CurveLog(log)
    for stage in runs.REC_PATH:
        out = runs.ablation_model_path(workspace, variant, stage)
        model, metrics[stage], read = runs.train_c2crs(
            stage, variant_params, workspace, PrefixedLog(log, stage), start_from, out, loaded
        )
        inputs.update({name: path for name, path in read.items() if name != "start_from"})
        start_from = out
    log.model(registered_name(ABLATION_PREFIX + variant, "recommender"), model, start_from, metrics["finetune_rec"])
    write_outputs({workspace / spec.metrics_file: metrics, workspace / spec.report(variant): log.rows()})
    return StageOutcome(inputs, metrics)
