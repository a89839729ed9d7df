"""C2-CRS (Zhou et al., WSDM 2022): the three context encoders, the coarse-to-fine contrastive losses, the recommender.

Over 400 lines on purpose: one model file, as nanoGPT: the views, the losses, the KG encoders and the recommender read
top to bottom against the paper map below.

Paper map:
    Eq. 1-2   conversation view   TokenEncoder + SelfAttentivePooling          -> e_C, F
    Eq. 3     graph view          KGEncoder (entity table + basis R-GCN)       -> N, then pooling -> e_G
                                  or FeaturelessRGCN (the reference code's parameterisation)
    4.1.3     review view         TokenEncoder per sentence + pooling -> E, sentence-level pooling -> e_R
    Eq. 4-5   coarse_contrastive_loss   InfoNCE over (e_C,e_G), (e_C,e_R), (e_G,e_R)
    Eq. 6     fine_contrastive_loss     InfoNCE over (F_j,N_e), (F_j,E_k), (N_e,E_k) triples
    Eq. 7     pretraining_loss          fine + lambda * coarse
    Eq. 8-9   recommendation_logits / recommendation_loss

Entity ids: items are entities 0..n_items-1, so N[:n_items] are the item embeddings n_i of Eq. 8.
Everything takes tensors; nothing here knows about files or experiment tracking.

Where the paper leaves a choice open, C2CRSConfig has a switch whose other value is what the authors' released code
does (docs/design.md, "The authors' released code"): kg_encoder, rec_pooling, item_bias, projection_heads,
contrastive_loss. The defaults are this project's choices; `params/reference.yaml` sets the reference's.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import RGCNConv
from torch_geometric.nn.inits import glorot

from models.dropout import Dropout, use_cheap_dropout


@dataclass
class C2CRSConfig:
    """Every size and switch comes from params.yaml's `model` section and the data (stages/training/runs.py:
    training_run); nothing has a default here."""

    vocab_size: int
    n_entities: int
    n_relations: int
    n_items: int  # items are entity ids 0..n_items-1
    pad_id: int
    token_dim: int
    kg_dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    dropout: float
    attention_dropout: float  # the reference's 0 lets CPU and GPU use the fused attention kernel
    num_bases: int
    projection_dim: int
    temperature: float  # of the contrastive losses; each pre-training stage sets its own (pretrain_*.temperature)
    max_positions: int  # contexts are left-truncated to <= 256 tokens, review sentences to <= 40
    # Eq. 8 has no bias; the reference code adds a per-entity bias (a learned popularity prior). Off = the paper.
    item_bias: bool
    # "table": an entity embedding table fed to a basis R-GCN (ours); "featureless": the reference's R-GCN with
    # x=None, whose basis tables are indexed by entity (num_bases x n_entities x kg_dim parameters).
    kg_encoder: str
    # The recommender's user vector: "own" self-attention, fresh at fine-tuning (paper 4.3.1 as we read it), or
    # "graph": the graph view's pooling that pre-training trained (the reference code's kg_attn).
    rec_pooling: str
    # "per_view": one projection head per view, shared by the coarse and the fine loss; "per_view_and_level": six,
    # user-level and unit-level per view (the reference).
    projection_heads: str
    # "cross_view": InfoNCE with the other view's B rows as candidates; "nt_xent": SimCLR's 2B-1 candidates, the
    # same view's other rows included (the reference).
    contrastive_loss: str

    def __post_init__(self):
        allowed = {
            "kg_encoder": ("table", "featureless"),
            "rec_pooling": ("own", "graph"),
            "projection_heads": ("per_view", "per_view_and_level"),
            "contrastive_loss": ("cross_view", "nt_xent"),
        }
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ValueError(f"C2CRSConfig.{name} must be one of {values}, got {getattr(self, name)!r}")


class SelfAttentivePooling(nn.Module):
    """Eq. 2: e = F . softmax(b^T tanh(W F)), a learned weighted average of the rows of F.

    mask is True at padding. A row with nothing to pool (e.g. a turn with no linked entity) gives a zero vector:
    its softmax is computed unmasked and then zeroed, so neither the output nor the gradient contains NaN.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)  # W_sa
        self.score = nn.Linear(dim, 1, bias=False)  # b

    def weights(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The softmax weight of each row of x [B, L, dim] in its pooled vector: [B, L], 0 at padding."""
        scores = self.score(torch.tanh(self.proj(x))).squeeze(-1)  # [B, L]
        empty = mask.all(dim=-1, keepdim=True)  # [B, 1]
        weights = torch.softmax(scores.masked_fill(mask & ~empty, float("-inf")), dim=-1)
        return weights.masked_fill(empty, 0.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bl,bld->bd", self.weights(x, mask), x)


class EncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer (same parameters, state-dict names and eval fast path) whose self-attention block
    splits the packed q/k/v projection with views and calls scaled_dot_product_attention itself. nn.MultiheadAttention
    copies the packed projection into three tensors and zero-fills and copies them back in the backward pass: 14 % of
    a layer's training step on CPU (batch 128 x 120 tokens, dim 128). Same math; batch_first only."""

    def _sa_block(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        attention = self.self_attn
        if attn_mask is not None or is_causal or not attention.batch_first:
            return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)
        B, L, D = x.shape
        heads = attention.num_heads
        q, k, v = (
            F.linear(x, attention.in_proj_weight, attention.in_proj_bias)
            .view(B, L, 3, heads, D // heads)
            .permute(2, 0, 3, 1, 4)
        )
        # key_padding_mask arrives as an additive float mask (-inf at padding) from the layer's forward
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :].to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=attention.dropout if self.training else 0.0
        )
        return self.dropout1(attention.out_proj(out.transpose(1, 2).reshape(B, L, D)))


