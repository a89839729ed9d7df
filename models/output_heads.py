"""The baselines' additions to a generator's output layer, kept apart from C2-CRS's decoder (models/generator.py):
KGSF's vocabulary bias, KBRD's user bias, KECRS's bag of entities and its infusion. ResponseGenerator holds the ones
its GeneratorConfig asks for."""

import torch
from torch import nn


class KGSFVocabularyBias(nn.Module):
    """KGSF's bias of the tokens that are graph words: [user; decoder state] through two linear layers (its copy_norm
    and copy_output), kept on the tokens of `tokens` (its copy mask, set by the owner)."""

    def __init__(self, user_dim: int, dim: int, vocab_size: int):
        super().__init__()
        self.projection = nn.Linear(user_dim + dim, dim)
        self.output = nn.Linear(dim, vocab_size)
        self.register_buffer("tokens", torch.zeros(vocab_size, dtype=torch.bool))

    def forward(self, hidden: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """hidden [..., dim], user [..., user_dim] -> a bias [..., vocab]."""
        return self.output(self.projection(torch.cat([user.to(hidden.dtype), hidden], dim=-1))) * self.tokens


class KBRDUserBias(nn.Module):
    """KBRD's user_representation_to_bias: the user vector through two layers to a bias over the vocabulary."""

    def __init__(self, user_dim: int, dim: int, vocab_size: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(user_dim, dim), nn.ReLU(), nn.Linear(dim, vocab_size))

    def forward(self, user: torch.Tensor) -> torch.Tensor:
        return self.layers(user)


class KECRSEntityBag(nn.Module):
    """KECRS's bag of entities: at every step a distribution over every KG entity, softmax(align([user; h]) . N + b),
    N the frozen R-GCN's output (`entities`, set by the owner, as `token_entity`: the entity each token names, -1
    none); and its infusion: the user vector scored against every word embedding."""

    def __init__(self, n_entities: int, entity_dim: int, dim: int, vocab_size: int, mixing: float, infusion: bool):
        super().__init__()
        self.mixing = mixing
        self.align = nn.Linear(entity_dim + dim, entity_dim)  # KECRS's bag_dim_align
        self.bias = nn.Parameter(torch.zeros(n_entities))
        self.register_buffer("entities", torch.zeros(n_entities, entity_dim))
        self.register_buffer("token_entity", torch.full((vocab_size,), -1, dtype=torch.long))
        if infusion:
            self.infusion_align = nn.Linear(entity_dim, dim)  # KECRS's dim_align
            self.infusion_bias = nn.Parameter(torch.zeros(vocab_size))

    def distribution(self, hidden: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """hidden [..., dim], user [..., entity_dim] -> [..., entities]."""
        query = self.align(torch.cat([user.to(hidden.dtype), hidden], dim=-1))
        return torch.softmax((query @ self.entities.to(query.dtype).T + self.bias).float(), dim=-1)

    def bag(self, hidden: torch.Tensor, real: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """The distributions summed over each response's real positions: hidden [B, T, dim], real [B, T], user
        [B, 1, entity_dim] -> [B, entities], each row in [0, T]."""
        probs = self.distribution(hidden[real], user.expand(-1, real.size(1), -1)[real])
        rows = real.nonzero(as_tuple=True)[0]
        return probs.new_zeros((real.size(0), probs.size(1))).index_add_(0, rows, probs)

    def infusion_scores(self, user: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        """The user vector [B, entity_dim] against every word embedding [vocab, dim] -> [B, vocab]."""
        return self.infusion_align(user) @ token_embeddings.T + self.infusion_bias

    def mix(self, probs: torch.Tensor, hidden: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """At decoding, an entity's probability (x mixing) raises the token that names it; renormalised."""
        names = self.token_entity >= 0
        entities = self.distribution(hidden, user)
        probs = probs.clone()
        probs[:, names] += self.mixing * entities[:, self.token_entity[names]]
        return probs / probs.sum(dim=-1, keepdim=True)
