"""The ablations stage: the paper's Table 4, the recommendation path retrained once per variant in
params.ablations (w/o Coarse, w/o Fine, multi-task, w/o CH / SD / UD)."""

from pathlib import Path

from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.stage_log import NO_LOG, PrefixedLog, StageLog, StageOutcome
from stages.training import runs
from stages.training.variants import train_variants


def train_ablation(params, workspace: Path, variant: str, log: StageLog) -> tuple[dict, dict[str, Path]]:
    """One ablation variant's whole recommendation path; returns its outcome per stage and the inputs it read."""
    variant_params = params.variant(variant)
    start_from, outcome, inputs = None, {"overrides": params.ablations.variants[variant]}, {}
    loaded = runs.training_run(variant_params, workspace)  # read once for the variant's three steps
    for stage in runs.REC_PATH:
        out = runs.ablation_model_path(workspace, variant, stage)
        _, outcome[stage], read = runs.train_c2crs(stage, variant_params, workspace,
                                                   PrefixedLog(log, f"{variant}.{stage}"), start_from, out, loaded)
        inputs.update({name: path for name, path in read.items() if name != "start_from"})
        start_from = out
    return outcome, inputs


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    """The paper's Table 4: every variant in params.ablations.variants trains the whole recommendation path with its
    overrides. A step whose params and inputs equal the main run's (e.g. w/o Fine's coarse stage) resumes the main
    run's finished checkpoint instead of training again; a killed stage resumes each variant where it stopped.
    """
    spec = STAGES["ablations"]
    done = train_variants("ablations", train_ablation, params, workspace, log)
    for variant in done:
        log.model(f"ablation_{variant}", runs.load_c2crs(runs.ablation_model_path(workspace, variant)))
    (workspace / spec.outs[0]).mkdir(parents=True, exist_ok=True)
    metrics = {variant: outcome for variant, (outcome, _) in done.items()}
    write_outputs({workspace / spec.metrics[0]: metrics})
    return StageOutcome({name: path for _, inputs in done.values() for name, path in inputs.items()}, metrics)
