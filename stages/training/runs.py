"""What the model stages share: the training inputs read into tensors, checkpoint folders keyed by what a run
depends on, saving and loading trained models, and one training run of the recommendation path or of a generator.

The stages (pretrain_coarse ... conv_baselines, evaluate) and the pre-training study call these, so the same
configuration always trains the same way.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from models.baselines import AutoRecRecommender, TextCNNRecommender
from models.c2crs import C2CRS, C2CRSConfig
from models.kgsf import KGSFConfig, KGSFRecommender
from models.revcore import RevCoreConfig, RevCoreRecommender
from models.generator import ConversationModel, GeneratorConfig, ResponseGenerator
from models.hred import HRED, HREDConfig
from stages.io.graph import STAGES
from stages.io.outputs import content_hash, write_outputs
from stages.io.stage_log import CurveLog, StageLog, StageOutcome, registered_name
from stages.evaluation import rec_metrics
from stages.training import (c2crs_data, c2crs_train, conv_train, distributed, hred_train, kecrs_train, kgsf_train,
                             loop, revcore_train)
from stages.triples import SPLIT
from stages.io.outputs import is_main_process
from stages.training.distributed import barrier
from stages.training.loop import resolve_device

# The params sections every model's training reads; a stage adds its own (checkpoint keys use them).
TRAINING_SECTIONS = ("seed", "device", "deterministic", "precision", "model")


TRAINING_INPUTS = {
    "samples": "data/triples/samples.parquet", "triples": "data/triples/triples.parquet",
    "vocab": "data/triples/vocab.parquet", "review_sentences": "data/reviews/review_sentences.parquet",
    "entities": "data/kg/entities.parquet", "relations": "data/kg/relations.parquet", "edges": "data/kg/edges.parquet",
}


TEXT_INPUTS = {"text_samples": "data/text_triples/samples.parquet", "text_triples": "data/text_triples/triples.parquet"}


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
    sentence_tokens = c2crs_data.sentence_token_ids(pl.read_parquet(inputs["review_sentences"]), vocabulary,
                                                    cfg.max_sentence_tokens)
    ranks, device = distributed.setup(params.distributed, device_of(params))
    run = c2crs_train.Run(
        graph=graph,
        train=c2crs_data.sample_table(samples, triple_table, "train"),
        valid=c2crs_data.sample_table(samples, triple_table, "valid"),
        sentence_tokens=sentence_tokens, pad_id=0, max_context_entities=cfg.max_context_entities,
        max_review_sentences=cfg.max_review_sentences, device=device, seed=params.seed,
        views=frozenset(cfg.views), ranks=ranks, precision=params.precision)
    model_config = C2CRSConfig(
        vocab_size=vocabulary.height, n_entities=graph.n_entities, n_relations=graph.n_relations,
        n_items=graph.n_items, token_dim=cfg.token_dim, kg_dim=cfg.kg_dim, n_layers=cfg.n_layers,
        n_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
        num_bases=cfg.num_bases,
        projection_dim=cfg.projection_dim, item_bias=cfg.item_bias, kg_encoder=cfg.kg_encoder,
        rec_pooling=cfg.rec_pooling, projection_heads=cfg.projection_heads, contrastive_loss=cfg.contrastive_loss,
        max_positions=max(int(samples["context_token_ids"].list.len().max()), cfg.max_sentence_tokens))
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
    key = json.dumps({"params": chosen, "inputs": {n: content_hash(p) for n, p in sorted(inputs.items())}},
                     sort_keys=True)
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


@dataclass
class TextCNNConfig:
    vocab_size: int
    n_items: int
    embed_dim: int
    n_filters: int
    dropout: float


def load_textcnn(path: Path) -> TextCNNRecommender:
    return load_module(path, lambda config: TextCNNRecommender(**config))


@dataclass
class AutoRecConfig:
    n_items: int
    hidden: int


def load_redial(path: Path) -> AutoRecRecommender:
    return load_module(path, lambda config: AutoRecRecommender(**config))


def load_kgsf(path: Path) -> KGSFRecommender:
    return load_module(path, lambda config: KGSFRecommender(KGSFConfig(**config)))


def load_revcore(path: Path) -> RevCoreRecommender:
    return load_module(path, lambda config: RevCoreRecommender(RevCoreConfig(**config)))


def training_outcome(state) -> dict:
    """How many epochs ran, and the metrics of the kept (best) epoch."""
    best = next((h for h in state.history if h["epoch"] == state.best_epoch), state.history[-1] if state.history
                else {})
    return {"epochs_run": state.epoch, "best_epoch": state.best_epoch,
            **{k: v for k, v in best.items() if k != "epoch"}}


# The recommendation path: (stage, the stage whose model it starts from, its training function).
REC_PATH = {"pretrain_coarse": (None, c2crs_train.pretrain_coarse),
            "pretrain_fine": ("pretrain_coarse", c2crs_train.pretrain_fine),
            "finetune_rec": ("pretrain_fine", c2crs_train.finetune_recommender)}


def with_share(run: c2crs_train.Run, fraction: float) -> c2crs_train.Run:
    """The run on `fraction` of its train conversations (c2crs_data.conversation_subset), each epoch passing over
    them round(1 / fraction) times: an epoch takes as many steps as on all conversations, so epochs, patience and
    min_improvement mean the same at every share (a learning curve compares converged runs, not step counts)."""
    return dataclasses.replace(run, train=run.train.subset(c2crs_data.conversation_subset(run.train.conv_ids,
                                                                                           fraction)),
                               passes_per_epoch=max(1, round(1 / fraction)))


def with_text_samples(run: c2crs_train.Run, params, workspace: Path, inputs: dict[str, Path]) -> c2crs_train.Run:
    """The run with text_triples' samples after its train samples, drawn at params.pretrain_text.ratio; their files
    join `inputs` (so the checkpoint key)."""
    for name, path in TEXT_INPUTS.items():
        inputs[name] = workspace / path
    text = c2crs_data.sample_table(pl.read_parquet(inputs["text_samples"]), pl.read_parquet(inputs["text_triples"]),
                                   "train")
    return dataclasses.replace(run, train=run.train.concat(text), text_ratio=params.pretrain_text.ratio)


def train_c2crs(stage: str, params, workspace: Path, log: StageLog, start_from: Path | None,
                out: Path, loaded=None) -> tuple[C2CRS, dict, dict[str, Path]]:
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
    start_from = workspace / STAGES[previous].outs[0] if previous else None
    log = CurveLog(log)
    model, metrics, inputs = train_c2crs(stage, params, workspace, log, start_from, workspace / spec.outs[0])
    write_outputs({workspace / spec.metrics[0]: metrics, workspace / spec.reports[0]: log.rows()})
    log.model(registered_name("c2crs", "recommender") if stage == "finetune_rec" else None, model,
              workspace / spec.outs[0], metrics)
    return StageOutcome(inputs, metrics)


# Where a generator's encoders start (params.finetune_conv.pretrained), and which recommender fills its movie
# placeholder when its responses are shown: the one trained from the same representations.
CONV_ENCODERS = {"c2crs": "data/models/pretrain_fine.pt", "kbrd": "data/models/baselines/kbrd.pt",
                 "kecrs": "data/models/baselines/kecrs.pt", "kgsf": "data/models/baselines/kgsf.pt",
                 "revcore": "data/models/baselines/revcore.pt", "none": None}
CONV_RECOMMENDER = {"c2crs": "c2crs", "kbrd": "kbrd", "kecrs": "kecrs", "kgsf": "kgsf", "revcore": "revcore",
                    "none": "textcnn"}
HRED_RECOMMENDER = "redial"  # ReDial's generator and recommender go together


@dataclass
class ConvModelConfig:
    """What builds a ConversationModel again: the encoders' and the generator's configs and the vocabulary facts."""

    encoders: dict
    generator: dict
    movie_token_ids: list[int]
    uncopyable_ids: list[int]
    frozen: list[str]
    pretrained: str
    kgsf: dict | None = None  # KGSF's generator: its recommender's config (the model holds its word graph)
    word_edges: int = 0  # how many edges that word graph has
    architecture: str = "transformer"  # hred: `generator` is an HREDConfig and there are no encoders


def conv_recommender(config: ConvModelConfig) -> str:
    """The recommender whose items fill a generator's movie placeholders."""
    return HRED_RECOMMENDER if config.architecture == "hred" else CONV_RECOMMENDER[config.pretrained]


