"""RevCore's recommender (Lu et al., Findings of ACL 2021): KGSF's recommender (models/kgsf.py) over a conversation
that reviews enrich, plus what its sentiment-aware retrieval needs to pick those reviews.

RevCore predicts the polarity of the utterance that mentions a movie and retrieves a review of that movie with the
same polarity; the review's words join the conversation and the entities it names join the user's entities. Its
released code ships neither the sentiment model nor the retrieval (each movie gets one fixed review snippet), so
here the sentiment model is a logistic regression over bags of vocabulary words, trained on the rated IMDb reviews
of the reviews stage, and the retrieval itself is stages/training/revcore_train.py's. The model holds the
classifier's weights and the entities linked in every review sentence, so a saved RevCore model retrieves on new
conversations as it did in training.
"""

from dataclasses import dataclass

import torch
from torch import nn

from models.kgsf import KGSFConfig, KGSFRecommender


@dataclass
class RevCoreConfig:
    kgsf: dict  # KGSFConfig's fields
    vocab_size: int  # the conversation vocabulary the sentiment model reads
    n_sentences: int  # review sentences (ids 0..n-1, the reviews stage's)
    n_links: int  # (sentence, entity) links in all


class RevCoreRecommender(nn.Module):
    def __init__(self, cfg: RevCoreConfig):
        super().__init__()
        self.cfg = cfg
        self.kgsf = KGSFRecommender(KGSFConfig(**cfg.kgsf))
        self.sentiment = nn.Linear(cfg.vocab_size, 1)  # P(positive) = sigmoid(w . bag of words + b)
        # the entities linked in sentence s: link_entities[link_offsets[s]: link_offsets[s + 1]]
        self.register_buffer("link_offsets", torch.zeros(cfg.n_sentences + 1, dtype=torch.long))
        self.register_buffer("link_entities", torch.zeros(cfg.n_links, dtype=torch.long))

    def positive(self, token_lists: list[list[int]]) -> torch.Tensor:
        """P(positive) of each text given as vocabulary ids (a word counts once) -> [len(token_lists)]."""
        weight = self.sentiment.weight[0]
        distinct = [sorted(set(tokens)) for tokens in token_lists]
        ids = torch.as_tensor([t for tokens in distinct for t in tokens], dtype=torch.long, device=weight.device)
        rows = torch.repeat_interleave(torch.as_tensor([len(t) for t in distinct], device=weight.device))
        with torch.no_grad():
            scores = weight.new_zeros(len(token_lists)).index_add_(0, rows, weight[ids])
            return torch.sigmoid(scores + self.sentiment.bias)

    def sentence_entities(self, sentence: int) -> list[int]:
        start, end = self.link_offsets[sentence : sentence + 2].tolist()
        return self.link_entities[start:end].tolist()
