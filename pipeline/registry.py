"""The stage graph as data: what each stage reads and writes. dvc.yaml must agree (tests/test_dvc_yaml.py checks)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    summary: str
    params: tuple[str, ...]  # params.yaml keys the stage reads
    code: tuple[str, ...]  # source files whose change must rerun the stage
    deps: tuple[str, ...]  # outputs of earlier stages
    outs: tuple[str, ...]
    metrics: tuple[str, ...]
    reports: tuple[str, ...] = ()  # human-readable outputs, kept in git like metrics
    external_inputs: str = ""  # data read from outside the workspace, for `pipeline stages`

    def all_deps(self) -> tuple[str, ...]:
        return self.code + self.deps


TRAINING_CODE = ("models/c2crs.py", "stages/c2crs_data.py", "stages/c2crs_train.py", "stages/training.py")
TRAINING_DATA = ("data/triples/samples.parquet", "data/triples/triples.parquet", "data/triples/vocab.parquet",
                 "data/reviews/review_sentences.parquet", "data/kg/entities.parquet", "data/kg/relations.parquet",
                 "data/kg/edges.parquet")

CONV_CODE = TRAINING_CODE + ("models/generator.py", "stages/conv_train.py")

STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec(
            name="ingest",
            summary="ReDial raw JSONL -> conversations, merged utterances, movies; train/valid/test splits",
            params=("seed", "data", "ingest"),
            code=("stages/ingest.py", "stages/resources/kgsf_valid_conversation_ids.txt"),
            deps=(),
            outs=("data/ingest/conversations.parquet", "data/ingest/utterances.parquet",
                  "data/ingest/movies.parquet"),
            metrics=("metrics/ingest.json",),
            external_inputs="ReDial train/test JSONL + movie lists (C2CRS_DATA_DIR mirror, or the public download)",
        ),
        StageSpec(
            name="reviews",
            summary="review sentences per ReDial movie from IMDb reviews, RevCore snippets and plots; coverage",
            params=("data", "reviews"),
            code=("stages/reviews.py", "stages/imdb_scraper.py", "stages/safe_pickle.py"),
            deps=("data/ingest/movies.parquet", "data/ingest/conversations.parquet", "data/ingest/utterances.parquet"),
            outs=("data/reviews/reviews.parquet", "data/reviews/review_sentences.parquet"),
            metrics=("metrics/reviews.json",),
            external_inputs="aclImdb reviews, RevCore snippets, movie plots (mirror or download); IMDb (scraper)",
        ),
        StageSpec(
            name="kg",
            summary="DBpedia subgraph around the ReDial movies and linked entities; relation filter, inverses, "
                    "self loops, compact ids; counts next to the reference's",
            params=("data", "linking", "kg"),
            code=("stages/kg.py", "stages/linking.py", "stages/safe_pickle.py"),
            deps=("data/ingest/movies.parquet", "data/ingest/utterances.parquet"),
            outs=("data/kg/entities.parquet", "data/kg/relations.parquet", "data/kg/edges.parquet"),
            metrics=("metrics/kg.json",),
            external_inputs="KGSF DBpedia subgraph pickles (+ optional movie-metadata KG)",
        ),
        StageSpec(
            name="triples",
            summary="vocabulary, entity linking (measured against CRSLab's annotations), samples per turn, "
                    "word-entity-sentence triples",
            params=("seed", "data", "linking", "triples"),
            code=("stages/triples.py", "stages/linking.py"),
            deps=("data/ingest/conversations.parquet", "data/ingest/utterances.parquet", "data/ingest/movies.parquet",
                  "data/reviews/reviews.parquet", "data/reviews/review_sentences.parquet",
                  "data/kg/entities.parquet", "data/kg/edges.parquet"),
            outs=("data/triples/vocab.parquet", "data/triples/samples.parquet", "data/triples/triples.parquet"),
            metrics=("metrics/triples.json",),
            reports=("reports/linking.md",),
            external_inputs="CRSLab's annotated validation conversations (linker evaluation); KGSF stopwords",
        ),
        StageSpec(
            name="pretrain_coarse",
            summary="coarse-grained contrastive pre-training (paper 4.2.1): conversation vs. subgraph vs. reviews",
            params=("seed", "device", "deterministic", "model", "pretrain_coarse"),
            code=TRAINING_CODE,
            deps=TRAINING_DATA,
            outs=("data/models/pretrain_coarse.pt",),
            metrics=("metrics/pretrain_coarse.json",),
        ),
        StageSpec(
            name="pretrain_fine",
            summary="fine-grained contrastive pre-training (4.2.2): word vs. entity vs. sentence, + lambda coarse",
            params=("seed", "device", "deterministic", "model", "pretrain_fine"),
            code=TRAINING_CODE,
            deps=TRAINING_DATA + ("data/models/pretrain_coarse.pt",),
            outs=("data/models/pretrain_fine.pt",),
            metrics=("metrics/pretrain_fine.json",),
        ),
        StageSpec(
            name="finetune_rec",
            summary="recommender fine-tuning (4.3.1) from the pre-trained representations; early stop on valid",
            params=("seed", "device", "deterministic", "model", "finetune_rec"),
            code=TRAINING_CODE,
            deps=TRAINING_DATA + ("data/models/pretrain_fine.pt",),
            outs=("data/models/c2crs_rec.pt",),
            metrics=("metrics/finetune_rec.json",),
        ),
        StageSpec(
            name="baselines",
            summary="TextCNN over context words and the KBRD-style recommender (no pre-training), same splits",
            params=("seed", "device", "deterministic", "model", "finetune_rec", "baselines"),
            code=TRAINING_CODE + ("models/baselines.py",),
            deps=TRAINING_DATA,
            outs=("data/models/textcnn.pt", "data/models/kbrd_rec.pt"),
            metrics=("metrics/baselines.json",),
        ),
        StageSpec(
            name="ablations",
            summary="the paper's Table 4: the recommendation path retrained per variant in params.ablations",
            params=("seed", "device", "deterministic", "model", "pretrain_coarse", "pretrain_fine", "finetune_rec", "ablations"),
            code=TRAINING_CODE,
            deps=TRAINING_DATA,
            outs=("data/models/ablations",),
            metrics=("metrics/ablations.json",),
        ),
        StageSpec(
            name="finetune_conv",
            summary="response generation fine-tuning (4.3.2) from the pre-trained representations: decoder over "
                    "history, KG and reviews, copy mechanism, instance-weighted loss; early stop on valid perplexity",
            params=("seed", "device", "deterministic", "model", "finetune_conv"),
            code=CONV_CODE,
            deps=TRAINING_DATA + ("data/models/pretrain_fine.pt",),
            outs=("data/models/c2crs_conv.pt",),
            metrics=("metrics/finetune_conv.json",),
        ),
        StageSpec(
            name="conv_baselines",
            summary="the paper's Table 2 rows by the same code: Transformer, KGSF-style, C2-CRS w/o instance "
                    "weighting (params.conv_baselines)",
            params=("seed", "device", "deterministic", "model", "finetune_conv", "conv_baselines"),
            code=CONV_CODE,
            deps=TRAINING_DATA + ("data/models/pretrain_fine.pt", "data/models/kbrd_rec.pt"),
            outs=("data/models/conv_baselines",),
            metrics=("metrics/conv_baselines.json",),
        ),
        StageSpec(
            name="evaluate",
            summary="test-split metrics: recommendation for C2-CRS, the baselines and the ablations (both protocols, "
                    "95 % CIs, margins); conversation for the generators (Dist-n both ways, BLEU, perplexity), "
                    "responses to read and a rating sheet",
            params=("seed", "device", "deterministic", "data", "linking", "model", "finetune_conv", "evaluate", "ablations",
                    "conv_baselines"),
            code=CONV_CODE + ("models/baselines.py", "stages/evaluate.py", "stages/conv_evaluate.py",
                              "stages/linking.py"),
            deps=TRAINING_DATA + ("data/ingest/movies.parquet", "data/ingest/utterances.parquet",
                                  "data/models/c2crs_rec.pt", "data/models/textcnn.pt",
                                  "data/models/kbrd_rec.pt", "data/models/ablations", "data/models/c2crs_conv.pt",
                                  "data/models/conv_baselines"),
            outs=(),
            metrics=("metrics/rec.json", "metrics/conv.json"),
            reports=("reports/rec.md", "reports/conv.md", "reports/conv_rating.csv", "reports/conv_rating_key.csv"),
        ),
    ]
}


def stage_names() -> list[str]:
    """Stages in execution order (the registry is written in topological order)."""
    return list(STAGES)
