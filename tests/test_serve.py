"""The HTTP API of `pipeline serve` on models trained on the fixture mirror: what each endpoint answers, that every
recommender's ranking is evaluate's, the explanations, the compare view, the registry's versions, and every bad
request a clear 4xx.

Over 400 lines: every test reads the same trained workspace (a session fixture that trains every stage once);
split across files, each file would train it again or share a fixture whose cost hides in conftest."""

import threading

import numpy as np
import polars as pl
import pytest
import torch
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient

from models.c2crs import C2CRS, C2CRSConfig
from pipeline.serve import MAX_BODY_BYTES, Models, create_app
from pipeline.tracking import stage_run, tracking_uri
from stages import evaluate, ingest
from stages.chat import engine
from stages.evaluation.rec_metrics import REPEAT_CHOICE
from stages.training import runs
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
    assert {"/healthz", "/v1/models", "/v1/movies", "/v1/recommend", "/v1/chat", "/v1/explain", "/v1/compare"} <= set(
        paths
    )


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
    expected = _evaluates_ranking(models, "c2crs", "workspace", LOVED_ALPHA, ranked)
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


def _evaluates_ranking(models, name: str, reference: str, messages: list[dict], ranked: list[dict]) -> list[int]:
    """Assert that the API's ranking is evaluate's: evaluate.score_split scores the same conversation's samples with
    model `name` (its file only), the named movies are left out; returns evaluate's movies, best first."""
    knowledge, (recommender, _) = models.knowledge, models.model("recommender", reference)
    turns = [knowledge.read_turn(m["role"], m["text"])[0] for m in messages]
    longest = min(filter(None, (models.params.triples.context_max_tokens, recommender.max_positions)))
    samples, triples, _, _ = knowledge.next_samples([turns], longest)
    file = models.files["recommender"][name]
    _, scorers = evaluate.score_split(
        models.params,
        models.workspace,
        samples,
        triples,
        loaded=knowledge.training,
        files={name: file},
        forms=pl.DataFrame(schema=ingest.FORM_SCHEMA),  # a chat has no movie forms
    )
    scores = np.concatenate([block for _, block in scorers[name]()])[-1]
    scores[[knowledge.item_entity[m] for t in turns for m in t.movie_ids]] = -np.inf
    expected = [knowledge.entity_movie[int(e)] for e in np.argsort(-scores, kind="stable")[: len(ranked)]]
    assert [r["movie_id"] for r in ranked] == expected, name
    assert np.allclose([r["score"] for r in ranked], np.sort(scores)[::-1][: len(ranked)], atol=1e-3), name
    return expected


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


@pytest.mark.parametrize("with_placeholder", [True, False])
def test_a_reply_that_names_no_recommendation_gets_a_marked_template(api, models, monkeypatch, with_placeholder):
    """The generator's words with a movie placeholder name the top card; without one, the reply says so and a
    template names the top card apart from the model's words (never part of the conversation)."""
    from stages.chat import catalogue
    from stages.training.conv_train import PLACEHOLDER

    tokens = models.knowledge.vocabulary.tokens
    said = [tokens.index(PLACEHOLDER)] if with_placeholder else [len(tokens) - 2]
    monkeypatch.setattr(catalogue.Generator, "generate", lambda self, knowledge, table, rows: [said] * len(rows))
    body = api.post("/v1/chat", json={"messages": LOVED_ALPHA, "top_k": 2}).json()
    top = body["recommendations"][0]
    assert body["names_recommendation"] is with_placeholder
    if with_placeholder:
        assert body["template"] is None and body["response"] == top["title"]
    else:
        assert body["template"] == f"How about {top['title']}?" and top["title"] not in body["response"]
        assert body["response_with_ids"] == tokens[len(tokens) - 2]  # the template is not part of the conversation


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


# ---------------------------------------------------------------- every trained model (the served workspace)


@pytest.fixture(scope="module")
def served_api(served_models):
    return TestClient(create_app(served_models, timeout=120))


RECOMMENDERS = [
    "c2crs",
    REPEAT_CHOICE,
    "textcnn",
    "redial",
    "kbrd",
    "kecrs",
    "kgsf",
    "revcore",
    *(f"c2crs_{variant}" for variant in ("wo_coarse", "wo_fine", "multitask", "wo_ch", "wo_sd", "wo_ud")),
]
GENERATORS = ["c2crs", "transformer", "kbrd", "kgsf", "redial", "kecrs", "revcore", "wo_iw"]


def _reference(name: str) -> str:
    return "workspace" if name == "c2crs" else f"workspace:{name}"


def test_every_trained_model_is_listed_and_a_missing_file_is_not(served_api, api):
    choices = served_api.get("/v1/models").json()["choices"]
    for kind, names in (("recommender", RECOMMENDERS), ("generator", GENERATORS)):
        offered = [c["reference"] for c in choices[kind]]
        assert offered[0] == "workspace" and sorted(offered) == sorted(map(_reference, names))
    assert all(c["usable"] for kind in choices.values() for c in kind)
    labels = {c["model"]: c["label"] for c in choices["recommender"]}
    assert labels["kbrd"].startswith("KBRD-style") and labels["c2crs_wo_sd"].startswith("C2-CRS w/o SD")
    # The chat workspace trained only C2-CRS (the repeat choice re-ranks its scores): the baselines' files are
    # missing, so they are not offered ...
    only = api.get("/v1/models").json()["choices"]
    assert [c["reference"] for c in only["recommender"]] == ["workspace", f"workspace:{REPEAT_CHOICE}"]
    # ... and asking for one says which stage makes it.
    missing = api.post("/v1/recommend", json={"messages": LOVED_ALPHA, "recommender": "workspace:kgsf"})
    assert missing.status_code == 422 and "not trained in this workspace" in missing.json()["detail"]
    assert "python -m pipeline repro baselines@kgsf" in missing.json()["detail"]
    unknown = api.post("/v1/recommend", json={"messages": LOVED_ALPHA, "recommender": "workspace:nope"})
    assert unknown.status_code == 422 and "no recommender 'nope'" in unknown.json()["detail"]


