"""Training stages: a run resumed after an interruption ends where an uninterrupted one does; a tiny end-to-end
training on the fixture mirror produces the metrics contract.

Over 400 lines: the end-to-end test trains every stage once and checks everything on that one workspace
(training it again per check would cost minutes each)."""

import json

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from pipeline.config import load_params
from stages.evaluation import conv_metrics, decoding_choice
from stages.io.graph import stage_body, stage_instances
from stages.io.stage_log import StageLog
from stages.training import c2crs_data
from stages.training.loop import epoch_generator, seed_everything, train


def tiny_problem(process_seed: int, seed: int = 0):
    """The same data and run seed; process_seed stands for whatever state a fresh process starts in."""
    data = torch.Generator().manual_seed(7)
    x, y = torch.randn(32, 4, generator=data), torch.randint(0, 3, (32,), generator=data)
    seed_everything(process_seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)

    def train_epoch(epoch: int) -> dict:
        order = epoch_generator(seed, epoch).permutation(32)
        for batch in np.array_split(order, 4):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return {"loss": loss.item()}

    def validate() -> dict:
        return {"loss": torch.nn.functional.cross_entropy(model(x), y).item()}

    return model, optimizer, train_epoch, validate


def test_a_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    model, optimizer, train_epoch, validate = tiny_problem(0)
    straight = train(
        model, optimizer, tmp_path / "straight", 4, train_epoch, validate, monitor="valid_loss", higher_is_better=False
    )
    expected = [p.detach().clone() for p in model.parameters()]

    model, optimizer, train_epoch, validate = tiny_problem(0)
    train(
        model, optimizer, tmp_path / "resumed", 2, train_epoch, validate, monitor="valid_loss", higher_is_better=False
    )  # the process "dies" here, after two epochs
    model, optimizer, train_epoch, validate = tiny_problem(123)  # a new process: fresh weights, other RNG state
    seen = []
    resumed = train(
        model,
        optimizer,
        tmp_path / "resumed",
        4,
        train_epoch,
        validate,
        monitor="valid_loss",
        higher_is_better=False,
        on_epoch=lambda epoch, metrics: seen.append((epoch, metrics)),
    )
    assert resumed.history == straight.history
    # The resumed run reports the epochs it did not train too, so its log and curve file have the whole curve.
    assert seen == [(row["epoch"], {k: v for k, v in row.items() if k != "epoch"}) for row in straight.history]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), expected))


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    model, optimizer, train_epoch, _ = tiny_problem(0)
    values = iter([0.5, 0.4, 0.45, 0.46, 0.47, 0.48])
    state = train(
        model,
        optimizer,
        tmp_path,
        6,
        train_epoch,
        validate=lambda: {"loss": next(values)},
        monitor="valid_loss",
        higher_is_better=False,
        patience=2,
    )
    assert (state.epoch, state.best_epoch) == (4, 2)
    assert (tmp_path / "best.pt").is_file()


def test_early_stopping_on_a_flattening_metric_keeps_the_lowest_epoch(tmp_path):
    model, optimizer, train_epoch, _ = tiny_problem(0)
    values = iter([1.0, 0.5, 0.498, 0.497, 0.3])  # after epoch 2 it falls by under 1 % an epoch
    state = train(
        model,
        optimizer,
        tmp_path,
        5,
        train_epoch,
        validate=lambda: {"loss": next(values)},
        monitor="valid_loss",
        higher_is_better=False,
        patience=2,
        min_improvement=0.01,
    )
    assert (state.epoch, state.best_epoch, state.best_metric) == (4, 4, 0.497)  # flattened; the lowest kept


@pytest.mark.usefixtures("mlflow_store")
def test_tiny_end_to_end_training_evaluation_and_scoring(params_file, mirror, monkeypatch, capsys):
    params = load_params(params_file)
    workspace = params_file.parent
    for stage in stage_instances(params):
        stage_body(stage)(params, workspace)
    results = _check_recommendation_reports(params, workspace)
    _check_ablations(params, workspace)
    conversation = _check_conversation_reports(params, workspace)
    run, inputs = _check_one_pass_and_whole_graph_scoring(params, workspace, conversation)
    _check_an_oracle_ranks_first(params, workspace, run, inputs, results, monkeypatch)
    _check_chat_and_scoring_a_file(params, workspace, mirror, results, capsys)