def conversation_model(config: ConvModelConfig, encoders: C2CRS | None = None, kgsf: KGSFRecommender | None = None,
                       word_graph: tuple[torch.Tensor, torch.Tensor] | None = None) -> ConversationModel | HRED:
    """The model a ConvModelConfig describes; encoders, kgsf and word_graph: trained parts to start from (fresh
    weights and an empty word graph of the configured size when absent, to be filled by load_state_dict)."""
    if config.architecture == "hred":
        return HRED(HREDConfig(**config.generator))
    if config.kgsf is not None:
        kgsf = kgsf or KGSFRecommender(KGSFConfig(**config.kgsf))
        if word_graph is None:
            n_in = config.encoders["vocab_size"]
            word_graph = (torch.zeros((2, config.word_edges), dtype=torch.long), torch.full((n_in,), -1))
    return ConversationModel(encoders or C2CRS(C2CRSConfig(**config.encoders)), ResponseGenerator(
        GeneratorConfig(**config.generator)), config.movie_token_ids, config.uncopyable_ids, tuple(config.frozen),
        kgsf, word_graph)


def load_conversation_model(path: Path) -> tuple[ConversationModel | HRED, ConvModelConfig]:
    saved = load_saved(path)
    config = ConvModelConfig(**saved["config"])
    model = conversation_model(config)
    model.load_state_dict(saved["state_dict"])
    return model, config


