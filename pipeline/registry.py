"""The MLflow model registry: every trained model a version of a named model, `champion` decided on validation.

A training stage registers its model (StageRun.model): the torch module in MLflow's pytorch flavour, with the
stage's own weights file (the DVC output, loaded without unpickling code) as an extra file, and tags that tie the
version to what made it: git commit, the stage's params hash, the sha256 of every input and of the weights file.
Its validation metrics are metrics of the version's logged model. The newest version carries the alias
`challenger`. evaluate (StageRun.evaluated) finds the version of the file it scored by that file's hash, logs the
test metrics on it, and moves `champion` to it only when it beats the champion's validation metric (params:
evaluate.champion). `python -m pipeline models list|compare` reads it all back; talk and score load
`models:/NAME@champion` (model_file) and fall back to the workspace's files.
"""

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stages.io.outputs import content_hash

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
FILE_TAG, FILE_NAME_TAG = "c2crs.file_sha256", "c2crs.file_name"
PARAMS_TAG, GIT_TAG, STAGE_TAG = "params_sha256", "git_commit", "stage"
MODEL_REQUIREMENTS = ["torch==2.13.0", "torch-geometric==2.8.1"]
DATA_TAG = "data."  # data.<input name> = sha256 of that input
VALIDATION_PREFIX, TEST_PREFIX = "valid", "test."


def metric_name(key: str) -> str:
    """MLflow metric names allow no '@': recall@10 -> recall_at_10."""
    return key.replace("@", "_at_")


