"""params.yaml, loaded and validated.

Over 400 lines because it is the one schema of params.yaml (every section, its checks and the override rules); a
section split across files would hide the keys from one another.

Every hyperparameter and path of the pipeline is in params.yaml, one section per stage. The models below are the
schema: an unknown key, a wrong type or an out-of-range value fails with the key's path and what is allowed.
"""

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

DATA_DIR_ENV = "C2CRS_DATA_DIR"


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or does not match the schema."""


class Section(BaseModel):
    # strict: a value of the wrong type is refused, never coerced (true is no seed, '0.2' no fraction)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ParamsLoader(yaml.SafeLoader):
    """YAML as params files mean it: a key given twice is an error (PyYAML keeps the last one silently), and
    1e-3 is a number (YAML 1.2; PyYAML's 1.1 rules read it as the string '1e-3')."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def read_yaml(text: str):
    """Text of a params file (or a -S value) read with ParamsLoader."""
    return yaml.load(text, Loader=ParamsLoader)


class Download(Section):
    """A public file: where it is and the checksum it must have (SHA-256, or MD5 where only that is published)."""

    url: str = Field(pattern=r"^https?://")
    # one of the two: the other is absent (the only keys of the schema that params.yaml may leave out)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    md5: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")

    @model_validator(mode="after")
    def _one_checksum(self):
        if not (self.sha256 or self.md5):
            raise ValueError("give sha256 (or md5 where the publisher only gives that)")
        return self


class RawFiles(Section):
    """Names of the raw files, relative to the mirror directory (the official zip's names differ: see downloads)."""

    redial_train: str
    redial_test: str
    movies: str
    movies_imdb: str
    movies_dbpedia: str
    aclimdb_reviews: str
    revcore_reviews: str
    movie_info: str
    dbpedia_subkg: str
    dbpedia_entity_ids: str
    stopwords: str
    metadata_kg: str
    metadata_entity_ids: str
    metadata_relation_ids: str
    metadata_item_ids: str
    metadata_entity_types: str
    linking_gold: str
    conceptnet_edges: str
    conceptnet_words: str


class RedialZip(Download):
    """The official ReDial release and the names of the files inside it."""

    redial_train: str
    redial_test: str
    movies: str


class Downloads(Section):
    """Where each raw file comes from without a mirror. aclimdb is the official tarball (converted on reading)."""

    redial_zip: RedialZip
    movies_imdb: Download
    movies_dbpedia: Download
    aclimdb_reviews: Download
    revcore_reviews: Download
    movie_info: Download
    dbpedia_subkg: Download
    dbpedia_entity_ids: Download
    stopwords: Download
    metadata_kg: Download
    metadata_entity_ids: Download
    metadata_relation_ids: Download
    metadata_item_ids: Download
    metadata_entity_types: Download
    linking_gold: Download
    conceptnet_edges: Download
    conceptnet_words: Download


class DataConfig(Section):
    source: Literal["auto", "mirror", "download"]
    mirror_dir: str | None
    cache_dir: str
    files: RawFiles
    downloads: Downloads
    timeout_seconds: float = Field(gt=0)
    retries: int = Field(ge=0, le=10)
    retry_backoff_seconds: float = Field(ge=0)

    def resolved_source(self) -> Literal["mirror", "download"]:
        """auto means the mirror when one is configured (C2CRS_DATA_DIR or data.mirror_dir), else the download."""
        if self.source != "auto":
            return self.source
        return "mirror" if (os.environ.get(DATA_DIR_ENV) or self.mirror_dir) else "download"

    def resolved_mirror_dir(self, workspace: Path) -> Path | None:
        """C2CRS_DATA_DIR wins over data.mirror_dir (which is relative to the params file's directory)."""
        if os.environ.get(DATA_DIR_ENV):
            return Path(os.environ[DATA_DIR_ENV]).expanduser().resolve()
        return (workspace / self.mirror_dir).expanduser().resolve() if self.mirror_dir else None


class IngestConfig(Section):
    on_bad_record: Literal["error", "skip"]
    valid_split: Literal["auto", "kgsf_ids", "fraction"]
    valid_fraction: float = Field(gt=0, lt=1)
    full_train_conversations: int = Field(gt=0)


class ScraperConfig(Section):
    """The IMDb review scraper (reviews source imdb_scraper); needs internet."""

    cache_dir: str
    requests_per_second: float = Field(gt=0, le=1.0)
    max_pages_per_movie: int = Field(ge=1, le=50)
    max_movies: int | None = Field(ge=1)
    max_retries: int = Field(ge=0, le=10)
    timeout_seconds: float = Field(gt=0)
    user_agent: str = Field(min_length=8)
    allowed_hosts: list[str] = Field(min_length=1)


class ReviewsConfig(Section):
    sources: list[Literal["imdb_scraper", "aclimdb", "revcore", "plots"]] = Field(min_length=1)
    on_bad_record: Literal["error", "skip"]
    min_sentence_tokens: int = Field(ge=1)
    max_sentence_tokens: int = Field(ge=1)
    max_sentences_per_movie: int = Field(ge=1)
    scraper: ScraperConfig

    @model_validator(mode="after")
    def _consistent(self):
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources must not repeat, got {self.sources}")
        if self.max_sentence_tokens < self.min_sentence_tokens:
            raise ValueError("max_sentence_tokens must be at least min_sentence_tokens")
        return self


class LinkingConfig(Section):
    """The entity linker of utterances to KG entities (used by kg, to find seeds, and by triples)."""

    min_label_chars: int = Field(ge=1)
    dominance_ratio: float = Field(ge=1.0)
    min_dominant_degree: int = Field(ge=0)
    use_variants: bool
    add_chat_stopwords: bool
    report_samples: int = Field(ge=0, le=500)


class KgConfig(Section):
    merge_metadata_kg: bool
    min_relation_edges: int = Field(ge=1)
    hops: int | None = Field(ge=0, le=6)
    add_inverse: bool
    add_self_loops: bool
    link_seeds: bool


class RelationNamesConfig(Section):
    majority: float = Field(ge=0, lt=1)  # a name is kept when more than this share of the compared edges agree
    min_edges: int = Field(ge=1)  # and at least this many edges could be compared


class TriplesConfig(Section):
    min_token_frequency: int = Field(ge=1)
    context_max_tokens: int = Field(ge=1)
    response_max_tokens: int = Field(ge=1)
    sentence_rule: Literal["bm25", "highest_rated", "first"]
    max_movies_per_entity: int = Field(ge=1)


class WordGraphConfig(Section):
    drop_stopwords: bool  # KGSF drops every ConceptNet edge with a stopword at either end


class ModelConfig(Section):
    """C2-CRS architecture (models/c2crs.py). CPU defaults; the reference's sizes are in README ("paper" set)."""

    token_dim: int = Field(ge=8)
    kg_dim: int = Field(ge=8)
    n_layers: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    ffn_dim: int = Field(ge=8)
    dropout: float = Field(ge=0, lt=1)
    attention_dropout: float = Field(ge=0, lt=1)  # on the attention weights (the reference: 0)
    num_bases: int = Field(ge=1)
    projection_dim: int = Field(ge=8)
    max_context_entities: int | None = Field(ge=1)  # most recent ones; null: all (the reference)
    max_review_sentences: int = Field(ge=1)
    max_sentence_tokens: int = Field(ge=1)
    # Ablations (paper Table 4): views used in pre-training (w/o CH drops conversation, w/o UD drops review);
    # kg_edges: false keeps only self loops, so entities carry no structured knowledge (w/o SD).
    views: list[Literal["conversation", "graph", "review"]] = Field(min_length=1)
    kg_edges: bool
    # Where this project and the authors' code differ (models/c2crs.py C2CRSConfig; params/reference.yaml sets
    # the reference's side of each):
    kg_encoder: Literal["table", "featureless"]
    rec_pooling: Literal["own", "graph"]
    item_bias: bool
    projection_heads: Literal["per_view", "per_view_and_level"]
    contrastive_loss: Literal["cross_view", "nt_xent"]

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.token_dim % self.n_heads:
            raise ValueError(f"token_dim ({self.token_dim}) must be a multiple of n_heads ({self.n_heads})")
        return self


class TrainConfig(Section):
    epochs: int = Field(ge=0)
    batch_size: int = Field(ge=2)
    learning_rate: float = Field(gt=0)
    grad_clip: float = Field(gt=0)
    patience: int | None = Field(ge=1)


class CoarseConfig(TrainConfig):
    temperature: float = Field(gt=0)
    # turn: one sample per turn; mention: one per (turn, movie it mentions), only turns that mention one (the
    # reference's pre-training samples)
    sample_unit: Literal["turn", "mention"]
    samples_per_conversation: int | None = Field(ge=1)  # drawn per conversation and epoch; null: all
    # early stopping counts an epoch as better only when its held-out loss fell by this fraction of the last such
    # epoch's (0: any fall); with patience it stops pre-training once the loss has flattened
    min_improvement: float = Field(ge=0, lt=1)
    # the share of the train conversations this stage trains on (a learning curve; c2crs_data.conversation_subset),
    # passed over 1/share times an epoch (runs.with_share)
    train_fraction: float = Field(gt=0, le=1)


class FineConfig(CoarseConfig):
    coarse_weight: float = Field(ge=0)  # lambda of Eq. 7
    max_triples_per_sample: int = Field(ge=1)


class TextTriplesConfig(Section):
    min_entities: int = Field(ge=1)  # linked entities (movies aside) a sentence needs to be a sample


class PretrainTextConfig(Section):
    # text_triples' samples drawn per conversation sample in each pre-training epoch (0: conversations only)
    ratio: float = Field(ge=0)


class RecConfig(TrainConfig):
    # the training softmax: over the items, or over every KG entity as the reference (evaluation ranks items)
    softmax_over: Literal["items", "entities"]
    # > 0: the "multi-task" ablation, adding this weight x (fine + coarse_weight x coarse) to every step
    pretraining_weight: float = Field(ge=0)
    coarse_weight: float = Field(ge=0)
    max_triples_per_sample: int = Field(ge=1)
    # multi-task: the pre-training losses of a step use at most this many of its samples (null: all of them)
    pretraining_samples_per_step: int | None = Field(ge=2)
    train_fraction: float = Field(gt=0, le=1)  # of the train conversations (a learning curve)


class TextCNNConfig(TrainConfig):
    embed_dim: int = Field(ge=8)
    n_filters: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)


