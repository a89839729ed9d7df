"""One run of the pre-training study (`python -m pipeline study`): an arm for a setting and a seed, trained, scored
on test and recorded with its provenance; which runs there are; what a run starts from.

For every setting of params.study and every seed, two runs of the same code: C2-CRS (pretrain_coarse ->
pretrain_fine -> finetune_rec) and the KBRD-style model (finetune_rec from fresh weights); extensions are more
C2-CRS arms. Each run's test ranks and validation metrics are written to study.results_dir/<setting>/seed<k>/ (kept
in git) when it finishes; training itself is checkpointed every epoch, so a killed study resumes where it stopped
and a finished run is never trained again. The C2-CRS run also measures its pre-trained model without fine-tuning
(zero-shot recall and a frozen probe, against an untrained model of the same seed). The report is built from
whatever runs exist.
"""

import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import torch

from models.c2crs import C2CRS
from pipeline.config import Params
from pipeline.paths import git_commit
from stages.evaluation import rec_metrics
from stages.io.outputs import write_outputs
from stages.io.stage_log import NO_LOG, CurveLog, StageLog
from stages.training import c2crs_data, c2crs_train, loop, probe, repeat_choice, runs

logger = logging.getLogger(__name__)

KBRD, C2CRS_ARM = "kbrd", "c2crs"


@dataclass(frozen=True)
class Job:
    setting: str
    seed: int
    arm: str  # c2crs, kbrd, or an extension's name

    def results(self, params: Params, workspace: Path) -> Path:
        return workspace / params.study.results_dir / self.setting / f"seed{self.seed}"

    def models(self, params: Params, workspace: Path) -> Path:
        return workspace / params.study.models_dir / self.setting / f"seed{self.seed}"

    def done(self, params: Params, workspace: Path) -> bool:
        return (self.results(params, workspace) / f"{self.arm}.json").is_file()


def jobs(
    params: Params, settings: list[str] | None = None, seeds: list[int] | None = None, arms: list[str] | None = None
) -> list[Job]:
    """Seed by seed, so that a cut-off study has whole seeds of every arm; extensions last (they resume the C2-CRS
    run's finished pre-training when their overrides leave it unchanged). `arms`: only these (c2crs, kbrd or an
    extension's name)."""
    every = params.study.all_settings()
    settings = settings or list(every)
    seeds = seeds or params.study.seeds
    unknown = [s for s in settings if s not in every]
    if unknown:
        raise ValueError(f"study: no setting {unknown[0]!r}; the settings are {sorted(every)}")
    known = [C2CRS_ARM, KBRD, *params.study.extensions]
    if arms and any(arm not in known for arm in arms):
        raise ValueError(f"study: no arm {next(a for a in arms if a not in known)!r}; the arms are {known}")
    core = [Job(setting, seed, arm) for seed in seeds for setting in settings for arm in (C2CRS_ARM, KBRD)]
    extra = [
        Job(setting, seed, name)
        for seed in seeds
        for setting in settings
        for name in params.study.extensions
        if setting in params.study.settings
    ]  # extensions apply to the settings, not to a learning curve's points
    return [job for job in core + extra if not arms or job.arm in arms]


def _without_pretraining(params: Params) -> dict:
    """What a KBRD-style run depends on: everything but the pre-training stages (which it never runs)."""
    return params.model_dump(exclude={"text_triples", "pretrain_text", "pretrain_coarse", "pretrain_fine", "study"})


def kbrd_source(params: Params, job: Job) -> Job:
    """The KBRD-style run that `job` (a KBRD-style job) is: the first setting whose params differ from job's only in
    pre-training, so settings that vary pre-training alone are paired with the same KBRD-style runs."""
    mine = _without_pretraining(params.study_params(job.setting, job.seed))
    for setting in params.study.all_settings():
        if setting == job.setting:
            return job
        if _without_pretraining(params.study_params(setting, job.seed)) == mine:
            return Job(setting, job.seed, KBRD)
    return job


def _compact(ranks: np.ndarray) -> np.ndarray:
    """Ranks as the smallest integer type that holds them (they are kept in git)."""
    return ranks.astype(np.int16) if ranks.max(initial=0) <= np.iinfo(np.int16).max else ranks.astype(np.int32)


def _changes_pretraining(overrides: dict) -> bool:
    return any(key.split(".")[0] != "finetune_rec" for key in overrides)


def _waits_for(params: Params, job: Job) -> Job | None:
    """An extension that changes only fine-tuning starts from its setting and seed's C2-CRS pre-training."""
    if job.arm in (C2CRS_ARM, KBRD) or _changes_pretraining(params.study.extensions[job.arm]):
        return None
    return Job(job.setting, job.seed, C2CRS_ARM)


