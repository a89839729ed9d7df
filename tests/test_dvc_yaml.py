"""dvc.yaml is the one declaration of the stage graph: every stage is one module with a run(), the layout's import
direction holds, and DVC is configured to stay offline."""

import ast
import configparser

from stages.io.graph import STAGES, load_stage_graph, stage_body
from tests.conftest import PROJECT


def test_every_stage_is_one_module_with_a_run_that_dvc_tracks():
    for name, spec in STAGES.items():
        module = f"stages/{name}.py"
        assert module in spec.code, f"{name}: dvc.yaml does not list {module} among its deps"
        assert callable(stage_body(name))
        assert spec.summary, f"{name}: dvc.yaml gives no desc"
    stage_modules = {path.stem for path in (PROJECT / "stages").glob("*.py")} - {"__init__"}
    assert stage_modules == set(STAGES), "stages/*.py holds exactly the DVC stages (shared code: subpackages)"


def test_every_stage_runs_through_the_pipeline_cli():
    import yaml

    for name, stage in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"].items():
        assert stage["cmd"] == f"python -m pipeline run {name}"


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
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
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