class KGSFRecConfig(TrainConfig):
    pretrain_epochs: int = Field(ge=0)  # Mutual Information Maximisation alone, before recommendation
    mim_weight: float = Field(ge=0)  # the MIM loss's weight in recommendation training (KGSF's)


class RevCoreRecConfig(KGSFRecConfig):
    """RevCore's recommender is KGSF's on review-enriched contexts (stages/training/revcore_train.py)."""

    review_movies: int = Field(ge=1)  # the most recent context movies that get a retrieved review
    review_tokens: int = Field(ge=1)  # words of it spliced into the context (RevCore's 20)


class ReDialRecConfig(TrainConfig):
    hidden: int = Field(ge=1)  # the autoencoder's hidden layer (ReDial's layer_sizes [1000])


class KBRDConfig(Section):
    """The KBRD-style recommender is C2-CRS's recommender without pre-training: it trains with finetune_rec's
    settings and has none of its own (its entry makes it one of the baselines stages)."""


DEFAULT_BASELINES = ["textcnn", "kbrd", "kgsf"]  # with popularity (no training): the paper's strongest four


class BaselinesConfig(Section):
    """Each recommender named in `train` is one baselines stage (baselines@textcnn, ...), trained with its entry's
    settings; the others are there for `dvc exp run -S 'baselines.train=[...]'` (README: the whole comparison)."""

    train: list[str]
    textcnn: TextCNNConfig
    kbrd: KBRDConfig
    kgsf: KGSFRecConfig
    redial: ReDialRecConfig
    kecrs: KBRDConfig  # KECRS's recommender: KBRD's, on new liked targets (finetune_rec's settings)
    revcore: RevCoreRecConfig

    @field_validator("train")
    @classmethod
    def _known_once(cls, train: list[str]) -> list[str]:
        known = [name for name in cls.model_fields if name != "train"]
        unknown = [name for name in train if name not in known]
        if unknown or len(set(train)) != len(train):
            raise ValueError(f"list each baseline once, from {known}; got {train}")
        return train


