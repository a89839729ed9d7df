"""The simulated seeker (stages/chat/seeker.py), its measures (stages/evaluation/simulation_metrics.py) and the
simulate stage: the rules on hand-made conversations (the title never leaks), the measures on hand-computed ranks,
and the stage on the fixture workspace's trained models, twice, with the same transcript."""

import json
import shutil

import numpy as np
import polars as pl
import pytest

from stages import ingest
from stages.chat import seeker
from stages.evaluation import simulation_metrics
from stages.io.graph import STAGES, stage_body

MOVIES = pl.DataFrame(
    {
        "movie_id": [1, 2, 3, 4, 5, 6],
        "title": ["Heat", "Heat Wave", "Ronin", "Collateral", "The Insider", "It"],
        "mentions_ingested": [10, 1, 5, 7, 3, 2],
    }
)
INFO = {
    "1": {"genre": ["crime", "heat"], "star": ["Al Pacino", "Robert De Niro"], "director": ["Michael Mann"]},
    "2": {"genre": ["crime"], "star": ["Al Pacino"], "director": []},
    "3": {"genre": ["action"], "star": ["Robert De Niro"], "director": ["John Frankenheimer"]},
    "4": {"genre": ["crime"], "star": ["Tom Cruise"], "director": ["Michael Mann"]},
    "5": {"genre": ["drama"], "star": ["Al Pacino"], "director": ["Michael Mann"]},
    "6": {"genre": ["horror"], "star": ["Bill Skarsgard"], "director": ["Andy Muschietti"]},
}


def _conversation(conv_id: int, turns: list[tuple[str, str, list[int]]]) -> pl.DataFrame:
    rows = [(conv_id, i, role, text, movies) for i, (role, text, movies) in enumerate(turns)]
    return pl.DataFrame(rows, schema=ingest.UTTERANCE_SCHEMA, orient="row")


def _forms(conv_id: int, answers: list[tuple[int, int, int]]) -> pl.DataFrame:
    """(movie, suggested, liked) answers of the seeker's form."""
    rows = [(conv_id, m, "seeker", s, 1, liked) for m, s, liked in answers]
    return pl.DataFrame(rows, schema=ingest.FORM_SCHEMA, orient="row")


def _seekers(utterances, forms, items=frozenset(range(1, 7))):
    conv_ids = sorted(set(utterances["conv_id"]))
    return seeker.build_seekers(conv_ids, utterances, forms, MOVIES, INFO, set(items))


def test_the_target_is_the_first_liked_suggested_movie_and_the_hints_follow_the_rules():
    utterances = _conversation(
        7,
        [
            ("seeker", "I love crime films like @3", [3]),
            ("recommender", "have you seen @5 or @1 ?", [5, 1]),
            ("seeker", "yes, @5 was great", [5]),
        ],
    )
    forms = _forms(7, [(3, 0, 1), (5, 1, 1), (1, 1, 1)])
    [who], left_out = _seekers(utterances, forms)
    assert who.target == 5 and sum(left_out.values()) == 0  # 5 and 1 are liked and suggested; 5 was named first
    assert who.opening == "I love crime films like @3"  # the real first message: it does not name the target
    assert who.hints["genre"] == ("I'm in the mood for drama.",)
    assert who.hints["star"] == ("Do you know one with Al Pacino?",)
    assert who.hints["director"] == ("Maybe something by Michael Mann?",)
    # a liked movie sharing a field first (3 shares nothing with 5; 1 shares Pacino and Mann), then the
    # director's movies (Collateral), then its star's (Heat Wave), most mentioned first, without the target
    assert who.hints["similar"] == ("I also liked @1.", "Something like @4?", "Something like @2?")
    assert who.messages(("genre", "star", "director", "similar"), 6) == [
        "I'm in the mood for drama.",
        "Do you know one with Al Pacino?",
        "Maybe something by Michael Mann?",
        "I also liked @1.",
        "Something like @4?",
        "Something like @2?",
    ]
    assert who.messages(("genre",), 3) == ["I'm in the mood for drama.", seeker.NO_HINT, seeker.NO_HINT]
    assert who.messages((), 2) == [seeker.NO_HINT, seeker.NO_HINT]


