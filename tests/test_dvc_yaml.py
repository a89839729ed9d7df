"""dvc.yaml is the one declaration of the stage graph: every stage is one module with a run(), the layout's import
direction holds, and DVC is configured to stay offline."""

import ast
import configparser
from pathlib import Path

import pytest
import yaml

from stages.io.graph import STAGES, load_stage_graph, stage_body, stage_instances, stage_making, stage_spec
from tests.conftest import PROJECT


def test_every_stage_is_one_module_with_a_run_that_dvc_tracks():
    for name, spec in STAGES.items():
        module = f"stages/{name}.py"
        assert module in spec.code, f"{name}: dvc.yaml does not list {module} among its deps"
        assert callable(stage_body(spec.for_variant("v").name if spec.foreach else name))
        assert spec.summary, f"{name}: dvc.yaml gives no desc"
    stage_modules = {path.stem for path in (PROJECT / "stages").glob("*.py")} - {"__init__"}
    assert stage_modules == set(STAGES), "stages/*.py holds exactly the DVC stages (shared code: subpackages)"


def test_every_stage_runs_through_the_pipeline_cli():
    import yaml

    for name, stage in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"].items():
        if "foreach" in stage:
            variable = "item" if stage["foreach"].endswith(".train}") else "key"  # a list's item, a mapping's key
            assert stage["do"]["cmd"] == f"bin/run-stage {name}@${{{variable}}}"
        else:
            assert stage["cmd"] == f"bin/run-stage {name}"