def _check_recommendation_reports(params, workspace) -> dict:
    """reports/rec.json and rec.md, metrics, the DVC plots' data: every model in every protocol."""
    results = json.loads((workspace / "reports/rec.json").read_text())
    for model, by_protocol in results.items():  # Kostric and Balog's protocol, on the raw test messages
        assert {"standard_full", "standard_dedup"} <= set(by_protocol), model
        assert 0 < by_protocol["standard_dedup"]["n"] <= by_protocol["standard_full"]["n"], model
        for protocol in ("standard_full", "standard_dedup"):  # and their dialogue-level measures
            assert 0 <= by_protocol[protocol]["success_rate"] <= 1 and by_protocol[protocol]["dialogues"] > 0, model
    assert "## The standardized protocol (Kostric and Balog)" in (workspace / "reports/rec.md").read_text()
    flat = json.loads((workspace / "metrics/rec.json").read_text())  # what `dvc metrics show` prints: flat, small
    assert flat["c2crs.all_turns.recall@10"] == results["c2crs"]["all_turns"]["recall@10"]
    assert all(isinstance(v, float) for v in flat.values()) and len(flat) == 2 * len(results)
    variants = {"wo_coarse", "wo_fine", "multitask", "wo_ch", "wo_sd", "wo_ud"}  # the shipped params.yaml's
    assert set(params.ablations.variants) == variants
    assert set(results) == (
        {
            "popularity",
            "repeat",
            "repeat_popularity",
            "textcnn",
            "redial",
            "kbrd",
            "kecrs",
            "kgsf",
            "revcore",
            "c2crs",
            "c2crs-repeat-choice",
        }
        | {f"c2crs_{v}" for v in variants}
    )
    for protocols in results.values():
        assert set(protocols) == {
            "all_turns",
            "recommender_turns",
            "new_items",
            "new_items_masked",
            "standard_full",
            "standard_dedup",
        }
        assert {"recall@1", "recall@10", "recall@50", "ndcg@10", "mrr@10", "n"} <= set(protocols["all_turns"])
    assert results["c2crs"]["all_turns"]["n"] == results["popularity"]["all_turns"]["n"] > 0
    assert set(results["c2crs"]["all_turns"]["margin_over"]) == set(results) - {"c2crs"}
    report = (workspace / "reports/rec.md").read_text()
    assert "paper: C2-CRS" in report and "| w/o SD | c2crs_wo_sd |" in report
    finetune = json.loads((workspace / "metrics/finetune_rec.json").read_text())
    assert finetune["epochs_run"] == 2
    # The DVC plots' data: per-epoch curves of every training stage, recall@k and Dist-n on the test split.
    curve = json.loads((workspace / "reports/curves/finetune_rec.json").read_text())
    assert [row["epoch"] for row in curve] == [1, 2] and {"train_loss", "valid_recall@50"} <= set(curve[0])
    baselines_curves = {
        name: json.loads((workspace / f"reports/curves/baselines/{name}.json").read_text())
        for name in ("textcnn", "kbrd", "kgsf", "redial", "kecrs", "revcore")
    }
    assert all(
        "valid_recall@50" in curve[0] for name, curve in baselines_curves.items() if name not in ("kgsf", "revcore")
    )
    for name in ("kgsf", "revcore"):
        assert "mim_train_loss" in baselines_curves[name][0] and "valid_recall@50" in baselines_curves[name][-1]
    revcore = json.loads((workspace / "metrics/baselines/revcore.json").read_text())
    assert revcore["sentiment"]["rated_reviews"] > 0 and revcore["retrieval"]["train"]["with_review"] > 0
    form_labels = json.loads((workspace / "metrics/baselines/redial.json").read_text())["form_labels"]
    kecrs = json.loads((workspace / "metrics/baselines/kecrs.json").read_text())
    assert 0 < kecrs["training_pairs"] < kecrs["all_training_pairs"]  # new, liked targets only
    assert form_labels["train"]["samples_with_a_liked_or_disliked_movie"] > 0  # conversation 11's seeker form
    word_graph = json.loads((workspace / "metrics/word_graph.json").read_text())
    assert word_graph["stopword_edges_dropped"] == 1 and word_graph["vocabulary_tokens_in_graph"] > 0
    ablation_curve = json.loads((workspace / "reports/curves/ablations/wo_fine.json").read_text())
    assert "finetune_rec.valid_recall@50" in ablation_curve[0] and "pretrain_coarse.train_loss" in ablation_curve[0]
    recall_at_k = json.loads((workspace / "reports/recall_at_k.json").read_text())
    assert [row["k"] for row in recall_at_k] == list(range(1, 51))
    for k in (1, 10, 50):
        assert recall_at_k[k - 1]["c2crs"] == results["c2crs"]["all_turns"][f"recall@{k}"]
    assert all(a["kbrd"] <= b["kbrd"] for a, b in zip(recall_at_k, recall_at_k[1:]))
    return results