def test_the_title_never_leaks_into_what_the_seeker_says():
    """Heat's genre "heat", the sequel-like "Heat Wave" and an opening that names it are never said."""
    utterances = _conversation(
        8, [("seeker", "something like Heat please", []), ("recommender", "try @1 or @3", [1, 3])]
    )
    forms = _forms(8, [(1, 1, 1), (3, 1, 1), (4, 0, 1)])
    [who], _ = _seekers(utterances, forms)
    assert who.target == 1
    assert who.opening == "Hi! I liked @3. Can you recommend a movie?"  # the first other liked movie, by mention
    said = [who.opening, *who.messages(("genre", "star", "director", "similar"), 12)]
    guard = seeker.TitleGuard(dict(MOVIES.select("movie_id", "title").iter_rows()))
    assert not any(guard.names(text, 1) for text in said)
    assert "I'm in the mood for heat." not in said and not any("@2" in text for text in said)
    assert "I'm in the mood for crime." in said
    # "It": a title made of a common word makes the real opening and a template that says "it" unusable
    it = _conversation(9, [("seeker", "I want it scary", []), ("recommender", "@6", [6])])
    [who], _ = _seekers(it, _forms(9, [(6, 1, 1)]))
    assert who.opening == seeker.OPENINGS[1]


def test_conversations_without_a_usable_target_are_left_out_and_counted():
    utterances = pl.concat(
        [
            _conversation(1, [("seeker", "hi", []), ("recommender", "@3", [3])]),
            _conversation(2, [("seeker", "hi", []), ("recommender", "@4", [4])]),
        ]
    )
    forms = pl.concat([_forms(1, [(3, 0, 1)]), _forms(2, [(4, 1, 1)])])  # 1: the seeker named it, not suggested
    seekers, left_out = _seekers(utterances, forms, items={3})  # 4 is not an item of the KG
    assert seekers == [] and left_out["no liked suggested movie with metadata in the KG"] == 2


def test_simulation_measures_on_hand_computed_ranks():
    # three seekers, three turns: rank of the target in the top items at each turn (0: not among them)
    ranks = np.array([[0, 2, 1], [5, 0, 0], [0, 0, 0]])
    assert simulation_metrics.first_success(ranks, 1).tolist() == [3, 0, 0]
    assert simulation_metrics.first_success(ranks, 3).tolist() == [2, 0, 0]
    assert simulation_metrics.first_success(ranks, 10).tolist() == [2, 1, 0]
    out = simulation_metrics.measures(ranks, [1, 10], n_resamples=200, seed=0)
    assert out["success@1"]["value"] == pytest.approx(1 / 3) and out["success@10"]["value"] == pytest.approx(2 / 3)
    assert out["mean_turns@1"]["value"] == 3 and out["mean_turns@10"]["value"] == 1.5
    assert out["success_by_turn@10"] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert out["recall_by_turn@10"] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    low, high = out["success@10"]["ci95"]
    assert 0 <= low <= 2 / 3 <= high <= 1
    other = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 4]])
    paired = simulation_metrics.paired_difference(ranks, other, [1, 10], n_resamples=200, seed=0)
    assert paired["success@1"]["difference"] == pytest.approx(0.0)  # (1 - 0) + (0 - 1) + 0
    assert paired["success@10"]["difference"] == pytest.approx(0.0)  # (1 - 0) + (1 - 1) + (0 - 1)
    with pytest.raises(ValueError, match="one shape"):
        simulation_metrics.paired_difference(ranks, other[:2], [1], n_resamples=10, seed=0)


@pytest.fixture(scope="module")
def simulated(served_workspace, tmp_path_factory):
    """The served workspace (every model trained on the fixture mirror) with a seeker's form for each test
    conversation, and the simulate stage's params (three turns)."""
    params, served = served_workspace
    workspace = tmp_path_factory.mktemp("simulated") / "workspace"
    shutil.copytree(served, workspace)
    conversations = pl.read_parquet(workspace / STAGES["ingest"].output("conversations"))
    utterances = pl.read_parquet(workspace / STAGES["ingest"].output("utterances"))
    test = conversations.filter(pl.col("split") == "test")["conv_id"].to_list()
    first = utterances.filter(pl.col("conv_id") == test[0])
    suggested = next(
        m for role, ids in first.select("role", "movie_ids").iter_rows() if role == "recommender" for m in ids
    )
    forms = _forms(test[0], [(suggested, 1, 1)])
    forms.write_parquet(workspace / STAGES["ingest"].output("movie_forms"))
    config = params.simulate.model_copy(update={"turns": 3, "sensitivity_models": ["c2crs", "kbrd"]})
    return params.model_copy(update={"simulate": config}), workspace, suggested


