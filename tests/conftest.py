"""Shared fixtures: a small ReDial mirror, params pointing at it, temporary MLflow and Prefect stores."""

import os
import shutil
from pathlib import Path

import pytest
import yaml

import pipeline  # noqa: F401  (sets telemetry-off and Prefect environment before anything else imports them)

FIXTURES = Path(__file__).parent / "fixtures"
PROJECT = Path(__file__).resolve().parents[1]
REAL_MIRROR = os.environ.get("C2CRS_DATA_DIR")


@pytest.fixture
def mirror(tmp_path) -> Path:
    """A copy of the fixture mirror that a test may change."""
    target = tmp_path / "mirror"
    shutil.copytree(FIXTURES / "mirror", target)
    return target


def fixture_params(mirror: Path, **ingest) -> dict:
    """The project's params.yaml, pointed at a fixture mirror."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["data"].update(source="mirror", mirror_dir=str(mirror))
    params["data"]["files"].update(redial_train="redial/train.jsonl", redial_test="redial/test.jsonl")
    params["ingest"].update(ingest)
    return params


@pytest.fixture
def params_file(tmp_path, mirror, monkeypatch) -> Path:
    monkeypatch.delenv("C2CRS_DATA_DIR", raising=False)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(fixture_params(mirror, on_bad_record="error")))
    return path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("C2CRS_INVOCATION", "")  # restored (removed) after the test, even if code sets it
    monkeypatch.delenv("C2CRS_INVOCATION")
    return uri


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect database for the whole session (starting it costs about 16 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