class TokenEncoder(nn.Module):
    """Eq. 1: token embedding + learned positions + a standard post-norm Transformer encoder -> F [B, L, D].

    Instantiated twice with separate parameters: the conversation encoder and the review sentence encoder (4.1.3).
    """

    def __init__(self, cfg: C2CRSConfig):
        super().__init__()
        self.pad_id = cfg.pad_id
        self.max_positions = cfg.max_positions
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.token_dim, padding_idx=cfg.pad_id)
        self.positions = nn.Embedding(cfg.max_positions, cfg.token_dim)
        nn.init.normal_(self.tokens.weight, std=cfg.token_dim**-0.5)
        nn.init.normal_(self.positions.weight, std=cfg.token_dim**-0.5)
        with torch.no_grad():
            self.tokens.weight[cfg.pad_id].zero_()
        self.dropout = Dropout(cfg.dropout)
        layer = EncoderLayer(
            d_model=cfg.token_dim,
            nhead=cfg.n_heads,
            dim_feedforward=cfg.ffn_dim,
            dropout=cfg.dropout,
            batch_first=True,
        )
        layer.self_attn.dropout = cfg.attention_dropout  # the layer's other dropouts stay cfg.dropout
        self.transformer = use_cheap_dropout(
            nn.TransformerEncoder(layer, num_layers=cfg.n_layers, enable_nested_tensor=False)
        )

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L] -> (F [B, L, D], padding mask [B, L], True at pad)."""
        B, L = ids.shape
        if L > self.max_positions:
            raise ValueError(f"sequence length {L} > max_positions {self.max_positions}: truncate before encoding")
        pad = ids.eq(self.pad_id)
        # Trailing columns that are padding in every row change nothing (keys are masked, positions count from the
        # left), so drop them: right-padded batches then cost only their longest row.
        used = (~pad).any(dim=0).nonzero()
        length = int(used[-1]) + 1 if used.numel() else 1
        ids_, pad_ = ids[:, :length], pad[:, :length]
        # An all-padding row would make attention softmax over nothing (NaN); let it attend to its first slot.
        # Poolers still see the true mask, so such a row pools to zeros.
        attn_pad = pad_.clone()
        attn_pad[:, 0] &= ~pad_.all(dim=1)
        x = self.tokens(ids_) + self.positions(torch.arange(length, device=ids.device))
        x = self.transformer(self.dropout(x), src_key_padding_mask=attn_pad)
        if length < L:
            x = F.pad(x, (0, 0, 0, L - length))
        return x, pad


class KGEncoder(nn.Module):
    """Eq. 3: a learned entity table (no one-hot features) + one basis-decomposed R-GCN layer -> N.

    RGCNConv's mean aggregation per relation is the 1/Z_{e,r} of Eq. 3, its root weight is W n_e; self loops are
    relations in the given graph already. Like the reference code (KGSF, C2-CRS) there is no nonlinearity after the
    single layer: N is used directly in dot products for recommendation (Eq. 8), where a ReLU would clamp scores.
    """

    def __init__(self, n_entities: int, n_relations: int, dim: int, num_bases: int):
        super().__init__()
        self.entities = nn.Embedding(n_entities, dim)
        nn.init.normal_(self.entities.weight, std=dim**-0.5)
        self.rgcn = RGCNConv(dim, dim, n_relations, num_bases=num_bases)

    def forward(self, edge_index: torch.Tensor, edge_type: torch.Tensor) -> torch.Tensor:
        """The whole graph: edge_index [2, E] (source, target), edge_type [E] -> N [n_entities, kg_dim]."""
        return self.rgcn(self.entities.weight, edge_index, edge_type)

    def forward_nodes(self, nodes: torch.Tensor, edge_index: torch.Tensor, edge_type: torch.Tensor) -> torch.Tensor:
        """Only the rows N[nodes], computed on the 1-hop in-neighbourhood of `nodes`; equals forward(...)[nodes].

        One R-GCN layer reads a node's own row and its in-neighbours' rows, and the per-relation mean only counts
        edges into that node, so keeping the edges whose target is in `nodes` is exact. This is the CPU speed
        lever: a batch touches a few hundred entities of ~60k (and recommendation every item). With RGCNConv's own
        weights, the mean is taken per (target, relation) pair that has an edge and only those pairs are
        multiplied by W_r: RGCNConv multiplies every target row by every relation's W_r (69 of them), which made
        this layer 85 % of a fine-tuning step.
        """
        conv = self.rgcn
        targets, inverse = torch.unique(nodes, return_inverse=True)
        keep = edges_into(targets, edge_index, self.entities.weight.size(0))
        src, rel = edge_index[0, keep], edge_type[keep]
        dst = torch.searchsorted(targets, edge_index[1, keep])
        # One gather of the entity rows the layer reads (sources, then targets): its backward zero-fills a gradient
        # of the whole entity table, once per call instead of once per gather. split, not slicing: a slice's backward
        # zero-fills the whole gathered block (a hundred MB when every item is a target), split's concatenates
        # (index_select: faster than indexing with [] for these ~80k rows, 73 vs 117 ms forward on one core)
        x = self.entities.weight.index_select(0, torch.cat([src, targets]))
        x_src, x_targets = x.split([len(src), len(targets)])
        # (relation, target) pairs, grouped by relation: one contiguous block of rows per W_r
        pairs, pair_of_edge, count = torch.unique(rel * len(targets) + dst, return_inverse=True, return_counts=True)
        mean = x.new_zeros(len(pairs), x.size(1)).index_add(0, pair_of_edge, x_src).div_(count[:, None].to(x.dtype))
        relations, per_relation = torch.unique_consecutive(pairs // len(targets), return_counts=True)
        weight = (conv.comp @ conv.weight.view(conv.num_bases, -1)).view(conv.num_relations, *conv.weight.shape[1:])
        # unbind: one view per relation whose backward stacks the gradients once; weight[r] per relation would
        # zero-fill a whole [relations, dim, dim] gradient for each relation used (about 100 a step)
        per_relation_weight = weight.unbind(0)
        messages = [
            block @ per_relation_weight[r] for block, r in zip(mean.split(per_relation.tolist()), relations.tolist())
        ]
        out = x_targets @ conv.root + conv.bias
        if messages:
            out = out.index_add(0, pairs % len(targets), torch.cat(messages).to(out.dtype))  # bf16 autocast: float32
        return out[inverse]


class FeaturelessRGCN(nn.Module):
    """The reference code's KG encoder: one basis R-GCN layer with no input features (PyG RGCNConv with x=None).

    With x=None the layer's weights are indexed by entity: relation r's message from entity j is
    W_r[j] = sum_b comp[r, b] * basis[b, j], so each entity owns num_bases rows plus its root row. PyG builds W_r for
    every relation and entity at once (n_relations x n_entities x kg_dim floats, ~2 GB here); this layer builds only
    the rows W_r[j] of the (source, relation) pairs that the wanted targets read, and gives the same N (mean over
    each relation's in-edges, plus root and bias, as RGCNConv's defaults).
    """

    def __init__(self, n_entities: int, n_relations: int, dim: int, num_bases: int):
        super().__init__()
        self.n_relations = n_relations
        self.basis = nn.Parameter(torch.empty(num_bases, n_entities, dim))
        self.comp = nn.Parameter(torch.empty(n_relations, num_bases))
        self.root = nn.Parameter(torch.empty(n_entities, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        for weight in (self.basis, self.comp, self.root):
            glorot(weight)

    def forward(self, edge_index: torch.Tensor, edge_type: torch.Tensor) -> torch.Tensor:
        return self.forward_nodes(torch.arange(self.root.size(0), device=edge_index.device), edge_index, edge_type)

    def forward_nodes(self, nodes: torch.Tensor, edge_index: torch.Tensor, edge_type: torch.Tensor) -> torch.Tensor:
        targets, inverse = torch.unique(nodes, return_inverse=True)
        keep = edges_into(targets, edge_index, self.root.size(0))
        src, rel = edge_index[0, keep], edge_type[keep]
        dst = torch.searchsorted(targets, edge_index[1, keep])
        # 1 / Z_{e,r}: the number of edges of relation r into each target
        _, group, count = torch.unique(dst * self.n_relations + rel, return_inverse=True, return_counts=True)
        norm = (1.0 / count.to(self.root.dtype))[group]
        # W_r[j] once per distinct (source j, relation r) pair, from one gather of the basis rows: one gather (one
        # scatter into the basis gradient) per step instead of one per relation, which cost 12 s a backward here
        pairs, pair_of_edge = torch.unique(src * self.n_relations + rel, return_inverse=True)
        pair_source, pair_relation = pairs // self.n_relations, pairs % self.n_relations
        rows = torch.einsum("pb,bpd->pd", self.comp[pair_relation], self.basis.index_select(1, pair_source))
        out = self.root[targets] + self.bias
        return out.index_add(0, dst, rows[pair_of_edge] * norm[:, None])[inverse]


def edges_into(targets: torch.Tensor, edge_index: torch.Tensor, n_entities: int) -> torch.Tensor:
    """A mask [E] of the edges whose target is one of `targets`: torch.isin(edge_index[1], targets) through a
    lookup table, since isin sorts all ~350k edges each call (20 ms, a step's largest single op in pre-training)."""
    wanted = torch.zeros(n_entities, dtype=torch.bool, device=edge_index.device)
    wanted[targets] = True
    return wanted[edge_index[1]]


def build_kg_encoder(cfg: "C2CRSConfig") -> nn.Module:
    encoder = FeaturelessRGCN if cfg.kg_encoder == "featureless" else KGEncoder
    return encoder(cfg.n_entities, cfg.n_relations, cfg.kg_dim, cfg.num_bases)


def batch_entities(*entity_ids: torch.Tensor, n_items: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The entities a batch needs and its id tensors renumbered into that list (for KGEncoder.forward_nodes).

    Returns (nodes, remapped): nodes = sorted unique valid ids (>= 0) of all given tensors, plus 0..n_items-1 if
    n_items > 0; remapped = each input with ids replaced by their row in `nodes` (-1 padding stays -1). Because the
    items are the smallest ids, N_sub = kg.forward_nodes(nodes, ...) keeps the layout of the full N: the items are
    N_sub[:n_items], so graph_view / recommendation_logits take (N_sub, remapped) exactly like (N, ids).
    """
    valid = [ids[ids >= 0] for ids in entity_ids]
    if n_items > 0:
        valid.append(torch.arange(n_items, device=entity_ids[0].device if entity_ids else None))
    nodes = torch.unique(torch.cat(valid)) if valid else torch.empty(0, dtype=torch.long)
    if nodes.numel() == 0:  # a batch without any entity still needs one row to gather (and then mask) from
        nodes = torch.zeros(1, dtype=torch.long, device=nodes.device)
    remapped = [torch.where(ids >= 0, torch.searchsorted(nodes, ids.clamp(min=0)), ids) for ids in entity_ids]
    return nodes, remapped


def projection_head(dim: int, out_dim: int) -> nn.Module:
    """2-layer MLP to the shared contrastive space (as the reference code), one per view."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out_dim))


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
    not_negative: torch.Tensor | None = None,
    same_view_negatives: bool = False,
) -> torch.Tensor:
    """Eq. 5 with cosine similarity and in-batch negatives, averaged over rows: row i of a should pick row i of b.

    valid [B] bool drops rows and columns where a view is missing (e.g. a user with no review sentence).
    not_negative [B, B] bool removes (i, j) from row i's denominator (false negatives: the same entity or sentence
    in two rows); the diagonal is never removed. Fewer than 2 valid rows -> 0 that still has a grad graph.
    same_view_negatives: SimCLR's NT-Xent (the reference code): both directions, each row's candidates are the
    2B-1 other rows of [a; b], its own view's included.
    """
    if valid is not None:
        a, b = a[valid], b[valid]
        if not_negative is not None:
            not_negative = not_negative[valid][:, valid]
    n = a.size(0)
    if n < 2:
        return (a.sum() + b.sum()) * 0.0
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    if not same_view_negatives:
        logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
        if not_negative is not None:
            logits = logits.masked_fill(not_negative & ~eye, float("-inf"))
        return F.cross_entropy(logits, torch.arange(n, device=a.device))
    z = F.normalize(torch.cat([a, b]), dim=-1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=a.device), float("-inf"))
    if not_negative is not None:
        excluded = (not_negative & ~eye).repeat(2, 2)
        excluded[torch.arange(2 * n), torch.arange(2 * n).roll(n)] = False  # the positive stays
        logits = logits.masked_fill(excluded, float("-inf"))
    return F.cross_entropy(logits, torch.arange(2 * n, device=a.device).roll(n))