def version_metrics(values: dict, prefix: str = "") -> dict[str, float]:
    """A model's numbers from a metrics dict: nested keys joined with dots, a 95 % interval [low, high] as two
    metrics (<name>.ci95_low/high); comparisons with other models (margin_over) and per-context breakdowns
    (by_context) stay in the reports."""
    flat = {}
    for key, value in values.items():
        if key in ("margin_over", "by_context"):
            continue
        if key == "ci95" and isinstance(value, dict):
            for metric, interval in value.items():
                if isinstance(interval, (list, tuple)) and len(interval) == 2 and None not in interval:
                    flat[metric_name(f"{prefix}{metric}.ci95_low")] = float(interval[0])
                    flat[metric_name(f"{prefix}{metric}.ci95_high")] = float(interval[1])
        elif isinstance(value, dict):
            flat.update(version_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[metric_name(f"{prefix}{key}")] = float(value)
    return flat


def model_id(version: ModelVersion) -> str:
    """The logged model behind a version (MLflow 3 keeps the version's metrics there)."""
    return getattr(version, "model_id", None) or version.source.removeprefix("models:/")


def logged_metrics(client: MlflowClient, version: ModelVersion) -> dict[str, float]:
    """The latest value of every metric of a version's logged model, without the <name>. that the runs' copies carry
    (one evaluate run scores every model)."""
    latest = {}
    for metric in client.get_logged_model(model_id(version)).metrics or []:
        key = metric.key.removeprefix(f"{version.name}.")
        if key not in latest or metric.timestamp >= latest[key][0]:
            latest[key] = (metric.timestamp, metric.value)
    return {key: value for key, (_, value) in latest.items()}


def log_test_metrics(version: ModelVersion, test: dict) -> None:
    """Test metrics of a version, in the active (evaluate) run and on the version's logged model."""
    mlflow.log_metrics(version_metrics(test, prefix=f"{version.name}.{TEST_PREFIX}"), model_id=model_id(version))


def register(name: str | None, model, file: Path, validation: dict, tags: dict[str, str]) -> ModelVersion | None:
    """Log the model in the active run and, when it has a name, register it as a new version tagged with `tags`
    and the weights file's hash, and make it the challenger. Returns the version (None: not registered)."""
    import mlflow.pytorch

    # Graph models do not export to pt2, so the flavour pickles; the weights file beside it is what our loaders read.
    info = mlflow.pytorch.log_model(
        model,
        name=(name or file.stem),
        serialization_format="pickle",
        pip_requirements=MODEL_REQUIREMENTS,
        extra_files=[str(file)],
        registered_model_name=name,
    )
    if name is None:
        return None
    # The kept epoch's validation numbers, named <name>.valid_... in the run (a stage may train two models; its
    # per-epoch curves keep their own names) and valid_... on the version (logged_metrics drops the name).
    numbers = {
        f"{name}.{k}": v for k, v in version_metrics(validation or {}).items() if k.startswith(VALIDATION_PREFIX)
    }
    if numbers:
        mlflow.log_metrics(numbers, step=int((validation or {}).get("best_epoch") or 0), model_id=info.model_id)
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key, value in {**tags, FILE_TAG: content_hash(file), FILE_NAME_TAG: file.name}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return client.get_model_version(name, version)


def version_of_file(client: MlflowClient, name: str, file: Path) -> ModelVersion | None:
    """The newest version of `name` whose weights are this file (by content), None when none is."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`{FILE_TAG}` = '{content_hash(file)}'")
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such model or alias
        return None


def promote(client: MlflowClient, name: str, version: ModelVersion, rule, min_improvement: float) -> str:
    """Make `version` the champion when it beats the current one on rule.metric (validation) by more than
    min_improvement, and say what was decided and why."""
    key = metric_name(rule.metric)
    value = logged_metrics(client, version).get(key)
    champion = alias_version(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(version.version):
        return f"{name}: version {version.version} is the champion already"
    if value is None:
        return f"{name}: version {version.version} has no {rule.metric}; the champion stays as it is"
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, str(version.version))
        return f"{name}: version {version.version} is the first champion ({rule.metric} {value:.4f})"
    best = logged_metrics(client, champion).get(key)
    gain = None if best is None else (value - best if rule.higher_is_better else best - value)
    caveat = ""
    if _data_tags(champion) != _data_tags(version):
        caveat = " (validated on different data: compare with care)"
    if gain is None or gain > min_improvement:
        client.set_registered_model_alias(name, CHAMPION, str(version.version))
        old = "has none" if best is None else f"{best:.4f}"
        return (
            f"{name}: version {version.version} is the new champion: {rule.metric} {value:.4f}, version "
            f"{champion.version} {old}{caveat}"
        )
    return (
        f"{name}: version {champion.version} stays champion: version {version.version}'s {rule.metric} "
        f"{value:.4f} does not beat its {best:.4f} by more than {min_improvement}{caveat}"
    )


def _data_tags(version: ModelVersion) -> dict[str, str]:
    return {k: v for k, v in version.tags.items() if k.startswith(DATA_TAG)}


# ---------------------------------------------------------------- reading it back: list, compare, load


class RegistryError(ValueError):
    pass


def resolve(client: MlflowClient, reference: str) -> ModelVersion:
    """NAME (its champion, else its newest version), NAME@ALIAS or NAME/VERSION, or models:/ any of these."""
    reference = reference.removeprefix("models:/")
    if "@" in reference:
        name, alias = reference.split("@", 1)
        version = alias_version(client, name, alias)
        if version is None:
            raise RegistryError(
                f"{reference}: no registered model {name!r} with alias {alias!r}" + _known(client, name)
            )
        return version
    if "/" in reference:
        name, number = reference.split("/", 1)
        try:
            return client.get_model_version(name, number)
        except MlflowException:
            raise RegistryError(
                f"{reference}: no version {number} of registered model {name!r}" + _known(client, name)
            ) from None
    champion = alias_version(client, reference, CHAMPION)
    if champion is not None:
        return champion
    versions = all_versions(client, reference)
    if not versions:
        raise RegistryError(f"{reference}: no registered model of that name" + _known(client, reference))
    return versions[-1]


def all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def _known(client: MlflowClient, name: str) -> str:
    versions = all_versions(client, name) if client.search_registered_models(f"name = '{name}'") else []
    if versions:
        return f"; it has versions {', '.join(str(v.version) for v in versions)}"
    names = [m.name for m in client.search_registered_models()]
    return f"; registered models: {', '.join(sorted(names)) or 'none (run the pipeline first)'}"


def model_file(client: MlflowClient, version: ModelVersion, into: Path | None = None) -> Path:
    """The weights file of a version, downloaded from its logged model."""
    name = version.tags.get(FILE_NAME_TAG)
    if not name:
        raise RegistryError(
            f"{version.name}/{version.version} has no {FILE_NAME_TAG} tag: not registered by this pipeline"
        )
    into = into or Path(tempfile.mkdtemp(prefix="c2crs-model-"))
    return Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{version.name}/{version.version}/extra_files/{name}", dst_path=str(into)
        )
    )


def data_differences(version: ModelVersion, data: dict[str, Path], hashes: dict[str, str]) -> list[str]:
    """The inputs (of `data`: name -> the workspace's file) whose content differs from what the version was trained
    on; hashes caches the workspace files' digests across calls."""
    differs = []
    for key, digest in _data_tags(version).items():
        input_name = key.removeprefix(DATA_TAG)
        if input_name in data and data[input_name].exists():
            hashes.setdefault(input_name, content_hash(data[input_name]))
            if hashes[input_name] != digest:
                differs.append(input_name)
    return differs


def registry_files(
    client: MlflowClient, wanted: dict[str, Path], data: dict[str, Path], alias: str = CHAMPION
) -> tuple[dict[str, Path], list[str]]:
    """For each registered name (-> its file in the workspace), the weights of its `alias` version when that version
    was trained on the data the workspace holds now (the vocabulary and entity ids must be the same), else the
    workspace's file; and one line per model saying which was used and why."""
    files, notes, hashes = {}, [], {}
    for name, workspace_file in wanted.items():
        version = alias_version(client, name, alias)
        if version is None:
            files[name] = workspace_file
            notes.append(f"{name}: no {alias} in the registry; using {workspace_file}")
            continue
        differs = data_differences(version, data, hashes)
        if differs:
            files[name] = workspace_file
            notes.append(
                f"{name}: {alias} version {version.version} was trained on other data "
                f"({', '.join(differs)} differ); using {workspace_file}"
            )
            continue
        files[name] = model_file(client, version)
        notes.append(f"{name}: models:/{name}@{alias} (version {version.version})")
    return files, notes


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]

    def render(self, markdown: bool = False) -> str:
        if markdown:
            lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
            return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self.rows])
        widths = [max(len(str(row[i])) for row in [self.header, *self.rows]) for i in range(len(self.header))]
        lines = [self.header, ["-" * w for w in widths], *self.rows]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)