def conv_model_path(workspace: Path, variant: str | None = None) -> Path:
    if variant is None:
        return workspace / STAGES["finetune_conv"].outs[0]
    return workspace / STAGES["conv_baselines"].for_variant(variant).outs[0]


def ablation_model_path(workspace: Path, variant: str, stage: str = "finetune_rec") -> Path:
    return workspace / STAGES["ablations"].for_variant(variant).outs[0] / f"{stage}.pt"


def revcore_retrieval(params, workspace: Path, run: c2crs_train.Run, max_positions: int | None = None,
                      path: Path | None = None) -> revcore_train.ReviewRetrieval:
    """RevCore's review retrieval over the workspace's reviews, with the recommender saved at `path` (default:
    baselines@revcore's model, whose KGSF parts are retrieval.model.kgsf); an enriched context keeps its last
    tokens that an encoder of max_positions can read (None: triples.context_max_tokens)."""
    model = load_revcore(path or workspace / CONV_ENCODERS["revcore"]).to(run.device)
    longest = params.triples.context_max_tokens
    return revcore_train.load_retrieval(model, run.sentence_tokens,
                                        {name: workspace / path for name, path in TRAINING_INPUTS.items()},
                                        params.baselines.revcore,
                                        longest if max_positions is None else min(longest, max_positions))


def conv_data(run: c2crs_train.Run, inputs: dict[str, Path]):
    """The output vocabulary and the train/valid responses."""
    vocabulary = conv_train.conv_vocabulary(pl.read_parquet(inputs["vocab"]))
    samples = pl.read_parquet(inputs["samples"], columns=["sample_id", "split", "role", "response_token_ids"])
    longest = int(samples["response_token_ids"].list.len().max() or 0)
    return (vocabulary, conv_train.responses(samples, run.train, "train", vocabulary),
            conv_train.responses(samples, run.valid, "valid", vocabulary), longest)