class VariantsConfig(Section):
    """Models trained as variants of the main one: variant name -> params overrides, as dotted keys (the keys
    `dvc exp run -S` takes). ablations: the paper's Table 4; conv_baselines: its Table 2 rows (finetune_conv keys).
    dvc.yaml makes each variant its own stage (ablations@<variant>)."""

    variants: dict[str, dict[str, Any]]


class ConvBaselinesConfig(VariantsConfig):
    """The conversation baselines: variants of finetune_conv; dvc.yaml trains those named in `train`."""

    train: list[str]

    @model_validator(mode="after")
    def _known_once(self) -> "ConvBaselinesConfig":
        unknown = [name for name in self.train if name not in self.variants]
        if unknown or len(set(self.train)) != len(self.train):
            raise ValueError(f"train: list each variant once, from {sorted(self.variants)}; got {self.train}")
        return self


MEMORY = Literal["history", "kg", "word", "review"]  # word: KGSF's ConceptNet words (pretrained: kgsf)


class FinetuneConvConfig(TrainConfig):
    """Response generation (paper 4.3.2, models/generator.py); the conv_baselines variants override these keys."""

    # Where the encoders start: c2crs = pretrain_fine's model, kbrd = the KBRD-style recommender's (its R-GCN is
    # trained, its text encoders are not), kgsf = KGSF's recommender (entities and words; the history encoder
    # starts fresh, as in KGSF), none = fresh weights. The same choice picks the recommender that fills the movie
    # placeholder at evaluation (c2crs, kbrd, kgsf; none: TextCNN, which reads only the words).
    # kecrs = KECRS's recommender (KBRD's, on new liked targets); revcore = RevCore's (KGSF's, on contexts its
    # review retrieval enriches: the generator reads the same enriched contexts and the retrieved sentences).
    pretrained: Literal["c2crs", "kbrd", "kecrs", "kgsf", "revcore", "none"]
    # transformer: models/generator.py (the keys below); hred: ReDial's hierarchical GRU encoder-decoder
    # (models/hred.py: fresh weights, history only; copy, the vocabulary bias and freezing do not apply)
    architecture: Literal["transformer", "hred"]
    hred_utterance_tokens: int = Field(gt=0)  # hred: an utterance's last tokens that its utterance encoder reads
    memories: list[MEMORY] = Field(min_length=1)  # the cross-attention chain
    copy_mechanism: bool  # pointer-generator over the context's and the review sentences' tokens
    vocabulary_bias: bool  # KGSF's: the user's entity and word vectors bias the graph words' logits
    user_bias: bool  # KBRD's: the recommender's user vector biases every token's logit
    instance_weighting: bool  # Eq. 11-12; false: plain cross-entropy
    weight_threshold: float = Field(gt=0)  # beta of Eq. 12 (a count in the train responses)
    weight_floor: float = Field(gt=0, le=1)  # gamma of Eq. 12
    freeze: list[MEMORY]  # encoders kept as pre-trained (no gradient): history, kg, review
    # KECRS's extra losses (stages/training/kecrs_train.py): > 0 turns each on; the bag of entities also mixes
    # bag_of_entity_mixing x an entity's probability into its name's at decoding
    bag_of_entity_weight: float = Field(ge=0)
    infusion_weight: float = Field(ge=0)
    bag_of_entity_mixing: float = Field(ge=0)

    @field_validator("memories")
    @classmethod
    def _each_once(cls, memories: list[str]) -> list[str]:
        if len(set(memories)) != len(memories):
            raise ValueError(f"list each memory once (in the order the decoder reads them), got {memories}")
        return memories

    @model_validator(mode="after")
    def _kgsf_parts(self) -> "FinetuneConvConfig":
        kgsf_parts = ("kgsf", "revcore")
        if self.pretrained not in kgsf_parts and (
            "word" in self.memories or "word" in self.freeze or self.vocabulary_bias
        ):
            raise ValueError(
                "the word memory, freezing it and the vocabulary bias are KGSF's: they need "
                f"pretrained: kgsf or revcore (got {self.pretrained!r})"
            )
        if self.vocabulary_bias and "kg" not in self.memories:
            raise ValueError("vocabulary_bias reads the user's entity vector: memories must include kg")
        if (self.bag_of_entity_weight or self.infusion_weight) and (
            self.pretrained in ("none", *kgsf_parts) or "kg" not in self.freeze
        ):
            raise ValueError(
                "bag_of_entity_weight and infusion_weight are KECRS's: they read a KBRD-style "
                "recommender's frozen R-GCN (pretrained: kecrs, kbrd or c2crs, freeze: [kg, ...])"
            )
        if self.user_bias and self.pretrained in ("none", *kgsf_parts):
            raise ValueError(
                "user_bias is KBRD's: it reads a KBRD-style recommender's user vector (pretrained: "
                f"kbrd, kecrs or c2crs; got {self.pretrained!r})"
            )
        if self.infusion_weight and not self.bag_of_entity_weight:
            raise ValueError(
                "infusion_weight reads the user vector of the bag-of-entity head: set bag_of_entity_weight too"
            )
        if self.architecture == "hred" and (
            self.pretrained != "none"
            or self.memories != ["history"]
            or self.copy_mechanism
            or self.vocabulary_bias
            or self.freeze
            or self.user_bias
        ):
            raise ValueError(
                "architecture hred reads the history only, from fresh weights: it needs pretrained: "
                "none, memories: [history], copy_mechanism: false, vocabulary_bias: false, user_bias: false, "
                "freeze: []"
            )
        return self


