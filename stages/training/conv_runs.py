"""One training run of a response generator (finetune_conv and conv_baselines): the model's configuration, its
file, its data, and the generator-specific parts (KGSF's word graph, KECRS's losses, ReDial's HRED)."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from models.c2crs import C2CRS, C2CRSConfig
from models.generator import ConversationModel, GeneratorConfig, ResponseGenerator
from models.hred import HRED, HREDConfig
from models.kgsf import KGSFConfig, KGSFRecommender
from stages.io.graph import STAGES
from stages.io.stage_log import StageLog
from stages.training import c2crs_data, c2crs_train, conv_train, hred_train, kecrs_train, kgsf_train, loop
from stages.training.baseline_models import load_kgsf, revcore_retrieval
from stages.training.runs import (
    TRAINING_SECTIONS,
    checkpoint_dir,
    load_c2crs,
    load_saved,
    save_model,
    training_outcome,
    training_run,
)
from stages.triples import END, PAD, SPLIT, START, token_texts

# Where a generator's encoders start (params.finetune_conv.pretrained), and which recommender fills its movie
# placeholder when its responses are shown: the one trained from the same representations.
CONV_ENCODERS = {
    "c2crs": STAGES["pretrain_fine"].model_file,
    **{name: STAGES["baselines"].for_variant(name).model_file for name in ("kbrd", "kecrs", "kgsf", "revcore")},
    "none": None,
}
CONV_RECOMMENDER = {
    "c2crs": "c2crs",
    "kbrd": "kbrd",
    "kecrs": "kecrs",
    "kgsf": "kgsf",
    "revcore": "revcore",
    "none": "textcnn",
}
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


def special_ids(vocabulary: conv_train.ConvVocabulary) -> dict[str, int]:
    """The ids a generator pads, starts and ends a response with (the vocabulary's special tokens)."""
    ids = vocabulary.token_id
    return {"pad_id": ids[PAD], "start_id": ids[START], "end_id": ids[END]}


def conv_recommender(config: ConvModelConfig) -> str:
    """The recommender whose items fill a generator's movie placeholders."""
    return HRED_RECOMMENDER if config.architecture == "hred" else CONV_RECOMMENDER[config.pretrained]


def conversation_model(
    config: ConvModelConfig,
    encoders: C2CRS | None = None,
    kgsf: KGSFRecommender | None = None,
    word_graph: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ConversationModel | HRED:
    """The model a ConvModelConfig describes; encoders, kgsf and word_graph: trained parts to start from (fresh
    weights and an empty word graph of the configured size when absent, to be filled by load_state_dict)."""
    if config.architecture == "hred":
        return HRED(HREDConfig(**config.generator))
    if config.kgsf is not None:
        kgsf = kgsf or KGSFRecommender(KGSFConfig(**config.kgsf))
        if word_graph is None:
            n_in = config.encoders["vocab_size"]
            word_graph = (torch.zeros((2, config.word_edges), dtype=torch.long), torch.full((n_in,), -1))
    return ConversationModel(
        encoders or C2CRS(C2CRSConfig(**config.encoders)),
        ResponseGenerator(GeneratorConfig(**config.generator)),
        config.movie_token_ids,
        config.uncopyable_ids,
        tuple(config.frozen),
        kgsf,
        word_graph,
    )


def generate(model: ConversationModel | HRED, run, table, rows, decoding, banned_ids: list[int]) -> list[list[int]]:
    """A response to each of the table's rows with the generation function of the model's architecture (HRED has
    its own)."""
    generate_rows = hred_train.generate if isinstance(model, HRED) else conv_train.generate
    return generate_rows(model, run, table, rows, decoding, banned_ids)


def load_conversation_model(path: Path) -> tuple[ConversationModel | HRED, ConvModelConfig]:
    saved = load_saved(path)
    config = ConvModelConfig(**saved["config"])
    model = conversation_model(config)
    model.load_state_dict(saved["state_dict"])
    return model, config


def conv_model_path(workspace: Path, variant: str | None = None) -> Path:
    if variant is None:
        return workspace / STAGES["finetune_conv"].model_file
    return workspace / STAGES["conv_baselines"].for_variant(variant).model_file


def conv_data(run: c2crs_train.Run, inputs: dict[str, Path]):
    """The output vocabulary and the train/valid responses."""
    vocabulary = conv_train.conv_vocabulary(pl.read_parquet(inputs["vocab"]))
    samples = pl.read_parquet(inputs["samples"], columns=["sample_id", "split", "role", "response_token_ids"])
    longest = int(samples["response_token_ids"].list.len().max() or 0)
    return (
        vocabulary,
        conv_train.responses(samples, run.train, "train", vocabulary),
        conv_train.responses(samples, run.valid, "valid", vocabulary),
        longest,
    )


def train_conversation(
    params, workspace: Path, log: StageLog, out: Path, loaded=None
) -> tuple[ConversationModel, dict, dict[str, Path]]:
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
    if cfg.pretrained in (
        "kgsf",
        "revcore",
    ):  # KGSF's parts come from its recommender; its history encoder starts fresh
        kgsf = load_kgsf(workspace / start) if cfg.pretrained == "kgsf" else retrieval.model.kgsf
        inputs.update({name: workspace / path for name, path in kgsf_train.WORD_GRAPH_INPUTS.items()})
        graph = kgsf_train.load_word_graph(workspace, model_config.vocab_size, "cpu")
        word_graph = (graph.edge_index, torch.as_tensor(graph.token_word))
    encoders = load_c2crs(workspace / start) if start and kgsf is None else C2CRS(model_config)
    kg_dim = kgsf.cfg.dim if kgsf is not None else m.kg_dim
    dims = {"history": m.token_dim, "kg": kg_dim, "word": kg_dim, "review": m.token_dim}
    config = ConvModelConfig(
        encoders=dataclasses.asdict(encoders.cfg),
        generator=dataclasses.asdict(
            GeneratorConfig(
                vocab_size=len(vocabulary.tokens),
                memory_dims={k: dims[k] for k in cfg.memories},
                **special_ids(vocabulary),
                dim=m.token_dim,
                n_layers=m.n_layers,
                n_heads=m.n_heads,
                ffn_dim=m.ffn_dim,
                dropout=m.dropout,
                attention_dropout=m.attention_dropout,
                max_positions=longest + 1,
                copy=cfg.copy_mechanism,
                vocabulary_bias_dim=2 * kg_dim if cfg.vocabulary_bias else 0,
                user_bias_dim=kg_dim if cfg.user_bias else 0,
                entity_bag=run.graph.n_entities if cfg.bag_of_entity_weight else 0,
                entity_dim=kg_dim,
                entity_bag_mixing=cfg.bag_of_entity_mixing,
                infusion=cfg.infusion_weight > 0,
            )
        ),
        movie_token_ids=vocabulary.movie_token_ids,
        uncopyable_ids=vocabulary.uncopyable_ids,
        frozen=list(cfg.freeze),
        pretrained=cfg.pretrained,
        kgsf=dataclasses.asdict(kgsf.cfg) if kgsf is not None else None,
        word_edges=word_graph[0].size(1) if word_graph is not None else 0,
    )
    model = conversation_model(config, encoders, kgsf, word_graph)
    with torch.no_grad():  # the decoder's words start where the conversation encoder's are
        table = encoders.conversation_encoder.tokens.weight
        model.generator.tokens.weight[: table.size(0)] = table
    auxiliary = _kecrs_losses(model, run, inputs, vocabulary, cfg) if cfg.bag_of_entity_weight else None
    model.to(run.device)
    weights = (
        conv_train.loss_weights(train_data, vocabulary, cfg.weight_threshold, cfg.weight_floor)
        if cfg.instance_weighting
        else None
    )
    checkpoints = checkpoint_dir(workspace, "finetune_conv", params, TRAINING_SECTIONS + ("finetune_conv",), inputs)
    state = conv_train.finetune_conversation(
        model, run, train_data, valid_data, weights, cfg, checkpoints, on_epoch=log.epoch, auxiliary=auxiliary
    )
    if (checkpoints / "best.pt").is_file():
        loop.load_checkpoint(checkpoints / "best.pt", model)
    save_model(out, model, config)
    outcome = {**training_outcome(state), "train_responses": len(train_data), "valid_responses": len(valid_data)}
    if weights is not None:
        outcome["downweighted_tokens"] = int((weights < 1).sum())
    return model, outcome, inputs


def _kecrs_losses(model: ConversationModel, run, inputs: dict[str, Path], vocabulary, cfg) -> kecrs_train.KECRSLosses:
    """KECRS's generator: its bag-of-entity head reads the frozen R-GCN's output for every entity (computed once
    here and kept in the model) and the tokens that name entities; returns its extra losses."""
    if "kg" not in model.frozen:
        raise ValueError(
            "finetune_conv.bag_of_entity_weight: KECRS's bag of entities reads the recommender's R-GCN "
            "as it was trained: add kg to finetune_conv.freeze"
        )
    entity_token, token_entity = kecrs_train.entity_names(
        pl.read_parquet(inputs["entities"]), pl.read_parquet(inputs["edges"]), vocabulary.tokens
    )
    generator = model.generator
    with torch.no_grad(), loop.evaluating(model.encoders):
        generator.entity_bag.entities.copy_(model.encoders.entity_graph(run.graph.edge_index, run.graph.edge_type))
    generator.entity_bag.token_entity.copy_(torch.as_tensor(token_entity))
    return kecrs_train.KECRSLosses(
        generator, run.graph, entity_token, cfg.bag_of_entity_weight, cfg.infusion_weight, run.device
    )


def _train_hred(
    params, workspace: Path, run, vocabulary, train_data, valid_data, inputs, log: StageLog, out: Path
) -> tuple[HRED, dict, dict[str, Path]]:
    """ReDial's generator (models/hred.py), trained on the same responses with plain cross-entropy."""
    m = params.model
    hred_config = HREDConfig(
        vocab_size=len(vocabulary.tokens),
        dim=m.token_dim,
        context_dim=2 * m.token_dim,
        dropout=m.dropout,
        **special_ids(vocabulary),
        split_id=vocabulary.token_id[SPLIT],
        max_utterance_tokens=params.finetune_conv.hred_utterance_tokens,
    )
    model = HRED(hred_config).to(run.device)
    config = ConvModelConfig(
        encoders={},
        generator=dataclasses.asdict(hred_config),
        movie_token_ids=vocabulary.movie_token_ids,
        uncopyable_ids=vocabulary.uncopyable_ids,
        frozen=[],
        pretrained="none",
        architecture="hred",
    )
    checkpoints = checkpoint_dir(workspace, "finetune_conv", params, TRAINING_SECTIONS + ("finetune_conv",), inputs)
    state = hred_train.train_hred(
        model, run, train_data, valid_data, params.finetune_conv, checkpoints, on_epoch=log.epoch
    )
    if (checkpoints / "best.pt").is_file():
        loop.load_checkpoint(checkpoints / "best.pt", model)
    save_model(out, model, config)
    return (
        model,
        {**training_outcome(state), "train_responses": len(train_data), "valid_responses": len(valid_data)},
        inputs,
    )


def conv_model_files(params, workspace: Path) -> dict[str, Path]:
    """Each trained generator that evaluate scores, and its file."""
    files = {variant: conv_model_path(workspace, variant) for variant in params.conv_baselines.train}
    return {**files, "c2crs": conv_model_path(workspace)}


def gold_words(
    workspace: Path,
    samples: pl.DataFrame,
    table: c2crs_data.SampleTable,
    data: conv_train.Responses,
    split: str = "test",
) -> list[list[str]]:
    """A split's responses as words, every movie as its own "@id" token (rare words and movies included, unlike the
    vocabulary ids), cut where the samples' responses are cut."""
    part = (
        samples.filter(pl.col("split") == split).sort("sample_id").select("conv_id", "turn_idx", "response_token_ids")
    )
    texts = part.join(
        pl.read_parquet(workspace / STAGES["ingest"].output("utterances")).select("conv_id", "turn_idx", "text"),
        on=["conv_id", "turn_idx"],
        how="left",
        maintain_order="left",
    )
    words = [token_texts(text)[: len(ids)] for text, ids in zip(texts["text"], texts["response_token_ids"])]
    return [words[row] for row in data.rows]
