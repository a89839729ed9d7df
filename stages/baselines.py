"""The baselines stage: TextCNN over the context words, the KBRD-style recommender, which is C2-CRS's own
recommender trained from fresh weights (no pre-training), KGSF's recommender (models/kgsf.py) and ReDial's
autoencoder over the context movies (stages/training/redial_train.py), on the same splits by the same code."""

import dataclasses
from pathlib import Path

import polars as pl

from models.baselines import AutoRecRecommender, TextCNNRecommender
from models.c2crs import C2CRS
from models.kgsf import KGSFConfig, KGSFRecommender
from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.stage_log import NO_LOG, CurveLog, StageLog, StageOutcome, registered_name
from stages.training import c2crs_train, kgsf_train, loop, redial_train, runs

# The params each model's checkpoints are keyed by (besides the inputs it reads). TextCNN and KBRD share one folder,
# keyed by what either reads, as before KGSF joined the stage, so their finished checkpoints stay valid.
SECTIONS = {"textcnn": runs.TRAINING_SECTIONS + ("finetune_rec", "baselines.textcnn"),
            "kbrd": runs.TRAINING_SECTIONS + ("finetune_rec", "baselines.textcnn"),
            "kgsf": runs.TRAINING_SECTIONS + ("baselines.kgsf",),
            "redial": runs.TRAINING_SECTIONS + ("baselines.redial",)}


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    """TextCNN over the context words, the KBRD-style recommender (C2-CRS's recommender, no pre-training), KGSF,
    ReDial."""
    spec = STAGES["baselines"]
    run, model_config, inputs = runs.training_run(params, workspace)
    log = CurveLog(log)
    textcnn_out, kbrd_out, kgsf_out, redial_out = (workspace / out for out in spec.outs)

    loop.seed_everything(params.seed, params.deterministic)
    cfg = params.baselines.textcnn
    textcnn_config = runs.TextCNNConfig(vocab_size=model_config.vocab_size, n_items=model_config.n_items,
                                        embed_dim=cfg.embed_dim, n_filters=cfg.n_filters, dropout=cfg.dropout)
    textcnn = TextCNNRecommender(**dataclasses.asdict(textcnn_config)).to(run.device)
    checkpoints = runs.checkpoint_dir(workspace, "baselines", params, SECTIONS["textcnn"], inputs) / "textcnn"
    textcnn_state = c2crs_train.train_textcnn(textcnn, run, cfg, checkpoints,
                                              on_epoch=lambda e, m: log.epoch(e, {f"textcnn.{k}": v
                                                                                  for k, v in m.items()}))
    loop.load_checkpoint(checkpoints / "best.pt", textcnn)
    runs.save_model(textcnn_out, textcnn, textcnn_config)

    loop.seed_everything(params.seed, params.deterministic)
    kbrd = C2CRS(model_config).to(run.device)
    checkpoints = runs.checkpoint_dir(workspace, "baselines", params, SECTIONS["kbrd"], inputs) / "kbrd"
    kbrd_state = c2crs_train.finetune_recommender(kbrd, run, params.finetune_rec, checkpoints,
                                                  on_epoch=lambda e, m: log.epoch(e, {f"kbrd.{k}": v
                                                                                      for k, v in m.items()}))
    loop.load_checkpoint(checkpoints / "best.pt", kbrd)
    runs.save_model(kbrd_out, kbrd, kbrd.cfg)

    loop.seed_everything(params.seed, params.deterministic)
    words = kgsf_train.load_word_graph(workspace, model_config.vocab_size, run.device)
    kgsf_config = KGSFConfig(n_words=words.n_words, n_entities=model_config.n_entities,
                             n_relations=model_config.n_relations, n_items=model_config.n_items,
                             dim=params.model.kg_dim, num_bases=params.model.num_bases)
    kgsf = KGSFRecommender(kgsf_config).to(run.device)
    kgsf_inputs = {**inputs, **{name: workspace / path for name, path in kgsf_train.WORD_GRAPH_INPUTS.items()}}
    checkpoints = runs.checkpoint_dir(workspace, "baselines", params, SECTIONS["kgsf"], kgsf_inputs) / "kgsf"
    kgsf_state = kgsf_train.train_kgsf(kgsf, run, words, params.baselines.kgsf, checkpoints,
                                       on_epoch=lambda e, m: log.epoch(e, {f"kgsf.{k}": v for k, v in m.items()}))
    loop.load_checkpoint(checkpoints / "rec" / "best.pt", kgsf)
    runs.save_model(kgsf_out, kgsf, kgsf_config)

    loop.seed_everything(params.seed, params.deterministic)
    likes = redial_train.seeker_likes(pl.read_parquet(workspace / redial_train.FORMS_INPUT),
                                      pl.read_parquet(inputs["entities"]))
    redial_config = runs.AutoRecConfig(n_items=model_config.n_items, hidden=params.baselines.redial.hidden)
    redial = AutoRecRecommender(**dataclasses.asdict(redial_config)).to(run.device)
    redial_inputs = {**inputs, "movie_forms": workspace / redial_train.FORMS_INPUT}
    checkpoints = runs.checkpoint_dir(workspace, "baselines", params, SECTIONS["redial"], redial_inputs) / "redial"
    redial_state = redial_train.train_redial(redial, run, likes, params.baselines.redial, checkpoints,
                                             on_epoch=lambda e, m: log.epoch(e, {f"redial.{k}": v
                                                                                 for k, v in m.items()}))
    loop.load_checkpoint(checkpoints / "best.pt", redial)
    runs.save_model(redial_out, redial, redial_config)

    metrics = {"textcnn": runs.training_outcome(textcnn_state),
               "kbrd": runs.training_outcome(kbrd_state),
               "kgsf": runs.training_outcome(kgsf_state),
               "redial": {**runs.training_outcome(redial_state),
                          "form_labels": {split: redial_train.label_coverage(table, likes)
                                          for split, table in (("train", run.train), ("valid", run.valid))}}}
    write_outputs({workspace / spec.metrics[0]: metrics, workspace / spec.reports[0]: log.rows()})
    log.model(registered_name("textcnn", "recommender"), textcnn, textcnn_out, metrics["textcnn"])
    log.model(registered_name("kbrd", "recommender"), kbrd, kbrd_out, metrics["kbrd"])
    log.model(registered_name("kgsf", "recommender"), kgsf, kgsf_out, metrics["kgsf"])
    log.model(registered_name("redial", "recommender"), redial, redial_out, metrics["redial"])
    return StageOutcome({**kgsf_inputs, **redial_inputs}, metrics)
