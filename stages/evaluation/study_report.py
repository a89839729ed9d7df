"""The pre-training study's numbers (reports/pretraining_runs/summary.json) from its finished runs; the report's text
is stages/evaluation/study_markdown.py.

Each run left <arm>.json (training outcome and curves, validation metrics, diagnostics, provenance) and <arm>.npz
(test ranks, one per evaluation row of rec_metrics.expand_mentions, unmasked and masked). Per setting and arm: each
metric's mean and sample standard deviation over seeds. C2-CRS minus the KBRD-style model, paired on the seeds both
arms finished: the per-seed differences, a cluster-bootstrap interval over test conversations for those fixed
models, and the seed-level interval that adds training variance (rec_metrics.seed_level_difference), which the
verdicts follow. Recall is also split by how much context a turn has, and the learning curve's settings are
gathered by share of the train conversations.
"""

import json
from pathlib import Path

import numpy as np
import polars as pl
import torch

from models.baselines import popularity_scores
from stages.evaluation import rec_metrics

KBRD = "kbrd"
C2CRS = "c2crs"
KEYS = ("recall@1", "recall@10", "recall@50")
REPORTED_PROTOCOLS = ("all_turns", "recommender_turns", "new_items", "new_items_masked")
NAIVE = ("repeat", "repeat_popularity")
REPEAT_CHOICE = "repeat_choice"
DIAGNOSTICS = ("zero_shot_pretrained", "zero_shot_untrained", "probe_pretrained", "probe_untrained")


def naive_ranks(
    test_samples: pl.DataFrame, rows: pl.DataFrame, train_targets: np.ndarray, n_items: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(ranks, masked ranks) of popularity, repeat and repeat-then-popularity on the test rows."""
    popularity = popularity_scores(torch.as_tensor(train_targets, dtype=torch.long), n_items).numpy()
    scorers = rec_metrics.naive_scorers(rec_metrics.context_items_by_recency(test_samples), popularity)
    sample_ids = test_samples["sample_id"].to_numpy()
    exclude = rows["context_item_ids"].to_list()
    ranks = {}
    for name, score in scorers.items():
        blocks = (
            (sample_ids[batch], score(batch))
            for batch in np.array_split(np.arange(len(sample_ids)), max(1, len(sample_ids) // 512))
        )
        ranks[name] = rec_metrics.ranks_and_masked_ranks(blocks, rows, exclude)
    return ranks


def load_runs(directory: Path) -> list[dict]:
    """Every finished run under the study directory: its json plus its arrays."""
    runs = []
    for path in sorted(directory.glob("*/seed*/*.json")):
        arrays = np.load(path.with_suffix(".npz"))
        runs.append({**json.loads(path.read_text()), "arrays": {k: arrays[k].astype(np.int64) for k in arrays.files}})
    return runs


def _as_runs(ranks: tuple[np.ndarray, np.ndarray]) -> list[dict]:
    """A deterministic model's ranks (a naive baseline) in the shape of one run, to pair with every seed."""
    return [{"seed": None, "arrays": {"ranks": ranks[0], "masked_ranks": ranks[1]}}]


def _ranks_for(arrays: dict, protocol: str, key: str = "ranks") -> np.ndarray:
    masked = f"{key}_masked" if key != "ranks" else "masked_ranks"
    return arrays[masked] if protocol in rec_metrics.MASKED_PROTOCOLS else arrays[key]


def _mean_sd(values: list[float]) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
        "seeds": len(values),
    }


def _per_seed(runs: list[dict], rows: pl.DataFrame, key: str = "ranks") -> dict:
    """{protocol: {metric: mean/sd over the runs}} for one arm (or one diagnostic array of the runs)."""
    out = {}
    for protocol in REPORTED_PROTOCOLS:
        keep = rec_metrics.protocol_rows(rows, protocol)
        scored = [rec_metrics.metrics_from_ranks(_ranks_for(r["arrays"], protocol, key)[keep]) for r in runs]
        out[protocol] = {m: _mean_sd([s[m] for s in scored]) for m in KEYS} | {"n": int(keep.sum())}
    return out