def _check_ablations(params, workspace) -> None:
    # Every variant trained its whole path with its overrides; w/o Fine's coarse step is the main run's.
    ablations = {
        variant: json.loads((workspace / f"metrics/ablations/{variant}.json").read_text())
        for variant in params.ablations.variants
    }
    for variant, outcome in ablations.items():
        assert np.isfinite(outcome["finetune_rec"]["train_loss"]), variant
    assert ablations["wo_coarse"]["pretrain_coarse"]["epochs_run"] == 0
    assert ablations["multitask"]["pretrain_fine"]["epochs_run"] == 0
    main_coarse = torch.load(workspace / "data/models/pretrain_coarse.pt", weights_only=True)["state_dict"]
    reused = torch.load(workspace / "data/models/ablations/wo_fine/pretrain_coarse.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(main_coarse[k], reused[k]) for k in main_coarse)


def _check_conversation_reports(params, workspace) -> dict:
    # Conversation: every generator on the test responses, the metrics contract, the report and the rating sheet.
    conversation = json.loads((workspace / "reports/conv.json").read_text())
    conv_flat = json.loads((workspace / "metrics/conv.json").read_text())
    assert conv_flat["c2crs.perplexity"] == conversation["c2crs"]["perplexity"] and "human.perplexity" not in conv_flat
    assert conv_flat["human.dist@2.corpus"] == conversation["human"]["dist@2"]["corpus"]
    distinct = {row["model"]: row for row in json.loads((workspace / "reports/distinct.json").read_text())}
    assert distinct["c2crs"]["dist@3"] == conversation["c2crs"]["dist@3"]["corpus"] and set(distinct) == set(
        conversation
    )
    assert set(conversation) == {"human", "c2crs"} | set(params.conv_baselines.train)
    assert set(params.conv_baselines.train) == {"transformer", "kbrd", "redial", "kgsf", "kecrs", "revcore", "wo_iw"}
    for name, metrics in conversation.items():
        for n in (2, 3, 4):
            assert set(metrics[f"dist@{n}"]) == {"corpus", "per_sentence"}, name
        assert {"perplexity", "avg_len", "entity_rate"} <= set(metrics)
    assert conversation["c2crs"]["perplexity"] > 1 and {"bleu@1", "bleu@2"} <= set(conversation["c2crs"])
    assert conversation["human"]["n"] == conversation["c2crs"]["n"] > 0
    assert (
        "names_recommended" in conversation["c2crs"]["quality"]
        and "names_recommended" not in conversation["human"]["quality"]
    )
    assert "| model | word repeated in a row |" in (workspace / "reports/conv.md").read_text()
    assert all(np.isfinite(m["quality"]["lm_perplexity"]) for m in conversation.values())
    conv_report = (workspace / "reports/conv.md").read_text()
    assert "| paper: C2-CRS | 0.163 | 0.291 | 0.417 |" in conv_report
    # choose_decoding: one setting per generator, by the rule, on validation; evaluate decoded with it and says so
    choice = json.loads((workspace / "reports/decoding.json").read_text())
    assert set(choice["generators"]) == set(conversation) - {"human"}
    for name, result in choice["generators"].items():
        assert decoding_choice.pick(result["settings"], choice["gold"])["setting"] == result["chosen"], name
        described = decoding_choice.describe(result["chosen"], params.evaluate.decoding.beam_size)
        assert f"{conv_metrics.MODEL_NAMES.get(name, name)}: {described}" in conv_report, name
    assert "## Where the repeated words come from" in (workspace / "reports/decoding.md").read_text()
    assert "| C2-CRS w/o instance weighting |" in conv_report
    sheet = (workspace / "reports/conv_rating.csv").read_text().splitlines()
    assert sheet[0] == "item,sample_id,context,response,fluency,informativeness"
    generators = len(conversation) - 1  # every model but the human responses
    assert len(sheet) - 1 == generators * min(params.evaluate.samples_for_reading, conversation["c2crs"]["n"])
    transformer = json.loads((workspace / "metrics/conv_baselines/transformer.json").read_text())
    assert transformer["overrides"]["finetune_conv.pretrained"] == "none"
    kgsf_generator = json.loads((workspace / "metrics/conv_baselines/kgsf.json").read_text())
    assert kgsf_generator["overrides"]["finetune_conv.pretrained"] == "kgsf" and kgsf_generator["epochs_run"] == 2
    assert np.isfinite(conversation["kgsf"]["perplexity"])
    hred = json.loads((workspace / "metrics/conv_baselines/redial.json").read_text())
    assert hred["overrides"]["finetune_conv.architecture"] == "hred" and np.isfinite(hred["train_loss"])
    assert "| ReDial (HRED) |" in conv_report and np.isfinite(conversation["redial"]["perplexity"])
    kecrs_generator = json.loads((workspace / "metrics/conv_baselines/kecrs.json").read_text())
    assert kecrs_generator["overrides"]["finetune_conv.bag_of_entity_weight"] == 1.5
    assert np.isfinite(kecrs_generator["train_loss"]) and "| KECRS |" in conv_report
    assert np.isfinite(conversation["kecrs"]["perplexity"]) and np.isfinite(conversation["kbrd"]["perplexity"])
    revcore_generator = json.loads((workspace / "metrics/conv_baselines/revcore.json").read_text())
    assert revcore_generator["overrides"]["finetune_conv.pretrained"] == "revcore" and "| RevCore |" in conv_report
    assert np.isfinite(conversation["revcore"]["perplexity"])
    assert json.loads((workspace / "metrics/finetune_conv.json").read_text())["epochs_run"] == 2
    return conversation


def _check_one_pass_and_whole_graph_scoring(params, workspace, conversation: dict):
    # evaluate's one pass per generator (perplexity and responses from one encoding) equals the two separate ones.
    from stages.training import baseline_models, conv_runs, conv_train, runs

    run, _, inputs = runs.training_run(params, workspace)
    generator, _ = conv_runs.load_conversation_model(workspace / "data/models/c2crs_conv.pt")
    test = c2crs_data.sample_table(pl.read_parquet(inputs["samples"]), pl.read_parquet(inputs["triples"]), "test")
    vocabulary = conv_train.conv_vocabulary(pl.read_parquet(inputs["vocab"]))
    responses = conv_train.responses(pl.read_parquet(inputs["samples"]), test, "test", vocabulary)
    decoding = params.evaluate.decoding
    scored, said = conv_train.perplexity_and_responses(generator, run, test, responses, decoding, vocabulary.banned_ids)
    assert scored["perplexity"] == pytest.approx(conversation["c2crs"]["perplexity"], rel=1e-6)
    assert scored["perplexity"] == pytest.approx(
        conv_train.perplexity(generator, run, test, responses, decoding.batch_size)["perplexity"], rel=1e-6
    )
    assert said == conv_train.generate(generator, run, test, responses.rows, decoding, vocabulary.banned_ids)
    # Scoring runs the R-GCN on the items and the table's context entities only: the whole graph's scores.
    from stages.training import c2crs_train

    recommender = runs.load_c2crs(workspace / "data/models/c2crs_rec.pt").eval()
    with torch.no_grad():
        whole = recommender.entity_graph(run.graph.edge_index, run.graph.edge_type)
        for rows, scores in c2crs_train.score_samples(recommender, run, test, 3):
            ids = c2crs_train.recommendation_batch(test, rows, run.max_context_entities, "cpu")
            assert np.allclose(scores, recommender.recommendation_logits(whole, ids).numpy(), atol=1e-5)
    # KGSF's scoring likewise: the whole graph's N gives the same scores.
    from stages.training import kgsf_train

    kgsf = baseline_models.load_kgsf(workspace / "data/models/baselines/kgsf.pt").eval()
    words = kgsf_train.load_word_graph(workspace, len(pl.read_parquet(inputs["vocab"])), "cpu")
    with torch.no_grad():
        whole = kgsf.kg_encoder(run.graph.edge_index, run.graph.edge_type)
        W = kgsf.word_states(words.edge_index)
        for rows, scores in kgsf_train.score_kgsf(kgsf, run, test, words, 3):
            ids = c2crs_train.recommendation_batch(test, rows, run.max_context_entities, "cpu")
            expected = kgsf.recommendation_logits(whole, ids, W, kgsf_train.context_words(test, rows, words))
            assert np.allclose(scores, expected.numpy(), atol=1e-5)
    return run, inputs


def _check_an_oracle_ranks_first(params, workspace, run, inputs, results: dict, monkeypatch) -> None:
    # The scorer ranks a hand-built oracle first (every row's own targets scored 1, the rest 0), so a baseline that
    # looks weak is weak, not hidden behind a bug in the evaluation.
    from stages import evaluate

    real_score_split = evaluate.score_split

    def with_oracle(*args, **kwargs):
        table, models = real_score_split(*args, **kwargs)

        def oracle():
            for start in range(0, len(table), 4):
                rows = np.arange(start, min(start + 4, len(table)))
                scores = np.zeros((len(rows), run.graph.n_items), dtype=np.float32)
                for i, r in enumerate(rows):
                    scores[i, table.targets[r]] = 1.0
                yield rows, scores

        return table, {**models, "oracle": oracle}

    with monkeypatch.context() as patched:
        patched.setattr(evaluate, "score_split", with_oracle)
        with_oracle_results = evaluate.evaluate_samples(
            params, workspace, pl.read_parquet(inputs["samples"]), pl.read_parquet(inputs["triples"])
        )
    for protocol in ("all_turns", "recommender_turns", "new_items"):
        oracle = with_oracle_results["oracle"][protocol]
        assert oracle["n"] > 0 and oracle["recall@10"] == 1.0, protocol
        assert all(oracle["recall@10"] >= m[protocol]["recall@10"] for m in with_oracle_results.values()), protocol
        assert with_oracle_results["kgsf"][protocol]["recall@10"] == results["kgsf"][protocol]["recall@10"]


def _check_chat_and_scoring_a_file(params, workspace, mirror, results: dict, capsys) -> None:
    # Talking to the trained model: a quoted title becomes the movie, named movies are not recommended again.
    from stages.chat.engine import Chat, Knowledge, Session, load_generator, load_recommender

    knowledge = Knowledge(params, workspace)
    generator = load_generator(workspace / "data/models/c2crs_conv.pt", knowledge)
    chosen = json.loads((workspace / "reports/decoding.json").read_text())["generators"]["c2crs"]["chosen"]
    assert {key: getattr(generator.decoding, key) for key in chosen} == chosen  # as evaluate decodes C2-CRS
    chat = Session(Chat(knowledge, load_recommender(workspace / "data/models/c2crs_rec.pt", knowledge), generator))
    answer, recommended, unknown = chat.reply('hi, I loved "Alpha" and "No Such Film"')
    assert chat.turns[0].movie_ids == [100] and unknown == ["No Such Film"]
    assert isinstance(answer, str) and "Alpha (2001)" not in recommended and len(recommended) == 3
    assert chat.turns[-1].role == "recommender" and len(chat.turns) == 2

    # The same models on a file a user brings: the fixture's test conversations give the same numbers.
    from stages.evaluate import score_file

    scored = score_file(params, workspace, mirror / "redial/test.jsonl")
    assert scored["conversations"] == 2 and scored["missing"] == {}
    for model in results:
        for protocol in ("all_turns", "recommender_turns", "new_items", "new_items_masked"):
            for metric in ("recall@1", "recall@10", "recall@50", "n"):
                assert scored["results"][model][protocol][metric] == results[model][protocol][metric]
    # Only the models asked for, and those whose file exists: a missing one is named with the stage that makes it.
    (workspace / "data/models/ablations/wo_ch/finetune_rec.pt").unlink()
    partial = score_file(params, workspace, mirror / "redial/test.jsonl", ["c2crs", "c2crs_wo_ch"])
    assert set(partial["results"]) == {"c2crs", "popularity", "repeat", "repeat_popularity"}
    assert partial["missing"] == {
        "c2crs_wo_ch": "data/models/ablations/wo_ch/finetune_rec.pt (made by stage ablations@wo_ch)"
    }
    with pytest.raises(ValueError, match="unknown model.s. nope"):
        score_file(params, workspace, mirror / "redial/test.jsonl", ["nope"])
    # The documented command, in this partial workspace: `score --data FILE.jsonl --models c2crs kbrd`.
    from pipeline import cli

    data, params_path = str(mirror / "redial/test.jsonl"), str(workspace / "params.yaml")
    argv = ["score", "--data", data, "--params", params_path, "--models-from", "workspace", "--models", "c2crs", "kbrd"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("\n{") + 1 :])  # the tables, then the reports/rec.json shape
    assert set(printed) == {"c2crs", "kbrd", "popularity", "repeat", "repeat_popularity"}
    assert printed["kbrd"]["all_turns"]["recall@10"] == results["kbrd"]["all_turns"]["recall@10"]