def list_models(client: MlflowClient) -> Table:
    """Every registered model: its versions, champion, challenger and the champion's validation numbers."""
    rows = []
    for registered in sorted(client.search_registered_models(), key=lambda m: m.name):
        versions = all_versions(client, registered.name)
        champion = alias_version(client, registered.name, CHAMPION)
        challenger = alias_version(client, registered.name, CHALLENGER)
        valid = logged_metrics(client, champion) if champion else {}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(valid.items()) if k.startswith(VALIDATION_PREFIX))
        rows.append(
            [
                registered.name,
                str(len(versions)),
                str(champion.version) if champion else "–",
                str(challenger.version) if challenger else "–",
                shown or "–",
            ]
        )
    return Table(["model", "versions", "champion", "challenger", "champion's validation"], rows)


def _with_interval(metrics: dict[str, float], key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "–"
    low, high = metrics.get(f"{key}.ci95_low"), metrics.get(f"{key}.ci95_high")
    if low is not None and high is not None:
        return f"{value:.4f} [{low:.4f}, {high:.4f}]"
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}"


def compare(client: MlflowClient, references: list[str]) -> Table:
    """Versions side by side: what they are, the params that differ, validation and test metrics (with 95 %
    intervals), and the data they were trained on (a '*' marks a hash that differs between the versions)."""
    versions = [resolve(client, reference) for reference in references]
    header = ["version", *(f"{v.name}/{v.version}" for v in versions)]
    runs = [client.get_run(v.run_id) for v in versions]
    metrics = [logged_metrics(client, v) for v in versions]
    rows = [
        ["aliases", *(", ".join(v.aliases) or "–" for v in versions)],
        ["git commit", *(v.tags.get(GIT_TAG, "–")[:16] for v in versions)],
        ["stage run", *(f"{r.info.run_name} {r.info.run_id[:8]}" for r in runs)],
    ]

    params = [r.data.params for r in runs]
    keys = sorted({k for p in params for k in p if not k.startswith("input_sha256.")})
    differing = [k for k in keys if len({p.get(k) for p in params}) > 1]
    rows += [[f"param {k}", *(p.get(k, "–") for p in params)] for k in differing]
    if not differing:
        rows.append(["params", *([f"the same {len(keys)}"] * len(versions))])

    metric_keys = sorted({k for m in metrics for k in m if ".ci95_" not in k})
    for key in [k for k in metric_keys if k.startswith(VALIDATION_PREFIX)] + [
        k for k in metric_keys if k.startswith(TEST_PREFIX)
    ]:
        rows.append([key, *(_with_interval(m, key) for m in metrics)])

    data = [_data_tags(v) for v in versions]
    for key in sorted({k for d in data for k in d}):
        hashes = [d.get(key, "–") for d in data]
        mark = " *" if len(set(hashes)) > 1 else ""
        rows.append([f"{key}{mark}", *(h[:12] for h in hashes)])
    return Table(header, rows)
