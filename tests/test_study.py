"""The pre-training study: the reference parameter set, the CPU setting that mirrors its switches, the study runs
(resumable, every arm scored on the same rows), diagnostics and the generated report, on the fixture mirror."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import ConfigError, load_params, reference_overrides
from stages.io.graph import stage_body
from stages.training.c2crs_data import recommendation_rows
from stages.training.c2crs_train import pretraining_rows

PROJECT = Path(__file__).resolve().parents[1]
# What a CPU setting may keep at this project's value although the reference differs: how much is trained, sizes,
# where it runs, and the training softmax (over every entity it needs the whole graph's R-GCN in every step).
VOLUME_KEYS = {
    "device",
    "model.token_dim",
    "model.ffn_dim",
    "model.max_review_sentences",
    "pretrain_coarse.samples_per_conversation",
    "pretrain_coarse.epochs",
    "pretrain_coarse.batch_size",
    "pretrain_fine.samples_per_conversation",
    "pretrain_fine.epochs",
    "pretrain_fine.batch_size",
    "finetune_rec.softmax_over",
    "finetune_rec.epochs",
    "finetune_rec.patience",
}


def test_reference_file_is_valid_and_the_cpu_setting_matches_its_switches():
    reference = reference_overrides(PROJECT / "params/reference.yaml")
    assert reference["model.kg_encoder"] == "featureless" and reference["pretrain_fine.epochs"] == 13
    switches = load_params(PROJECT / "params.yaml").study.settings["reference_switches"]
    for key, value in switches.items():
        assert reference[key] == value, key
    recommendation_path = {k for k in reference if not k.startswith("finetune_conv.")}  # the study's scope
    assert recommendation_path - set(switches) <= VOLUME_KEYS


def test_reference_file_with_an_unknown_key_names_file_and_key(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "params.yaml").write_text((PROJECT / "params.yaml").read_text())
    bad = tmp_path / "params/reference.yaml"
    bad.write_text("model.kg_encoder: featureless\nmodel.kg_encodr: table\n")
    with pytest.raises(ConfigError, match=r"reference.yaml.model.kg_encodr: unknown key"):
        reference_overrides(bad)
    bad.write_text("model.kg_encoder: onehot\n")
    with pytest.raises(ConfigError, match="kg_encoder"):
        reference_overrides(bad)


def test_reference_command_prints_every_key():
    printed = subprocess.run(
        [sys.executable, "-m", "pipeline", "reference"], cwd=PROJECT, capture_output=True, text=True, check=True
    ).stdout
    reference = yaml.safe_load((PROJECT / "params/reference.yaml").read_text())
    assert printed.startswith("dvc exp run ")
    assert printed.count(" -S ") == len(reference)
    assert "-S 'model.rec_pooling=\"graph\"'" in printed


def test_a_study_setting_with_a_bad_override_is_refused(params_file):
    raw = yaml.safe_load(params_file.read_text())
    raw["study"]["settings"]["broken"] = {"model.rec_pooling": "shared"}
    params_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="study.settings.broken"):
        load_params(params_file)


def test_mention_samples_are_one_per_turn_and_movie(params_file):
    from stages.training.runs import training_run

    params = load_params(params_file)
    workspace = params_file.parent
    for stage in ("ingest", "reviews", "kg", "triples"):
        stage_body(stage)(params, workspace)
    run, _, _ = training_run(params, workspace)
    cfg = params.pretrain_coarse.model_copy(update={"sample_unit": "mention", "samples_per_conversation": None})
    rows = pretraining_rows(run.train, cfg, np.random.default_rng(0))
    assert sorted(rows.tolist()) == sorted(recommendation_rows(run.train)[0].tolist())
    assert all(run.train.targets[r] for r in rows)
    turns = pretraining_rows(run.train, params.pretrain_coarse, np.random.default_rng(0))
    per_conversation = np.bincount(run.train.conv_ids[turns])
    assert per_conversation.max() <= params.pretrain_coarse.samples_per_conversation


def test_study_runs_resume_and_report(params_file, mlflow_store):
    from pipeline import study, study_runs

    raw = yaml.safe_load(params_file.read_text())
    raw["study"].update(
        seeds=[1, 2],
        workers=1,
        probe_epochs=2,
        settings={name: raw["study"]["settings"][name] for name in ("ours", "reference_switches")},
        extensions={"keep_contrastive": {"finetune_rec.pretraining_weight": 1.0}},
        learning_curve=None,
    )
    raw["finetune_rec"]["epochs"] = 1
    params_file.write_text(yaml.safe_dump(raw))
    params = load_params(params_file)
    workspace = params_file.parent
    for stage in ("ingest", "reviews", "kg", "triples"):
        stage_body(stage)(params, workspace)

    done = study.run_study(params, workspace, seeds=[1])
    assert {(r["setting"], r["arm"]) for r in done} == {
        (s, a) for s in ("ours", "reference_switches") for a in ("c2crs", "kbrd", "keep_contrastive")
    }
    c2crs = next(r for r in done if r["setting"] == "reference_switches" and r["arm"] == "c2crs")
    assert c2crs["training"]["pretrain_fine"]["epochs_run"] == 2
    assert set(c2crs["diagnostics"]) == {
        "zero_shot_pretrained",
        "zero_shot_untrained",
        "probe_pretrained",
        "probe_untrained",
    }
    arrays = np.load(workspace / "reports/pretraining_runs/reference_switches/seed1/c2crs.npz")
    assert arrays["ranks"].shape == arrays["masked_ranks"].shape == arrays["probe_untrained"].shape
    assert (arrays["masked_ranks"] <= arrays["ranks"]).all()
    assert arrays["repeat_choice"].shape == arrays["ranks"].shape
    assert len(c2crs["repeat_choice"]["seeker"]["by_recency"]) == 9
    # An extension that changes only fine-tuning starts from C2-CRS's pre-trained model of the same seed.
    extension = next(r for r in done if r["setting"] == "ours" and r["arm"] == "keep_contrastive")
    assert set(extension["training"]) == {"finetune_rec"}
    assert not (workspace / "data/study/pretraining/ours/seed1/keep_contrastive.pretrain_fine.pt").exists()

    marker = workspace / "reports/pretraining_runs/ours/seed1/c2crs.json"
    written = marker.stat().st_mtime_ns
    assert [j.seed for j in study_runs.jobs(params) if not j.done(params, workspace)] == [2] * 6
    study.run_study(params, workspace, settings=["ours"], seeds=[1])  # nothing left to do: nothing rewritten
    assert marker.stat().st_mtime_ns == written
    study.run_study(params, workspace, settings=["ours"], seeds=[2])

    report = study.write_report(params, workspace)
    assert (workspace / "reports/pretraining.md").read_text() == report
    assert "## Answer" in report and "- `ours` (2 seed(s), seed-level interval): pre-training **" in report
    assert "By context" in report and "| C2-CRS | new_items_masked |" in report
    assert "- `reference_switches` (1 seed(s), interval over test conversations)" in report
    assert "| earlier turns | 1 | all_turns |" in report and "## Pre-training curves" in report
    assert "(last process only" not in report  # every run here has its provenance
    assert "### new_items_masked" in report and "| repeat_popularity (naive) |" in report
    assert "keep_contrastive (beyond the paper)" in report and "probe: pre-trained N minus untrained N" in report
    assert "| C2-CRS + repeat choice (beyond the paper) |" in report
    assert "| C2-CRS + repeat choice | repeat_popularity | all_turns |" in report
    summary = json.loads((workspace / "reports/pretraining_runs/summary.json").read_text())
    ours = summary["settings"]["ours"]
    assert ours["seeds"] == {"c2crs": [1, 2], "kbrd": [1, 2], "keep_contrastive": [1, 2]}
    assert ours["arms"]["c2crs"]["all_turns"]["recall@10"]["seeds"] == 2
    assert ours["minus_kbrd"]["c2crs"]["seeds"] == [1, 2]
    assert summary["naive"]["repeat"]["new_items"]["recall@1"] == 0.0  # the fixture has fewer than 50 items


def test_study_with_an_unknown_setting_is_refused(params_file):
    from pipeline import study_runs

    with pytest.raises(ValueError, match="no setting 'paper'"):
        study_runs.jobs(load_params(params_file), settings=["paper"])


def test_the_reference_set_trains_the_whole_recommendation_path(params_file):
    """Every switch of params/reference.yaml at the reference's value (sizes and epochs made tiny, CPU)."""
    from pipeline.config import Params, apply_overrides

    reference = reference_overrides(PROJECT / "params/reference.yaml")
    tiny = {
        "device": "cpu",
        "model.token_dim": 16,
        "model.ffn_dim": 32,
        "pretrain_coarse.epochs": 1,
        "pretrain_fine.epochs": 1,
        "finetune_rec.epochs": 1,
        "pretrain_coarse.batch_size": 4,
        "pretrain_fine.batch_size": 4,
    }
    base = load_params(params_file)
    params = Params.model_validate(apply_overrides(dict(base), "reference", {**reference, **tiny}, kind="reference"))
    assert params.finetune_rec.softmax_over == "entities" and params.model.kg_encoder == "featureless"
    workspace = params_file.parent
    for stage in ("ingest", "reviews", "kg", "triples", "pretrain_coarse", "pretrain_fine", "finetune_rec"):
        outcome = stage_body(stage)(params, workspace)
    assert outcome.metrics["epochs_run"] == 1 and np.isfinite(outcome.metrics["train_loss"])
    import torch

    saved = torch.load(workspace / "data/models/c2crs_rec.pt", weights_only=True)
    assert saved["config"]["kg_encoder"] == "featureless" and "kg_encoder.basis" in saved["state_dict"]
    assert "user_pooling.proj.weight" not in saved["state_dict"]  # the recommender pools with graph_pooling
    assert saved["state_dict"]["item_bias"].shape[0] == saved["config"]["n_entities"]