def _ranks(
    model,
    run: c2crs_train.Run,
    table: c2crs_data.SampleTable,
    rows: pl.DataFrame,
    batch: int,
    blocks=c2crs_train.score_samples,
) -> tuple[np.ndarray, np.ndarray]:
    scored = ((table.sample_ids[r], scores) for r, scores in blocks(model, run, table, batch))
    return rec_metrics.ranks_and_masked_ranks(scored, rows, rows["context_item_ids"].to_list())


class RunClock(StageLog):
    """The seconds a run took over every process that worked on it. Saved beside its checkpoints after every epoch
    (and stage), so a killed and resumed run counts the processes before it too (up to the epoch it lost)."""

    def __init__(self, path: Path):
        earlier = json.loads(path.read_text()) if path.is_file() else {}
        self.path, self.started = path, time.monotonic()
        self.earlier_seconds = earlier.get("seconds", 0.0)
        self.started_at = earlier.get("started_at") or _now()
        self.processes = earlier.get("processes", 0) + 1

    def seconds(self) -> float:
        return self.earlier_seconds + time.monotonic() - self.started

    def epoch(self, epoch: int, metrics: dict) -> None:
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_outputs(
            {
                self.path: {
                    "seconds": round(self.seconds(), 1),
                    "started_at": self.started_at,
                    "processes": self.processes,
                }
            }
        )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def provenance(clock: RunClock, device: torch.device) -> dict:
    """Where and how a run was made: the code's commit, when, how long over all its processes, on what."""
    return {
        "git_commit": git_commit(),
        "started_at": clock.started_at,
        "finished_at": _now(),
        "seconds": round(clock.seconds(), 1),
        "processes": clock.processes,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _reuse(params: Params, workspace: Path, job: Job, source: Job) -> dict:
    """A KBRD-style run shared with `source`'s setting: its files copied under job's setting, marked as such."""
    if not source.done(params, workspace):
        run_job(params, workspace, source)
    result = {
        **json.loads((source.results(params, workspace) / f"{KBRD}.json").read_text()),
        "setting": job.setting,
        "reused_from": f"{source.setting}/seed{source.seed}",
    }
    target = job.results(params, workspace)
    target.mkdir(parents=True, exist_ok=True)
    temporary = target / f".{KBRD}.npz.tmp"
    shutil.copyfile(source.results(params, workspace) / f"{KBRD}.npz", temporary)
    temporary.replace(target / f"{KBRD}.npz")
    write_outputs({target / f"{KBRD}.json": result})
    return result


def _train_arm(params: Params, workspace: Path, job: Job, run_params: Params, loaded, log: StageLog):
    """Train job's arm through the stages it needs; (the model, {stage: outcome}, {stage: per-epoch curve})."""
    out = job.models(params, workspace)
    extension = job.arm if job.arm not in (C2CRS_ARM, KBRD) else None
    if job.arm == KBRD:
        path = [("finetune_rec", None)]
    elif extension and not _changes_pretraining(params.study.extensions[extension]):
        path = [("finetune_rec", out / f"{C2CRS_ARM}.pretrain_fine.pt")]
    else:
        path = [
            (stage, out / f"{job.arm}.{previous}.pt" if previous else None)
            for stage, (previous, _) in runs.REC_PATH.items()
        ]
    outcome, curves = {}, {}
    for stage, start_from in path:
        curve = CurveLog(log)
        model, outcome[stage], _ = runs.train_c2crs(
            stage, run_params, workspace, curve, start_from, out / f"{job.arm}.{stage}.pt", loaded
        )
        curves[stage] = curve.rows()
    return model, outcome, curves


def run_job(params: Params, workspace: Path, job: Job, log: StageLog = NO_LOG) -> dict:
    """Train one arm for one setting and seed, score it on test, write <arm>.json and <arm>.npz; return the json."""
    if job.arm == KBRD and (source := kbrd_source(params, job)) != job:
        return _reuse(params, workspace, job, source)
    extension = job.arm if job.arm not in (C2CRS_ARM, KBRD) else None
    run_params = params.study_params(job.setting, job.seed, extension)
    loaded = runs.training_run(run_params, workspace)
    run, model_config, inputs = loaded
    out, results = job.models(params, workspace), job.results(params, workspace)
    clock = RunClock(out / f"{job.arm}.clock.json")
    arrays = {}
    model, outcome, curves = _train_arm(params, workspace, job, run_params, loaded, clock)
    clock.save()
    samples = pl.read_parquet(inputs["samples"])
    test_table = c2crs_data.sample_table(samples, pl.read_parquet(inputs["triples"]), "test")
    test_rows = rec_metrics.expand_mentions(samples.filter(pl.col("split") == "test").sort("sample_id"))
    batch = params.evaluate.batch_size
    arrays["ranks"], arrays["masked_ranks"] = _ranks(model, run, test_table, test_rows, batch)
    result = {
        "setting": job.setting,
        "seed": job.seed,
        "arm": job.arm,
        "overrides": {
            **params.study.all_settings()[job.setting],
            **(params.study.extensions[extension] if extension else {}),
        },
        "training": outcome,
        "curves": curves,
    }
    result["repeat_choice"], arrays["repeat_choice"], arrays["repeat_choice_masked"] = _with_repeat_choice(
        params, workspace, model, run, samples, test_table, test_rows, batch
    )
    if job.arm == C2CRS_ARM and job.setting in params.study.settings:  # a curve's point shares its pre-training
        result["diagnostics"], diagnostic_ranks = _diagnostics(
            run_params, run, model_config, out, samples, test_table, test_rows, batch, params.study.probe_epochs
        )
        arrays.update(diagnostic_ranks)
    result["provenance"] = provenance(clock, run.device)
    result["seconds"] = result["provenance"]["seconds"]
    npz = results / f"{job.arm}.npz"
    npz.parent.mkdir(parents=True, exist_ok=True)
    temporary = npz.with_name(f".{npz.name}.tmp.npz")
    np.savez_compressed(temporary, **{name: _compact(ranks) for name, ranks in arrays.items()})
    temporary.replace(npz)
    write_outputs({results / f"{job.arm}.json": result})  # last: its presence marks the run done
    return result


def _with_repeat_choice(
    params: Params,
    workspace: Path,
    model,
    run: c2crs_train.Run,
    samples: pl.DataFrame,
    test_table: c2crs_data.SampleTable,
    test_rows: pl.DataFrame,
    batch: int,
):
    """The model inside a learned choice between re-mentioning a context movie and a new one (beyond the paper;
    models.baselines.RepeatChoice, counted on the train split): (the fitted statistics, test ranks, masked)."""
    choice = repeat_choice.fitted(params, workspace, run, by_state=False)
    recent = repeat_choice.recent_items_tensor(
        rec_metrics.context_items_by_recency(samples.filter(pl.col("split") == "test").sort("sample_id"))
    )
    scored = (
        (test_table.sample_ids[r], s)
        for r, s in repeat_choice.with_repeat_choice(
            c2crs_train.score_samples(model, run, test_table, batch), recent, test_table, choice
        )
    )
    ranks, masked = rec_metrics.ranks_and_masked_ranks(scored, test_rows, test_rows["context_item_ids"].to_list())
    statistics = {
        role: {
            "p_repeat": round(float(choice.p_repeat[i, 0]), 4),
            "by_recency": [round(float(w), 4) for w in choice.by_recency[i]],
        }
        for i, role in enumerate(choice.ROLES)
    }
    return statistics, ranks, masked


def _diagnostics(
    run_params: Params,
    run: c2crs_train.Run,
    model_config,
    out: Path,
    samples: pl.DataFrame,
    test_table: c2crs_data.SampleTable,
    test_rows: pl.DataFrame,
    batch: int,
    probe_epochs: int,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Zero-shot recall and the frozen probe, for the pre-trained model and for an untrained one of the same seed."""
    pretrained = runs.load_c2crs(out / f"{C2CRS_ARM}.pretrain_fine.pt").to(run.device)
    loop.seed_everything(run_params.seed, run_params.deterministic)
    untrained = C2CRS(model_config).to(run.device)
    valid_table = run.valid
    valid_rows = rec_metrics.expand_mentions(samples.filter(pl.col("split") == "valid").sort("sample_id"))
    found, arrays = {}, {}
    for name, model in (("pretrained", pretrained), ("untrained", untrained)):
        valid_ranks, _ = _ranks(model, run, valid_table, valid_rows, batch, probe.zero_shot_blocks)
        found[f"zero_shot_{name}"] = {"valid": rec_metrics.metrics_from_ranks(valid_ranks)}
        arrays[f"zero_shot_{name}"], arrays[f"zero_shot_{name}_masked"] = _ranks(
            model, run, test_table, test_rows, batch, probe.zero_shot_blocks
        )
        frozen, history = probe.train_frozen_probe(
            model,
            run,
            probe_epochs,
            run_params.finetune_rec.batch_size,
            run_params.finetune_rec.learning_rate,
            run_params.seed,
        )
        found[f"probe_{name}"] = {"valid_history": history, "valid": max(history, key=lambda h: h["recall@50"])}
        arrays[f"probe_{name}"], arrays[f"probe_{name}_masked"] = _ranks(
            frozen, run, test_table, test_rows, batch, probe.score_probe
        )
    return found, arrays


def prerequisites(params: Params, job: Job) -> list[Job]:
    """The runs `job` starts from: an extension that changes only fine-tuning needs its C2-CRS run's pre-training."""
    needed = _waits_for(params, job)
    return [needed] if needed else []
