"""C2-CRS response generation (paper 4.3.2): a Transformer decoder that fuses history, KG entities and reviews.

Over 400 lines on purpose, one decoder file: the layers, the copy path, the loss and both decoders share the cache
layout, so they stay together.

Paper map:
    Eq. 10     DecoderLayer: self-attention over the words generated so far -> cross-attention to the
               conversation history F -> to the KG entities N -> to the review sentences E -> feed-forward,
               one cross-attention per memory of GeneratorConfig.memory_dims, in its order. A memory left out is
               skipped (the baselines); KGSF's generator reads entities, then ConceptNet words, then the history.
    copy       pointer-generator: a gate mixes the vocabulary softmax with an attention over the source tokens
               (the context, and the review sentences' tokens), so a name in the context can be said even when
               the vocabulary softmax gives it almost nothing. (The reference code builds a copy layer and never
               uses it.)
    KBRD       user bias: the recommender's user vector, through two layers, adds a bias to every token's logit.
    KGSF       vocabulary bias (KGSF's "copy"): the user's pooled entity and word vectors with the decoder state,
               through two linear layers, add a bias to the logits of the tokens that are graph words.
    KECRS      bag of entities: at each step [user vector; decoder state] -> a distribution over every KG entity
               (scored against the frozen R-GCN's outputs); summed over the response it is trained towards the
               neighbours of the turn's movies (bag_of_entity_loss), and at decoding it adds mixing x its mass to
               the tokens that name an entity. Infusion: the user vector scores every word embedding, trained
               towards the names of the context's entities (infusion_loss).
    Eq. 11-12  instance_weights, generation_loss
Decoding: greedy_decode and beam_decode, with a key/value cache (memories are projected once per response,
self-attention keys grow by one row a step), a maximum length and n-gram blocking.

Nothing here knows about files or experiment tracking; the encoders that produce F, N and E are models/c2crs.py's.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.c2crs import C2CRS
from models.dropout import Dropout
from models.kgsf import KGSFRecommender
from models.output_heads import KBRDUserBias, KECRSEntityBag, KGSFVocabularyBias

MEMORIES = ("history", "kg", "word", "review")  # what a decoder may attend to (word: KGSF's ConceptNet words)
USER = "user"  # a memories entry that is no cross-attention: KGSF's user vectors [B, 1, d] for the vocabulary bias


@dataclass
class GeneratorConfig:
    vocab_size: int  # output vocabulary (the conversation vocabulary + the movie placeholder)
    memory_dims: dict[str, int]  # the cross-attention chain, in order: memory name -> its states' size
    pad_id: int
    start_id: int
    end_id: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    dropout: float
    attention_dropout: float  # on the attention weights, as the reference's decoder
    max_positions: int  # response tokens + the start token
    copy: bool
    vocabulary_bias_dim: int  # KGSF: the size of the user vectors that bias the vocabulary; 0 = no bias
    user_bias_dim: int  # KBRD: the size of the user vector that biases every token's logit; 0 = no bias
    entity_bag: int  # KECRS: the entities of the bag-of-entity head (the KG's); 0 = no head
    entity_dim: int  # KECRS: the size of the entity features and of the user vector (the R-GCN's)
    entity_bag_mixing: float  # KECRS: weight of an entity's probability added to its name's at decoding
    infusion: bool  # KECRS: the user vector scores the word embeddings (infusion_loss)

    def __post_init__(self):
        unknown = set(self.memory_dims) - set(MEMORIES)
        if unknown:
            raise ValueError(f"memory_dims: unknown memories {sorted(unknown)}; known: {MEMORIES}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.infusion and not self.entity_bag:
            raise ValueError(
                "the infusion reads the user vector from the bag-of-entity head's entities: set entity_bag"
            )
        if self.entity_bag and self.entity_dim <= 0:
            raise ValueError("the bag-of-entity head needs entity_dim (the entity features' and user vector's size)")


@dataclass
class Memory:
    """What one cross-attention reads: states [B, M, d] and a padding mask [B, M] (True = padding)."""

    states: torch.Tensor
    pad: torch.Tensor

    def split(self, sizes: list[int]) -> list["Memory"]:
        """Consecutive row groups of these sizes (views; their gradients join in one concatenation)."""
        return [Memory(*parts) for parts in zip(self.states.split(sizes), self.pad.split(sizes))]


@dataclass
class CopySource:
    """Tokens the copy path may point at: encoder states [B, S, dim], their output-vocabulary ids [B, S], and a
    mask [B, S] of positions that may not be copied (padding, separators, unknown words)."""

    states: torch.Tensor
    ids: torch.Tensor
    blocked: torch.Tensor

    def split(self, sizes: list[int]) -> list["CopySource"]:
        return [
            CopySource(*parts)
            for parts in zip(self.states.split(sizes), self.ids.split(sizes), self.blocked.split(sizes))
        ]


class Attention(nn.Module):
    """Multi-head attention whose keys and values are computed separately, so they can be cached."""

    def __init__(self, dim: int, n_heads: int, dropout: float, kv_dim: int | None = None):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(kv_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, kv_dim] -> keys, values [B, heads, L, dim / heads]."""
        k, v = self.key_value(x).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attend: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """attend: bool, broadcastable to [B, heads, T, L], True where a query may look; causal: row t sees <= t."""
        q = self._split(self.query(x))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attend, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        B, H, T, d = out.shape
        return self.out(out.transpose(1, 2).reshape(B, T, H * d))


