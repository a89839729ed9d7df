"""What the recommendation stages share: the training inputs read into tensors, checkpoint folders keyed by what a
run depends on, saving and loading trained models, and one training run of the recommendation path.

The stages (pretrain_coarse, pretrain_fine, finetune_rec, ablations) and the pre-training study call these, so the
same configuration always trains the same way; a generator's run is conv_runs.py, the baselines' model files
baseline_models.py and textcnn_train.py.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import polars as pl
import torch

from models.c2crs import C2CRS, C2CRSConfig
from stages.io.graph import STAGES
from stages.io.outputs import content_hash, is_main_process, write_outputs
from stages.io.stage_log import CurveLog, StageLog, StageOutcome, registered_name
from stages.training import c2crs_data, c2crs_train, distributed, loop
from stages.training.distributed import barrier
from stages.training.loop import resolve_device

# The params sections every model's training reads; a stage adds its own (checkpoint keys use them).
TRAINING_SECTIONS = ("seed", "device", "deterministic", "precision", "model")


# What a C2-CRS training run reads: outputs of earlier stages, by their names in dvc.yaml
TRAINING_INPUTS = {
    **{name: STAGES["triples"].output(name) for name in ("samples", "triples", "vocab")},
    "review_sentences": STAGES["reviews"].output("review_sentences"),
    **{name: STAGES["kg"].output(name) for name in ("entities", "relations", "edges")},
}
TEXT_INPUTS = {f"text_{name}": STAGES["text_triples"].output(name) for name in ("samples", "triples")}


def device_of(params) -> torch.device:
    return torch.device(resolve_device(params.device))


def training_run(params, workspace: Path) -> tuple[c2crs_train.Run, C2CRSConfig, dict[str, Path]]:
    """Everything a C2-CRS training stage reads, as tensors and tables, and the model's configuration."""
    inputs = {name: workspace / path for name, path in TRAINING_INPUTS.items()}
    samples, triple_table = pl.read_parquet(inputs["samples"]), pl.read_parquet(inputs["triples"])
    vocabulary = pl.read_parquet(inputs["vocab"])
    cfg = params.model
    edges = pl.read_parquet(inputs["edges"])
    if not cfg.kg_edges:
        edges = edges.filter(pl.col("src") == pl.col("dst"))
    graph = c2crs_data.load_graph(pl.read_parquet(inputs["entities"]), pl.read_parquet(inputs["relations"]), edges)
    sentence_tokens = c2crs_data.sentence_token_ids(
        pl.read_parquet(inputs["review_sentences"]), vocabulary, cfg.max_sentence_tokens
    )
    ranks, device = distributed.setup(params.distributed, device_of(params))
    run = c2crs_train.Run(
        graph=graph,
        train=c2crs_data.sample_table(samples, triple_table, "train"),
        valid=c2crs_data.sample_table(samples, triple_table, "valid"),
        sentence_tokens=sentence_tokens,
        pad_id=0,
        max_context_entities=cfg.max_context_entities,
        max_review_sentences=cfg.max_review_sentences,
        device=device,
        seed=params.seed,
        views=frozenset(cfg.views),
        ranks=ranks,
        precision=params.precision,
    )
    model_config = C2CRSConfig(
        vocab_size=vocabulary.height,
        n_entities=graph.n_entities,
        n_relations=graph.n_relations,
        n_items=graph.n_items,
        pad_id=0,  # the vocabulary's __pad__
        token_dim=cfg.token_dim,
        kg_dim=cfg.kg_dim,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        ffn_dim=cfg.ffn_dim,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        num_bases=cfg.num_bases,
        projection_dim=cfg.projection_dim,
        temperature=params.pretrain_coarse.temperature,  # pretrain_fine sets its own when it starts
        item_bias=cfg.item_bias,
        kg_encoder=cfg.kg_encoder,
        rec_pooling=cfg.rec_pooling,
        projection_heads=cfg.projection_heads,
        contrastive_loss=cfg.contrastive_loss,
        max_positions=max(int(samples["context_token_ids"].list.len().max()), cfg.max_sentence_tokens),
    )
    return run, model_config, inputs


def checkpoint_dir(workspace: Path, name: str, params, sections: tuple[str, ...], inputs: dict[str, Path]) -> Path:
    """Checkpoints of a run live outside DVC's outputs (DVC deletes those before a stage runs), under a key of the
    params sections the training reads and its inputs, so a rerun resumes only the very same training. A section
    may be dotted ("baselines.textcnn"): the key then holds that part only, nested as in params."""
    dump, chosen = params.model_dump(), {}
    for section in sections:
        *parents, last = section.split(".")
        source, target = dump, chosen
        for part in parents:
            source, target = source[part], target.setdefault(part, {})
        target[last] = source[last]
    key = json.dumps(
        {"params": chosen, "inputs": {n: content_hash(p) for n, p in sorted(inputs.items())}}, sort_keys=True
    )
    return workspace / "data" / "checkpoints" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def save_model(path: Path, model: torch.nn.Module, config) -> None:
    """Weights and the config that builds the module again, written atomically (distributed: by the first process,
    which the others wait for)."""
    if not is_main_process():
        barrier()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save({"config": dataclasses.asdict(config), "state_dict": model.state_dict()}, temporary)
    temporary.replace(path)
    barrier()