def _by_context(runs: list[dict], rows: pl.DataFrame, key: str = "ranks") -> dict:
    """{protocol: {with_entities / without_entities: {metric: mean/sd over runs, n}}} for all_turns and
    new_items_masked: without a linked entity in the context the KG recommenders output one fixed ranking."""
    out = {}
    for protocol in rec_metrics.CONTEXT_PROTOCOLS:
        keep = rec_metrics.protocol_rows(rows, protocol)
        kept = rows.filter(pl.Series(keep))
        splits = [rec_metrics.by_context(kept, _ranks_for(r["arrays"], protocol, key)[keep]) for r in runs]
        out[protocol] = {
            part: {
                **{m: _mean_sd([s[part][m] for s in splits]) for m in ("recall@10", "recall@50")},
                "n": splits[0][part]["n"],
            }
            for part in ("with_entities", "without_entities")
        }
    return out


def _paired(
    runs_a: list[dict],
    runs_b: list[dict],
    rows: pl.DataFrame,
    n_resamples: int,
    seed: int,
    key_a: str = "ranks",
    key_b: str = "ranks",
    keep_rows: np.ndarray | None = None,
) -> dict:
    """a minus b on the seeds both have, per protocol and metric: `difference` (the mean over seeds), `ci95` (paired
    cluster bootstrap of the seed-averaged rows: the trained models held fixed), `per_seed` and `ci95_seeds` (the
    seed-level interval, with training variance; None under two seeds). keep_rows: a subset of the rows only."""
    if len(runs_b) == 1 and runs_b[0]["seed"] is None:  # a naive baseline: the same ranks for every seed
        runs_b = [{**runs_b[0], "seed": r["seed"]} for r in runs_a]
    seeds = sorted({r["seed"] for r in runs_a} & {r["seed"] for r in runs_b})
    if not seeds:
        return {}
    a = {r["seed"]: r for r in runs_a}
    b = {r["seed"]: r for r in runs_b}
    out = {"seeds": seeds}
    for protocol in REPORTED_PROTOCOLS:
        keep = rec_metrics.protocol_rows(rows, protocol) & (True if keep_rows is None else keep_rows)
        kept = rows.filter(pl.Series(keep))
        values = [
            rec_metrics.metric_values(_ranks_for(a[s]["arrays"], protocol, key_a)[keep])
            - rec_metrics.metric_values(_ranks_for(b[s]["arrays"], protocol, key_b)[keep])
            for s in seeds
        ]
        fixed = rec_metrics.paired_values_difference(kept, np.mean(values, axis=0), n_resamples=n_resamples, seed=seed)
        with_seeds = rec_metrics.seed_level_difference(kept, values, n_resamples=n_resamples, seed=seed)
        out[protocol] = {
            m: {**fixed[m], "per_seed": with_seeds[m]["per_seed"], "ci95_seeds": with_seeds[m]["ci95"]} for m in KEYS
        } | {"n": int(keep.sum())}
    return out


def _has(runs: list[dict], key: str) -> bool:
    return all(key in r["arrays"] for r in runs)


def _minus_naive(arms: dict[str, list[dict]], naive: dict, rows: pl.DataFrame, n_resamples: int, seed: int) -> dict:
    """{arm (or arm+repeat_choice): {naive baseline: paired difference}}: does a model beat repeating the context?"""
    out = {}
    for arm, runs in arms.items():
        for label, key in ((arm, "ranks"), (f"{arm}+repeat_choice", REPEAT_CHOICE)):
            if key == "ranks" or _has(runs, key):
                out[label] = {
                    name: _paired(runs, _as_runs(naive[name]), rows, n_resamples, seed, key) for name in NAIVE
                }
    return out


def _by_context_size(arms: dict[str, list[dict]], rows: pl.DataFrame, sizes: dict, n_resamples: int, seed: int) -> dict:
    """Per dimension and bin: each arm's R@10/R@50 per protocol (mean/sd over seeds) and every arm minus KBRD-style."""
    out = {}
    for dimension, bins in sizes.items():
        out[dimension] = {}
        for label, mask in bins.items():
            cell = {"arms": {}, "minus_kbrd": {}}
            for arm, runs in arms.items():
                cell["arms"][arm] = {}
                for protocol in REPORTED_PROTOCOLS:
                    keep = rec_metrics.protocol_rows(rows, protocol) & mask
                    scored = [rec_metrics.metrics_from_ranks(_ranks_for(r["arrays"], protocol)[keep]) for r in runs]
                    cell["arms"][arm][protocol] = {
                        "n": int(keep.sum()),
                        **(
                            {m: _mean_sd([x[m] for x in scored]) for m in ("recall@10", "recall@50")}
                            if keep.any()
                            else {}
                        ),
                    }
                if arm != KBRD and KBRD in arms:
                    cell["minus_kbrd"][arm] = _paired(runs, arms[KBRD], rows, n_resamples, seed, keep_rows=mask)
            out[dimension][label] = cell
    return out