def attendable(pad: torch.Tensor) -> torch.Tensor:
    """A memory padding mask [B, M] as an attention mask [B, 1, 1, M]. A row with nothing to attend to (a turn
    with no linked entity) may look at its first slot, whose states the caller zeroes: softmax over nothing is NaN."""
    allowed = ~pad
    allowed[:, 0] |= pad.all(dim=1)
    return allowed[:, None, None, :]


class DecoderLayer(nn.Module):
    """Eq. 10's layer: R^l = Decoder(R^{l-1}, N, E, F), post-norm residual blocks as in KGSF's decoder."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.memories = list(cfg.memory_dims)  # the chain's order
        self.self_attention = Attention(cfg.dim, cfg.n_heads, cfg.attention_dropout)
        self.cross_attention = nn.ModuleDict(
            {m: Attention(cfg.dim, cfg.n_heads, cfg.attention_dropout, cfg.memory_dims[m]) for m in self.memories}
        )
        self.norms = nn.ModuleDict({name: nn.LayerNorm(cfg.dim) for name in ("self", *self.memories, "ffn")})
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.ReLU(), Dropout(cfg.dropout), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.dropout = Dropout(cfg.dropout)

    def memory_keys_values(self, memories: dict[str, Memory]) -> dict:
        """Keys, values and attention mask of each memory, computed once per response (the cross-attention cache)."""
        return {
            m: (*self.cross_attention[m].keys_values(memories[m].states), attendable(memories[m].pad))
            for m in self.memories
        }

    def forward(self, x: torch.Tensor, memory_kv: dict, cache: dict | None = None) -> torch.Tensor:
        """x [B, T, dim]. With a cache (decoding), x holds the next position only and the cache the earlier ones."""
        k, v = self.self_attention.keys_values(x)
        if cache is not None:
            if "k" in cache:
                if x.size(1) != 1:
                    raise ValueError("a decoding cache takes one new position per step")
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        x = self.norms["self"](x + self.dropout(self.self_attention(x, k, v, causal=x.size(1) > 1)))
        for m in self.memories:
            mk, mv, attend = memory_kv[m]
            x = self.norms[m](x + self.dropout(self.cross_attention[m](x, mk, mv, attend)))
        return self.norms["ffn"](x + self.dropout(self.ffn(x)))


class ResponseGenerator(nn.Module):
    """The decoder, its output layer (tied to the token embeddings) and the pointer-generator copy path."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_id)
        self.positions = nn.Embedding(cfg.max_positions, cfg.dim)
        nn.init.normal_(self.tokens.weight, std=cfg.dim**-0.5)
        nn.init.normal_(self.positions.weight, std=cfg.dim**-0.5)
        with torch.no_grad():
            self.tokens.weight[cfg.pad_id].zero_()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.dropout = Dropout(cfg.dropout)
        self.output_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.copy:
            self.copy_query = nn.Linear(cfg.dim, cfg.dim)
            self.copy_gate = nn.Linear(2 * cfg.dim, 1)  # [decoder state; attended source] -> p_gen
        # the baselines' output heads (models/output_heads.py), when the config asks for them
        self.vocabulary_bias = (
            KGSFVocabularyBias(cfg.vocabulary_bias_dim, cfg.dim, cfg.vocab_size) if cfg.vocabulary_bias_dim else None
        )
        self.user_bias = KBRDUserBias(cfg.user_bias_dim, cfg.dim, cfg.vocab_size) if cfg.user_bias_dim else None
        self.entity_bag = (
            KECRSEntityBag(cfg.entity_bag, cfg.entity_dim, cfg.dim, cfg.vocab_size, cfg.entity_bag_mixing, cfg.infusion)
            if cfg.entity_bag
            else None
        )

    # ---- the decoder ------------------------------------------------------------------------------------------
    def memory_keys_values(self, memories: dict[str, Memory]) -> list[dict]:
        return [layer.memory_keys_values(memories) for layer in self.layers]

    def decode(
        self, ids: torch.Tensor, memory_kv: list[dict], caches: list[dict] | None = None, offset: int = 0
    ) -> torch.Tensor:
        """Decoder states for input tokens ids [B, T] at positions offset.. -> [B, T, dim] (causal)."""
        T = ids.size(1)
        if offset + T > self.cfg.max_positions:
            raise ValueError(f"position {offset + T} > max_positions {self.cfg.max_positions}")
        x = self.tokens(ids) + self.positions(torch.arange(offset, offset + T, device=ids.device))
        x = self.dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, memory_kv[i], None if caches is None else caches[i])
        return x

    # ---- the output distribution ------------------------------------------------------------------------------
    def vocabulary_logits(self, hidden: torch.Tensor, user: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [..., vocab] of decoder states hidden [..., dim]; with a vocabulary bias, user [..., bias dim]
        are the user vectors of each state's row."""
        logits = hidden @ self.tokens.weight.T + self.output_bias
        if (self.cfg.vocabulary_bias_dim or self.cfg.user_bias_dim) and user is None:
            raise ValueError("this generator's vocabulary bias needs the user vectors (memories['user'])")
        if self.vocabulary_bias is not None:
            logits = logits + self.vocabulary_bias(hidden, user)
        if self.user_bias is not None:
            logits = logits + self.user_bias(user.to(hidden.dtype))
        return logits

    def bag_of_entities(self, hidden: torch.Tensor, targets: torch.Tensor, user: Memory) -> torch.Tensor:
        """KECRS's bag of entities over each response's real positions (targets [B, T], padding excluded) ->
        [B, entities] (output_heads.KECRSEntityBag.bag)."""
        return self.entity_bag.bag(hidden, targets.ne(self.cfg.pad_id), user.states)

    def infusion_scores(self, user: torch.Tensor) -> torch.Tensor:
        """KECRS's infusion: the user vector [B, entity_dim] against this generator's word embeddings -> [B, vocab]."""
        return self.entity_bag.infusion_scores(user, self.tokens.weight)

    def copy_attention(self, hidden: torch.Tensor, source: CopySource) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention over source tokens [B, T, S], p_gen [B, T, 1]). Nothing copyable -> p_gen = 1."""
        scores = self.copy_query(hidden) @ source.states.transpose(1, 2) / self.cfg.dim**0.5
        blocked = source.blocked[:, None, :]
        nothing = source.blocked.all(dim=1)[:, None, None]
        attention = torch.softmax(scores.masked_fill(blocked, float("-inf")).masked_fill(nothing, 0.0), dim=-1)
        attention = attention.masked_fill(blocked, 0.0)
        attended = attention @ source.states
        p_gen = torch.sigmoid(self.copy_gate(torch.cat([hidden, attended], dim=-1)))
        return attention, p_gen.masked_fill(nothing, 1.0)

    def target_log_probs(
        self, hidden: torch.Tensor, targets: torch.Tensor, source: CopySource | None = None, user: Memory | None = None
    ) -> torch.Tensor:
        """log P(w_t) of the given targets [B, T] under the mixture, without building the copy distribution over the
        whole vocabulary: P = p_gen * softmax(logits)[w] + (1 - p_gen) * (attention on source positions holding w).

        The vocabulary softmax runs on the real target positions only (a batch pads every response to its longest,
        ~60 % of the positions on ReDial); padding positions get log P = 0. user: memories[USER], for the
        vocabulary bias."""
        real = targets.ne(self.cfg.pad_id)
        user_rows = None if user is None else user.states.expand(-1, targets.size(1), -1)[real]
        vocab_log_probs = torch.log_softmax(self.vocabulary_logits(hidden[real], user_rows).float(), dim=-1)
        generated = torch.zeros(targets.shape, dtype=vocab_log_probs.dtype, device=hidden.device).masked_scatter(
            real, vocab_log_probs.gather(-1, targets[real].unsqueeze(-1)).squeeze(-1)
        )
        if not self.cfg.copy or source is None:
            return generated
        attention, p_gen = self.copy_attention(hidden, source)
        copied = (attention * (source.ids[:, None, :] == targets[:, :, None])).sum(-1)
        p_gen = p_gen.squeeze(-1).float()
        return torch.log(p_gen * generated.exp() + (1 - p_gen) * copied.float() + 1e-12).masked_fill(~real, 0.0)

    def next_token_log_probs(
        self, hidden: torch.Tensor, source: CopySource | None = None, user: Memory | None = None
    ) -> torch.Tensor:
        """The full output distribution for decoder states hidden [B, dim] -> log P [B, vocab]."""
        probs = torch.softmax(
            self.vocabulary_logits(hidden, None if user is None else user.states[:, 0]).float(), dim=-1
        )
        if self.cfg.copy and source is not None:
            attention, p_gen = self.copy_attention(hidden[:, None], source)
            copied = torch.zeros_like(probs).scatter_add_(1, source.ids, attention[:, 0].float())
            p_gen = p_gen[:, 0].float()
            probs = p_gen * probs + (1 - p_gen) * copied
        if self.entity_bag is not None and user is not None:  # KECRS: an entity's mass raises the token naming it
            probs = self.entity_bag.mix(probs, hidden, user.states[:, 0])
        return torch.log(probs + 1e-12)


def review_token_order(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Positions [B, R] of each row's real review tokens in tokens [B, K * Ls] (its sentences, padded to Ls), in
    document order, then padding; R = the most real tokens of a row. The copy source keeps these only: padding is
    never copied, and sentences are ~half padding, so the copy attention reads about half the positions."""
    padding = tokens.eq(pad_id)
    width = int((~padding).sum(dim=1).max()) if tokens.numel() else 0
    return torch.argsort(padding.to(torch.uint8), dim=1, stable=True)[:, :width]


