"""KECRS's recommender (Zhang et al., 2021): KBRD's recommender (an R-GCN over the KG, self-attentive pooling of the
context entities, softmax over the items), trained on KECRS's reformulated task, as its released data code builds
it: a turn's targets are the movies that were not mentioned before in the conversation and that the seeker liked
(ReDial's movie forms). Everything else is the KBRD-style baseline's training (finetune_rec's settings)."""

import numpy as np

from stages.training.c2crs_data import SampleTable, recommendation_rows
from stages.training.redial_train import LIKING


def new_liked_pairs(table: SampleTable, likes: dict) -> tuple[np.ndarray, np.ndarray]:
    """The (sample row, target item) pairs whose item is new to the conversation and liked by the seeker."""
    rows, items = recommendation_rows(table)
    keep = [item not in table.context_items[row] and likes.get((int(table.conv_ids[row]), int(item))) == LIKING[1]
            for row, item in zip(rows, items)]
    keep = np.asarray(keep, dtype=bool)
    if not keep.any():
        raise ValueError("KECRS: no train target is both new to its conversation and liked by the seeker (the "
                         "ingest stage's movie_forms.parquet has no such answer): nothing to train on")
    return rows[keep], items[keep]