@pytest.mark.parametrize("name", RECOMMENDERS)
def test_every_recommender_ranks_as_evaluate_and_explains_what_it_reads(served_api, served_models, name):
    messages = LOVED_ALPHA + [
        {"role": "recommender", "text": "have you seen @300 ?"},
        {"role": "seeker", "text": "yes, and I liked Meryl Streep in it"},
    ]
    body = served_api.post("/v1/recommend", json={"messages": messages, "top_k": 3, "recommender": _reference(name)})
    assert body.status_code == 200, body.text
    assert body.json()["models"] == {"recommender": _reference(name)}
    ranked = body.json()["recommendations"]
    _evaluates_ranking(served_models, name, _reference(name), messages, ranked)
    why = ranked[0]["explanation"]
    labels = {e["label"] for e in why["context_entities"]}
    if name == "textcnn":
        assert why["context_entities"] == [] and why["kg_paths"] == []
        assert why["note"] == "TextCNN reads only the words: no context entities or KG paths"
    elif name == "redial":
        assert labels == {"Alpha", "Gamma"} and why["kg_paths"] == [] and "no KG paths" in why["note"]
        assert all(e["weight"] is None for e in why["context_entities"])
    elif name in ("kgsf", "revcore"):
        assert {"Alpha", "Tom Hanks", "Meryl Streep"} <= labels and "no weight per entity" in why["note"]
        assert [e["weight"] for e in why["context_entities"]] == [None] * len(labels)
    else:  # C2-CRS's kind: the weights of its self-attentive pooling
        assert sum(e["weight"] for e in why["context_entities"]) == pytest.approx(1.0, abs=1e-3)
        assert why["note"] is None or name in (REPEAT_CHOICE, "c2crs_wo_sd")
    explained = served_api.post(
        "/v1/explain", json={"messages": messages, "movie_id": 400, "recommender": _reference(name)}
    ).json()
    assert explained["rank"] >= 1 and explained["explanation"]["note"] == why["note"]


@pytest.mark.parametrize("name", GENERATORS)
def test_every_generator_answers(served_api, served_models, name):
    body = served_api.post(
        "/v1/chat",
        json={"messages": LOVED_ALPHA, "top_k": 2, "generator": _reference(name), "recommender": "workspace:kgsf"},
    )
    assert body.status_code == 200, body.text
    answer = body.json()
    assert answer["models"] == {"recommender": "workspace:kgsf", "generator": _reference(name)}
    assert (
        "__movie__" not in answer["response"]
        and served_models.knowledge.titled(answer["response_with_ids"]) == (answer["response"])
    )


def test_compare_puts_two_recommenders_side_by_side(served_api):
    body = {"messages": LOVED_ALPHA, "recommenders": ["workspace", "workspace:textcnn"], "top_k": 3}
    compared = served_api.post("/v1/compare", json=body).json()
    assert [c["recommender"] for c in compared["columns"]] == ["workspace", "workspace:textcnn"]
    for column in compared["columns"]:
        alone = served_api.post(
            "/v1/recommend",
            json={"messages": LOVED_ALPHA, "top_k": 3, "recommender": column["recommender"], "explain": False},
        ).json()["recommendations"]
        assert column["recommendations"] == alone
    first, second = ([r["movie_id"] for r in c["recommendations"]] for c in compared["columns"])
    assert compared["shared"] == [m for m in first if m in second]
    assert compared["unknown_titles"] == ["No Such Film"]
    one = served_api.post("/v1/compare", json={"messages": LOVED_ALPHA, "recommenders": ["workspace"]})
    assert one.status_code == 422 and "at least 2 items" in one.text
    bad = served_api.post("/v1/compare", json={**body, "recommenders": ["workspace", "workspace:nope"]})
    assert bad.status_code == 422 and "workspace:nope" in bad.json()["detail"]


def test_a_registered_baseline_is_offered_and_ranks_as_the_workspaces_file(served_workspace, mlflow_store):
    params, workspace = served_workspace
    version = _register(workspace, "kgsf-recommender", workspace / "data/models/baselines/kgsf.pt")
    models = Models(params, workspace, "registry")
    api = TestClient(create_app(models, timeout=120))
    offered = {c["reference"]: c for c in api.get("/v1/models").json()["choices"]["recommender"]}
    assert offered[f"kgsf-recommender/{version}"]["model"] == "kgsf"
    assert offered[f"kgsf-recommender/{version}"]["usable"]
    asked = [{"messages": LOVED_ALPHA, "recommender": r} for r in (f"kgsf-recommender/{version}", "workspace:kgsf")]
    registered, own = (api.post("/v1/recommend", json=body).json() for body in asked)
    assert registered["models"]["recommender"] == f"kgsf-recommender/{version}"
    assert registered["recommendations"] == own["recommendations"]
    as_generator = api.post(
        "/v1/chat", json={"messages": LOVED_ALPHA, "generator": f"kgsf-recommender/{version}"}
    ).json()
    assert "not a generator this chat can use" in as_generator["detail"]