def train_conversation(params, workspace: Path, log: StageLog, out: Path,
                       loaded=None) -> tuple[ConversationModel, dict, dict[str, Path]]:
    """Train one response generator with params.finetune_conv, keep its best epoch (valid perplexity), save it."""
    cfg, m = params.finetune_conv, params.model
    run, model_config, inputs = loaded or training_run(params, workspace)
    inputs = dict(inputs)
    if cfg.pretrained == "revcore":  # KGSF's parts (below), on the contexts its retrieval enriches
        retrieval = revcore_retrieval(params, workspace, run, model_config.max_positions)
        run = dataclasses.replace(run, train=retrieval.augment(run.train), valid=retrieval.augment(run.valid))
    vocabulary, train_data, valid_data, longest = conv_data(run, inputs)
    loop.seed_everything(params.seed, params.deterministic)
    if cfg.architecture == "hred":
        return _train_hred(params, workspace, run, vocabulary, train_data, valid_data, inputs, log, out)
    start = CONV_ENCODERS[cfg.pretrained]
    if start is not None:
        inputs["start_from"] = workspace / start
    kgsf, word_graph = None, None
    if cfg.pretrained in ("kgsf", "revcore"):  # KGSF's parts come from its recommender; its history encoder starts fresh
        kgsf = load_kgsf(workspace / start) if cfg.pretrained == "kgsf" else retrieval.model.kgsf
        inputs.update({name: workspace / path for name, path in kgsf_train.WORD_GRAPH_INPUTS.items()})
        graph = kgsf_train.load_word_graph(workspace, model_config.vocab_size, "cpu")
        word_graph = (graph.edge_index, torch.as_tensor(graph.token_word))
    encoders = load_c2crs(workspace / start) if start and kgsf is None else C2CRS(model_config)
    kg_dim = kgsf.cfg.dim if kgsf is not None else m.kg_dim
    dims = {"history": m.token_dim, "kg": kg_dim, "word": kg_dim, "review": m.token_dim}
    config = ConvModelConfig(
        encoders=dataclasses.asdict(encoders.cfg),
        generator=dataclasses.asdict(GeneratorConfig(
            vocab_size=len(vocabulary.tokens), memory_dims={k: dims[k] for k in cfg.memories}, dim=m.token_dim,
            n_layers=m.n_layers, n_heads=m.n_heads, ffn_dim=m.ffn_dim, dropout=m.dropout,
            attention_dropout=m.attention_dropout,
            max_positions=longest + 1, copy=cfg.copy_mechanism,
            vocabulary_bias_dim=2 * kg_dim if cfg.vocabulary_bias else 0,
            user_bias_dim=kg_dim if cfg.user_bias else 0,
            entity_bag=run.graph.n_entities if cfg.bag_of_entity_weight else 0, entity_dim=kg_dim,
            entity_bag_mixing=cfg.bag_of_entity_mixing, infusion=cfg.infusion_weight > 0)),
        movie_token_ids=vocabulary.movie_token_ids, uncopyable_ids=vocabulary.uncopyable_ids,
        frozen=list(cfg.freeze), pretrained=cfg.pretrained,
        kgsf=dataclasses.asdict(kgsf.cfg) if kgsf is not None else None,
        word_edges=word_graph[0].size(1) if word_graph is not None else 0)
    model = conversation_model(config, encoders, kgsf, word_graph)
    with torch.no_grad():  # the decoder's words start where the conversation encoder's are
        table = encoders.conversation_encoder.tokens.weight
        model.generator.tokens.weight[: table.size(0)] = table
    auxiliary = _kecrs_losses(model, run, inputs, vocabulary, cfg) if cfg.bag_of_entity_weight else None
    model.to(run.device)
    weights = (conv_train.loss_weights(train_data, vocabulary, cfg.weight_threshold, cfg.weight_floor)
               if cfg.instance_weighting else None)
    checkpoints = checkpoint_dir(workspace, "finetune_conv", params, TRAINING_SECTIONS + ("finetune_conv",), inputs)
    state = conv_train.finetune_conversation(model, run, train_data, valid_data, weights, cfg, checkpoints,
                                             on_epoch=log.epoch, auxiliary=auxiliary)
    if (checkpoints / "best.pt").is_file():
        loop.load_checkpoint(checkpoints / "best.pt", model)
    save_model(out, model, config)
    outcome = {**training_outcome(state), "train_responses": len(train_data), "valid_responses": len(valid_data)}
    if weights is not None:
        outcome["downweighted_tokens"] = int((weights < 1).sum())
    return model, outcome, inputs


