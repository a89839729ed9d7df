"""The stage graph, read from dvc.yaml: the one place that declares what each stage reads and writes.

A stage's run() takes its output paths from here, and the orchestration (pipeline/) its flows, CLI listing and
MLflow params; DVC reads the same file. Paths under data/ are a stage's data inputs, the other deps its code.
"""

import importlib
from dataclasses import dataclass
from pathlib import Path

import yaml

DVC_YAML = Path(__file__).resolve().parents[2] / "dvc.yaml"


@dataclass(frozen=True)
class StageSpec:
    name: str
    summary: str  # dvc.yaml desc
    params: tuple[str, ...]  # params.yaml keys the stage reads
    code: tuple[str, ...]  # source files whose change must rerun the stage
    deps: tuple[str, ...]  # outputs of earlier stages
    outs: tuple[str, ...]
    metrics: tuple[str, ...]
    reports: tuple[str, ...] = ()  # human-readable outputs (outs with cache: false), kept in git like metrics
    external_inputs: str = ""  # dvc.yaml meta.external_inputs: data read from outside the workspace

    def all_deps(self) -> tuple[str, ...]:
        return self.code + self.deps


def _path(entry) -> str:
    """An out or metric of dvc.yaml: a path, or {path: options}."""
    return next(iter(entry)) if isinstance(entry, dict) else entry


def load_stage_graph(path: Path = DVC_YAML) -> dict[str, StageSpec]:
    """Every stage of dvc.yaml in its order (written topologically), as StageSpec."""
    try:
        stages = yaml.safe_load(path.read_text(encoding="utf-8"))["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: cannot read the stage graph ({exc})") from None
    graph = {}
    for name, stage in stages.items():
        deps = [str(d) for d in stage.get("deps", [])]
        outs = stage.get("outs", [])
        graph[name] = StageSpec(
            name=name, summary=" ".join(str(stage.get("desc", "")).split()),
            params=tuple(stage.get("params", [])),
            code=tuple(d for d in deps if not d.startswith("data/")),
            deps=tuple(d for d in deps if d.startswith("data/")),
            outs=tuple(o for o in outs if not isinstance(o, dict)),
            metrics=tuple(_path(m) for m in stage.get("metrics", [])),
            reports=tuple(_path(o) for o in outs if isinstance(o, dict)),
            external_inputs=" ".join(str(stage.get("meta", {}).get("external_inputs", "")).split()))
    return graph


STAGES = load_stage_graph()


def stage_names() -> list[str]:
    """Stages in execution order."""
    return list(STAGES)


def stage_body(name: str):
    """The run(params, workspace, log) of a stage: the module stages/<name>.py."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; dvc.yaml has {', '.join(STAGES)}")
    return importlib.import_module(f"stages.{name}").run
