"""The docs' figures, drawn from the committed reports by `python -m pipeline report` (pipeline/report.py) as
Vega-Lite charts rendered to PNG (vl-convert, offline): each a function of the reports' JSON, named by its file."""

import json
from collections.abc import Callable
from pathlib import Path

RECALL_AT_K = "reports/recall_at_k.json"
FINETUNE_CURVE = "reports/curves/finetune_rec.json"
STUDY_SUMMARY = "reports/pretraining_runs/summary.json"
SHOWN_RECOMMENDERS = ("c2crs", "c2crs-repeat-choice", "kbrd", "kgsf", "repeat_popularity", "popularity")
CURVE_ARMS = {
    "kbrd": "KBRD-style",
    "c2crs_pretrain_all": "C2-CRS, pre-trained on all",
    "c2crs_pretrain_same": "C2-CRS, pre-trained on the share",
}


def _lines(rows: list[dict], x: str, y: str, color: str, title: str, y_title: str) -> dict:
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": title,
        "width": 480,
        "height": 280,
        "data": {"values": rows},
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": {"field": x, "type": "quantitative"},
            "y": {"field": y, "type": "quantitative", "title": y_title},
            "color": {"field": color, "type": "nominal", "title": None},
        },
    }


def recall_at_k(reports: dict) -> dict:
    rows = [
        {"k": row["k"], "model": model, "recall": row[model]}
        for row in reports[RECALL_AT_K]
        for model in SHOWN_RECOMMENDERS
        if model in row
    ]
    return _lines(rows, "k", "recall", "model", "Test recall@k, all turns (reports/rec.json)", "recall@k")


def finetune_curve(reports: dict) -> dict:
    rows = [
        {"epoch": row["epoch"], "metric": metric, "value": row[metric]}
        for row in reports[FINETUNE_CURVE]
        for metric in ("valid_recall@10", "valid_recall@50")
        if metric in row
    ]
    return _lines(rows, "epoch", "value", "metric", "finetune_rec: validation recall per epoch", "recall")


def learning_curve(reports: dict) -> dict:
    points = reports[STUDY_SUMMARY].get("learning_curve", {}).get("points", {})
    rows = [
        {"share": float(fraction), "arm": CURVE_ARMS[arm], "recall@50": by_protocol["all_turns"]["recall@50"]["mean"]}
        for fraction, point in points.items()
        for arm, by_protocol in point["arms"].items()
    ]
    return _lines(
        rows, "share", "recall@50", "arm", "Learning curve: test R@50, all turns, mean over seeds", "recall@50"
    )


def pretraining_loss(reports: dict) -> dict:
    rows = [
        {
            "epoch": row["epoch"],
            "run": f"{setting} {stage.removeprefix('pretrain_')} seed {seed}",
            "held-out loss": row["valid_loss"],
        }
        for setting, entry in reports[STUDY_SUMMARY]["settings"].items()
        for stage, by_seed in entry["curves"].items()
        for seed, rows in by_seed.items()
        for row in rows
    ]
    return _lines(rows, "epoch", "held-out loss", "run", "Pre-training: held-out loss per epoch", "loss")


FIGURES: dict[str, tuple[Callable[[dict], dict], tuple[str, ...]]] = {
    "recall_at_k.png": (recall_at_k, (RECALL_AT_K,)),
    "finetune_rec_curve.png": (finetune_curve, (FINETUNE_CURVE,)),
    "learning_curve.png": (learning_curve, (STUDY_SUMMARY,)),
    "pretraining_loss.png": (pretraining_loss, (STUDY_SUMMARY,)),
}


def read_reports(root: Path) -> dict:
    paths = {path for _, needs in FIGURES.values() for path in needs}
    return {path: json.loads((root / path).read_text(encoding="utf-8")) for path in paths}


def render(name: str, reports: dict) -> bytes:
    """The figure as PNG bytes."""
    import vl_convert

    return vl_convert.vegalite_to_png(FIGURES[name][0](reports), scale=1.5)