def test_an_ablation_variant_is_its_own_stage_and_logs_each_step(params_file):
    """ablations@short trains that variant alone, into its own folder and metrics file, naming each step's epochs."""
    raw = yaml.safe_load(params_file.read_text())
    raw["ablations"] = {"variants": {"wo_sd": {"model.kg_edges": False}, "short": {"finetune_rec.epochs": 1}}}
    params_file.write_text(yaml.safe_dump(raw))
    params = load_params(params_file)
    workspace = params_file.parent
    assert [name for name in stage_instances(params) if name.startswith("ablations")] == [
        "ablations@short",
        "ablations@wo_sd",
    ]  # yaml.safe_dump sorts the keys
    for stage in ("ingest", "reviews", "kg", "triples"):
        stage_body(stage)(params, workspace)

    class Epochs(StageLog):
        def __init__(self):
            self.names = set()

        def epoch(self, epoch, metrics):
            self.names |= set(metrics)

    log = Epochs()
    outcome = stage_body("ablations@short")(params, workspace, log)
    assert outcome.metrics["finetune_rec"]["epochs_run"] == 1
    assert outcome.metrics["overrides"] == {"finetune_rec.epochs": 1}
    assert {"pretrain_coarse.train_loss", "finetune_rec.valid_recall@50"} <= log.names
    assert (workspace / "data/models/ablations/short/finetune_rec.pt").is_file()
    assert json.loads((workspace / "metrics/ablations/short.json").read_text()) == outcome.metrics
    assert not (workspace / "data/models/ablations/wo_sd").exists()


