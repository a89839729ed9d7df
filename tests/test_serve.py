"""The HTTP API of `pipeline serve` on C2-CRS models trained on the fixture mirror: what each endpoint answers, that its
rankings are the evaluation scorer's, the explanations, the registry's versions, and every bad request a clear 4xx."""

import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient

from models.c2crs import C2CRS, C2CRSConfig
from pipeline.serve import MAX_BODY_BYTES, Models, create_app
from pipeline.tracking import stage_run, tracking_uri
from stages.chat import engine
from stages.training import c2crs_train, runs
from stages.training.runs import TRAINING_INPUTS

LOVED_ALPHA = [{"role": "seeker", "text": 'hi, I loved "Alpha" with Tom Hanks and "No Such Film"'}]


@pytest.fixture(scope="module")
def models(chat_models):
    return chat_models


@pytest.fixture(scope="module")
def api(models):
    return TestClient(create_app(models, timeout=60))


def test_health_page_and_openapi(api):
    health = api.get("/healthz").json()
    assert health["status"] == "ok" and health["models"] == {"recommender": "workspace", "generator": "workspace"}
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="suggestions"' in page.text and "/v1/chat" in page.text
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/v1/models", "/v1/movies", "/v1/recommend", "/v1/chat", "/v1/explain"} <= set(paths)


def test_movie_search_finds_titles_most_mentioned_first(api):
    hits = api.get("/v1/movies", params={"q": "ALP"}).json()
    assert hits == [{"movie_id": 100, "title": "Alpha (2001)", "mentions": 4}]
    every = api.get("/v1/movies", params={"q": "a", "limit": 2}).json()
    assert len(every) == 2 and every[0]["mentions"] >= every[1]["mentions"]
    assert api.get("/v1/movies", params={"q": "zzz-none"}).json() == []
    assert api.get("/v1/movies", params={"q": ""}).status_code == 422
    assert api.get("/v1/movies", params={"q": "a", "limit": 0}).status_code == 422


def test_recommend_ranks_as_the_evaluation_scorer_and_explains(api, models):
    body = api.post("/v1/recommend", json={"messages": LOVED_ALPHA, "top_k": 3}).json()
    assert body["unknown_titles"] == ["No Such Film"] and body["models"] == {"recommender": "workspace"}
    ranked = body["recommendations"]
    assert [r["rank"] for r in ranked] == [1, 2, 3] and 100 not in [r["movie_id"] for r in ranked]
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    # The same scores as evaluate's scorer (score_samples) on the same sample, with the named movie left out.
    knowledge, (recommender, _) = models.knowledge, models.model("recommender", None)
    turns = [knowledge.read_turn("seeker", LOVED_ALPHA[0]["text"])[0]]
    table = knowledge.next_sample(turns, recommender.cfg.max_positions)
    scores = np.concatenate([b for _, b in c2crs_train.score_samples(recommender, knowledge.run, table, 8)])[-1]
    scores[knowledge.item_entity[100]] = -np.inf
    expected = [knowledge.entity_movie[int(e)] for e in np.argsort(-scores, kind="stable")[:3]]
    assert [r["movie_id"] for r in ranked] == expected
    assert np.allclose([r["score"] for r in ranked], np.sort(scores)[::-1][:3], atol=1e-3)
    # What it attended to: Alpha and Tom Hanks, weights of a softmax, the same for every movie of the answer.
    attended = ranked[0]["explanation"]["context_entities"]
    assert {e["label"] for e in attended} == {"Alpha", "Tom Hanks"}
    assert sum(e["weight"] for e in attended) == pytest.approx(1.0, abs=1e-3)
    assert next(e for e in attended if e["label"] == "Alpha")["movie_id"] == 100
    assert all(r["explanation"]["context_entities"] == attended for r in ranked)
    plain = api.post("/v1/recommend", json={"messages": LOVED_ALPHA, "top_k": 3, "explain": False}).json()
    assert [r["explanation"] for r in plain["recommendations"]] == [None] * 3
    assert [r["movie_id"] for r in plain["recommendations"]] == expected
    assert api.post("/v1/recommend", json={"messages": []}).status_code == 422
    no_generator_here = api.post("/v1/recommend", json={"messages": LOVED_ALPHA, "generator": "workspace"})
    assert no_generator_here.status_code == 422 and "generator" in no_generator_here.text
    after_recommender = LOVED_ALPHA + [{"role": "recommender", "text": "have you seen @300 ?"}]
    assert api.post("/v1/recommend", json={"messages": after_recommender}).status_code == 200
    with_named = api.post("/v1/recommend", json={"messages": LOVED_ALPHA, "exclude_mentioned": False}).json()
    assert 100 in [r["movie_id"] for r in with_named["recommendations"]]