def test_the_verdict_says_helps_or_hurts_only_when_every_interval_does():
    from stages.evaluation.study_markdown import excluded, verdict

    def minus(*intervals, level="ci95_seeds"):
        cells = iter(intervals)
        return {
            p: {m: {"ci95": [-1, 1], level: next(cells), "difference": 0.0} for m in ("recall@10", "recall@50")}
            for p in ("all_turns", "recommender_turns")
        }

    assert verdict(minus(*[(0.01, 0.02)] * 4)) == "helps"
    assert verdict(minus(*[(-0.02, -0.01)] * 4)) == "hurts"
    assert verdict(minus((-0.01, -0.002), (-0.01, 0.001), (-0.01, 0.01), (-0.01, 0.01))).startswith(
        "hurts on some metrics"
    )
    assert verdict(minus(*[(-0.01, 0.01)] * 4)).startswith("tie")
    # with one seed there is no seed-level interval: the fixed-model interval decides
    assert verdict(minus(*[(0.01, 0.02)] * 4, level="ci95")) == "helps"
    assert (
        excluded({"ci95": [-1, 1], "ci95_seeds": [-0.012, 0.015]})
        == "a gain above +0.015 and a loss beyond -0.012 are excluded"
    )
    assert excluded({"ci95": [-1, 1], "ci95_seeds": [-0.031, -0.009]}) == (
        "any gain is excluded, and a loss beyond -0.031 (the loss is 0.009 to 0.031)"
    )