class DecodingConfig(Section):
    method: Literal["greedy", "beam"]
    beam_size: int = Field(ge=1)
    max_tokens: int = Field(ge=1)
    block_ngram: int = Field(ge=0)  # never repeat an n-gram of this size within a response; 0: off
    repetition_penalty: float = Field(ge=1)  # an already-said token's probability / this (models/decoding.py); 1: off
    block_repeat_word: bool  # never the previous token again
    length_penalty: float = Field(ge=0)  # beam: score / length ** this
    batch_size: int = Field(ge=1)


class DecodingGrid(Section):
    """The decoding settings choose_decoding tries: every combination of these values (the other keys of a
    setting are evaluate.decoding's)."""

    method: list[Literal["greedy", "beam"]] = Field(min_length=1)
    block_ngram: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    repetition_penalty: list[Annotated[float, Field(ge=1)]] = Field(min_length=1)
    block_repeat_word: list[bool] = Field(min_length=1)

    @field_validator("method", "block_ngram", "repetition_penalty", "block_repeat_word")
    @classmethod
    def _distinct(cls, values: list) -> list:
        if len(set(values)) < len(values):
            raise ValueError(f"{values}: a value is listed twice")
        return values


class ChooseDecodingConfig(Section):
    valid_turns: int = Field(ge=1)  # validation recommender turns sampled (seeded) to decode; never the test split
    grid: DecodingGrid