def test_the_stage_command_finds_the_checkouts_python_without_an_activated_environment():
    """DVC runs `bin/run-stage STAGE` with whatever PATH it has: the project's .venv must be used, not the system
    Python (which lacks prefect)."""
    import os
    import subprocess

    if not (PROJECT / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv in this checkout (make setup creates it)")
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    done = subprocess.run(
        [str(PROJECT / "bin" / "run-stage"), "--help"], env=env, capture_output=True, text=True, cwd="/", timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "usage: python -m pipeline run" in done.stdout


def test_a_foreach_stage_is_one_stage_per_variant_of_its_params_section():
    from pipeline.config import load_params

    params = load_params(PROJECT / "params.yaml")
    assert STAGES["ablations"].foreach == "ablations.variants"  # every ablation variant is trained
    assert [name for name in stage_instances(params) if name.startswith("ablations@")] == [
        f"ablations@{variant}" for variant in params.ablations.variants
    ]
    # baselines and conv_baselines: the ones their `train` list names (the default set; the rest opt in)
    assert STAGES["conv_baselines"].foreach == "conv_baselines.train"
    assert [name for name in stage_instances(params) if name.startswith("conv_baselines@")] == [
        "conv_baselines@transformer",
        "conv_baselines@kgsf",
        "conv_baselines@wo_iw",
    ]
    assert STAGES["baselines"].foreach == "baselines.train"
    assert [name for name in stage_instances(params) if name.startswith("baselines@")] == [
        "baselines@textcnn",
        "baselines@kbrd",
        "baselines@kgsf",
    ]
    kecrs = stage_spec("conv_baselines@kecrs")  # any variant's paths, trained or not
    assert kecrs.outs == ("data/models/conv_baselines/kecrs.pt",) and "conv_baselines.variants.kecrs" in kecrs.params
    assert stage_making("data/models/baselines/revcore.pt") == "baselines@revcore"
    wo_ch = stage_spec("ablations@wo_ch")
    assert wo_ch.outs == ("data/models/ablations/wo_ch",) and wo_ch.metrics == ("metrics/ablations/wo_ch.json",)
    assert "ablations.variants.wo_ch" in wo_ch.params
    with pytest.raises(ValueError, match="name one as ablations@<variant>"):
        stage_spec("ablations")
    with pytest.raises(ValueError, match="has no variants"):
        stage_spec("ingest@x")
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        stage_body("nope")


def test_the_stage_that_makes_a_file_is_named():
    assert stage_making("data/models/c2crs_rec.pt") == "finetune_rec"
    assert stage_making("data/models/ablations/wo_ch/finetune_rec.pt") == "ablations@wo_ch"
    assert stage_making("metrics/conv_baselines/kgsf.json") == "conv_baselines@kgsf"
    assert stage_making("data/models/baselines/kbrd.pt") == "baselines@kbrd"
    assert stage_making("reports/rec.md") == "evaluate"
    assert stage_making("data/nothing.pt") is None


def test_dvc_expands_the_graph_as_the_reader_does():
    """DVC's own expansion of dvc.yaml (what `pipeline repro` schedules) has the stages stage_instances names."""
    from pipeline.config import load_params
    from pipeline.parallel import dvc_stage_graph

    graph = dvc_stage_graph(PROJECT)
    assert list(graph) == stage_instances(load_params(PROJECT / "params.yaml"))
    assert set(graph["evaluate"]) >= {
        "ablations@wo_ch",
        "conv_baselines@kgsf",
        "finetune_rec",
        "baselines@kbrd",
        "baselines@kgsf",
    }  # the baselines folder: every trained recommender
    assert set(graph["conv_baselines@kgsf"]) >= {"baselines@kbrd", "baselines@kgsf", "word_graph"}
    assert set(graph["ablations@wo_ch"]) == {"triples", "reviews", "kg"}


def test_every_code_dependency_exists():
    for spec in STAGES.values():
        for path in spec.code:
            assert (PROJECT / path).is_file(), f"{spec.name}: {path} is listed as a dependency but missing"


def test_the_graph_reader_names_a_broken_file(tmp_path):
    broken = tmp_path / "dvc.yaml"
    broken.write_text("stages: [unclosed")
    try:
        load_stage_graph(broken)
    except ValueError as error:
        assert str(broken) in str(error)
    else:
        raise AssertionError("a broken dvc.yaml was read")


def _runtime_imports(path):
    """Top-level modules imported by a file, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_imports_point_one_way_pipeline_stages_models():
    forbidden = {"models": {"pipeline", "stages", "prefect", "mlflow"}, "stages": {"pipeline", "prefect", "mlflow"}}
    for package, banned in forbidden.items():
        for path in (PROJECT / package).rglob("*.py"):
            found = banned & set(_runtime_imports(path))
            assert not found, f"{path.relative_to(PROJECT)} imports {found}: imports go pipeline -> stages -> models"


def test_dvc_analytics_are_off():
    config = configparser.ConfigParser()
    config.read(PROJECT / ".dvc" / "config")
    assert config["core"]["analytics"] == "false"


def test_every_plot_reads_what_a_stage_writes():
    """dvc.yaml's plots point at files (or folders of files) that stages declare, so `dvc plots show` has data."""
    from pipeline.config import load_params

    written = [out for spec in STAGES.values() for out in spec.outs + spec.metrics + spec.reports]
    written.append(load_params(PROJECT / "params.yaml").study.plots_dir)  # the pre-training study's report writes it
    plots = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["plots"]
    assert plots
    for plot in plots:
        [(name, props)] = plot.items()
        files = list(props["y"]) if isinstance(props.get("y"), dict) else [name]
        for path in files:
            assert any(out == path or out.startswith(path + "/") or path.startswith(out + "/") for out in written), (
                f"plot {name!r}: {path}"
            )


def import_closure(module: Path) -> set[str]:
    """The project files (stages/, models/) a module imports, directly or through others, at module level or
    inside functions; package __init__ files (docstrings only) aside. pipeline/ is orchestration: not a stage's code."""
    seen, todo = set(), [module]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += [target for target in _imports(path) if target.relative_to(PROJECT).parts[0] != "pipeline"]
    return {str(path.relative_to(PROJECT)) for path in seen}


def test_every_file_a_stage_imports_is_a_dvc_dep():
    """dvc.yaml lists every project file whose change can change a stage's outputs (a file or a folder above it),
    so `dvc repro` reruns the stage when one changes."""
    for name, spec in STAGES.items():
        missing = sorted(
            path
            for path in import_closure(PROJECT / f"stages/{name}.py")
            if not any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in spec.code)
        )
        assert not missing, f"dvc.yaml, stage {name}: deps miss {missing}"


def test_stages_read_and_write_their_paths_by_name_whatever_the_order(params_file, monkeypatch):
    """Reversing every stage's deps and outs in the graph changes nothing a stage reads or writes."""
    import dataclasses

    import polars as pl

    from pipeline.config import load_params

    params, workspace = load_params(params_file), params_file.parent
    stages = ("ingest", "reviews", "kg", "triples", "text_triples")
    for stage in stages:
        stage_body(stage)(params, workspace)
    outs = [out for stage in stages for out in STAGES[stage].outs]
    before = {out: pl.read_parquet(workspace / out) for out in outs}
    for name, spec in list(STAGES.items()):
        monkeypatch.setitem(STAGES, name, dataclasses.replace(spec, deps=spec.deps[::-1], outs=spec.outs[::-1]))
    for stage in stages:
        stage_body(stage)(params, workspace)
    for out in outs:
        assert pl.read_parquet(workspace / out).equals(before[out]), out


def _imports(path: Path) -> set[Path]:
    """The project files (pipeline/, stages/, models/) one file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("pipeline", "stages", "models"):
                base = PROJECT / name.replace(".", "/")
                if base.with_suffix(".py").is_file():
                    found.add(base.with_suffix(".py"))
    return found - {path}


def test_no_import_cycle_between_project_files():
    files = [p for folder in ("pipeline", "stages", "models") for p in (PROJECT / folder).rglob("*.py")]
    graph = {path: _imports(path) for path in files}
    state: dict[Path, str] = {}

    def visit(path: Path, trail: list[Path]) -> None:
        state[path] = "open"
        for target in graph.get(path, ()):
            if state.get(target) == "open":
                cycle = [*trail[trail.index(target) :], target] if target in trail else [path, target]
                pytest.fail("import cycle: " + " -> ".join(str(p.relative_to(PROJECT)) for p in cycle))
            if target not in state:
                visit(target, [*trail, target])
        state[path] = "done"

    for path in files:
        if path not in state:
            visit(path, [path])
