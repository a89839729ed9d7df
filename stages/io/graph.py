"""The stage graph, read from dvc.yaml: the one place that declares what each stage reads and writes.

A stage's run() takes its output paths from here, and the orchestration (pipeline/) its flows, CLI listing and
MLflow params; DVC reads the same file. Paths under data/ and reports/ are a stage's data inputs (a report another
stage wrote: evaluate reads choose_decoding's reports/decoding.json), the other deps its code.
A `foreach` stage is one stage per variant of a params section (a mapping's keys: ablations.variants) or list
(baselines.train), named as DVC names it (ablations@wo_coarse): its spec here holds `${key}` (`${item}` for a list)
in its paths until for_variant() fills them in.
"""

import dataclasses
import functools
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

DVC_YAML = Path(__file__).resolve().parents[2] / "dvc.yaml"
DATA_ROOTS = ("data/", "reports/")  # where a dep is another stage's output, not code


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
    foreach: str = ""  # a foreach stage: the params key of its variants (e.g. ablations.variants)

    def all_deps(self) -> tuple[str, ...]:
        return self.code + self.deps

    def input(self, name: str) -> str:
        """The data dep called `name` (see named()): the stage reads it by name, so dvc.yaml's order never matters."""
        return named(self.deps, name, f"dvc.yaml, stage {self.name}: deps")

    def output(self, name: str) -> str:
        return named(self.outs, name, f"dvc.yaml, stage {self.name}: outs")

    def report(self, name: str) -> str:
        return named(self.reports, name, f"dvc.yaml, stage {self.name}: outs (cache: false)")

    def metric(self, name: str) -> str:
        return named(self.metrics, name, f"dvc.yaml, stage {self.name}: metrics")

    @property
    def model_file(self) -> str:
        """The stage's one trained model file (the one out ending in .pt)."""
        models = [out for out in self.outs if out.endswith(".pt")]
        if len(models) != 1:
            raise ValueError(f"dvc.yaml, stage {self.name}: expected one model file (.pt) in outs, found {models}")
        return models[0]

    @property
    def metrics_file(self) -> str:
        if len(self.metrics) != 1:
            raise ValueError(f"dvc.yaml, stage {self.name}: expected one metrics file, found {list(self.metrics)}")
        return self.metrics[0]

    def for_variant(self, variant: str) -> "StageSpec":
        """One variant's stage of a foreach stage: its name and paths with DVC's ${key} filled in."""
        if not self.foreach:
            raise ValueError(f"stage {self.name!r} has no variants")

        def fill(values: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(value.replace("${key}", variant).replace("${item}", variant) for value in values)

        return dataclasses.replace(
            self,
            name=f"{self.name}@{variant}",
            params=fill(self.params),
            outs=fill(self.outs),
            metrics=fill(self.metrics),
            reports=fill(self.reports),
            foreach="",
        )


def named(paths: tuple[str, ...], name: str, where: str) -> str:
    """The one path called `name`: its file name (rec.md), its stem (movies for data/ingest/movies.parquet) or, where
    two share a stem, its folder and stem (text_triples/samples). An unknown or ambiguous name is an error."""
    matches = [
        p for p in paths if name in (Path(p).name, Path(p).stem) or str(Path(p).with_suffix("")).endswith("/" + name)
    ]
    if len(matches) != 1:
        found = "none" if not matches else f"{len(matches)}: {', '.join(matches)} (qualify it: folder/stem)"
        raise ValueError(f"{where}: no single path called {name!r} ({found}); the paths are {', '.join(paths)}")
    return matches[0]


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
        foreach = ""
        if "foreach" in stage:  # foreach: ${section.key}, do: the stage's body
            foreach, stage = str(stage["foreach"]).removeprefix("${").removesuffix("}"), stage.get("do", {})
        deps = [str(d) for d in stage.get("deps", [])]
        outs = stage.get("outs", [])
        graph[name] = StageSpec(
            name=name,
            summary=" ".join(str(stage.get("desc", "")).split()),
            params=tuple(stage.get("params", [])),
            code=tuple(d for d in deps if not d.startswith(DATA_ROOTS)),
            deps=tuple(d for d in deps if d.startswith(DATA_ROOTS)),
            outs=tuple(o for o in outs if not isinstance(o, dict)),
            metrics=tuple(_path(m) for m in stage.get("metrics", [])),
            reports=tuple(_path(o) for o in outs if isinstance(o, dict)),
            external_inputs=" ".join(str(stage.get("meta", {}).get("external_inputs", "")).split()),
            foreach=foreach,
        )
    return graph


STAGES = load_stage_graph()


def stage_names() -> list[str]:
    """Stages in execution order (a foreach stage by its own name, standing for all its variants)."""
    return list(STAGES)


def params_value(params: dict, key: str):
    """A dotted key into nested dicts: a params key as dvc.yaml names it, a section (model) or a path into one
    (ablations.variants.wo_ch); also a metric in a results dict (all_turns.recall@10)."""
    value = params
    for part in key.split("."):
        value = value[part]
    return value


def variants_of(spec: StageSpec, params) -> list[str]:
    """A foreach stage's variants in these params, in their order (e.g. params.ablations.variants)."""
    return list(params_value(params.model_dump(), spec.foreach))


def stage_instances(params, names: list[str] | None = None) -> list[str]:
    """The stages DVC runs for these params, in order: a foreach stage once per variant (ablations@wo_coarse)."""
    expanded = []
    for name in names or stage_names():
        spec = STAGES[name]
        expanded += [f"{name}@{variant}" for variant in variants_of(spec, params)] if spec.foreach else [name]
    return expanded


def stage_spec(name: str) -> StageSpec:
    """A stage's spec by its DVC name; `family@variant` gives a foreach stage's variant."""
    family, _, variant = name.partition("@")
    if family not in STAGES:
        raise ValueError(f"unknown stage {name!r}; dvc.yaml has {', '.join(STAGES)}")
    spec = STAGES[family]
    if bool(variant) != bool(spec.foreach):
        raise ValueError(
            f"stage {family!r} "
            + (
                f"runs once per variant of params {spec.foreach}: name one as {family}@<variant>"
                if spec.foreach
                else "has no variants"
            )
        )
    return spec.for_variant(variant) if variant else spec


def stage_making(path: str) -> str | None:
    """The stage that writes `path` (an output, or a file inside an output folder); a foreach stage's variant as
    family@variant. None: no stage declares it."""
    for spec in STAGES.values():
        for out in spec.outs + spec.metrics + spec.reports:
            pattern = re.escape(out)
            for variable in ("${key}", "${item}"):  # a dict's variant, a list's
                pattern = pattern.replace(re.escape(variable), "(?P<key>[^/]+)")
            found = re.fullmatch(pattern + "(/.+)?", path)
            if found:
                return f"{spec.name}@{found.group('key')}" if spec.foreach else spec.name
    return None


def stage_body(name: str):
    """The run(params, workspace, log) of a stage: the module stages/<family>.py (a variant's with variant=)."""
    stage_spec(name)  # an unknown name, or a foreach stage without its variant, fails here with what to write
    run = importlib.import_module(f"stages.{name.partition('@')[0]}").run
    _, _, variant = name.partition("@")
    return functools.partial(run, variant=variant) if variant else run
