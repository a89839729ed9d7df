"""The baseline recommenders' model files (ReDial's autoencoder, KGSF, RevCore) and RevCore's review retrieval
over the workspace's reviews; TextCNN's are in textcnn_train.py."""

from dataclasses import dataclass
from pathlib import Path

from models.baselines import AutoRecRecommender
from models.kgsf import KGSFConfig, KGSFRecommender
from models.revcore import RevCoreConfig, RevCoreRecommender
from stages.io.graph import STAGES
from stages.training import c2crs_train, revcore_train
from stages.training.runs import TRAINING_INPUTS, load_module


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


def revcore_retrieval(
    params, workspace: Path, run: c2crs_train.Run, max_positions: int | None = None, path: Path | None = None
) -> revcore_train.ReviewRetrieval:
    """RevCore's review retrieval over the workspace's reviews, with the recommender saved at `path` (default:
    baselines@revcore's model, whose KGSF parts are retrieval.model.kgsf); an enriched context keeps its last
    tokens that an encoder of max_positions can read (None: triples.context_max_tokens)."""
    model = load_revcore(path or workspace / STAGES["baselines"].for_variant("revcore").model_file).to(run.device)
    longest = params.triples.context_max_tokens
    return revcore_train.load_retrieval(
        model,
        run.sentence_tokens,
        {name: workspace / path for name, path in TRAINING_INPUTS.items()},
        params.baselines.revcore,
        longest if max_positions is None else min(longest, max_positions),
    )