class ChampionMetric(Section):
    metric: str  # a validation metric of the training stage's metrics file (valid_recall@50, valid_perplexity)
    higher_is_better: bool


class ChampionRule(Section):
    """When evaluate moves a registered model's `champion` alias to the version it just scored: when that version
    beats the champion's validation metric by more than min_improvement (never on test numbers)."""

    recommender: ChampionMetric
    generator: ChampionMetric
    min_improvement: float = Field(ge=0)


class EvaluateConfig(Section):
    bootstrap_resamples: int = Field(ge=10)
    batch_size: int = Field(ge=1)
    decoding: DecodingConfig
    samples_for_reading: int = Field(ge=1)  # test contexts shown with every model's response
    max_recency: int = Field(ge=1)  # c2crs-repeat-choice: recency positions told apart (older: one)
    champion: ChampionRule


class SimulateConfig(Section):
    """The simulated seeker (stages/simulate.py, rules in stages/chat/seeker.py)."""

    conversations: int = Field(ge=1)  # seekers simulated: a seeded sample of the test conversations with a target
    turns: int = Field(ge=1)  # T: the system's turns in each simulated conversation
    ks: list[int] = Field(min_length=1)  # the seeker accepts when the target is among the system's top k
    hint_kinds: list[Literal["genre", "star", "director", "similar"]] = Field(min_length=1)  # the round robin
    sensitivity_models: list[str]  # recommenders also simulated with no hints and with each kind of hint alone
    transcripts: int = Field(ge=0)  # C2-CRS's simulated conversations written out to read

    @field_validator("ks")
    @classmethod
    def _increasing(cls, ks: list[int]) -> list[int]:
        if ks[0] < 1 or any(b <= a for a, b in zip(ks, ks[1:])):
            raise ValueError(f"list each k once, from 1 up, in increasing order; got {ks}")
        return ks

    @field_validator("hint_kinds", "sensitivity_models")
    @classmethod
    def _each_once(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"list each once; got {names}")
        return names