def _curves(runs: list[dict]) -> dict:
    """{stage: {seed: per-epoch rows}} of the pre-training stages, from the runs that recorded them."""
    return {
        stage: {r["seed"]: r["curves"][stage] for r in runs if stage in r.get("curves", {})}
        for stage in ("pretrain_coarse", "pretrain_fine")
    }


def _minutes(runs: list[dict]) -> dict:
    """Mean minutes per run; `complete` is False when a run predates provenance (its seconds counted only the last
    process that worked on it)."""
    return {
        "mean": round(float(np.mean([r["seconds"] for r in runs])) / 60, 1),
        "complete": all("provenance" in r for r in runs),
    }


def _setting_entry(
    arms: dict[str, list[dict]], rows: pl.DataFrame, naive: dict, sizes: dict, n_resamples: int, seed: int
) -> dict:
    entry = {
        "arms": {arm: _per_seed(arm_runs, rows) for arm, arm_runs in arms.items()},
        "seeds": {arm: sorted(r["seed"] for r in arm_runs) for arm, arm_runs in arms.items()},
        "minutes": {arm: _minutes(arm_runs) for arm, arm_runs in arms.items()},
        "reused": {
            arm: sorted({r["reused_from"].split("/")[0] for r in arm_runs if "reused_from" in r})
            for arm, arm_runs in arms.items()
        },
        "by_context": {arm: _by_context(arm_runs, rows) for arm, arm_runs in arms.items()},
        "by_context_size": _by_context_size(arms, rows, sizes, n_resamples, seed),
        "curves": _curves(arms.get(C2CRS, [])),
        "valid_recall@50": {
            arm: _mean_sd([r["training"]["finetune_rec"]["valid_recall@50"] for r in arm_runs])
            for arm, arm_runs in arms.items()
        },
        "minus_kbrd": {
            arm: _paired(arm_runs, arms[KBRD], rows, n_resamples, seed)
            for arm, arm_runs in arms.items()
            if arm != KBRD and KBRD in arms
        },
        # every arm inside the learned repeat choice (beyond the paper), and each against the naive baselines
        "with_repeat_choice": {
            arm: _per_seed(arm_runs, rows, REPEAT_CHOICE)
            for arm, arm_runs in arms.items()
            if _has(arm_runs, REPEAT_CHOICE)
        },
        "minus_naive": _minus_naive(arms, naive, rows, n_resamples, seed),
    }
    with_diagnostics = [r for r in arms.get(C2CRS, []) if "diagnostics" in r]
    if with_diagnostics:
        entry["diagnostics"] = {
            "test": {d: _per_seed(with_diagnostics, rows, d) for d in DIAGNOSTICS},
            "valid": {
                d: {
                    m: _mean_sd([r["diagnostics"][d]["valid"][m] for r in with_diagnostics])
                    for m in ("recall@10", "recall@50")
                }
                for d in DIAGNOSTICS
            },
            "zero_shot_gain": _paired(
                with_diagnostics,
                with_diagnostics,
                rows,
                n_resamples,
                seed,
                "zero_shot_pretrained",
                "zero_shot_untrained",
            ),
            "probe_gain": _paired(
                with_diagnostics, with_diagnostics, rows, n_resamples, seed, "probe_pretrained", "probe_untrained"
            ),
            "fine_tuning_minus_probe": _paired(
                with_diagnostics, with_diagnostics, rows, n_resamples, seed, "ranks", "probe_pretrained"
            ),
        }
    return entry