def test_the_stage_simulates_every_recommender_and_replays_the_same_transcript(simulated, monkeypatch):
    params, workspace, target = simulated
    monkeypatch.delenv("C2CRS_DATA_DIR", raising=False)
    report_path = workspace / STAGES["simulate"].report("simulate.json")
    stage_body("simulate")(params, workspace)
    first = json.loads(report_path.read_text())
    stage_body("simulate")(params, workspace)
    assert json.loads(report_path.read_text()) == first
    assert first["protocol"]["size"] == 1 and first["protocol"]["turns"] == 3
    main = first["settings"]["all kinds in turn"]
    assert {"popularity", "repeat", "c2crs", "kbrd", "kgsf", "textcnn", "c2crs_wo_sd"} <= set(main)
    assert set(first["settings"]["none"]) == {"c2crs", "kbrd"} and set(first["paired"]["by_setting"]) == set(
        first["settings"]
    )
    [transcript] = first["transcripts"]
    roles = [m["role"] for m in transcript["messages"]]
    assert roles == ["seeker", "system", "seeker", "system", "seeker", "system"]
    title = transcript["target"].rsplit(" (", 1)[0]
    assert not any(title in m["text"] for m in transcript["messages"] if m["role"] == "seeker")
    assert all(len(m["top"]) == 3 for m in transcript["messages"] if m["role"] == "system")
    markdown = (workspace / STAGES["simulate"].report("simulate.md")).read_text()
    assert "| C2-CRS |" in markdown and "Test conversation" in markdown
    metrics = json.loads((workspace / STAGES["simulate"].metrics_file).read_text())
    assert set(metrics) >= {"c2crs.success@1", "c2crs.success@10", "kbrd.success@3"}
    assert target  # the seeker's target came from the conversation's recommender turn


def test_an_unknown_sensitivity_model_is_named(simulated, monkeypatch):
    params, workspace, _ = simulated
    monkeypatch.delenv("C2CRS_DATA_DIR", raising=False)
    wrong = params.model_copy(update={"simulate": params.simulate.model_copy(update={"sensitivity_models": ["nope"]})})
    with pytest.raises(ValueError, match=r"params simulate.sensitivity_models: nope is not a recommender"):
        stage_body("simulate")(wrong, workspace)


def test_answering_many_conversations_at_once_answers_each_as_alone(chat_models):
    """Chat.respond_all (the simulation's pass over every conversation) gives each conversation the reply that
    respond gives it alone: batching changes no text and no ranking."""
    from stages.chat.engine import Chat

    knowledge = chat_models.knowledge
    (recommender, _), (generator, _) = chat_models.model("recommender", None), chat_models.model("generator", None)
    chat = Chat(knowledge, recommender, generator)
    conversations = [
        [knowledge.read_turn("seeker", 'hi, I loved "Alpha" with Tom Hanks')[0]],
        [knowledge.read_turn("seeker", "something scary please")[0]],
        [
            knowledge.read_turn("seeker", "any comedy?")[0],
            knowledge.read_turn("recommender", "have you seen @300 ?")[0],
            knowledge.read_turn("seeker", "yes, another one")[0],
        ],
    ]
    together = chat.respond_all(conversations, top_k=3, explain=False)
    for turns, reply in zip(conversations, together):
        alone = chat.respond(turns, top_k=3, explain=False)
        assert reply.text_with_ids == alone.text_with_ids
        assert [r.movie_id for r in reply.recommendations] == [r.movie_id for r in alone.recommendations]
        assert [r.score for r in reply.recommendations] == pytest.approx(
            [r.score for r in alone.recommendations], abs=1e-3
        )
    assert 300 not in [r.movie_id for r in together[2].recommendations]  # named: not recommended again


def test_the_simulate_command_prints_the_report_of_the_models_asked_for(simulated, tmp_path, monkeypatch, capsys):
    from pipeline import cli

    _, workspace, _ = simulated
    monkeypatch.delenv("C2CRS_DATA_DIR", raising=False)
    out = tmp_path / "simulated.json"
    argv = ["simulate", "--params", str(workspace / "params.yaml"), "--models", "c2crs", "popularity", "--turns", "2"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| C2-CRS |" in printed and "| KBRD-style |" not in printed
    report = json.loads(out.read_text())
    assert report["protocol"]["models"] == ["c2crs", "popularity"] and report["protocol"]["turns"] == 2
    assert set(report["settings"]["none"]) == {"c2crs"} and report["paired"]["by_setting"] == {}
    assert cli.main(["simulate", "--params", str(workspace / "params.yaml"), "--models", "nope"]) == 2
    assert "unknown model(s) nope" in capsys.readouterr().err
