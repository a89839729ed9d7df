"""ReDial's response generator (Li et al., NeurIPS 2018): a hierarchical encoder-decoder (HRED, Serban et al. 2016).

    utterances   each context utterance's tokens through a bidirectional GRU -> one vector per utterance
    context      the utterance vectors, in order, through a GRU -> the conversation state
    decoder      a GRU whose first state is the conversation state (through a tanh layer) writes the response,
                 its output layer tied to the token embeddings

ReDial's movie tokens are handled as everywhere in this project: a response's movies are one placeholder that the
recommender (here ReDial's autoencoder) fills, where ReDial's decoder switches to its recommender for a movie token.
Differences from ReDial's code: its utterance encoder starts from GenSen's pre-trained sentence encoder and its
decoder also reads the sentiment of the mentioned movies; here every weight starts fresh and the decoder reads the
conversation state only.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from models.dropout import Dropout


@dataclass
class HREDConfig:
    vocab_size: int  # output vocabulary (the conversation vocabulary + the movie placeholder); inputs share it
    dim: int  # token embeddings and each direction of the utterance encoder
    context_dim: int  # the conversation GRU and the decoder GRU
    dropout: float
    pad_id: int
    start_id: int
    end_id: int
    split_id: int  # the token that ends each utterance in a sample's context
    max_utterance_tokens: int  # an utterance's last tokens that the utterance encoder reads


class HRED(nn.Module):
    def __init__(self, cfg: HREDConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_id)
        self.utterance_encoder = nn.GRU(cfg.dim, cfg.dim, batch_first=True, bidirectional=True)
        self.context_encoder = nn.GRU(2 * cfg.dim, cfg.context_dim, batch_first=True)
        self.decoder_start = nn.Linear(cfg.context_dim, cfg.context_dim)
        self.decoder = nn.GRU(cfg.dim, cfg.context_dim, batch_first=True)
        self.to_embedding = nn.Linear(cfg.context_dim, cfg.dim)  # the output layer is tied to self.tokens
        self.output_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.dropout = Dropout(cfg.dropout)

    def encode(self, utterances: torch.Tensor) -> torch.Tensor:
        """utterances [B, U, L] token ids (an utterance of padding only is no utterance; every row has at least one,
        left-aligned) -> the decoder's first state [1, B, context_dim]."""
        B, U, L = utterances.shape
        lengths = utterances.ne(self.cfg.pad_id).sum(dim=2)  # [B, U]
        real = lengths > 0
        if not bool(real[:, 0].all()):
            raise ValueError("every row needs at least one utterance, in its first slot")
        flat = utterances[real]  # [N, L]
        packed = pack_padded_sequence(
            self.dropout(self.tokens(flat)), lengths[real].cpu(), batch_first=True, enforce_sorted=False
        )
        _, h = self.utterance_encoder(packed)  # [2, N, dim]
        vectors = flat.new_zeros((B, U, 2 * self.cfg.dim), dtype=h.dtype).index_put(
            real.nonzero(as_tuple=True), torch.cat([h[0], h[1]], dim=-1)
        )
        packed = pack_padded_sequence(vectors, real.sum(dim=1).cpu(), batch_first=True, enforce_sorted=False)
        _, state = self.context_encoder(packed)  # [1, B, context_dim]
        return torch.tanh(self.decoder_start(state))

    def decode(self, ids: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder outputs [B, T, context_dim] for input tokens ids [B, T] from state [1, B, context_dim], and the
        state after them."""
        outputs, state = self.decoder(self.dropout(self.tokens(ids)), state)
        return outputs, state

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.to_embedding(self.dropout(outputs)) @ self.tokens.weight.T + self.output_bias

    def target_log_probs(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log P(target) [B, T] at the real target positions (0 at padding)."""
        real = targets.ne(self.cfg.pad_id)
        log_probs = torch.log_softmax(self.logits(outputs[real]).float(), dim=-1)
        return torch.zeros(targets.shape, dtype=log_probs.dtype, device=targets.device).masked_scatter(
            real, log_probs.gather(-1, targets[real].unsqueeze(-1)).squeeze(-1)
        )


class HREDStepper:
    """One decoding step at a time for models/decoding's greedy_search and beam_search: feeds the newest token
    and keeps the GRU state."""

    def __init__(self, model: HRED, state: torch.Tensor):
        self.model, self.state = model, state

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        outputs, self.state = self.model.decode(prefix[:, -1:], self.state)
        return F.log_softmax(self.model.logits(outputs[:, -1]).float(), dim=-1)

    def reorder(self, rows: torch.Tensor) -> None:
        self.state = self.state[:, rows]


__all__ = ["HREDConfig", "HRED", "HREDStepper"]
