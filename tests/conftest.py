"""Shared fixtures: a small ReDial mirror, params pointing at it, temporary MLflow and Prefect stores."""

import gzip
import json
import os
import pickle
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

import pipeline  # noqa: F401  (sets telemetry-off and Prefect environment before anything else imports them)

FIXTURES = Path(__file__).parent / "fixtures"
PROJECT = Path(__file__).resolve().parents[1]
REAL_MIRROR = os.environ.get("C2CRS_DATA_DIR")


ACLIMDB_FIXTURE = [
    {
        "split": "train",
        "label": "pos",
        "id": 1,
        "rating": 9,
        "imdb_id": "tt0012345",
        "text": "Alpha is a joy from start to end.<br /><br />The map scene is great fun. Wow.",
    },
    {
        "split": "test",
        "label": "neg",
        "id": 2,
        "rating": 2,
        "imdb_id": "tt0012345",
        "text": "I did not like the ending of this film at all.",
    },
    {
        "split": "train",
        "label": "neg",
        "id": 3,
        "rating": 3,
        "imdb_id": "tt0022222",
        "text": "Beta has cheap scares and a silly monster in the basement.",
    },
    {
        "split": "train",
        "label": "pos",
        "id": 4,
        "rating": 10,
        "imdb_id": "tt9999999",
        "text": "A movie that is not in ReDial at all, so it is never joined.",
    },
]
REVCORE_FIXTURE = {
    "100": ["``", "Alpha", "''", "is", "the", "best", "comedy", "of", "its", "year", ",", "I", "think", "."],
    "300": [],
    "999": ["Not", "a", "ReDial", "movie", "here", "."],
}


# A tiny DBpedia subgraph in KGSF's pickle form: entity ids, and head -> [(relation, tail)].
DBPEDIA = "http://dbpedia.org/resource/"
KG_ENTITIES = {
    f"<{DBPEDIA}Alpha_(film)>": 0,
    f"<{DBPEDIA}Gamma>": 1,
    f"<{DBPEDIA}Tom_Hanks>": 2,
    f"<{DBPEDIA}Comedy_film>": 3,
    f"<{DBPEDIA}Meryl_Streep>": 4,
    f"<{DBPEDIA}Far_Away>": 5,
}
KG_ADJACENCY = {0: [(7, 2), (9, 3)], 1: [(7, 4), (9, 3)], 4: [(7, 5)], 5: [(8, 5)]}


