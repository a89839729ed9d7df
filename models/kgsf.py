"""KGSF's recommender (Zhou et al., KDD 2020): the paper's strongest baseline, a word graph and an entity graph fused.

    entities   the DBpedia R-GCN (KGEncoder, as the KBRD-style recommender) -> N; self-attentive pooling over the
               context's entities -> the entity-side user vector e
    words      ConceptNet word embeddings through one GCN layer over the word graph (stages/word_graph.py) -> W;
               self-attentive pooling over the context's words -> the word-side user vector w
    fusion     g = sigmoid(w_g . fuse([w; e])), user = g * e + (1 - g) * w (KGSF's gate)
    scores     user . n_i + b_i for every item (Eq. 8's form, with KGSF's output bias)
    MIM        Mutual Information Maximisation pre-training, as KGSF's code does it: the word-side vector, projected,
               scores the entities against the context's movies (1) and the rest (0) under a squared error
               (its info_db_loss); pre-training uses it alone, recommendation training adds it with a small weight.

Differences from KGSF's code, all for a CPU budget or this project's data: the entity encoder is KGEncoder (an
entity table into one basis R-GCN layer, like our KBRD-style model) instead of the featureless R-GCN; the MIM and
the recommender's softmax run over the nodes a step computes (every item and the batch's context entities; KGSF's
run over all ~64k entities, a whole-graph R-GCN per step); the word graph is a KGSF fork's one-hop ConceptNet file.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GCNConv

from models.c2crs import KGEncoder, SelfAttentivePooling


@dataclass
class KGSFConfig:
    n_words: int
    n_entities: int
    n_relations: int
    n_items: int  # items are entity ids 0..n_items-1
    dim: int
    num_bases: int


class KGSFRecommender(nn.Module):
    def __init__(self, cfg: KGSFConfig):
        super().__init__()
        self.cfg = cfg
        self.kg_encoder = KGEncoder(cfg.n_entities, cfg.n_relations, cfg.dim, cfg.num_bases)
        self.words = nn.Embedding(cfg.n_words, cfg.dim)
        nn.init.normal_(self.words.weight, std=cfg.dim**-0.5)
        self.word_gcn = GCNConv(cfg.dim, cfg.dim)
        self.entity_pooling = SelfAttentivePooling(cfg.dim)
        self.word_pooling = SelfAttentivePooling(cfg.dim)
        self.fuse = nn.Linear(2 * cfg.dim, cfg.dim)  # KGSF's user_norm
        self.gate = nn.Linear(cfg.dim, 1)  # KGSF's gate_norm
        self.item_bias = nn.Parameter(torch.zeros(cfg.n_entities))  # KGSF's output_en.bias
        self.mim_projection = nn.Linear(cfg.dim, cfg.dim)  # KGSF's info_con_norm
        self.mim_bias = nn.Parameter(torch.zeros(cfg.n_entities))  # KGSF's info_output_db.bias

    def entity_rows(self, nodes: torch.Tensor, edge_index: torch.Tensor, edge_type: torch.Tensor) -> torch.Tensor:
        """N for the given entities only (KGEncoder.forward_nodes)."""
        return self.kg_encoder.forward_nodes(nodes, edge_index, edge_type)

    def word_states(self, word_edge_index: torch.Tensor) -> torch.Tensor:
        """W [n_words, dim]: the word embeddings after one GCN layer over the word graph (as KGSF, no nonlinearity)."""
        return self.word_gcn(self.words.weight, word_edge_index)

    def user_vectors(
        self, N: torch.Tensor, entity_ids: torch.Tensor, W: torch.Tensor, word_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the fused user vector [B, dim], the word-side one w [B, dim]); entity_ids index rows of N and word_ids
        rows of W, both [B, *] with -1 padding."""
        e, w = self.side_vectors(N, entity_ids, W, word_ids)
        g = torch.sigmoid(self.gate(self.fuse(torch.cat([w, e], dim=-1))))
        return g * e + (1 - g) * w, w

    def side_vectors(
        self, N: torch.Tensor, entity_ids: torch.Tensor, W: torch.Tensor, word_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the entity-side user vector e, the word-side one w), each [B, dim], before the gate (KGSF's generator
        reads both). A side with nothing to pool is a zero vector."""
        return (
            self.entity_pooling(N[entity_ids.clamp(min=0)], entity_ids < 0),
            self.word_pooling(W[word_ids.clamp(min=0)], word_ids < 0),
        )

    def recommendation_logits(
        self, N: torch.Tensor, entity_ids: torch.Tensor, W: torch.Tensor, word_ids: torch.Tensor
    ) -> torch.Tensor:
        """user . n_i + b_i for every item -> [B, n_items] (N's first n_items rows are the items)."""
        user, _ = self.user_vectors(N, entity_ids, W, word_ids)
        return user @ N[: self.cfg.n_items].T + self.item_bias[: self.cfg.n_items]

    def mim_loss(
        self,
        N: torch.Tensor,
        node_ids: torch.Tensor,
        word_user: torch.Tensor,
        targets: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """KGSF's info_db_loss: squared error between the projected word-side vectors' scores over N's rows
        (entities node_ids, [n]) and the targets [B, n] (1 for the context's movies), summed over entities and
        averaged over the rows that count (rows [B] bool: KGSF counts the samples with context entities)."""
        scores = self.mim_projection(word_user) @ N.T + self.mim_bias[node_ids]
        per_row = F.mse_loss(scores, targets, reduction="none").sum(dim=1)
        return (per_row * rows).sum() / rows.sum().clamp(min=1)


__all__ = ["KGSFConfig", "KGSFRecommender"]