class LearningCurveConfig(Section):
    """The study's learning curve: a setting's fine-tuning on shares of the train conversations, with pre-training
    on all of them (`<setting>_<pct>pct_pretrain_all`) and on the same share (`..._pretrain_same`)."""

    setting: str
    fractions: list[float] = Field(min_length=1)

    @field_validator("fractions")
    @classmethod
    def _whole_percents(cls, fractions: list[float]) -> list[float]:
        for fraction in fractions:
            if not 0 < fraction < 1 or abs(fraction * 100 - round(fraction * 100)) > 1e-9:
                raise ValueError(f"{fraction}: a fraction must be a whole percent in (0, 1), e.g. 0.05")
        return fractions


class StudyConfig(Section):
    """`python -m pipeline study`: does coarse-to-fine pre-training improve the recommender? In each setting (params
    overrides, as `dvc exp run -S` keys), C2-CRS against the KBRD-style model (the same code without pre-training),
    once per seed; extensions (beyond the paper) are more C2-CRS arms, their overrides applied on top of a setting."""

    seeds: list[int] = Field(min_length=1)
    workers: int = Field(ge=1)  # runs trained at once, each in its own process with a share of the cores
    settings: dict[str, dict[str, Any]] = Field(min_length=1)
    extensions: dict[str, dict[str, Any]]
    learning_curve: LearningCurveConfig | None
    probe_epochs: int = Field(ge=1)  # the frozen probe's epochs (best on validation recall@50 kept)
    # Each finished run's results (test ranks, validation metrics, diagnostics; small) are kept in git, so a study
    # cut off in one session goes on in the next; its models and checkpoints stay under data/.
    results_dir: str
    models_dir: str
    report: str
    plots_dir: str  # the report's curves as DVC plot data (dvc.yaml's plots)

    @model_validator(mode="after")
    def _curve_names_a_setting(self) -> "StudyConfig":
        if self.learning_curve and self.learning_curve.setting not in self.settings:
            raise ValueError(
                f"study.learning_curve.setting: {self.learning_curve.setting!r} is not in study.settings "
                f"{sorted(self.settings)}"
            )
        return self

    def curve_settings(self) -> dict[str, tuple[float, str]]:
        """The learning curve's settings: name -> (fraction, pre-trained on "all" or the "same" share)."""
        if not self.learning_curve:
            return {}
        return {
            f"{self.learning_curve.setting}_{round(f * 100)}pct_pretrain_{data}": (f, data)
            for f in self.learning_curve.fractions
            for data in ("all", "same")
        }

    def all_settings(self) -> dict[str, dict[str, Any]]:
        """Every setting's overrides: params.study.settings, then the learning curve's."""
        curve = {}
        for name, (fraction, data) in self.curve_settings().items():
            stages = ("finetune_rec",) if data == "all" else ("pretrain_coarse", "pretrain_fine", "finetune_rec")
            curve[name] = {
                **self.settings[self.learning_curve.setting],
                **{f"{stage}.train_fraction": fraction for stage in stages},
            }
        return {**self.settings, **curve}