def load_saved(path: Path) -> dict:
    """A file written by save_model: weights and a config of plain values, loaded without unpickling code (a model
    file may come from someone else)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_module(path: Path, build) -> torch.nn.Module:
    """A module saved by save_model: build(config) makes it, the saved weights fill it."""
    saved = load_saved(path)
    model = build(saved["config"])
    model.load_state_dict(saved["state_dict"])
    return model


def load_c2crs(path: Path) -> C2CRS:
    return load_module(path, lambda config: C2CRS(C2CRSConfig(**config)))


def training_outcome(state) -> dict:
    """How many epochs ran, and the metrics of the kept (best) epoch."""
    best = next(
        (h for h in state.history if h["epoch"] == state.best_epoch), state.history[-1] if state.history else {}
    )
    return {
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        **{k: v for k, v in best.items() if k != "epoch"},
    }


# The recommendation path: (stage, the stage whose model it starts from, its training function).
REC_PATH = {
    "pretrain_coarse": (None, c2crs_train.pretrain_coarse),
    "pretrain_fine": ("pretrain_coarse", c2crs_train.pretrain_fine),
    "finetune_rec": ("pretrain_fine", c2crs_train.finetune_recommender),
}


def with_share(run: c2crs_train.Run, fraction: float) -> c2crs_train.Run:
    """The run on `fraction` of its train conversations (c2crs_data.conversation_subset), each epoch passing over
    them round(1 / fraction) times: an epoch takes as many steps as on all conversations, so epochs, patience and
    min_improvement mean the same at every share (a learning curve compares converged runs, not step counts)."""
    return dataclasses.replace(
        run,
        train=run.train.subset(c2crs_data.conversation_subset(run.train.conv_ids, fraction)),
        passes_per_epoch=max(1, round(1 / fraction)),
    )


def with_text_samples(run: c2crs_train.Run, params, workspace: Path, inputs: dict[str, Path]) -> c2crs_train.Run:
    """The run with text_triples' samples after its train samples, drawn at params.pretrain_text.ratio; their files
    join `inputs` (so the checkpoint key)."""
    for name, path in TEXT_INPUTS.items():
        inputs[name] = workspace / path
    text = c2crs_data.sample_table(
        pl.read_parquet(inputs["text_samples"]), pl.read_parquet(inputs["text_triples"]), "train"
    )
    return dataclasses.replace(run, train=run.train.concat(text), text_ratio=params.pretrain_text.ratio)


def train_c2crs(
    stage: str, params, workspace: Path, log: StageLog, start_from: Path | None, out: Path, loaded=None
) -> tuple[C2CRS, dict, dict[str, Path]]:
    """One step of the recommendation path: train from `start_from` (None: fresh weights), keep the best epoch,
    save it to `out`. Returns the model, the training outcome and the inputs read."""
    run, model_config, inputs = loaded or training_run(params, workspace)  # loaded: training_run's, reused
    inputs = dict(inputs)
    loop.seed_everything(params.seed, params.deterministic)
    if start_from is not None:
        inputs["start_from"] = start_from
        model = load_c2crs(start_from)
    else:
        model = C2CRS(model_config)
    model.to(run.device)
    _, train_fn = REC_PATH[stage]
    fraction, name = getattr(params, stage).train_fraction, stage
    if fraction < 1:  # a learning curve's point: a share of the train conversations, in epochs of the usual size
        run, name = with_share(run, fraction), f"{stage}-share"
    sections = TRAINING_SECTIONS + (stage,)
    if stage != "finetune_rec" and params.pretrain_text.ratio > 0:  # pre-training reads the text samples too
        run, sections = with_text_samples(run, params, workspace, inputs), sections + ("pretrain_text",)
    checkpoints = checkpoint_dir(workspace, name, params, sections, inputs)
    state = train_fn(model, run, getattr(params, stage), checkpoints, on_epoch=log.epoch)
    if (checkpoints / "best.pt").is_file():
        loop.load_checkpoint(checkpoints / "best.pt", model)
    save_model(out, model, model.cfg)
    return model, training_outcome(state), inputs


def rec_path_stage(stage: str, params, workspace: Path, log: StageLog) -> StageOutcome:
    """A stage of the recommendation path: train from the previous stage's model, save, write its metrics."""
    spec = STAGES[stage]
    previous, _ = REC_PATH[stage]
    start_from = workspace / STAGES[previous].model_file if previous else None
    log = CurveLog(log)
    model, metrics, inputs = train_c2crs(stage, params, workspace, log, start_from, workspace / spec.model_file)
    write_outputs({workspace / spec.metrics_file: metrics, workspace / spec.report(stage): log.rows()})
    log.model(
        registered_name("c2crs", "recommender") if stage == "finetune_rec" else None,
        model,
        workspace / spec.model_file,
        metrics,
    )
    return StageOutcome(inputs, metrics)


def ablation_model_path(workspace: Path, variant: str, stage: str = "finetune_rec") -> Path:
    return workspace / STAGES["ablations"].for_variant(variant).output(variant) / f"{stage}.pt"