def _learning_curve(
    by_setting: dict[str, dict[str, list[dict]]],
    curve: dict[str, tuple[float, str]],
    base: str,
    rows: pl.DataFrame,
    n_resamples: int,
    seed: int,
) -> dict:
    """{fraction: {"arms": {c2crs_pretrain_all / c2crs_pretrain_same / kbrd: per-seed metrics},
    "minus_kbrd": {pretrain_all / pretrain_same: paired}, "curves": pre-training curves of the same-share arm}};
    the share 1.0 is the base setting itself (pre-trained on all conversations, which are then the same share)."""
    points = {1.0: {"all": base, "same": base}}
    for name, (fraction, data) in curve.items():
        points.setdefault(fraction, {})[data] = name
    out = {}
    for fraction in sorted(points):
        arms, minus = {}, {}
        for data, setting in points[fraction].items():
            of_setting = by_setting.get(setting, {})
            if C2CRS in of_setting:
                arms[f"c2crs_pretrain_{data}"] = _per_seed(of_setting[C2CRS], rows)
                if KBRD in of_setting:
                    minus[f"pretrain_{data}"] = _paired(of_setting[C2CRS], of_setting[KBRD], rows, n_resamples, seed)
            if KBRD in of_setting:
                arms[KBRD] = _per_seed(of_setting[KBRD], rows)
        same = by_setting.get(points[fraction].get("same"), {}).get(C2CRS, [])
        out[str(fraction)] = {"arms": arms, "minus_kbrd": minus, "curves": _curves(same)}
    return out


def summarise(
    runs: list[dict],
    rows: pl.DataFrame,
    naive: dict,
    sizes: dict,
    n_resamples: int,
    seed: int,
    curve: dict[str, tuple[float, str]] | None = None,
    curve_base: str | None = None,
) -> dict:
    """Everything the report shows, as JSON-able data. curve: the learning curve's settings (name -> (share,
    "all" or "same")), summarised apart from the settings."""
    curve = curve or {}
    summary = {"naive": {}, "settings": {}}
    for name, ranks in naive.items():
        summary["naive"][name] = {
            p: {m: v[m]["mean"] for m in KEYS} for p, v in _per_seed(_as_runs(ranks), rows).items()
        }
    by_setting: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        by_setting.setdefault(r["setting"], {}).setdefault(r["arm"], []).append(r)
    for setting, arms in by_setting.items():
        if setting not in curve:
            summary["settings"][setting] = _setting_entry(arms, rows, naive, sizes, n_resamples, seed)
    summary["setting_order"] = list(summary["settings"])  # as the runs came (write_report: params' order)
    if curve_base:
        summary["learning_curve"] = {
            "setting": curve_base,
            "points": _learning_curve(by_setting, curve, curve_base, rows, n_resamples, seed),
        }
    return summary


def plot_files(summary: dict, directory: Path) -> dict[Path, list | dict]:
    """The DVC plots' data: every C2-CRS run's pre-training loss per epoch (loss/<setting>.<stage>.seed<k>.json) and
    each arm's recall per share on the learning curve (learning_curve/<protocol>/<arm>.json: one line per file)."""
    files = {}
    curves = {setting: entry["curves"] for setting, entry in summary["settings"].items()}
    for fraction, point in summary.get("learning_curve", {}).get("points", {}).items():
        if float(fraction) < 1:
            curves[f"{summary['learning_curve']['setting']}_{round(float(fraction) * 100)}pct_pretrain_same"] = point[
                "curves"
            ]
    for setting, by_stage in curves.items():
        for stage, by_seed in by_stage.items():
            for seed, rows in by_seed.items():
                files[directory / "loss" / f"{setting}.{stage}.seed{seed}.json"] = [
                    {k: row[k] for k in ("epoch", "train_loss", "valid_loss")} for row in rows
                ]
    points = summary.get("learning_curve", {}).get("points", {})
    for protocol in ("all_turns", "new_items_masked"):
        for arm in dict.fromkeys(arm for point in points.values() for arm in point["arms"]):
            files[directory / "learning_curve" / protocol / f"{arm}.json"] = [
                {
                    "share": float(fraction),
                    **{m: point["arms"][arm][protocol][m]["mean"] for m in ("recall@10", "recall@50")},
                }
                for fraction, point in points.items()
                if arm in point["arms"]
            ]
    return files