class Params(Section):
    seed: int = Field(ge=0, lt=2**32)  # numpy and torch both take it
    device: Literal["auto", "cpu", "cuda"]
    deterministic: bool  # torch's deterministic kernels: reruns agree bit for bit (bench/determinism.py)
    precision: Literal["fp32", "bf16"]  # bf16: training forward passes under bf16 autocast (GPU)
    distributed: bool  # under torchrun: the C2-CRS training steps split each batch across the processes
    data: DataConfig
    _source: Path = PrivateAttr(default=Path("params.yaml"))  # the file read (load_params), named in later errors
    ingest: IngestConfig
    reviews: ReviewsConfig
    linking: LinkingConfig
    kg: KgConfig
    relation_names: RelationNamesConfig
    triples: TriplesConfig
    word_graph: WordGraphConfig
    model: ModelConfig
    text_triples: TextTriplesConfig
    pretrain_text: PretrainTextConfig
    pretrain_coarse: CoarseConfig
    pretrain_fine: FineConfig
    finetune_rec: RecConfig
    baselines: BaselinesConfig
    ablations: VariantsConfig
    finetune_conv: FinetuneConvConfig
    conv_baselines: ConvBaselinesConfig
    choose_decoding: ChooseDecodingConfig
    evaluate: EvaluateConfig
    simulate: SimulateConfig
    study: StudyConfig

    @staticmethod
    def _earlier_sections_valid(info: ValidationInfo) -> bool:
        """Whether every section before this one validated: overrides are checked against them, and one bad value
        elsewhere (reported on its own) must not make every variant look wrong too."""
        earlier = list(Params.model_fields)[: list(Params.model_fields).index(info.field_name)]
        return all(name in info.data for name in earlier)

    @field_validator("study")
    @classmethod
    def _study_overrides_apply(cls, study: StudyConfig, info: ValidationInfo) -> StudyConfig:
        if not cls._earlier_sections_valid(info):
            return study
        for group in ("settings", "extensions"):
            for name, overrides in getattr(study, group).items():
                if not name.isidentifier():
                    raise ValueError(f"study.{group}.{name}: a name must be an identifier (letters, digits, _)")
                apply_overrides(info.data, name, overrides, kind="study", where=f"study.{group}.{name}")
        return study

    def study_params(self, setting: str, seed: int, extension: str | None = None) -> "Params":
        """The params of one study run: a setting's overrides, then an extension's, then the seed."""
        raw = apply_overrides(dict(self), setting, self.study.all_settings()[setting], kind="study")
        overrides = {**(self.study.extensions[extension] if extension else {}), "seed": seed}
        return Params.model_validate(apply_overrides(raw, setting, overrides, kind="study"))

    @field_validator("ablations", "conv_baselines")
    @classmethod
    def _variants_apply(cls, section: "VariantsConfig", info: ValidationInfo) -> "VariantsConfig":
        """Each variant must name keys its kind may change and give values the schema accepts."""
        if not cls._earlier_sections_valid(info):
            return section
        for name, overrides in section.variants.items():
            if not name.isidentifier():
                raise ValueError(
                    f"{info.field_name}.variants.{name}: a variant name must be an identifier (letters, digits, _)"
                )
            apply_overrides(info.data, name, overrides, kind=info.field_name)
        return section

    @model_validator(mode="after")
    def _conv_baselines_have_their_recommenders(self) -> "Params":
        """A conversation baseline's movies come from the recommender it is built on, which must be trained too."""
        for name in self.conv_baselines.train:
            conv = self.variant(name, kind="conv_baselines").finetune_conv
            recommender = "redial" if conv.architecture == "hred" else conv.pretrained
            if recommender in BaselinesConfig.model_fields and recommender not in self.baselines.train:
                raise ValueError(
                    f"conv_baselines.train holds {name!r}, whose recommender {recommender!r} is not in "
                    f"baselines.train {self.baselines.train}: add it there"
                )
        return self

    def variant(self, name: str, kind: str = "ablations") -> "Params":
        """These params with variant `name`'s overrides applied: an ablation (Table 4) or a conversation baseline
        (kind="conv_baselines", Table 2). The result has no variants of its own."""
        variants = getattr(self, kind).variants
        if name not in variants:
            raise ConfigError(f"{self._source}: {kind}.variants has no {name!r}; it has {sorted(variants)}")
        varied = Params.model_validate(apply_overrides(dict(self), name, variants[name], kind))
        varied._source = self._source
        return varied


