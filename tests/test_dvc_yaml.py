"""dvc.yaml and the stage registry describe the same graph; DVC is configured to stay offline."""

import configparser

import yaml

from pipeline.registry import STAGES
from tests.conftest import PROJECT


def test_dvc_yaml_matches_the_registry():
    dvc = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == list(STAGES)
    for name, spec in STAGES.items():
        stage = dvc[name]
        assert stage["cmd"] == f"python -m pipeline run {name}"
        assert tuple(stage["deps"]) == spec.all_deps()
        assert tuple(stage["params"]) == spec.params
        assert tuple(stage["outs"]) == spec.outs + tuple({report: {"cache": False}} for report in spec.reports)
        assert tuple(next(iter(m)) if isinstance(m, dict) else m for m in stage["metrics"]) == spec.metrics


def test_every_code_dependency_exists():
    for spec in STAGES.values():
        for path in spec.code:
            assert (PROJECT / path).is_file(), f"{spec.name}: {path} is listed as a dependency but missing"


def test_dvc_analytics_are_off():
    config = configparser.ConfigParser()
    config.read(PROJECT / ".dvc" / "config")
    assert config["core"]["analytics"] == "false"