def test_seed_level_interval_adds_training_variance():
    import polars as pl

    from stages.evaluation.rec_metrics import METRICS, seed_level_difference

    rows = pl.DataFrame({"conv_id": np.repeat(np.arange(50), 4)})
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, size=(rows.height, len(METRICS)))
    agreeing = [noise + 0.02, noise + 0.02, noise + 0.02]
    spread = [noise - 0.05, noise + 0.02, noise + 0.09]  # the same mean, seeds that disagree
    narrow, wide = (seed_level_difference(rows, v, n_resamples=200)["recall@50"] for v in (agreeing, spread))
    assert narrow["difference"] == pytest.approx(wide["difference"]) == pytest.approx(noise[:, 2].mean() + 0.02)
    assert wide["per_seed"] == pytest.approx([noise[:, 2].mean() + d for d in (-0.05, 0.02, 0.09)])
    assert wide["ci95"][1] - wide["ci95"][0] > 5 * (narrow["ci95"][1] - narrow["ci95"][0])
    lone = seed_level_difference(rows, agreeing[:1], n_resamples=200)["recall@50"]
    assert lone["ci95"] == [None, None]


def test_conversation_subsets_are_nested_and_seed_free():
    from stages.training.c2crs_data import conversation_subset

    conv_ids = np.repeat(np.arange(40), 3)
    small, large = conversation_subset(conv_ids, 0.25), conversation_subset(conv_ids, 0.5)
    assert len(np.unique(conv_ids[small])) == 10 and len(np.unique(conv_ids[large])) == 20
    assert set(small) <= set(large)
    assert (conversation_subset(conv_ids[::-1], 0.25) == len(conv_ids) - 1 - small[::-1]).all()  # order-free


def test_a_share_trains_epochs_of_the_usual_size(params_file):
    from stages.training import runs
    from stages.training.c2crs_train import _pretraining_batches

    params = load_params(params_file)
    for stage in ("ingest", "reviews", "kg", "triples"):
        stage_body(stage)(params, params_file.parent)
    full = runs.training_run(params, params_file.parent)[0]
    half = runs.with_share(full, 0.5)
    assert half.passes_per_epoch == 2 and set(half.train.conv_ids) < set(full.train.conv_ids)
    one_pass = len(pretraining_rows(half.train, params.pretrain_coarse, np.random.default_rng(0)))
    batches = _pretraining_batches(half, params.pretrain_coarse, np.random.default_rng(0))
    assert sum(len(b) for b in batches) == 2 * one_pass