def write_generated_fixtures(mirror: Path) -> None:
    """Binary sources (gzip, pickles) are made here rather than kept in git."""
    (mirror / "reviews_aclimdb").mkdir(exist_ok=True)
    with gzip.open(mirror / "reviews_aclimdb" / "aclimdb_reviews.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(record) + "\n" for record in ACLIMDB_FIXTURE)
    (mirror / "reviews_revcore").mkdir(exist_ok=True)
    (mirror / "reviews_revcore" / "movie2tokenreview_helpful.pkl").write_bytes(pickle.dumps(REVCORE_FIXTURE))
    kgsf = mirror / "dbpedia_kgsf"
    kgsf.mkdir(exist_ok=True)
    (kgsf / "subkg.pkl").write_bytes(pickle.dumps(defaultdict(list, KG_ADJACENCY)))
    (kgsf / "entity2entityId.pkl").write_bytes(pickle.dumps(KG_ENTITIES))
    (kgsf / "stopwords.txt").write_text("the\na\nand\ni\n")
    shutil.copy(FIXTURES / "linking" / "valid_data.json", mirror / "crslab_redial" / "valid_data.json")


@pytest.fixture
def mirror(tmp_path) -> Path:
    """A copy of the fixture mirror that a test may change."""
    target = tmp_path / "mirror"
    shutil.copytree(FIXTURES / "mirror", target)
    write_generated_fixtures(target)
    return target


def fixture_params(mirror: Path, **ingest) -> dict:
    """The project's params.yaml, pointed at a fixture mirror."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["data"].update(source="mirror", mirror_dir=str(mirror))
    params["data"]["files"].update(redial_train="redial/train.jsonl", redial_test="redial/test.jsonl")
    params["ingest"].update(ingest)
    params["kg"]["min_relation_edges"] = 1  # the fixture graph is tiny
    params["triples"]["min_token_frequency"] = 1
    params["device"] = "cpu"
    params["model"].update(token_dim=16, kg_dim=16, ffn_dim=32, projection_dim=16, num_bases=2)
    for stage in ("pretrain_coarse", "pretrain_fine", "finetune_rec"):
        params[stage].update(epochs=2, batch_size=4)
    params["baselines"]["textcnn"].update(epochs=2, batch_size=4, embed_dim=16, n_filters=4)
    params["baselines"]["kgsf"].update(pretrain_epochs=1, epochs=2, batch_size=4)
    params["baselines"]["revcore"].update(pretrain_epochs=1, epochs=2, batch_size=4)
    params["baselines"]["train"] = [name for name in params["baselines"] if name != "train"]  # the whole comparison
    params["conv_baselines"]["train"] = list(params["conv_baselines"]["variants"])
    params["baselines"]["redial"].update(epochs=2, batch_size=4, hidden=16)
    params["finetune_conv"].update(epochs=2, batch_size=4)
    params["evaluate"]["decoding"].update(batch_size=3, max_tokens=8)
    params["evaluate"]["samples_for_reading"] = 3
    params["evaluate"]["bootstrap_resamples"] = 20
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


CHAT_STAGES = (
    "ingest",
    "reviews",
    "kg",
    "triples",
    "pretrain_coarse",
    "pretrain_fine",
    "finetune_rec",
    "finetune_conv",
)


@pytest.fixture(scope="session")
def chat_workspace(tmp_path_factory):
    """A workspace with C2-CRS's recommender and generator trained on the fixture mirror (the chat's models), made
    once for the tests of the API, the page and the terminal chat. Returns (params, workspace)."""
    from pipeline.config import load_params
    from stages.io.graph import stage_body

    workspace = tmp_path_factory.mktemp("chat")
    mirror = workspace / "mirror"
    shutil.copytree(FIXTURES / "mirror", mirror)
    write_generated_fixtures(mirror)
    (workspace / "params.yaml").write_text(yaml.safe_dump(fixture_params(mirror, on_bad_record="error")))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("C2CRS_DATA_DIR", raising=False)
        params = load_params(workspace / "params.yaml")
        for stage in CHAT_STAGES:
            stage_body(stage)(params, workspace)
    return params, workspace


@pytest.fixture(scope="session")
def chat_models(chat_workspace):
    """pipeline serve's Models on the chat workspace's files (no registry)."""
    from pipeline.serve import Models

    params, workspace = chat_workspace
    return Models(params, workspace, "workspace")


@pytest.fixture(scope="session")
def served_workspace(chat_workspace, tmp_path_factory):
    """A copy of the chat workspace with every other model trained too (the baselines, the ablations, every
    generator; about a minute), for serving each of them. Returns (params, workspace)."""
    from stages.io.graph import stage_body, stage_instances

    params, chat = chat_workspace
    workspace = tmp_path_factory.mktemp("served") / "workspace"
    shutil.copytree(chat, workspace)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("C2CRS_DATA_DIR", raising=False)
        for stage in stage_instances(params):
            if stage not in CHAT_STAGES and stage not in ("evaluate", "simulate"):
                stage_body(stage)(params, workspace)
    return params, workspace


@pytest.fixture(scope="session")
def served_models(served_workspace):
    """pipeline serve's Models on the served workspace's files (every model trained, no registry)."""
    from pipeline.serve import Models

    params, workspace = served_workspace
    return Models(params, workspace, "workspace")


def c2crs_config(**fields):
    """A C2CRSConfig for a unit test: params.yaml's `model` values, then `fields` (sizes of the test's toy data)."""
    from models.c2crs import C2CRSConfig

    model = yaml.safe_load((PROJECT / "params.yaml").read_text())["model"]
    shared = {
        k: model[k]
        for k in (
            "token_dim",
            "kg_dim",
            "n_layers",
            "n_heads",
            "ffn_dim",
            "dropout",
            "attention_dropout",
            "num_bases",
            "projection_dim",
            "item_bias",
            "kg_encoder",
            "rec_pooling",
            "projection_heads",
            "contrastive_loss",
        )
    }
    return C2CRSConfig(**{"pad_id": 0, "temperature": 0.07, "max_positions": 64, **shared, **fields})


def tiny_generator_config(**fields):
    """A GeneratorConfig small enough for a unit test; `fields` set what the test is about."""
    from models.generator import GeneratorConfig

    small = {
        "memory_dims": {"history": 8, "kg": 6, "review": 8},
        "pad_id": 0,
        "start_id": 1,
        "end_id": 2,
        "dim": 8,
        "n_layers": 2,
        "n_heads": 2,
        "ffn_dim": 16,
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "max_positions": 8,
        "copy": True,
        "vocabulary_bias_dim": 0,
        "user_bias_dim": 0,
        "entity_bag": 0,
        "entity_dim": 0,
        "entity_bag_mixing": 0.1,
        "infusion": False,
    }
    return GeneratorConfig(**{**small, **fields})