# ---- the loss (Eq. 11-12) -----------------------------------------------------------------------------------------
def instance_weights(frequency: torch.Tensor, threshold: float, floor: float) -> torch.Tensor:
    """Eq. 12: alpha_w = max(gamma, beta / f_w) if f_w >= beta, else 1 (beta = threshold, gamma = floor)."""
    frequency = frequency.float()
    scaled = torch.clamp(threshold / frequency.clamp(min=1e-12), min=floor)
    return torch.where(frequency >= threshold, scaled, torch.ones_like(frequency))


def generation_loss(
    target_log_probs: torch.Tensor, targets: torch.Tensor, pad_id: int, token_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 11 as a weighted negative log-likelihood, averaged over the real target tokens of the batch.

    Eq. 11 writes log(alpha * P); taken literally that is log alpha + log P, whose gradient ignores alpha. The
    reference code multiplies the token's cross-entropy by alpha, which is what punishes frequent tokens, and so
    does this. token_weights [vocab] are Eq. 12's alpha per token; None = plain cross-entropy.
    """
    real = targets.ne(pad_id)
    nll = -target_log_probs
    if token_weights is not None:
        nll = nll * token_weights[targets]
    return (nll * real).sum() / real.sum().clamp(min=1)


def bag_of_entity_loss(sums: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KECRS's bag-of-entity loss (its positive-only form): -sum_e y_e log sigmoid(S_e) per response, averaged over
    the batch (a response without target entities adds 0). sums [B, entities] (bag_of_entities), targets 0/1."""
    return -(targets.float() * F.logsigmoid(sums)).sum() / targets.size(0)


def infusion_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KECRS's infusion loss: the squared error between infusion_scores [B, vocab] and the 0/1 names of the
    context's entities [B, vocab], summed over the vocabulary, averaged over the batch (rows without a name: 0)."""
    has_targets = targets.any(dim=1)
    per_row = ((scores.float() - targets.float()) ** 2).sum(dim=1)
    return (per_row * has_targets).sum() / targets.size(0)


class ConversationModel(nn.Module):
    """C2-CRS's encoders (models/c2crs.py: conversation F, R-GCN N, review E) feeding the response generator.

    The encoders read the conversation vocabulary; the generator writes an output vocabulary that adds one movie
    placeholder, which every movie token ("@123") of a response becomes (the recommender fills it when a response
    is shown). A copied movie token becomes the placeholder too. `frozen` encoders get no gradient and run without
    autograd (cheaper on CPU).

    KBRD's and KECRS's generators (generator.cfg.user_bias_dim, entity_bag): the encoders are their recommender's;
    the user vector pools the context entities' rows of N (the batch's, or KECRS's entity_bag.entities: the frozen
    R-GCN's outputs for every entity) as that recommender does.

    KGSF's generator: `kgsf` (its trained recommender) gives the entities (its R-GCN) and the ConceptNet words (its
    word GCN over word_graph = (edges [2, E], the word id of each input token [n_in], -1 for none)), and, pooled by
    its self-attention, the user vectors of the vocabulary bias; the history is the encoders' conversation encoder.
    """

    def __init__(
        self,
        encoders: C2CRS,
        generator: ResponseGenerator,
        movie_token_ids: list[int],
        uncopyable_ids: list[int],
        frozen: tuple[str, ...] = (),
        kgsf: KGSFRecommender | None = None,
        word_graph: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.encoders, self.generator, self.kgsf = encoders, generator, kgsf
        needs_kgsf = "word" in generator.cfg.memory_dims or generator.cfg.vocabulary_bias_dim
        if needs_kgsf and (kgsf is None or word_graph is None):
            raise ValueError("the word memory and the vocabulary bias need KGSF's recommender and its word graph")
        n_in = encoders.cfg.vocab_size
        self.placeholder_id = generator.cfg.vocab_size - 1
        if self.placeholder_id != n_in:
            raise ValueError(
                f"the output vocabulary ({generator.cfg.vocab_size}) must be the input vocabulary "
                f"({n_in}) plus the movie placeholder"
            )
        to_output = torch.arange(n_in)
        to_output[torch.as_tensor(movie_token_ids, dtype=torch.long)] = self.placeholder_id
        uncopyable = torch.zeros(n_in, dtype=torch.bool)
        uncopyable[torch.as_tensor(uncopyable_ids, dtype=torch.long)] = True
        self.register_buffer("to_output", to_output)
        self.register_buffer("uncopyable", uncopyable)
        if kgsf is not None and word_graph is not None:
            word_edges, token_word = word_graph
            if token_word.shape != (n_in,):
                raise ValueError(f"word_graph: {tuple(token_word.shape)} token words for {n_in} input tokens")
            self.register_buffer("word_edges", word_edges.long())
            self.register_buffer("token_word", token_word.long())
            if generator.cfg.vocabulary_bias_dim:
                generator.vocabulary_bias.tokens[:n_in] = token_word >= 0
        self.frozen = tuple(frozen)
        for name in self.frozen:
            self._encoder(name).requires_grad_(False)

    def _encoder(self, name: str) -> nn.Module:
        if name == "history":
            return self.encoders.conversation_encoder
        if name == "review":
            return nn.ModuleList([self.encoders.review_encoder, self.encoders.sentence_pooling])
        if self.kgsf is None:
            if name == "word":
                raise ValueError("the word encoder is KGSF's: this model has none")
            return self.encoders.kg_encoder
        return (
            nn.ModuleList([self.kgsf.kg_encoder, self.kgsf.entity_pooling])
            if name == "kg"
            else nn.ModuleList([self.kgsf.words, self.kgsf.word_gcn, self.kgsf.word_pooling])
        )

    def _run(self, name: str, fn, *args):
        if name in self.frozen:
            module = self._encoder(name)
            was_training = module.training
            module.eval()
            with torch.no_grad():
                out = fn(*args)
            module.train(was_training)
            return out
        return fn(*args)

    def entity_rows(self, nodes: torch.Tensor, edge_index: torch.Tensor, edge_type: torch.Tensor) -> torch.Tensor:
        """N for the given entities only (KGEncoder.forward_nodes): a batch needs a few hundred of ~60k."""
        kg_encoder = self.encoders.kg_encoder if self.kgsf is None else self.kgsf.kg_encoder
        return self._run("kg", kg_encoder.forward_nodes, nodes, edge_index, edge_type)

    def encode_sentences(self, sentence_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Review sentences [S, Ls] -> token states [S, Ls, d] and sentence vectors E [S, d]."""

        def encode(ids):
            states, pad = self.encoders.review_encoder(ids)
            return states, self.encoders.sentence_pooling(states, pad)

        return self._run("review", encode, sentence_ids)

    def word_states(self) -> torch.Tensor:
        """KGSF's W: its word embeddings after the word GCN, over the whole word graph -> [n_words, d]."""
        return self._run("word", self.kgsf.word_states, self.word_edges)

    def encode_context(self, context_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context tokens [B, L] -> the conversation encoder's states F [B, L, d] and padding mask [B, L]."""
        return self._run("history", self.encoders.conversation_encoder, context_ids)

    def memories(
        self,
        context_ids: torch.Tensor,
        entity_rows: torch.Tensor | None,
        entity_ids: torch.Tensor,
        sentence_ids: torch.Tensor,
        sentence_mask: torch.Tensor,
        review_states: tuple[torch.Tensor, torch.Tensor] | None = None,
        history_states: torch.Tensor | None = None,
        word_states: torch.Tensor | None = None,
    ) -> tuple[dict[str, Memory], CopySource | None]:
        """Eq. 10's memories for a batch, and the copy source (context tokens, then review sentence tokens).

        context_ids [B, L]; entity_rows = N for the batch's entities (KGEncoder.forward_nodes) with entity_ids
        [B, E] indexing it (-1 padding); sentence_ids [B, K, Ls] with sentence_mask [B, K] (True = real);
        review_states: their (token states [B, R, d] laid out as review_token_order, vectors [B, K, d]) when the
        caller has them already (a frozen review encoder's outputs never change: stages/training/conv_train.
        FrozenReviews); history_states:
        the conversation encoder's states [B, L, d] for context_ids, likewise (conv_train.FrozenHistory);
        word_states: KGSF's W (self.word_states()), likewise when its word encoder is frozen.
        """
        wanted = self.generator.cfg.memory_dims
        memories, sources = {}, []
        if history_states is None:
            F_, context_pad = self.encode_context(context_ids)
        else:
            F_, context_pad = history_states, context_ids.eq(self.encoders.cfg.pad_id)
        if "history" in wanted:
            memories["history"] = Memory(F_, context_pad)
        sources.append((F_, context_ids))
        if "kg" in wanted:
            pad = entity_ids < 0
            memories["kg"] = Memory(entity_rows[entity_ids.clamp(min=0)].masked_fill(pad[..., None], 0.0), pad)
        if "word" in wanted or self.generator.cfg.vocabulary_bias_dim:
            W = self.word_states() if word_states is None else word_states
            memories.update(self._kgsf_memories(context_ids, entity_rows, entity_ids, W))
        if self.generator.cfg.entity_bag or self.generator.cfg.user_bias_dim:
            # KECRS and KBRD: their recommender's user vector (N: the batch's rows, else KECRS's bag of all rows)
            N = entity_rows if entity_rows is not None else self.generator.entity_bag.entities
            user = self._run("kg", self.encoders.user_vector, N, entity_ids)[:, None]
            memories[USER] = Memory(user, user.new_zeros(user.shape[:2], dtype=torch.bool))
        if "review" in wanted:
            B, K, Ls = sentence_ids.shape
            tokens = sentence_ids.view(B, K * Ls)
            order = review_token_order(tokens, self.encoders.cfg.pad_id)
            if review_states is not None:
                H, E = (x.to(F_.dtype) for x in review_states)
            else:
                H = sentence_ids.new_zeros((B, K, Ls, self.encoders.cfg.token_dim), dtype=F_.dtype)
                E = sentence_ids.new_zeros((B, K, self.encoders.cfg.token_dim), dtype=F_.dtype)
                if sentence_mask.any():
                    states, vectors = self.encode_sentences(sentence_ids[sentence_mask])
                    where = sentence_mask.nonzero(as_tuple=True)
                    H, E = H.index_put(where, states.to(H.dtype)), E.index_put(where, vectors.to(E.dtype))
                H = H.view(B, K * Ls, -1).gather(1, order[..., None].expand(-1, -1, H.size(-1)))
            memories["review"] = Memory(E, ~sentence_mask)
            sources.append((H, tokens.gather(1, order)))
        if not self.generator.cfg.copy:
            return memories, None
        states = torch.cat([s for s, _ in sources], dim=1)
        ids = torch.cat([i for _, i in sources], dim=1)
        return memories, CopySource(states=states, ids=self.to_output[ids], blocked=self.uncopyable[ids])

    def _kgsf_memories(
        self, context_ids: torch.Tensor, entity_rows: torch.Tensor, entity_ids: torch.Tensor, W: torch.Tensor
    ) -> dict[str, Memory]:
        """KGSF's word memory (the graph words of the context's tokens, after the word GCN) and, for the
        vocabulary bias, the user's entity and word vectors [B, 1, 2d] (as KGSF's recommender pools them)."""
        word_ids = self.token_word[context_ids]
        pad = word_ids < 0
        out = {}
        if "word" in self.generator.cfg.memory_dims:
            out["word"] = Memory(W[word_ids.clamp(min=0)].masked_fill(pad[..., None], 0.0), pad)
        if self.generator.cfg.vocabulary_bias_dim:
            e = self._run("kg", self.kgsf.entity_pooling, entity_rows[entity_ids.clamp(min=0)], entity_ids < 0)
            w = self._run("word", self.kgsf.word_pooling, W[word_ids.clamp(min=0)], pad)
            vectors = torch.cat([e, w], dim=-1)[:, None]
            out[USER] = Memory(vectors, vectors.new_zeros(vectors.shape[:2], dtype=torch.bool))
        return out


__all__ = [
    "ConversationModel",
    "MEMORIES",
    "USER",
    "GeneratorConfig",
    "Memory",
    "CopySource",
    "Attention",
    "DecoderLayer",
    "ResponseGenerator",
    "review_token_order",
    "instance_weights",
    "generation_loss",
    "bag_of_entity_loss",
    "infusion_loss",
]