def test_run_clock_sums_every_process(tmp_path):
    from pipeline.study_runs import RunClock

    first = RunClock(tmp_path / "c2crs.clock.json")
    first.earlier_seconds = 100.0  # as if this process had already run 100 s
    first.save()
    second = RunClock(tmp_path / "c2crs.clock.json")
    assert second.processes == 2 and second.started_at == first.started_at and second.seconds() >= 100.0


def test_learning_curve_and_settings_that_share_runs(params_file, mlflow_store):
    """A setting that changes only pre-training reuses the KBRD-style runs; a learning curve's pretrain_all point
    reuses its setting's pre-training (shared checkpoints), its pretrain_same point pre-trains on the share."""
    from pipeline import study

    raw = yaml.safe_load(params_file.read_text())
    raw["study"].update(
        seeds=[1],
        workers=1,
        extensions={},
        learning_curve={"setting": "base", "fractions": [0.5]},
        settings={
            "base": {"model.rec_pooling": "graph"},
            "flat": {
                "pretrain_coarse.epochs": 4,
                "pretrain_coarse.patience": 1,
                "pretrain_coarse.min_improvement": 0.5,
            },
        },
    )
    raw["finetune_rec"]["epochs"] = 1
    params_file.write_text(yaml.safe_dump(raw))
    params = load_params(params_file)
    workspace = params_file.parent
    for stage in ("ingest", "reviews", "kg", "triples"):
        stage_body(stage)(params, workspace)
    done = {(r["setting"], r["arm"]): r for r in study.run_study(params, workspace)}
    assert set(done) == {
        (s, a)
        for s in ("base", "flat", "base_50pct_pretrain_all", "base_50pct_pretrain_same")
        for a in ("c2crs", "kbrd")
    }

    results = workspace / "reports/pretraining_runs"
    assert done[("flat", "kbrd")]["reused_from"] == "base/seed1"
    assert done[("base_50pct_pretrain_same", "kbrd")]["reused_from"] == "base_50pct_pretrain_all/seed1"
    assert (
        np.load(results / "flat/seed1/kbrd.npz")["ranks"] == np.load(results / "base/seed1/kbrd.npz")["ranks"]
    ).all()
    assert done[("flat", "c2crs")]["training"]["pretrain_coarse"]["epochs_run"] < 4  # flattened: stopped early

    base = done[("base", "c2crs")]
    assert set(base["provenance"]) >= {
        "git_commit",
        "started_at",
        "finished_at",
        "seconds",
        "processes",
        "cores",
        "threads",
        "torch",
    }
    assert base["provenance"]["processes"] == 1 and base["seconds"] == base["provenance"]["seconds"] > 0
    assert [row["epoch"] for row in base["curves"]["pretrain_coarse"]] == [1, 2]
    assert {"train_loss", "valid_loss"} <= set(base["curves"]["pretrain_fine"][0])
    point, same = done[("base_50pct_pretrain_all", "c2crs")], done[("base_50pct_pretrain_same", "c2crs")]
    for stage in ("pretrain_coarse", "pretrain_fine"):
        assert point["curves"][stage] == base["curves"][stage]
        assert same["curves"][stage] != base["curves"][stage]
    assert "diagnostics" not in point
    checkpoints = workspace / "data/checkpoints"
    assert len(list(checkpoints.glob("pretrain_coarse-*"))) == 3  # base (= the pretrain_all point's), flat, same

    report = study.write_report(params, workspace)
    assert "## Learning curve" in report and "| 50% |" in report and "| 100% |" in report
    assert "Learning curve (`base`), C2-CRS minus KBRD-style" in report
    assert "The KBRD-style (no pre-training) runs are `base`'s" in report
    plots = workspace / "reports/pretraining_plots"
    curve = json.loads((plots / "learning_curve/all_turns/c2crs_pretrain_same.json").read_text())
    assert [row["share"] for row in curve] == [0.5, 1.0] and set(curve[0]) == {"share", "recall@10", "recall@50"}
    loss = json.loads((plots / "loss/base_50pct_pretrain_same.pretrain_coarse.seed1.json").read_text())
    assert set(loss[0]) == {"epoch", "train_loss", "valid_loss"}