def test_explain_gives_the_kg_path_and_review_sentences_of_any_movie(api):
    gamma = api.post("/v1/explain", json={"messages": LOVED_ALPHA, "movie_id": 300}).json()
    assert gamma["movie_id"] == 300 and gamma["title"] == "Gamma" and gamma["rank"] >= 1
    # The fixture KG: Alpha and Gamma are both comedies (Alpha -9-> Comedy film <-9- Gamma).
    path = gamma["explanation"]["kg_paths"][0]
    assert [n["label"] for n in path["entities"]] == ["Alpha", "Comedy film", "Gamma"]
    assert path["relations"] == ["dbpedia:9", "dbpedia:9^-1"]
    alpha = api.post("/v1/explain", json={"messages": LOVED_ALPHA, "movie_id": 100}).json()
    sentences = alpha["explanation"]["review_sentences"]
    assert sentences and all(s["text"] for s in sentences) and sentences[0]["score"] > 0
    assert {s["source"] for s in sentences} <= {"plots", "revcore", "aclimdb", "imdb"}
    assert api.post("/v1/explain", json={"messages": LOVED_ALPHA, "movie_id": 12345}).status_code == 404


def test_chat_answers_with_the_recommenders_movies(api, models):
    body = api.post("/v1/chat", json={"messages": LOVED_ALPHA, "top_k": 2}).json()
    assert len(body["recommendations"]) == 2 and body["response"].strip()
    assert body["models"] == {"recommender": "workspace", "generator": "workspace"}
    # The shown response is the one kept for the conversation, movies as titles; no placeholder is left.
    assert models.knowledge.titled(body["response_with_ids"]) == body["response"]
    assert "__movie__" not in body["response"]
    follow_up = LOVED_ALPHA + [
        {"role": "recommender", "text": body["response_with_ids"]},
        {"role": "seeker", "text": "something else? I have seen @400"},
    ]
    again = api.post("/v1/chat", json={"messages": follow_up, "top_k": 2}).json()
    assert 400 not in [r["movie_id"] for r in again["recommendations"]]


@pytest.mark.parametrize(
    "body, status, says",
    [
        ({"messages": [{"role": "bot", "text": "hi"}]}, 422, "seeker"),
        ({"messages": [{"role": "seeker", "text": ""}]}, 422, "at least 1 character"),
        ({"messages": [{"role": "seeker", "text": "x" * 2001}]}, 422, "at most 2000"),
        ({"messages": [{"role": "seeker", "text": "hi"}] * 101}, 422, "at most 100"),
        ({"messages": []}, 422, "at least 1 item"),
        ({"messages": LOVED_ALPHA, "top_k": 0}, 422, "greater than or equal to 1"),
        ({"messages": LOVED_ALPHA, "temperature": 2}, 422, "Extra inputs"),
        ({"messages": LOVED_ALPHA + [{"role": "recommender", "text": "ok"}]}, 422, "must be the seeker's"),
        ({"messages": LOVED_ALPHA, "recommender": "c2crs-recommender/1"}, 422, "started with --models-from workspace"),
    ],
)
def test_bad_chat_requests_get_a_4xx_that_says_what_is_wrong(api, body, status, says):
    answer = api.post("/v1/chat", json=body)
    assert answer.status_code == status and says in answer.text
    assert "Traceback" not in answer.text


