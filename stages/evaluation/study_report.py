"""The pre-training study's numbers and report (reports/pretraining.md) from its finished runs.

Each run left <arm>.json (training outcome, validation metrics, diagnostics) and <arm>.npz (test ranks, one per
evaluation row of stages.evaluate.expand_mentions, unmasked and masked). Per setting and arm: each metric's mean and
sample standard deviation over seeds; C2-CRS minus the KBRD-style model as a paired difference of the per-row
metric values averaged over the seeds both arms finished, with a cluster-bootstrap interval over test
conversations (the same resamples for both arms).
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


def naive_ranks(test_samples: pl.DataFrame, rows: pl.DataFrame, train_targets: np.ndarray,
                n_items: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(ranks, masked ranks) of popularity, repeat and repeat-then-popularity on the test rows."""
    popularity = popularity_scores(torch.as_tensor(train_targets, dtype=torch.long), n_items).numpy()
    scorers = rec_metrics.naive_scorers(rec_metrics.context_items_by_recency(test_samples), popularity)
    sample_ids = test_samples["sample_id"].to_numpy()
    exclude = rows["context_item_ids"].to_list()
    ranks = {}
    for name, score in scorers.items():
        blocks = ((sample_ids[batch], score(batch)) for batch in np.array_split(np.arange(len(sample_ids)),
                                                                                 max(1, len(sample_ids) // 512)))
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
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
            "seeds": len(values)}


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
        out[protocol] = {part: {**{m: _mean_sd([s[part][m] for s in splits]) for m in ("recall@10", "recall@50")},
                                "n": splits[0][part]["n"]} for part in ("with_entities", "without_entities")}
    return out


def _paired(runs_a: list[dict], runs_b: list[dict], rows: pl.DataFrame, n_resamples: int, seed: int,
            key_a: str = "ranks", key_b: str = "ranks") -> dict:
    """a minus b on the seeds both have: per-row metric values averaged over those seeds, paired bootstrap."""
    if len(runs_b) == 1 and runs_b[0]["seed"] is None:  # a naive baseline: the same ranks for every seed
        runs_b = [{**runs_b[0], "seed": r["seed"]} for r in runs_a]
    seeds = sorted({r["seed"] for r in runs_a} & {r["seed"] for r in runs_b})
    if not seeds:
        return {}
    a = {r["seed"]: r for r in runs_a}
    b = {r["seed"]: r for r in runs_b}
    out = {"seeds": seeds}
    for protocol in REPORTED_PROTOCOLS:
        keep = rec_metrics.protocol_rows(rows, protocol)
        values = [rec_metrics.metric_values(_ranks_for(a[s]["arrays"], protocol, key_a)[keep])
                  - rec_metrics.metric_values(_ranks_for(b[s]["arrays"], protocol, key_b)[keep]) for s in seeds]
        difference = rec_metrics.paired_values_difference(rows.filter(pl.Series(keep)), np.mean(values, axis=0),
                                                          n_resamples=n_resamples, seed=seed)
        out[protocol] = {m: difference[m] for m in KEYS}
    return out


def _has(runs: list[dict], key: str) -> bool:
    return all(key in r["arrays"] for r in runs)


def _minus_naive(arms: dict[str, list[dict]], naive: dict, rows: pl.DataFrame, n_resamples: int, seed: int) -> dict:
    """{arm (or arm+repeat_choice): {naive baseline: paired difference}}: does a model beat repeating the context?"""
    out = {}
    for arm, runs in arms.items():
        for label, key in ((arm, "ranks"), (f"{arm}+repeat_choice", REPEAT_CHOICE)):
            if key == "ranks" or _has(runs, key):
                out[label] = {name: _paired(runs, _as_runs(naive[name]), rows, n_resamples, seed, key)
                              for name in NAIVE}
    return out


def summarise(runs: list[dict], rows: pl.DataFrame, naive: dict, n_resamples: int, seed: int) -> dict:
    """Everything the report shows, as JSON-able data."""
    summary = {"naive": {}, "settings": {}}
    for name, ranks in naive.items():
        summary["naive"][name] = {p: {m: v[m]["mean"] for m in KEYS}
                                  for p, v in _per_seed(_as_runs(ranks), rows).items()}
    for setting in dict.fromkeys(r["setting"] for r in runs):
        of_setting = [r for r in runs if r["setting"] == setting]
        arms = {arm: [r for r in of_setting if r["arm"] == arm] for arm in dict.fromkeys(r["arm"] for r in of_setting)}
        entry = {"arms": {arm: _per_seed(arm_runs, rows) for arm, arm_runs in arms.items()},
                 "seeds": {arm: sorted(r["seed"] for r in arm_runs) for arm, arm_runs in arms.items()},
                 "minutes": {arm: round(float(np.mean([r["seconds"] for r in arm_runs])) / 60, 1)
                             for arm, arm_runs in arms.items()},
                 "by_context": {arm: _by_context(arm_runs, rows) for arm, arm_runs in arms.items()},
                 "valid_recall@50": {arm: _mean_sd([r["training"]["finetune_rec"]["valid_recall@50"]
                                                    for r in arm_runs]) for arm, arm_runs in arms.items()},
                 "minus_kbrd": {arm: _paired(arm_runs, arms[KBRD], rows, n_resamples, seed)
                                for arm, arm_runs in arms.items() if arm != KBRD and KBRD in arms},
                 # every arm inside the learned repeat choice (beyond the paper), and each against the naive baselines
                 "with_repeat_choice": {arm: _per_seed(arm_runs, rows, REPEAT_CHOICE)
                                        for arm, arm_runs in arms.items() if _has(arm_runs, REPEAT_CHOICE)},
                 "minus_naive": _minus_naive(arms, naive, rows, n_resamples, seed)}
        with_diagnostics = [r for r in arms.get(C2CRS, []) if "diagnostics" in r]
        if with_diagnostics:
            entry["diagnostics"] = {
                "test": {d: _per_seed(with_diagnostics, rows, d) for d in DIAGNOSTICS},
                "valid": {d: {m: _mean_sd([r["diagnostics"][d]["valid"][m] for r in with_diagnostics])
                              for m in ("recall@10", "recall@50")} for d in DIAGNOSTICS},
                "zero_shot_gain": _paired(with_diagnostics, with_diagnostics, rows, n_resamples, seed,
                                          "zero_shot_pretrained", "zero_shot_untrained"),
                "probe_gain": _paired(with_diagnostics, with_diagnostics, rows, n_resamples, seed,
                                      "probe_pretrained", "probe_untrained"),
                "fine_tuning_minus_probe": _paired(with_diagnostics, with_diagnostics, rows, n_resamples, seed,
                                                   "ranks", "probe_pretrained"),
            }
        summary["settings"][setting] = entry
    return summary


def _fmt(stat: dict) -> str:
    if stat.get("sd") is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def _diff(d: dict) -> str:
    lo, hi = d["ci95"]
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "tie"
    return f"{d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}"


def verdict(minus_kbrd: dict) -> str:
    """What pre-training does to recommendation: better / worse only when every R@10 and R@50 interval of both
    standard protocols says so, "on some metrics" when some do and the others include 0."""
    cells = [minus_kbrd[p][m]["ci95"] for p in ("all_turns", "recommender_turns") for m in ("recall@10", "recall@50")]
    if all(lo > 0 for lo, _ in cells):
        return "improves recommendation"
    if all(hi < 0 for _, hi in cells):
        return "worsens recommendation"
    if any(lo > 0 for lo, _ in cells):
        return "improves recommendation on some metrics (the other intervals include 0)"
    if any(hi < 0 for _, hi in cells):
        return "worsens recommendation on some metrics (the other intervals include 0)"
    return "does not measurably change recommendation"


def report(summary: dict, params) -> str:
    lines = ["# Does coarse-to-fine pre-training improve recommendation?", "",
             "Generated by `python -m pipeline study report` from the runs of `python -m pipeline study run` "
             f"(params.study; each run's results in `{params.study.results_dir}`). Do not edit by hand.", "",
             "Protocol: the ReDial test split, one evaluation row per ground-truth movie mention of a scored turn, "
             "ranked over all movies (stages/evaluation/rec_metrics.py). all_turns: seeker and recommender turns "
             "(the C2-CRS code); recommender_turns: the recommender's only; new_items: recommender turns whose movie "
             "was not mentioned before, ranked over all movies; new_items_masked: the same rows with the context's "
             "movies removed from every ranking. Each arm is trained once per seed with the same code; 'KBRD-style' is "
             "the C2-CRS recommender trained from fresh weights (no pre-training). Cells: mean ± standard deviation "
             "over seeds. Differences: per-row metric values averaged over the seeds both arms finished, 95 % "
             "paired cluster-bootstrap interval over test conversations; 'better'/'worse' when it excludes 0. "
             "Nothing was selected on test.", ""]
    answers = []
    for setting, entry in summary["settings"].items():
        if C2CRS in entry["minus_kbrd"] and entry["minus_kbrd"][C2CRS]:
            seeds = entry["minus_kbrd"][C2CRS]["seeds"]
            d = entry["minus_kbrd"][C2CRS]["all_turns"]
            answers.append(f"under `{setting}` ({len(seeds)} seed(s)) pre-training "
                           f"{verdict(entry['minus_kbrd'][C2CRS])} (all turns R@10 "
                           f"{_diff(d['recall@10'])}, R@50 {_diff(d['recall@50'])})")
    lines += ["## Answer", "", ("On this data, " + "; ".join(answers) + ".") if answers
              else "No setting has both arms finished yet.", ""]
    lines += ["## Selection on validation", "",
              "The default settings are chosen by validation recall@50 of the fine-tuned recommender (the metric its "
              "early stopping uses), never by test numbers:", "",
              "| setting | model | validation recall@50 | seeds |", "|---|---|---|---|"]
    for setting, entry in summary["settings"].items():
        for arm, stat in entry["valid_recall@50"].items():
            lines.append(f"| {setting} | {_label(arm)} | {_fmt(stat)} | {stat['seeds']} |")
    lines.append("")
    for setting, entry in summary["settings"].items():
        overrides = params.study.settings.get(setting, {})
        lines += [f"## Setting `{setting}`", "",
                  "Overrides of params.yaml: " + (", ".join(f"`{k}={json.dumps(v)}`" for k, v in overrides.items())
                                                  or "none (the default pipeline)") + ".",
                  "Seeds finished: " + ", ".join(f"{arm} {seeds}" for arm, seeds in entry["seeds"].items())
                  + "; minutes per run: " + ", ".join(f"{arm} {m}" for arm, m in entry["minutes"].items()) + ".", ""]
        for protocol in REPORTED_PROTOCOLS:
            lines += [f"### {protocol}", "", "| model | R@1 | R@10 | R@50 | n |", "|---|---|---|---|---|"]
            for arm, by_protocol in entry["arms"].items():
                m = by_protocol[protocol]
                lines.append(f"| {_label(arm)} | " + " | ".join(_fmt(m[k]) for k in KEYS) + f" | {m['n']} |")
            if protocol != "new_items_masked":  # with the context's movies masked the choice changes nothing
                for arm, by_protocol in entry["with_repeat_choice"].items():
                    m = by_protocol[protocol]
                    lines.append(f"| {_label(arm)} + repeat choice (beyond the paper) | "
                                 + " | ".join(_fmt(m[k]) for k in KEYS) + f" | {m['n']} |")
            for name, by_protocol in summary["naive"].items():
                lines.append(f"| {name} (naive) | " + " | ".join(f"{by_protocol[protocol][k]:.3f}" for k in KEYS)
                             + " | |")
            lines.append("")
        if entry["minus_kbrd"]:
            lines += ["Minus KBRD-style (paired):", "", "| model | protocol | R@1 | R@10 | R@50 |",
                      "|---|---|---|---|---|"]
            for arm, by_protocol in entry["minus_kbrd"].items():
                for protocol in REPORTED_PROTOCOLS:
                    if protocol in by_protocol:
                        lines.append(f"| {_label(arm)} | {protocol} | "
                                     + " | ".join(_diff(by_protocol[protocol][k]) for k in KEYS) + " |")
            lines.append("")
        lines += ["By context (linked entities in the context or none; R@10 / R@50, mean over seeds):", "",
                  "| model | protocol | with entities | n | without | n |", "|---|---|---|---|---|---|"]
        for arm, by_protocol in entry["by_context"].items():
            for protocol, parts in by_protocol.items():
                cells = [f"{_fmt(parts[part]['recall@10'])} / {_fmt(parts[part]['recall@50'])} | {parts[part]['n']}"
                         for part in ("with_entities", "without_entities")]
                lines.append(f"| {_label(arm)} | {protocol} | " + " | ".join(cells) + " |")
        lines.append("")
        if entry["minus_naive"]:
            lines += ["Against the naive baselines (paired; model minus baseline):", "",
                      "| model | baseline | protocol | R@1 | R@10 | R@50 |", "|---|---|---|---|---|---|"]
            for arm, by_baseline in entry["minus_naive"].items():
                label = (_label(arm.removesuffix("+repeat_choice"))
                         + (" + repeat choice" if arm.endswith("+repeat_choice") else ""))
                for name, by_protocol in by_baseline.items():
                    for protocol in REPORTED_PROTOCOLS:
                        if protocol in by_protocol and not (arm.endswith("+repeat_choice")
                                                            and protocol == "new_items_masked"):
                            lines.append(f"| {label} | {name} | {protocol} | "
                                         + " | ".join(_diff(by_protocol[protocol][k]) for k in KEYS) + " |")
            lines.append("")
        if "diagnostics" in entry:
            lines += _diagnostics_section(entry["diagnostics"])
    return "\n".join(lines) + "\n"


def _label(arm: str) -> str:
    return {C2CRS: "C2-CRS", KBRD: "KBRD-style (no pre-training)"}.get(arm, f"{arm} (beyond the paper)")


def _diagnostics_section(diagnostics: dict) -> list[str]:
    lines = ["### Diagnostics without fine-tuning", "",
             "zero-shot: the pre-trained graph view e_G of the context dotted with the item rows of N, no "
             "recommendation training; probe: N frozen, only a fresh self-attentive pooling and an item bias trained "
             "(best epoch on validation recall@50). 'untrained': the same on a model of the same seed that never "
             "trained.", "",
             "| diagnostic | valid R@10 | valid R@50 | test all_turns R@10 | R@50 "
             "| test new_items_masked R@10 | R@50 |",
             "|---|---|---|---|---|---|---|"]
    for name in DIAGNOSTICS:
        valid, test = diagnostics["valid"][name], diagnostics["test"][name]
        lines.append(f"| {name} | {_fmt(valid['recall@10'])} | {_fmt(valid['recall@50'])} | "
                     f"{_fmt(test['all_turns']['recall@10'])} | {_fmt(test['all_turns']['recall@50'])} | "
                     f"{_fmt(test['new_items_masked']['recall@10'])} | {_fmt(test['new_items_masked']['recall@50'])} |")
    lines += ["", "| paired difference (test) | protocol | R@10 | R@50 |", "|---|---|---|---|"]
    for name, label in (("zero_shot_gain", "zero-shot: pre-trained minus untrained"),
                        ("probe_gain", "probe: pre-trained N minus untrained N"),
                        ("fine_tuning_minus_probe", "fine-tuned C2-CRS minus the probe on its pre-trained N")):
        for protocol in ("all_turns", "new_items_masked"):
            if protocol in diagnostics[name]:
                d = diagnostics[name][protocol]
                lines.append(f"| {label} | {protocol} | {_diff(d['recall@10'])} | {_diff(d['recall@50'])} |")
    return lines + [""]
