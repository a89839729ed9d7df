"""The conv_baselines stage: the paper's Table 2 rows by the same code, each a params.conv_baselines variant of
finetune_conv (Transformer, KGSF-style, C2-CRS w/o instance weighting)."""

from pathlib import Path

from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.stage_log import NO_LOG, PrefixedLog, StageLog, StageOutcome
from stages.training import runs
from stages.training.variants import train_variants


def train_conv_baseline(params, workspace: Path, variant: str, log: StageLog) -> tuple[dict, dict]:
    variant_params = params.variant(variant, kind="conv_baselines")
    _, outcome, inputs = runs.train_conversation(variant_params, workspace, PrefixedLog(log, variant),
                                                 runs.conv_model_path(workspace, variant))
    return {"overrides": params.conv_baselines.variants[variant], **outcome}, inputs


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    """The paper's Table 2 rows, each a params.conv_baselines variant of finetune_conv. A variant equal to the main
    model resumes finetune_conv's finished checkpoint; a killed stage resumes each variant where it stopped."""
    spec = STAGES["conv_baselines"]
    done = train_variants("conv_baselines", train_conv_baseline, params, workspace, log)
    for variant in done:
        log.model(f"conv_{variant}", runs.load_conversation_model(runs.conv_model_path(workspace, variant))[0])
    (workspace / spec.outs[0]).mkdir(parents=True, exist_ok=True)
    metrics = {variant: outcome for variant, (outcome, _) in done.items()}
    write_outputs({workspace / spec.metrics[0]: metrics})
    return StageOutcome({name: path for _, inputs in done.values() for name, path in inputs.items()}, metrics)