def test_two_processes_with_one_checkpoint_folder_take_turns(tmp_path):
    """Stages side by side that share a training run: the second waits for the first, then resumes its finished
    run instead of training the same epochs again (or both writing one checkpoint)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        histories = pool.starmap(_train_tiny, [(tmp_path, 0.3), (tmp_path, 0.0)])
    assert histories[0] == histories[1] and len(histories[0]) == 3
    epochs_trained = sorted(int(line) for line in (tmp_path / "trained").read_text().split())
    assert epochs_trained == [0, 1, 2]  # each epoch once, by whichever process came first


def _train_tiny(folder, delay: float):
    import time

    time.sleep(delay)
    model, optimizer, train_epoch, validate = tiny_problem(0)

    def counted_epoch(epoch: int) -> dict:
        with open(folder / "trained", "a") as record:
            record.write(f"{epoch}\n")
        time.sleep(0.2)
        return train_epoch(epoch)

    state = train(model, optimizer, folder / "run", 3, counted_epoch, validate)
    return [(h["epoch"], round(h["train_loss"], 6)) for h in state.history]


def test_seed_everything_switches_torchs_deterministic_kernels():
    seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
    seed_everything(0)  # params.yaml's default
    assert torch.are_deterministic_algorithms_enabled()


class _NotData:
    """Anything that is not a tensor, number, string or container: a full pickle would rebuild (and could run) it."""


def test_model_and_checkpoint_files_are_loaded_without_unpickling_objects(tmp_path):
    import pickle

    from stages.training.loop import load_checkpoint
    from stages.training.runs import load_c2crs

    path = tmp_path / "model.pt"
    torch.save({"config": {"vocab_size": 3}, "state_dict": {}, "payload": _NotData()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_c2crs(path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path, torch.nn.Linear(1, 1))


def test_precision_bf16_runs_the_forward_pass_under_autocast():
    from stages.training.loop import autocast

    layer, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert layer(x).dtype == torch.float32


def test_a_bf16_training_stage_trains_close_to_fp32(params_file):
    """precision: bf16 changes the numbers (the forward runs in bfloat16) but not what is learned; its checkpoints are
    kept apart from fp32's (precision is part of the checkpoint key)."""
    workspace = params_file.parent
    params = load_params(params_file)
    for stage in ("ingest", "reviews", "kg", "triples", "word_graph"):
        stage_body(stage)(params, workspace)
    losses = {}
    for precision in ("fp32", "bf16"):
        raw = yaml.safe_load(params_file.read_text())
        raw["precision"] = precision
        params_file.write_text(yaml.safe_dump(raw))
        losses[precision] = stage_body("pretrain_coarse")(load_params(params_file), workspace).metrics["train_loss"]
    assert np.isfinite(losses["bf16"]) and losses["bf16"] != losses["fp32"]
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * abs(losses["fp32"])
    assert len(list((workspace / "data/checkpoints").glob("pretrain_coarse-*"))) == 2
    bf16 = load_params(params_file)
    for stage in (
        "pretrain_fine",
        "finetune_rec",
        "baselines@textcnn",
        "baselines@kbrd",
        "baselines@kgsf",
        "baselines@redial",
        "finetune_conv",
    ):  # every training step's layers
        metrics = stage_body(stage)(bf16, workspace).metrics
        losses = [value for key, value in _flat(metrics) if key.endswith("train_loss")]
        assert losses and all(np.isfinite(losses)), stage