# What a variant may change. An ablation: the sections the recommendation path (pretrain_coarse, pretrain_fine,
# finetune_rec) reads; a conversation baseline: finetune_conv. The stages before them are shared by every variant.
# The reference configuration (params/reference.yaml) sets both paths.
VARIANT_SECTIONS = {
    "ablations": ("seed", "model", "pretrain_text", "pretrain_coarse", "pretrain_fine", "finetune_rec"),
    "conv_baselines": ("finetune_conv",),
    "study": ("seed", "device", "model", "pretrain_text", "pretrain_coarse", "pretrain_fine", "finetune_rec"),
    "reference": (
        "seed",
        "device",
        "model",
        "pretrain_text",
        "pretrain_coarse",
        "pretrain_fine",
        "finetune_rec",
        "finetune_conv",
    ),
}


def apply_overrides(
    sections: dict, variant: str, overrides: dict[str, Any], kind: str = "ablations", where: str | None = None
) -> dict:
    """The params as plain data with `overrides` ({"pretrain_fine.epochs": 0, ...}) applied, each section they change
    validated.

    sections maps section name -> validated section (or plain value); the result has no ablation or conversation
    baseline variants of its own (the study section stays as it is). Errors name the variant (or `where`) and the key.
    """
    raw = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in sections.items()}
    raw.update(ablations={"variants": {}}, conv_baselines={"variants": {}, "train": []})  # a variant has none
    allowed = VARIANT_SECTIONS[kind]
    prefix = where or f"{kind}.variants.{variant}"
    for key, value in overrides.items():
        parts = key.split(".")
        where = f"{prefix}.{key}"
        if parts[0] not in allowed:
            raise ValueError(f"{where}: a variant of {kind} may change only {', '.join(allowed)}")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ValueError(f"{where}: {'.'.join(parts[: depth + 1])} is not a section")
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"{where}: unknown key; allowed here: {', '.join(node)}")
        node[parts[-1]] = value
    problems = []
    for section in dict.fromkeys(key.split(".")[0] for key in overrides):  # each section the overrides changed
        try:
            TypeAdapter(Params.model_fields[section].annotation).validate_python(raw[section], strict=True)
        except ValidationError as exc:
            problems += [f"{'.'.join(str(p) for p in (section, *e['loc']))}: {e['msg']}" for e in exc.errors()]
    if problems:
        raise ValueError(f"{prefix}: {'; '.join(problems)}")
    return raw


def reference_overrides(path: Path, params_path: Path | None = None) -> dict[str, Any]:
    """params/reference.yaml: the authors' configuration as dotted overrides, checked against params.yaml."""
    try:
        overrides = read_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: expected a mapping of dotted keys to values")
    params = load_params(params_path or path.resolve().parents[1] / "params.yaml")
    try:
        apply_overrides(dict(params), "reference", overrides, kind="reference", where=str(path))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return overrides


def load_params(path: str | Path) -> Params:
    """Read and validate params.yaml; every problem is reported with its key path."""
    path = Path(path)
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None
    params._source = path
    return params


def format_validation_error(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: {exc.error_count()} invalid value(s)"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(error["loc"][:-1]))
            lines.append(f"  {key}: unknown key; allowed here: {allowed}")
        elif error["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        elif error["type"] == "value_error" and error["msg"].removeprefix("Value error, ").startswith(f"{key}."):
            lines.append(f"  {error['msg'].removeprefix('Value error, ')}")  # names its own, deeper key
        else:
            lines.append(f"  {key}: {error['msg']} (got {error['input']!r})")
    return "\n".join(lines)


def _allowed_keys(parent: tuple) -> list[str]:
    model: type[BaseModel] = Params
    for part in parent:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