def _kecrs_losses(model: ConversationModel, run, inputs: dict[str, Path], vocabulary,
                  cfg) -> kecrs_train.KECRSLosses:
    """KECRS's generator: its bag-of-entity head reads the frozen R-GCN's output for every entity (computed once
    here and kept in the model) and the tokens that name entities; returns its extra losses."""
    if "kg" not in model.frozen:
        raise ValueError("finetune_conv.bag_of_entity_weight: KECRS's bag of entities reads the recommender's R-GCN "
                         "as it was trained: add kg to finetune_conv.freeze")
    entity_token, token_entity = kecrs_train.entity_names(pl.read_parquet(inputs["entities"]),
                                                          pl.read_parquet(inputs["edges"]), vocabulary.tokens)
    generator = model.generator
    with torch.no_grad(), loop.evaluating(model.encoders):
        generator.bag_entities.copy_(model.encoders.entity_graph(run.graph.edge_index, run.graph.edge_type))
    generator.token_entity.copy_(torch.as_tensor(token_entity))
    return kecrs_train.KECRSLosses(generator, run.graph, entity_token, cfg.bag_of_entity_weight, cfg.infusion_weight,
                                   run.device)


def _train_hred(params, workspace: Path, run, vocabulary, train_data, valid_data, inputs, log: StageLog,
                out: Path) -> tuple[HRED, dict, dict[str, Path]]:
    """ReDial's generator (models/hred.py), trained on the same responses with plain cross-entropy."""
    m = params.model
    hred_config = HREDConfig(vocab_size=len(vocabulary.tokens), dim=m.token_dim, context_dim=2 * m.token_dim,
                             dropout=m.dropout, split_id=vocabulary.token_id[SPLIT])
    model = HRED(hred_config).to(run.device)
    config = ConvModelConfig(encoders={}, generator=dataclasses.asdict(hred_config),
                             movie_token_ids=vocabulary.movie_token_ids, uncopyable_ids=vocabulary.uncopyable_ids,
                             frozen=[], pretrained="none", architecture="hred")
    checkpoints = checkpoint_dir(workspace, "finetune_conv", params, TRAINING_SECTIONS + ("finetune_conv",), inputs)
    state = hred_train.train_hred(model, run, train_data, valid_data, params.finetune_conv, checkpoints,
                                  on_epoch=log.epoch)
    if (checkpoints / "best.pt").is_file():
        loop.load_checkpoint(checkpoints / "best.pt", model)
    save_model(out, model, config)
    return model, {**training_outcome(state), "train_responses": len(train_data),
                   "valid_responses": len(valid_data)}, inputs


def repeat_choice(params, workspace: Path, run: c2crs_train.Run, by_state: bool = True):
    """RepeatChoice's counts from the train split (whether a turn's movie repeats a context movie, and which), by
    speaker and context state (rec_metrics.choice_states; by_state False: by speaker alone, the pre-training
    study's choice since it began)."""
    train = (pl.read_parquet(workspace / TRAINING_INPUTS["samples"]).filter(pl.col("split") == "train")
             .sort("sample_id"))
    recent = c2crs_train.recent_items_tensor(rec_metrics.context_items_by_recency(train))
    if not by_state:
        return c2crs_train.fit_repeat_choice(run.train, recent, params.evaluate.max_recency)
    states = torch.as_tensor(rec_metrics.choice_states(train))
    return c2crs_train.fit_repeat_choice(run.train, recent, params.evaluate.max_recency, states,
                                         rec_metrics.CHOICE_STATES)