class C2CRS(nn.Module):
    """The three views (conversation, graph, review), their projection heads, the losses and the recommender.

    The KBRD-style baseline is this class's recommender without pre-training (use recommendation_logits only).
    """

    def __init__(self, cfg: C2CRSConfig):
        super().__init__()
        self.cfg = cfg
        self.conversation_encoder = TokenEncoder(cfg)
        self.conversation_pooling = SelfAttentivePooling(cfg.token_dim)
        self.kg_encoder = build_kg_encoder(cfg)
        self.graph_pooling = SelfAttentivePooling(cfg.kg_dim)
        self.review_encoder = TokenEncoder(cfg)  # separate parameters from the conversation encoder (4.1.3)
        self.sentence_pooling = SelfAttentivePooling(cfg.token_dim)  # tokens -> one sentence vector
        self.review_pooling = SelfAttentivePooling(cfg.token_dim)  # a user's sentences -> e_R (noise filter)
        dims = {"conversation": cfg.token_dim, "graph": cfg.kg_dim, "review": cfg.token_dim}
        self.projection = nn.ModuleDict({view: projection_head(dim, cfg.projection_dim) for view, dim in dims.items()})
        # The fine (unit-level) loss's heads: the same as the coarse loss's, or their own (the reference's six).
        self.unit_projection = (
            nn.ModuleDict({view: projection_head(dim, cfg.projection_dim) for view, dim in dims.items()})
            if cfg.projection_heads == "per_view_and_level"
            else None
        )
        # 4.3.1's "self-attentive mechanism as in Eq. 2": its own (fresh at fine-tuning), or the graph view's
        self.user_pooling = SelfAttentivePooling(cfg.kg_dim) if cfg.rec_pooling == "own" else None
        # a learned popularity prior, per entity (softmax over all entities in training uses every row)
        self.item_bias = nn.Parameter(torch.zeros(cfg.n_entities)) if cfg.item_bias else None

    # ---- views (4.1) -------------------------------------------------------------------------------------------
    def conversation_view(self, context_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context_ids [B, L] -> (e_C [B, token_dim], F [B, L, token_dim]) (Eq. 1-2)."""
        F_, pad = self.conversation_encoder(context_ids)
        return self.conversation_pooling(F_, pad), F_

    def entity_graph(
        self, edge_index: torch.Tensor, edge_type: torch.Tensor, nodes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """N for the whole graph, or only N[nodes] (see batch_entities for the matching id renumbering)."""
        if nodes is None:
            return self.kg_encoder(edge_index, edge_type)
        return self.kg_encoder.forward_nodes(nodes, edge_index, edge_type)

    def graph_view(self, N: torch.Tensor, entity_ids: torch.Tensor) -> torch.Tensor:
        """Self-attentive pooling over the context entities' rows of N: entity_ids [B, E] (-1 pad) -> e_G [B,
        kg_dim]."""
        return self.graph_pooling(N[entity_ids.clamp(min=0)], entity_ids < 0)

    def encode_sentences(self, sentence_ids: torch.Tensor, chunk: int = 128) -> torch.Tensor:
        """Review sentences [S, Ls] -> sentence vectors [S, token_dim] (review Transformer + token pooling).

        Sorted by length and encoded `chunk` sentences at a time, each chunk padded only to its own longest (ReDial's
        review sentences average 25 tokens of at most 40): the same vectors for a third fewer token positions."""
        order = torch.argsort(sentence_ids.ne(self.cfg.pad_id).sum(1), stable=True)
        vectors = []
        for part in order.split(chunk):
            H, pad = self.review_encoder(sentence_ids[part])
            vectors.append(self.sentence_pooling(H, pad))
        return torch.cat(vectors)[torch.argsort(order)]

    def review_view(self, sentence_ids: torch.Tensor, sentence_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sentence_ids [B, K, Ls], sentence_mask [B, K] (True = real) -> (e_R [B, token_dim], E [B, K, token_dim]).

        Only the real sentences are encoded (flattened, then scattered back), so padding sentences cost nothing, and
        each distinct sentence once: users who talk about the same movies share sentences (a quarter of a
        pre-training batch's on ReDial).
        """
        B, K, _ = sentence_ids.shape
        E = sentence_ids.new_zeros((B, K, self.cfg.token_dim), dtype=self.review_pooling.proj.weight.dtype)
        if sentence_mask.any():
            distinct, where = torch.unique(sentence_ids[sentence_mask], dim=0, return_inverse=True)
            E = E.index_put(sentence_mask.nonzero(as_tuple=True), self.encode_sentences(distinct)[where].to(E.dtype))
        return self.review_document(E, sentence_mask), E

    def review_document(self, E: torch.Tensor, sentence_mask: torch.Tensor) -> torch.Tensor:
        """A user's sentence vectors E [B, K, token_dim] (sentence_mask [B, K], True = real) -> e_R [B, token_dim]."""
        return self.review_pooling(E, ~sentence_mask)

    # ---- contrastive pre-training (4.2) ---------------------------------------------------------------------------
    def coarse_contrastive_loss(
        self,
        e_C: torch.Tensor,
        e_G: torch.Tensor,
        e_R: torch.Tensor,
        valid_graph: torch.Tensor,
        valid_review: torch.Tensor,
        valid_conversation: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eq. 4: InfoNCE over (e_C,e_G), (e_C,e_R), (e_G,e_R) after projection; a pair uses rows valid in both
        views."""
        if valid_conversation is None:
            valid_conversation = torch.ones_like(valid_graph)
        c, g, r = self.projection["conversation"](e_C), self.projection["graph"](e_G), self.projection["review"](e_R)
        t, nt_xent = self.cfg.temperature, self.cfg.contrastive_loss == "nt_xent"
        return (
            info_nce(c, g, t, valid_conversation & valid_graph, same_view_negatives=nt_xent)
            + info_nce(c, r, t, valid_conversation & valid_review, same_view_negatives=nt_xent)
            + info_nce(g, r, t, valid_graph & valid_review, same_view_negatives=nt_xent)
        )

    def fine_contrastive_loss(
        self,
        word_vectors: torch.Tensor,
        entity_vectors: torch.Tensor,
        sentence_vectors: torch.Tensor,
        entity_ids: torch.Tensor,
        sentence_ids: torch.Tensor,
        use_words: bool = True,
    ) -> torch.Tensor:
        """Eq. 6 over aligned triples: row t is (F_j, N_e, E_k) = (word_vectors[t], entity_vectors[t],
        sentence_vectors[t]).

        Build the rows as F[sample, token_position], N[entity], encode_sentences(sentence tokens).
        entity_ids / sentence_ids [T] identify each row's entity and sentence (sentence -1 = the entity has none;
        such rows take part only in the word-entity pair; use_words=False drops both pairs with a word, for the
        ablation without conversation history). In-batch negatives, except that two rows sharing an entity
        or a sentence are not negatives of each other: the same entity appears in many turns, so its N_e (and its
        sentence E_k) would otherwise be pushed away from itself.
        """
        same_unit = (entity_ids[:, None] == entity_ids[None, :]) | (
            (sentence_ids[:, None] == sentence_ids[None, :]) & (sentence_ids[:, None] >= 0)
        )
        has_sentence = sentence_ids >= 0
        heads = self.unit_projection if self.unit_projection is not None else self.projection
        w, n, s = heads["conversation"](word_vectors), heads["graph"](entity_vectors), heads["review"](sentence_vectors)
        t, nt_xent = self.cfg.temperature, self.cfg.contrastive_loss == "nt_xent"
        if not use_words:
            return info_nce(n, s, t, has_sentence, same_unit, nt_xent)
        return (
            info_nce(w, n, t, None, same_unit, nt_xent)
            + info_nce(w, s, t, has_sentence, same_unit, nt_xent)
            + info_nce(n, s, t, has_sentence, same_unit, nt_xent)
        )

    @staticmethod
    def pretraining_loss(fine: torch.Tensor, coarse: torch.Tensor, coarse_weight: float) -> torch.Tensor:
        """Eq. 7: L = L_fine + lambda * L_coarse (lambda = 0.2 in the reference scripts)."""
        return fine + coarse_weight * coarse

    # ---- recommender (4.3.1) ----------------------------------------------------------------------------------
    def user_vector(self, N: torch.Tensor, entity_ids: torch.Tensor) -> torch.Tensor:
        """e_u: self-attentive pooling over the context entities' rows of N. No entities -> zeros."""
        return self._recommender_pooling(N[entity_ids.clamp(min=0)], entity_ids < 0)

    def user_pooling_weights(self, N: torch.Tensor, entity_ids: torch.Tensor) -> torch.Tensor:
        """How much each context entity counts in e_u: [B, E] softmax weights, 0 at padding (-1) (an explanation)."""
        return self._recommender_pooling.weights(N[entity_ids.clamp(min=0)], entity_ids < 0)

    @property
    def _recommender_pooling(self) -> SelfAttentivePooling:
        return self.user_pooling if self.user_pooling is not None else self.graph_pooling

    def recommendation_logits(
        self, N: torch.Tensor, entity_ids: torch.Tensor, all_entities: bool = False
    ) -> torch.Tensor:
        """Eq. 8 before the softmax: e_u . n_i (+ bias_i) for every item -> [B, n_items], or for every row of N
        (all_entities, the reference's training softmax; N must then be the whole graph's)."""
        candidates = N if all_entities else N[: self.cfg.n_items]
        logits = self.user_vector(N, entity_ids) @ candidates.T
        return logits + self.item_bias[: len(candidates)] if self.item_bias is not None else logits

    @staticmethod
    def recommendation_loss(logits: torch.Tensor, target_items: torch.Tensor) -> torch.Tensor:
        """Eq. 9: cross-entropy with one ground-truth item per row (mean over rows)."""
        return F.cross_entropy(logits, target_items)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "C2CRSConfig",
    "SelfAttentivePooling",
    "TokenEncoder",
    "KGEncoder",
    "FeaturelessRGCN",
    "C2CRS",
    "batch_entities",
    "info_nce",
    "projection_head",
    "count_parameters",
]
