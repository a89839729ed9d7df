"""KECRS's recommender (Zhang et al., 2021): KBRD's recommender (an R-GCN over the KG, self-attentive pooling of the
context entities, softmax over the items), trained on KECRS's reformulated task, as its released data code builds
it: a turn's targets are the movies that were not mentioned before in the conversation and that the seeker liked
(ReDial's movie forms). Everything else is the KBRD-style baseline's training (finetune_rec's settings).

And what its generator adds to the Transformer's training (conv_baselines@kecrs): the names of the entities in the
vocabulary and its two extra losses (KECRSLosses)."""

import numpy as np
import polars as pl
import torch

from models.generator import USER, ResponseGenerator, bag_of_entity_loss, infusion_loss
from stages.training.c2crs_data import SampleTable, recommendation_rows
from stages.training.redial_train import LIKING


def new_liked_pairs(table: SampleTable, likes: dict) -> tuple[np.ndarray, np.ndarray]:
    """The (sample row, target item) pairs whose item is new to the conversation and liked by the seeker."""
    rows, items = recommendation_rows(table)
    keep = [
        item not in table.context_items[row] and likes.get((int(table.conv_ids[row]), int(item))) == LIKING[1]
        for row, item in zip(rows, items)
    ]
    keep = np.asarray(keep, dtype=bool)
    if not keep.any():
        raise ValueError(
            "KECRS: no train target is both new to its conversation and liked by the seeker (the "
            "ingest stage's movie_forms.parquet has no such answer): nothing to train on"
        )
    return rows[keep], items[keep]


# ---------------------------------------------------------------- KECRS's generator
# Its released code trains a plain Transformer with two extra losses that read the frozen recommender: the bag of
# entities (models/generator.bag_of_entity_loss, weight 1.5 there) and the infusion (infusion_loss, weight 0.025).


def entity_names(entities: pl.DataFrame, edges: pl.DataFrame, tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Which vocabulary token names which entity, as KECRS adds each entity's name to its dictionary: a movie is
    named by its mention token "@<ReDial id>", another entity by its label when the label is one word of the
    vocabulary (lowercased; multi-word names never occur as one token, as in KECRS's own data).

    Returns (entity_token [entities]: the naming token or -1, token_entity [tokens]: the entity a token names or
    -1; a token naming several entities names the one with the most edges)."""
    index = {t: i for i, t in enumerate(tokens)}
    degree = np.bincount(edges["src"].to_numpy(), minlength=entities.height)
    entity_token = np.full(entities.height, -1, dtype=np.int64)
    for entity, label, is_item, movie in entities.select("entity_id", "label", "is_item", "movie_id").iter_rows():
        name = f"@{movie}" if is_item and movie is not None else (label or "").lower()
        entity_token[entity] = index.get(name, -1) if name and " " not in name else -1
    token_entity = np.full(len(tokens), -1, dtype=np.int64)
    named = np.flatnonzero(entity_token >= 0)
    for entity in named[np.argsort(degree[named], kind="stable")]:  # the most connected entity is written last
        token_entity[entity_token[entity]] = entity
    return entity_token, token_entity


class KECRSLosses:
    """KECRS's two extra generator losses for a group of responses, weighted and summed over the group's rows:
    the bag of entities, towards the KG neighbours of each response's movies (the turn's targets), and the
    infusion, towards the tokens naming the context's entities and movies."""

    def __init__(
        self,
        generator: ResponseGenerator,
        graph,
        entity_token: np.ndarray,
        bag_weight: float,
        infusion_weight: float,
        device,
    ):
        n = graph.n_entities
        links = graph.edge_index[:, graph.edge_index[0] != graph.edge_index[1]]  # self loops are no neighbours
        self.adjacency = (
            torch.sparse_coo_tensor(links, torch.ones(links.size(1)), (n, n), check_invariants=True)
            .coalesce()
            .to(device)
        )
        self.entity_token = entity_token
        self.generator, self.n_entities, self.device = generator, n, device
        self.bag_weight, self.infusion_weight = bag_weight, infusion_weight

    def neighbours(self, table: SampleTable, rows: np.ndarray) -> torch.Tensor:
        """[B, entities] 0/1: the entities one edge away from each row's target movies."""
        movies = torch.zeros((self.n_entities, len(rows)), device=self.device)
        for i, row in enumerate(rows):
            movies[list(table.targets[row]), i] = 1.0
        return (torch.sparse.mm(self.adjacency.t(), movies) > 0).T

    def names(self, table: SampleTable, rows: np.ndarray) -> torch.Tensor:
        """[B, vocab] 0/1: the tokens naming each row's context entities and movies."""
        out = torch.zeros((len(rows), self.generator.cfg.vocab_size), dtype=torch.bool, device=self.device)
        for i, row in enumerate(rows):
            tokens = self.entity_token[list(table.context_entities[row]) + list(table.context_items[row])]
            out[i, torch.as_tensor(tokens[tokens >= 0], dtype=torch.long, device=self.device)] = True
        return out

    def __call__(
        self, table: SampleTable, rows: np.ndarray, hidden: torch.Tensor, targets: torch.Tensor, memories: dict
    ) -> torch.Tensor:
        user = memories[USER]
        total = hidden.new_zeros((), dtype=torch.float32)
        if self.bag_weight:
            sums = self.generator.bag_of_entities(hidden, targets, user)
            total = total + self.bag_weight * bag_of_entity_loss(sums, self.neighbours(table, rows))
        if self.infusion_weight:
            scores = self.generator.infusion_scores(user.states[:, 0])
            total = total + self.infusion_weight * infusion_loss(scores, self.names(table, rows))
        return total * len(rows)
