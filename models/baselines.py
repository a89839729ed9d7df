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