def test_bodies_that_are_too_big_unsized_or_not_json_are_refused(api):
    big = api.post(
        "/v1/recommend", content=b"{" + b" " * MAX_BODY_BYTES + b"}", headers={"content-type": "application/json"}
    )
    assert big.status_code == 413
    unsized = api.post(
        "/v1/recommend",
        content=iter([b'{"messages": []}']),  # chunked: no Content-Length
        headers={"content-type": "application/json"},
    )
    assert unsized.status_code == 411
    garbled = api.post("/v1/recommend", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert garbled.status_code == 422 and "JSON" in garbled.text
    surrogate = api.post(
        "/v1/recommend",
        content=b'{"messages": [{"role": "seeker", "text": "\\ud800 @100"}]}',
        headers={"content-type": "application/json"},
    )  # JSON that no UTF-8 text can hold
    assert surrogate.status_code == 422 and "valid string" in surrogate.text


def test_a_failure_inside_is_a_500_naming_a_log_entry_not_a_traceback(models, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(engine.Chat, "recommend", broken)
    answer = TestClient(create_app(models), raise_server_exceptions=False).post(
        "/v1/recommend", json={"messages": LOVED_ALPHA}
    )
    assert answer.status_code == 500 and "internal error" in answer.json()["detail"]
    assert "secret" not in answer.text and "Traceback" not in answer.text
    incident = answer.json()["detail"].split()[-1]
    assert any(incident in record.getMessage() for record in caplog.records)


def test_a_request_that_cannot_start_in_time_gets_503(models):
    api = TestClient(create_app(models, timeout=0.3))
    models.lock.acquire()  # another request holds the models
    try:
        answer = api.post("/v1/recommend", json={"messages": LOVED_ALPHA})
    finally:
        models.lock.release()
    assert answer.status_code == 503 and "within 0.3 s" in answer.json()["detail"]
    assert api.post("/v1/recommend", json={"messages": LOVED_ALPHA}).status_code == 200


def test_concurrent_requests_get_the_answer_each_gets_alone(api):
    alone = api.post("/v1/recommend", json={"messages": LOVED_ALPHA, "top_k": 5}).json()["recommendations"]
    answers = [None] * 6

    def ask(i):
        answers[i] = api.post("/v1/recommend", json={"messages": LOVED_ALPHA, "top_k": 5}).json()["recommendations"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(answers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(answer == alone for answer in answers)


def _register(workspace, name: str, file, data_overrides: dict | None = None) -> str:
    """Register a model file as a new version of `name`, tagged with the workspace's inputs (or other files)."""
    inputs = {n: workspace / p for n, p in TRAINING_INPUTS.items()} | (data_overrides or {})
    with stage_run("finetune_rec", {"finetune_rec": {}}) as run:
        run.model(name, torch.nn.Linear(1, 1), file, {"best_epoch": 1, "valid_recall@50": 0.5})
        run.log_inputs(inputs)
    return str(max(int(v.version) for v in MlflowClient(tracking_uri()).search_model_versions(f"name = '{name}'")))


def test_the_registry_champion_loads_at_start_and_the_picker_lists_versions(chat_workspace, mlflow_store, tmp_path):
    params, workspace = chat_workspace
    client = MlflowClient(mlflow_store)
    rec_file, gen_file = workspace / "data/models/c2crs_rec.pt", workspace / "data/models/c2crs_conv.pt"
    first = _register(workspace, "c2crs-recommender", rec_file)
    client.set_registered_model_alias("c2crs-recommender", "champion", first)
    other_vocab = tmp_path / "vocab.parquet"
    other_vocab.write_bytes(b"another vocabulary")
    other = _register(workspace, "c2crs-recommender", rec_file, {"vocab": other_vocab})
    generator = _register(workspace, "c2crs-generator", gen_file)

    models = Models(params, workspace, "registry")
    assert models.default == {"recommender": f"c2crs-recommender/{first}", "generator": "workspace"}
    api = TestClient(create_app(models))
    choices = api.get("/v1/models").json()["choices"]
    recommenders = {c["reference"]: c for c in choices["recommender"]}
    assert recommenders[f"c2crs-recommender/{first}"]["aliases"] == ["champion"]
    assert recommenders[f"c2crs-recommender/{first}"]["loaded_at_start"]
    assert recommenders[f"c2crs-recommender/{first}"]["valid_recall_at_50"] == 0.5
    assert not recommenders[f"c2crs-recommender/{other}"]["usable"]
    assert "vocab" in recommenders[f"c2crs-recommender/{other}"]["why_not"]
    assert {c["reference"] for c in choices["generator"]} == {"workspace", f"c2crs-generator/{generator}"}

    picked = api.post("/v1/chat", json={"messages": LOVED_ALPHA, "generator": f"c2crs-generator/{generator}"})
    assert picked.status_code == 200 and picked.json()["models"]["generator"] == f"c2crs-generator/{generator}"
    # An alias names the version it points to now (a champion may move while the server runs); a version is one
    # cached model whatever named it.
    third = _register(workspace, "c2crs-recommender", rec_file)
    by_alias = {"messages": LOVED_ALPHA, "recommender": "c2crs-recommender@champion"}
    assert api.post("/v1/recommend", json=by_alias).json()["models"]["recommender"] == f"c2crs-recommender/{first}"
    client.set_registered_model_alias("c2crs-recommender", "champion", third)
    assert api.post("/v1/recommend", json=by_alias).json()["models"]["recommender"] == f"c2crs-recommender/{third}"
    api.post("/v1/recommend", json={"messages": LOVED_ALPHA, "recommender": f"c2crs-recommender/{third}"})
    assert [key for key in models.loaded if key[0] == "recommender"] == [("recommender", f"c2crs-recommender/{third}")]
    no_alias = api.post("/v1/recommend", json={"messages": LOVED_ALPHA, "recommender": "c2crs-recommender@best"})
    assert (
        no_alias.status_code == 404
        and "no registered model 'c2crs-recommender' with alias 'best'" in no_alias.json()["detail"]
    )
    refused = api.post("/v1/recommend", json={"messages": LOVED_ALPHA, "recommender": f"c2crs-recommender/{other}"})
    assert refused.status_code == 422 and "trained on other data" in refused.json()["detail"]
    unknown = api.post("/v1/recommend", json={"messages": LOVED_ALPHA, "recommender": "c2crs-recommender/99"})
    assert unknown.status_code == 404 and f"it has versions {first}, {other}, {third}" in unknown.json()["detail"]
    wrong_kind = api.post(
        "/v1/recommend", json={"messages": LOVED_ALPHA, "recommender": f"c2crs-generator/{generator}"}
    )
    assert wrong_kind.status_code == 422 and "not a recommender this chat can use" in wrong_kind.json()["detail"]


def test_model_files_of_another_kind_or_other_data_are_refused_by_name(chat_workspace, models, tmp_path):
    _, workspace = chat_workspace
    with pytest.raises(ValueError, match="c2crs_conv.pt: not a C2-CRS recommender file"):
        engine.load_recommender(workspace / "data/models/c2crs_conv.pt", models.knowledge)
    with pytest.raises(ValueError, match="c2crs_rec.pt: not a generator file"):
        engine.load_generator(workspace / "data/models/c2crs_rec.pt", models.knowledge)
    config = C2CRSConfig(**runs.load_saved(workspace / "data/models/c2crs_rec.pt")["config"])
    config.n_entities += 1  # a model of another KG
    runs.save_model(tmp_path / "bigger.pt", C2CRS(config), config)
    with pytest.raises(ValueError, match="trained on other data"):
        engine.load_recommender(tmp_path / "bigger.pt", models.knowledge)


def test_the_terminal_why_tells_the_same_explanation(models):
    session = engine.Session(
        engine.Chat(models.knowledge, models.model("recommender", None)[0], models.model("generator", None)[0]), top_k=2
    )
    assert session.why() == "no recommendation yet: say something first"
    answer, recommended, unknown = session.reply(LOVED_ALPHA[0]["text"])
    assert unknown == ["No Such Film"] and len(recommended) == 2 and session.turns[-1].role == "recommender"
    lines = session.why().splitlines()
    assert lines[0].startswith("attended to: ") and "Alpha" in lines[0] and "Tom Hanks" in lines[0]
    assert recommended[0] in lines[1] and session.why(3) == "/why takes a number from 1 to 2"
    gamma = engine.describe(session.chat.explain_movie(session.turns[:1], 300)[1])
    assert "KG: Alpha -[dbpedia:9]-> Comedy film -[dbpedia:9^-1]-> Gamma" in gamma
