"""Recommendation baselines: TextCNN over the context tokens, ReDial's autoencoder over the context movies, and item
popularity.

The KBRD-style baseline needs no code here: it is C2CRS's recommender (entity table + one basis R-GCN layer,
self-attentive user vector, dot product with item rows; models.c2crs.C2CRS.recommendation_logits) trained from
scratch, i.e. without the contrastive pre-training.
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.dropout import Dropout


class TextCNNRecommender(nn.Module):
    """Kim (2014): token embeddings -> parallel 1-D convolutions -> ReLU -> max over time -> dropout -> item logits.

    Padding positions are excluded from the max so that the pad count of a batch does not change a row's score.
    """

    def __init__(
        self,
        vocab_size: int,
        n_items: int,
        embed_dim: int = 300,
        filters: tuple[int, ...] = (3, 4, 5),
        n_filters: int = 100,
        dropout: float = 0.5,
        pad_id: int = 0,
    ):
        super().__init__()
        self.pad_id = pad_id
        self.filters = tuple(filters)
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, n_filters, k) for k in self.filters)
        self.dropout = Dropout(dropout)
        self.output = nn.Linear(n_filters * len(self.filters), n_items)

    def forward(self, context_ids: torch.Tensor) -> torch.Tensor:
        """context_ids [B, L] -> item logits [B, n_items]."""
        longest = max(self.filters)
        if context_ids.size(1) < longest:  # a window needs at least `longest` positions
            context_ids = F.pad(context_ids, (0, longest - context_ids.size(1)), value=self.pad_id)
        x = self.embedding(context_ids).transpose(1, 2)  # [B, D, L]
        real = context_ids.ne(self.pad_id)
        pooled = []
        for _k, conv in zip(self.filters, self.convs):
            h = F.relu(conv(x))  # [B, n_filters, L-k+1]
            # A window counts if it starts on a real token; an all-padding row pools to zeros.
            starts = real[:, : h.size(2)].unsqueeze(1)
            pooled.append(h.masked_fill(~starts, 0.0).amax(dim=2))
        return self.output(self.dropout(torch.cat(pooled, dim=1)))


class AutoRecRecommender(nn.Module):
    """ReDial's recommender (Li et al., NeurIPS 2018): a user-based autoencoder (AutoRec, Sedhain et al. 2015) whose
    input is the seeker's liking of each movie mentioned so far (1 liked, 0 disliked or not mentioned, between for
    not said) and whose output scores every movie: decoder(sigmoid(encoder(likes))), as its code with one hidden
    layer (the recommender uses the raw scores)."""

    def __init__(self, n_items: int, hidden: int = 1000):
        super().__init__()
        self.encoder = nn.Linear(n_items, hidden)
        self.decoder = nn.Linear(hidden, n_items)

    def forward(self, likes: torch.Tensor) -> torch.Tensor:
        """likes [B, n_items] -> item logits [B, n_items]."""
        return self.decoder(torch.sigmoid(self.encoder(likes)))


def popularity_scores(train_target_items: torch.Tensor, n_items: int, smoothing: float = 1.0) -> torch.Tensor:
    """log(count + smoothing) of each item as a training target -> [n_items]; the same ranking for every user."""
    counts = torch.bincount(train_target_items.long().flatten(), minlength=n_items)[:n_items].float()
    return torch.log(counts + smoothing)


class RepeatChoice(nn.Module):
    """A learned choice between re-mentioning a context movie and a new one, around any recommender (a copy/generate
    mixture, as pointer networks do for words).

    In ReDial about half of the ground-truth mentions repeat a movie of the context, and a recommender that reads the
    context only through entity embeddings cannot tell a movie just named from an unrelated one. Here the next movie
    is a repeat with probability p_repeat[role, state] (role: the speaker of the turn, a seeker often names again
    what was just recommended, a recommender rarely does; state: what the context looks like, for example how many
    movies it holds and whether the turn before named one, so the choice also predicts when the next movie will be
    new); a repeat is the k-th most recent context movie with probability proportional to by_recency[role, k]
    (older ones share the last bucket); a new movie follows the recommender's softmax over the movies not in the
    context. Scores are the log-probabilities, so ranks follow the mixture. The statistics are counts
    (RepeatChoice.fit), independent of the recommender.
    """

    ROLES = ("seeker", "recommender")

    def __init__(self, p_repeat: torch.Tensor, by_recency: torch.Tensor):
        super().__init__()
        self.register_buffer("p_repeat", p_repeat.float())  # [roles, states]
        self.register_buffer("by_recency", by_recency.float())  # [roles, max_recency + 1], rows sum to 1

    @classmethod
    def fit(
        cls,
        positions: list[int | None],
        roles: list[int],
        max_recency: int,
        states: list[int] | None = None,
        n_states: int = 1,
    ) -> "RepeatChoice":
        """From observed targets: positions[t] = the target's recency position among its sample's context movies
        (0 = most recent) or None for a new movie, roles[t] its turn's speaker, states[t] its context's state
        (None: one state). Add-one smoothing."""
        states = states or [0] * len(positions)
        repeats = torch.ones(len(cls.ROLES), n_states)
        news = torch.ones(len(cls.ROLES), n_states)
        by_recency = torch.ones(len(cls.ROLES), max_recency + 1)
        for position, role, state in zip(positions, roles, states):
            if position is None:
                news[role, state] += 1
            else:
                repeats[role, state] += 1
                by_recency[role, min(position, max_recency)] += 1
        return cls(repeats / (repeats + news), by_recency / by_recency.sum(1, keepdim=True))

    def forward(
        self, scores: torch.Tensor, recent_items: torch.Tensor, roles: torch.Tensor, states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """scores [B, n_items] (the recommender's logits); recent_items [B, K] item ids, most recent first, -1
        padded; roles [B] indices into ROLES; states [B] (None: state 0) -> log-probabilities [B, n_items] of the
        mixture."""
        present = recent_items.ge(0)
        rows, slots = present.nonzero(as_tuple=True)  # the real context movies: (sample, slot)
        items = recent_items[rows, slots]
        in_context = torch.zeros_like(scores, dtype=torch.bool).index_put((rows, items), torch.tensor(True))
        has_context = present.any(1, keepdim=True)
        states = torch.zeros_like(roles) if states is None else states
        p_repeat = torch.where(has_context, self.p_repeat[roles, states][:, None], torch.zeros(()))
        new = torch.log_softmax(scores.masked_fill(in_context, float("-inf")), dim=1) + torch.log1p(-p_repeat)
        max_recency = self.by_recency.size(1) - 1
        position = torch.arange(recent_items.size(1), device=scores.device).clamp(max=max_recency)
        bucket_size = torch.zeros(len(scores), max_recency + 1).scatter_add_(
            1, position.expand_as(recent_items), present.float()
        )
        weight = (self.by_recency[roles] / bucket_size.clamp(min=1))[torch.arange(len(scores))[:, None], position]
        weight = weight * present
        repeat = torch.log(weight / weight.sum(1, keepdim=True).clamp(min=1e-12)) + torch.log(p_repeat)
        return new.index_put((rows, items), repeat[rows, slots])