def _flat(metrics: dict, prefix: str = ""):
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_a_fine_pretraining_step_encodes_its_contexts_once(params_file, monkeypatch):
    """The fine and the coarse loss of a step share one pass of the conversation encoder (the step's largest part)."""
    from models.c2crs import C2CRS

    workspace = params_file.parent
    params = load_params(params_file)
    for stage in ("ingest", "reviews", "kg", "triples", "pretrain_coarse"):
        stage_body(stage)(params, workspace)
    encoded = []
    original = C2CRS.conversation_view

    def counted(self, context_ids):
        encoded.append(context_ids.clone())
        return original(self, context_ids)

    monkeypatch.setattr(C2CRS, "conversation_view", counted)
    stage_body("pretrain_fine")(params, workspace)
    assert encoded and all(not torch.equal(a, b) for a, b in zip(encoded, encoded[1:]))


def test_batches_by_context_then_response_length_cover_every_row_once_and_pad_less():
    from stages.training.c2crs_data import bucketed_batches

    rng = np.random.default_rng(0)
    contexts, responses = rng.integers(1, 256, 2000), rng.integers(1, 31, 2000)
    plain = bucketed_batches(contexts, 50, np.random.default_rng(1))
    both = bucketed_batches(contexts, 50, np.random.default_rng(1), then_by=responses, group=4)
    assert sorted(np.concatenate(both).tolist()) == list(range(2000))
    assert all(len(b) == 50 for b in both)

    def padded(batches, lengths):
        return sum(int(lengths[b].max()) * len(b) for b in batches)

    assert padded(both, responses) < 0.8 * padded(plain, responses)
    assert padded(both, contexts) < 1.2 * padded(plain, contexts)


def test_a_steps_review_sentences_are_encoded_once_however_often_they_are_asked_for():
    from types import SimpleNamespace

    from stages.training.c2crs_train import StepSentences

    encoded = []

    def encode_sentences(tokens):
        encoded.append(tokens.clone())
        return tokens.sum(1, keepdim=True).float()  # a "vector" that tells sentences apart

    run = SimpleNamespace(sentence_tokens=[[1], [2, 3], [4, 4, 4], [7]], pad_id=0, device="cpu")
    sentences = StepSentences(SimpleNamespace(encode_sentences=encode_sentences), run)
    assert sentences.vectors([2, 1, 2]).flatten().tolist() == [12.0, 5.0, 12.0]
    assert sentences.vectors([3, 1, 0]).flatten().tolist() == [7.0, 5.0, 1.0]
    assert [len(batch) for batch in encoded] == [2, 2]  # 1 and 2, then only the new 0 and 3
