"""Recommendation baselines: TextCNN over the context tokens, and item popularity.

The KBRD-style baseline needs no code here: it is C2CRS's recommender (entity table + one basis R-GCN layer,
self-attentive user vector, dot product with item rows; models.c2crs.C2CRS.recommendation_logits) trained from
scratch, i.e. without the contrastive pre-training.
"""

import torch
import torch.nn.functional as F
from torch import nn


class TextCNNRecommender(nn.Module):
    """Kim (2014): token embeddings -> parallel 1-D convolutions -> ReLU -> max over time -> dropout -> item logits.

    Padding positions are excluded from the max so that the pad count of a batch does not change a row's score.
    """

    def __init__(self, vocab_size: int, n_items: int, embed_dim: int = 300, filters: tuple[int, ...] = (3, 4, 5),
                 n_filters: int = 100, dropout: float = 0.5, pad_id: int = 0):
        super().__init__()
        self.pad_id = pad_id
        self.filters = tuple(filters)
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, n_filters, k) for k in self.filters)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(n_filters * len(self.filters), n_items)

    def forward(self, context_ids: torch.Tensor) -> torch.Tensor:
        """context_ids [B, L] -> item logits [B, n_items]."""
        longest = max(self.filters)
        if context_ids.size(1) < longest:  # a window needs at least `longest` positions
            context_ids = F.pad(context_ids, (0, longest - context_ids.size(1)), value=self.pad_id)
        x = self.embedding(context_ids).transpose(1, 2)  # [B, D, L]
        real = context_ids.ne(self.pad_id)
        pooled = []
        for k, conv in zip(self.filters, self.convs):
            h = F.relu(conv(x))  # [B, n_filters, L-k+1]
            # A window counts if it starts on a real token; an all-padding row pools to zeros.
            starts = real[:, : h.size(2)].unsqueeze(1)
            pooled.append(h.masked_fill(~starts, 0.0).amax(dim=2))
        return self.output(self.dropout(torch.cat(pooled, dim=1)))


def popularity_scores(train_target_items: torch.Tensor, n_items: int, smoothing: float = 1.0) -> torch.Tensor:
    """log(count + smoothing) of each item as a training target -> [n_items]; the same ranking for every user."""
    counts = torch.bincount(train_target_items.long().flatten(), minlength=n_items)[:n_items].float()
    return torch.log(counts + smoothing)


class RecencyBonus(nn.Module):
    """A learned choice between re-mentioning a context movie and a new one, on top of any recommender's scores.

    In ReDial about half of the ground-truth mentions repeat a movie of the context, and a recommender that reads the
    context only through entity embeddings cannot tell a movie just named from an unrelated one. This adds a learned
    bonus to the k-th most recently mentioned context movie (k = 1..max_recency; older ones share the last bonus),
    one set per speaker of the turn (a seeker often names again what was just recommended, a recommender rarely
    does): 2 x (max_recency + 1) numbers, fitted on held-out data with the recommender frozen.
    """

    ROLES = ("seeker", "recommender")

    def __init__(self, max_recency: int = 8):
        super().__init__()
        self.max_recency = max_recency
        self.bonus = nn.Parameter(torch.zeros(len(self.ROLES), max_recency + 1))

    def forward(self, scores: torch.Tensor, recent_items: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
        """scores [B, n_items]; recent_items [B, K] item ids, most recent first, -1 padded; roles [B] indices into
        ROLES -> scores + bonuses."""
        position = torch.arange(recent_items.size(1), device=scores.device).clamp(max=self.max_recency)
        bonus = self.bonus[roles[:, None], position[None, :]] * recent_items.ge(0)
        return scores.scatter_add(1, recent_items.clamp(min=0), bonus.to(scores.dtype))
