"""models/: shapes of every view, gradient flow per loss, InfoNCE by hand, masking, the R-GCN subgraph shortcut,
and that each trainable thing can fit a toy problem. Small sizes, CPU, a few seconds in all.

Over 400 lines: one tiny configuration and graph serve every model test; split, each file would rebuild them.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.baselines import TextCNNRecommender, popularity_scores
from models.c2crs import C2CRS, C2CRSConfig, KGEncoder, SelfAttentivePooling, TokenEncoder, batch_entities, info_nce
from tests.conftest import c2crs_config

B, L, K, LS, E_CTX = 4, 12, 3, 6, 3


def tiny_config(**overrides) -> C2CRSConfig:
    base = dict(
        vocab_size=50,
        n_entities=30,
        n_relations=5,
        n_items=10,
        token_dim=16,
        kg_dim=8,
        n_heads=2,
        ffn_dim=16,
        num_bases=2,
        projection_dim=8,
        max_positions=32,
        dropout=0.0,
        rec_pooling="own",  # Eq. 8 as printed: the recommender's own pooling, no item bias
        item_bias=False,
    )
    base.update(overrides)
    return c2crs_config(**base)


def random_graph(n_nodes: int, n_edges: int, n_relations: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, n_nodes, (2, n_edges), generator=g)
    edge_type = torch.randint(0, n_relations, (n_edges,), generator=g)
    return edge_index, edge_type


def tiny_batch(cfg: C2CRSConfig):
    torch.manual_seed(1)
    context = torch.randint(1, cfg.vocab_size, (B, L))
    context[0, 8:] = cfg.pad_id  # ragged row
    entities = torch.randint(0, cfg.n_entities, (B, E_CTX))
    entities[1, 1:] = -1
    entities[3, :] = -1  # no context entity
    sentences = torch.randint(1, cfg.vocab_size, (B, K, LS))
    sentence_mask = torch.ones(B, K, dtype=torch.bool)
    sentence_mask[0, 2] = False
    sentence_mask[2, :] = False  # no review sentence
    sentences[~sentence_mask] = cfg.pad_id
    return context, entities, sentences, sentence_mask


@pytest.fixture
def setup():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = C2CRS(cfg)
    edge_index, edge_type = random_graph(cfg.n_entities, 120, cfg.n_relations)
    return cfg, model, edge_index, edge_type, tiny_batch(cfg)


def grads_of(module) -> dict:
    return {name: p.grad for name, p in module.named_parameters()}


def assert_all_have_grad(module, label: str):
    for name, grad in grads_of(module).items():
        assert grad is not None, f"{label}.{name} got no gradient"
        assert torch.isfinite(grad).all(), f"{label}.{name} has a non-finite gradient"
        assert grad.abs().sum() > 0, f"{label}.{name} has an all-zero gradient"


# ---- views -------------------------------------------------------------------------------------------------------
def test_view_shapes_and_no_nan(setup):
    cfg, model, edge_index, edge_type, (context, entities, sentences, sentence_mask) = setup
    e_C, F_ = model.conversation_view(context)
    N = model.entity_graph(edge_index, edge_type)
    e_G = model.graph_view(N, entities)
    e_R, E = model.review_view(sentences, sentence_mask)
    assert e_C.shape == (B, cfg.token_dim) and F_.shape == (B, L, cfg.token_dim)
    assert N.shape == (cfg.n_entities, cfg.kg_dim)
    assert e_G.shape == (B, cfg.kg_dim)
    assert e_R.shape == (B, cfg.token_dim) and E.shape == (B, K, cfg.token_dim)
    for t in (e_C, F_, N, e_G, e_R, E):
        assert torch.isfinite(t).all()
    assert torch.equal(e_G[3], torch.zeros(cfg.kg_dim))  # no entities -> zeros
    assert torch.equal(e_R[2], torch.zeros(cfg.token_dim))  # no sentences -> zeros
    assert torch.equal(E[0, 2], torch.zeros(cfg.token_dim))  # padding sentence is never encoded


def test_trailing_padding_does_not_change_outputs(setup):
    cfg, model, *_ = setup
    model.eval()
    ids = torch.randint(1, cfg.vocab_size, (2, 5))
    padded = torch.cat([ids, torch.zeros(2, 7, dtype=torch.long)], dim=1)
    e1, F1 = model.conversation_view(ids)
    e2, F2 = model.conversation_view(padded)
    assert torch.allclose(e1, e2, atol=1e-5) and torch.allclose(F1, F2[:, :5], atol=1e-5)
    with pytest.raises(ValueError):
        model.conversation_view(torch.ones(1, cfg.max_positions + 1, dtype=torch.long))


def test_all_padding_context_gives_zero_vector(setup):
    cfg, model, *_ = setup
    e_C, F_ = model.conversation_view(torch.zeros(2, 6, dtype=torch.long))
    assert torch.isfinite(F_).all() and torch.equal(e_C, torch.zeros(2, cfg.token_dim))


def test_self_attentive_pooling_masking():
    torch.manual_seed(0)
    pool = SelfAttentivePooling(4)
    x = torch.randn(3, 5, 4, requires_grad=True)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 2:] = True
    mask[2, :] = True
    out = pool(x, mask)
    assert torch.equal(out[2], torch.zeros(4))
    # a masked position has no influence: row 1 equals pooling its first two positions alone
    assert torch.allclose(out[1], pool(x[1:2, :2], mask[1:2, :2])[0], atol=1e-6)
    # a single unmasked position is returned as is
    one = torch.ones(1, 5, dtype=torch.bool)
    one[0, 3] = False
    assert torch.allclose(pool(x[:1], one)[0], x[0, 3])
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in pool.parameters())
    assert torch.equal(x.grad[2], torch.zeros(5, 4))


# ---- KG encoder --------------------------------------------------------------------------------------------------
def test_kg_forward_nodes_equals_full_forward():
    torch.manual_seed(0)
    cfg = tiny_config(n_entities=60, n_relations=7, num_bases=3)
    kg = KGEncoder(cfg.n_entities, cfg.n_relations, cfg.kg_dim, cfg.num_bases)
    edge_index, edge_type = random_graph(60, 300, 7, seed=3)
    full = kg(edge_index, edge_type)
    nodes = torch.tensor([5, 0, 17, 5, 59, 33])  # unordered, with a duplicate
    part = kg.forward_nodes(nodes, edge_index, edge_type)
    assert part.shape == (len(nodes), cfg.kg_dim)
    assert torch.allclose(part, full[nodes], atol=1e-5)
    isolated = edge_index[1] != 42  # a node without in-edges: root weight + bias only
    assert torch.allclose(
        kg.forward_nodes(torch.tensor([42]), edge_index[:, isolated], edge_type[isolated]),
        kg(edge_index[:, isolated], edge_type[isolated])[42:43],
        atol=1e-5,
    )
    weights = torch.randn(len(nodes), cfg.kg_dim)  # and the same gradients for every weight
    grads = []
    for output in (lambda: kg(edge_index, edge_type)[nodes], lambda: kg.forward_nodes(nodes, edge_index, edge_type)):
        kg.zero_grad()
        (output() * weights).sum().backward()
        grads.append([p.grad.clone() for p in kg.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_batch_entities_keeps_item_layout(setup):
    cfg, model, edge_index, edge_type, (_, entities, *_) = setup
    entities = entities.clone()
    entities[0, 0] = 25  # a non-item entity
    nodes, (remapped,) = batch_entities(entities, n_items=cfg.n_items)
    assert torch.equal(nodes[: cfg.n_items], torch.arange(cfg.n_items))
    assert torch.equal(remapped < 0, entities < 0)
    assert torch.equal(nodes[remapped[entities >= 0]], entities[entities >= 0])
    none_nodes, (none_ids,) = batch_entities(torch.full((2, 3), -1))  # a batch without any entity
    e_G = model.graph_view(model.entity_graph(edge_index, edge_type, nodes=none_nodes), none_ids)
    assert torch.equal(e_G, torch.zeros(2, cfg.kg_dim))
    model.eval()
    N = model.entity_graph(edge_index, edge_type)
    N_sub = model.entity_graph(edge_index, edge_type, nodes=nodes)
    assert torch.allclose(model.graph_view(N_sub, remapped), model.graph_view(N, entities), atol=1e-5)
    assert torch.allclose(
        model.recommendation_logits(N_sub, remapped), model.recommendation_logits(N, entities), atol=1e-5
    )


# ---- InfoNCE -----------------------------------------------------------------------------------------------------
def test_info_nce_matches_hand_computation_2x2():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    t = 0.5
    # cosines: a0.b0 = 1/sqrt2, a0.b1 = 0, a1.b0 = 1/sqrt2, a1.b1 = 1
    c = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(c / t) / (math.exp(c / t) + math.exp(0 / t)))
    row1 = -math.log(math.exp(1 / t) / (math.exp(c / t) + math.exp(1 / t)))
    assert info_nce(a, b, t).item() == pytest.approx((row0 + row1) / 2, rel=1e-5)


def test_info_nce_matches_hand_computation_3x3_and_valid_mask():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 5.0]])
    t = 0.1
    cos = [[1.0, 1 / math.sqrt(2), 0.0], [0.0, 1 / math.sqrt(2), 1.0], [1 / math.sqrt(2), 1.0, 1 / math.sqrt(2)]]

    def row_loss(i, cols):
        return -cos[i][i] / t + math.log(sum(math.exp(cos[i][j] / t) for j in cols))

    expected = sum(row_loss(i, range(3)) for i in range(3)) / 3
    assert info_nce(a, b, t).item() == pytest.approx(expected, rel=1e-5)
    valid = torch.tensor([True, False, True])
    expected_valid = (row_loss(0, [0, 2]) + row_loss(2, [0, 2])) / 2
    assert info_nce(a, b, t, valid).item() == pytest.approx(expected_valid, rel=1e-5)
    # not_negative removes (0, 1) from row 0's denominator only
    not_negative = torch.zeros(3, 3, dtype=torch.bool)
    not_negative[0, 1] = True
    expected_nn = (row_loss(0, [0, 2]) + row_loss(1, range(3)) + row_loss(2, range(3))) / 3
    assert info_nce(a, b, t, not_negative=not_negative).item() == pytest.approx(expected_nn, rel=1e-5)


def test_info_nce_fewer_than_two_valid_rows_is_zero_with_grad():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True)
    loss = info_nce(a, b, 0.07, torch.tensor([False, True, False]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


def test_fine_loss_masks_duplicate_entities_and_sentences(setup):
    cfg, model, *_ = setup
    torch.manual_seed(2)
    words, ents, sents = torch.randn(4, cfg.token_dim), torch.randn(4, cfg.kg_dim), torch.randn(4, cfg.token_dim)
    entity_ids = torch.tensor([7, 7, 3, 4])
    sentence_ids = torch.tensor([1, 2, 5, 5])
    ents[1] = ents[0]  # the same entity gives the same N_e row
    sents[3] = sents[2]
    loss = model.fine_contrastive_loss(words, ents, sents, entity_ids, sentence_ids)
    same = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    w, n, s = (
        model.projection["conversation"](words),
        model.projection["graph"](ents),
        model.projection["review"](sents),
    )

    def by_hand(x, y):  # explicit per-row log-softmax over the allowed columns
        cos = F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T / cfg.temperature
        rows = [-(cos[i, i] - torch.logsumexp(cos[i][~same[i]], 0)) for i in range(4)]
        return torch.stack(rows).mean()

    expected = by_hand(w, n) + by_hand(w, s) + by_hand(n, s)
    assert torch.allclose(loss, expected, atol=1e-5)
    unmasked = info_nce(w, n, cfg.temperature) + info_nce(w, s, cfg.temperature) + info_nce(n, s, cfg.temperature)
    assert not torch.allclose(loss, unmasked)
    # a row without a sentence (-1) only joins the word-entity pair
    no_sentence = torch.tensor([1, 2, 5, -1])
    loss_ns = model.fine_contrastive_loss(words, ents, sents, entity_ids, no_sentence)
    assert torch.isfinite(loss_ns)


# ---- gradient flow -----------------------------------------------------------------------------------------------
def test_coarse_loss_reaches_every_view_parameter(setup):
    cfg, model, edge_index, edge_type, (context, entities, sentences, sentence_mask) = setup
    e_C, _ = model.conversation_view(context)
    N = model.entity_graph(edge_index, edge_type)
    e_G = model.graph_view(N, entities)
    e_R, _ = model.review_view(sentences, sentence_mask)
    loss = model.coarse_contrastive_loss(e_C, e_G, e_R, (entities >= 0).any(1), sentence_mask.any(1))
    assert torch.isfinite(loss)
    loss.backward()
    for name in (
        "conversation_encoder",
        "conversation_pooling",
        "kg_encoder",
        "graph_pooling",
        "review_encoder",
        "sentence_pooling",
        "review_pooling",
        "projection",
    ):
        assert_all_have_grad(getattr(model, name), name)
    assert model.user_pooling.proj.weight.grad is None  # the recommender is not part of pre-training
    touched = entities[entities >= 0].unique()
    assert (model.kg_encoder.entities.weight.grad[touched].abs().sum(1) > 0).all()
    assert (model.conversation_encoder.tokens.weight.grad[context[context > 0].unique()].abs().sum(1) > 0).all()
    assert (model.review_encoder.tokens.weight.grad[sentences[sentences > 0].unique()].abs().sum(1) > 0).all()


def test_fine_and_pretraining_loss_reach_their_parameters(setup):
    cfg, model, edge_index, edge_type, (context, entities, sentences, sentence_mask) = setup
    e_C, F_ = model.conversation_view(context)
    nodes, (ctx_local,) = batch_entities(entities)
    N = model.entity_graph(edge_index, edge_type, nodes=nodes)  # subgraph path must carry gradients too
    e_G = model.graph_view(N, ctx_local)
    e_R, _ = model.review_view(sentences, sentence_mask)
    coarse = model.coarse_contrastive_loss(e_C, e_G, e_R, (entities >= 0).any(1), sentence_mask.any(1))
    # triples: (sample, token position, entity row, sentence tokens)
    sample, position = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([1, 2, 3, 4, 5])
    entity_ids = torch.tensor([0, 1, 2, 0, 3])
    entity_rows = torch.tensor([ctx_local[0, 0], ctx_local[0, 1], ctx_local[0, 2], ctx_local[0, 0], ctx_local[1, 0]])
    sentence_tokens = sentences[1]  # [K, LS] -> 3 distinct sentences
    sentence_ids = torch.tensor([0, 1, 2, 0, 1])
    fine = model.fine_contrastive_loss(
        F_[sample, position],
        N[entity_rows],
        model.encode_sentences(sentence_tokens)[sentence_ids],
        entity_ids,
        sentence_ids,
    )
    loss = model.pretraining_loss(fine, coarse, 0.2)
    assert torch.allclose(loss, fine + 0.2 * coarse)
    loss.backward()
    for name in ("conversation_encoder", "kg_encoder", "review_encoder", "sentence_pooling", "projection"):
        assert_all_have_grad(getattr(model, name), name)


# ---- learning ----------------------------------------------------------------------------------------------------
def test_info_nce_pulls_positive_pairs_together():
    torch.manual_seed(0)
    n, d = 64, 16
    latent = torch.randn(n, d)
    x_view, y_view = latent @ torch.randn(d, d), latent @ torch.randn(d, d)  # two views of the same thing
    f, g = torch.nn.Linear(d, 8), torch.nn.Linear(d, 8)
    opt = torch.optim.Adam([*f.parameters(), *g.parameters()], lr=1e-2)

    def positive_minus_negative():
        with torch.no_grad():
            cos = F.normalize(f(x_view), dim=-1) @ F.normalize(g(y_view), dim=-1).T
            off = ~torch.eye(n, dtype=torch.bool)
            return (cos.diag().mean() - cos[off].mean()).item()

    before = positive_minus_negative()
    for _ in range(100):
        opt.zero_grad()
        loss = info_nce(f(x_view), g(y_view), 0.1)
        loss.backward()
        opt.step()
    after = positive_minus_negative()
    assert after > 0.5 and after > before + 0.3


def test_recommender_overfits_tiny_problem(setup):
    cfg, model, edge_index, edge_type, (_, entities, *_) = setup
    targets = torch.tensor([1, 4, 7, 2])
    logits = model.recommendation_logits(model.entity_graph(edge_index, edge_type), entities)
    assert logits.shape == (B, cfg.n_items)
    assert torch.allclose(logits[3], torch.zeros(cfg.n_items))  # no context entity -> uniform
    rec_params = [*model.kg_encoder.parameters(), *model.user_pooling.parameters()]
    opt = torch.optim.Adam(rec_params, lr=1e-2)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = model.recommendation_loss(
            model.recommendation_logits(model.entity_graph(edge_index, edge_type), entities), targets
        )
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    assert model.user_pooling.proj.weight.grad.abs().sum() > 0


def test_item_bias_is_per_entity_and_added_to_the_logits(setup):
    cfg, _, edge_index, edge_type, (_, entities, *_) = setup
    model = C2CRS(tiny_config(item_bias=True))
    assert model.item_bias.shape == (cfg.n_entities,)
    assert C2CRS(tiny_config()).item_bias is None
    with torch.no_grad():
        model.item_bias.copy_(torch.arange(cfg.n_entities, dtype=torch.float))
    N = model.entity_graph(edge_index, edge_type)
    plain = model.user_vector(N, entities) @ N.T
    assert torch.allclose(model.recommendation_logits(N, entities), plain[:, : cfg.n_items] + torch.arange(10.0))
    assert torch.allclose(
        model.recommendation_logits(N, entities, all_entities=True), plain + torch.arange(float(cfg.n_entities))
    )


def test_rec_pooling_graph_reuses_the_pretrained_graph_pooling(setup):
    cfg, _, edge_index, edge_type, (_, entities, *_) = setup
    model = C2CRS(tiny_config(rec_pooling="graph"))
    assert model.user_pooling is None
    N = model.entity_graph(edge_index, edge_type)
    assert torch.equal(model.user_vector(N, entities), model.graph_view(N, entities))
    model.recommendation_loss(model.recommendation_logits(N, entities), torch.tensor([1, 2, 3, 4])).backward()
    assert model.graph_pooling.proj.weight.grad.abs().sum() > 0


def test_featureless_rgcn_equals_pyg_rgcnconv_with_x_none():
    """Our relation-by-relation layer gives PyG's featureless RGCNConv output, on the whole graph and on a subset."""
    from torch_geometric.nn import RGCNConv

    torch.manual_seed(0)
    cfg = tiny_config(kg_encoder="featureless")
    layer = C2CRS(cfg).kg_encoder
    edge_index, edge_type = random_graph(cfg.n_entities, 150, cfg.n_relations, seed=3)
    reference = RGCNConv(cfg.n_entities, cfg.kg_dim, cfg.n_relations, num_bases=cfg.num_bases)
    with torch.no_grad():
        reference.weight.copy_(layer.basis)
        reference.comp.copy_(layer.comp)
        reference.root.copy_(layer.root)
        reference.bias.copy_(torch.randn(cfg.kg_dim))
        layer.bias.copy_(reference.bias)
    expected = reference(None, edge_index, edge_type)
    assert torch.allclose(layer(edge_index, edge_type), expected, atol=1e-5)
    nodes = torch.tensor([7, 0, 7, 29, 12])
    assert torch.allclose(layer.forward_nodes(nodes, edge_index, edge_type), expected[nodes], atol=1e-5)
    assert layer.basis.shape == (cfg.num_bases, cfg.n_entities, cfg.kg_dim)


def test_six_projection_heads_give_the_fine_loss_its_own_heads(setup):
    cfg, _, *_ = setup
    torch.manual_seed(0)
    model = C2CRS(tiny_config(projection_heads="per_view_and_level"))
    assert C2CRS(tiny_config()).unit_projection is None
    T = 6
    loss = model.fine_contrastive_loss(
        torch.randn(T, cfg.token_dim),
        torch.randn(T, cfg.kg_dim),
        torch.randn(T, cfg.token_dim),
        torch.arange(T),
        torch.arange(T),
    )
    loss.backward()
    assert all(p.grad is not None for p in model.unit_projection.parameters())
    assert all(p.grad is None for p in model.projection.parameters())


def test_nt_xent_by_hand():
    """SimCLR's loss: rows of [a; b], each row's positive is its counterpart, candidates the 2B-1 other rows."""
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    t = 0.5
    z = F.normalize(torch.cat([a, b]), dim=-1)
    total = 0.0
    for i in range(4):
        positive = (i + 2) % 4
        others = [j for j in range(4) if j != i]
        total += -(z[i] @ z[positive] / t - torch.logsumexp(torch.stack([z[i] @ z[j] / t for j in others]), 0))
    assert info_nce(a, b, t, same_view_negatives=True).item() == pytest.approx(total.item() / 4, rel=1e-5)
    assert info_nce(a, b, t, same_view_negatives=True).item() != pytest.approx(info_nce(a, b, t).item(), rel=1e-3)
    # a false negative removed in both views keeps the positive
    not_negative = torch.tensor([[False, True], [True, False]])
    assert torch.isfinite(info_nce(a, b, t, not_negative=not_negative, same_view_negatives=True))


def test_invalid_switch_value_is_refused():
    with pytest.raises(ValueError, match="kg_encoder"):
        tiny_config(kg_encoder="onehot")


# ---- baselines ---------------------------------------------------------------------------------------------------
def test_textcnn_shapes_and_learns():
    torch.manual_seed(0)
    model = TextCNNRecommender(vocab_size=40, n_items=6, embed_dim=16, n_filters=8, dropout=0.1)
    context = torch.randint(1, 40, (8, 10))
    context[0, 4:] = 0
    assert model(context).shape == (8, 6)
    assert model(torch.tensor([[3, 4]])).shape == (1, 6)  # shorter than the widest filter
    targets = torch.randint(0, 6, (8,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(context), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_popularity_scores():
    scores = popularity_scores(torch.tensor([2, 2, 2, 0]), n_items=4)
    assert scores.shape == (4,)
    assert torch.allclose(scores, torch.log(torch.tensor([2.0, 1.0, 4.0, 1.0])))
    assert scores.argmax().item() == 2


def test_repeat_choice_by_hand():
    """p(repeat) per speaker, the recency distribution among repeats, the recommender's softmax over new movies."""
    from models.baselines import RepeatChoice

    seeker, recommender = RepeatChoice.ROLES.index("seeker"), RepeatChoice.ROLES.index("recommender")
    # seeker targets: 2 repeats at position 0, 1 at position 1, 1 new; recommender: 1 repeat at position 3, 3 new
    fitted = RepeatChoice.fit([0, 0, 1, None, 3, None, None, None], [seeker] * 4 + [recommender] * 4, max_recency=2)
    assert fitted.p_repeat[seeker, 0].item() == pytest.approx(4 / 6)  # add-one: (3 + 1) / (3 + 1 + 1 + 1)
    assert fitted.p_repeat[recommender, 0].item() == pytest.approx(2 / 6)
    assert fitted.by_recency[seeker].tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6])
    assert fitted.by_recency[recommender].tolist() == pytest.approx([1 / 4, 1 / 4, 2 / 4])

    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    recent = torch.tensor([[3, 0, -1], [-1, -1, -1]])  # sample 0: movie 3 then movie 0; sample 1: no context
    out = fitted(scores, recent, torch.tensor([seeker, recommender]))
    p = 4 / 6
    new = torch.log_softmax(torch.tensor([1.0, 2.0, 0.0]), 0) + math.log(1 - p)  # movies 1, 2, 4
    assert out[0, [1, 2, 4]].tolist() == pytest.approx(new.tolist(), rel=1e-5)
    assert out[0, 3].item() == pytest.approx(math.log(p * 3 / 5), rel=1e-5)  # positions 0 and 1: weights 3/6, 2/6
    assert out[0, 0].item() == pytest.approx(math.log(p * 2 / 5), rel=1e-5)
    assert torch.exp(out[0]).sum().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(out[1], torch.log_softmax(scores[1], 0))  # no context: the recommender alone
    # a context movie ranks by recency, whatever the recommender thought of it
    assert out[0, 3] > out[0, 0]


def test_repeat_choice_fitted_on_a_table():
    from stages.training.c2crs_data import SampleTable
    from stages.training.repeat_choice import fit_repeat_choice

    table = SampleTable(
        sample_ids=np.arange(3),
        conv_ids=np.zeros(3, dtype=int),
        roles=["seeker", "recommender", "seeker"],
        context_tokens=[[1]] * 3,
        context_entities=[[]] * 3,
        context_items=[[]] * 3,
        targets=[[5], [7, 5], [9]],
        triples=[[]] * 3,
    )
    recent = torch.tensor([[5, -1], [5, 2], [5, 7]])
    choice = fit_repeat_choice(table, recent, max_recency=1)
    # seeker: 5 at position 0 (repeat), 9 new; recommender: 7 new, 5 at position 0 (repeat)
    assert choice.p_repeat.flatten().tolist() == pytest.approx([2 / 4, 2 / 4])
    assert choice.by_recency.flatten().tolist() == pytest.approx([2 / 3, 1 / 3, 2 / 3, 1 / 3])
    # by context state: state 1 holds the first two samples (a seeker's repeat; a recommender's new movie and repeat),
    # state 0 the seeker's new movie
    by_state = fit_repeat_choice(table, recent, max_recency=1, states=torch.tensor([1, 1, 0]), n_states=2)
    assert by_state.p_repeat.flatten().tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2, 2 / 4])
    scores = torch.zeros(2, 10)
    out = by_state(scores, torch.tensor([[5, -1], [5, -1]]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert out[0, 5].exp().item() == pytest.approx(1 / 3) and out[1, 5].exp().item() == pytest.approx(2 / 3)


def test_choice_states_count_context_movies_and_the_turn_before():
    import polars as pl

    from stages.evaluation.rec_metrics import choice_states

    samples = pl.DataFrame(
        {
            "sample_id": [0, 1, 2, 3],
            "conv_id": [1, 1, 1, 2],
            "turn_idx": [1, 2, 3, 1],
            "context_item_ids": [[5], [5], [5, 6, 7, 8, 9], []],
            "target_item_ids": [[], [6], [], [4]],
        }
    )
    # (movies 1, 2, 3, 4+ -> 0..3) x 2 + named by the turn before: turn 1's is turn 0 (its context)
    assert choice_states(samples) == [0 * 2 + 1, 0 * 2 + 0, 3 * 2 + 1, 0 * 2 + 0]


def test_sentences_encoded_in_length_chunks_equal_one_padded_batch(setup):
    cfg, model, *_ = setup
    model.eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, cfg.vocab_size, (7, 9), generator=g)
    for row, length in enumerate([9, 2, 5, 1, 9, 3, 6]):
        ids[row, length:] = cfg.pad_id
    H, pad = model.review_encoder(ids)
    whole = model.sentence_pooling(H, pad)
    assert torch.allclose(model.encode_sentences(ids, chunk=2), whole, atol=1e-5)
    assert torch.allclose(model.encode_sentences(ids), whole, atol=1e-5)


def test_attention_dropout_is_its_own_switch():
    ids = torch.randint(1, 50, (4, 12))
    quiet = TokenEncoder(tiny_config(dropout=0.0, attention_dropout=0.0)).train()
    assert torch.equal(quiet(ids)[0], quiet(ids)[0])
    noisy = TokenEncoder(tiny_config(dropout=0.0, attention_dropout=0.5)).train()
    assert not torch.allclose(noisy(ids)[0], noisy(ids)[0])


def test_cheap_cpu_dropout_drops_p_keeps_the_expectation_and_passes_gradients_through_the_mask():
    from models.dropout import Dropout, use_cheap_dropout

    dropout = Dropout(0.1)
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x)
    assert abs(float(y.eq(0).float().mean()) - 0.1) < 0.003
    assert abs(float(y.mean()) - 1.0) < 0.01  # kept elements scaled by 1 / keep probability
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask) / dx = mask, here equal to y since x = 1
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)  # seeded: the same mask
    assert torch.equal(dropout.eval()(x), x)
    layer = use_cheap_dropout(torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True))
    assert {type(m) for m in layer.modules() if isinstance(m, torch.nn.Dropout)} == {Dropout}
    assert layer.dropout1.p == 0.2


def test_encoder_layer_equals_torchs_layer_in_training_forward_and_backward():
    from models.c2crs import EncoderLayer

    torch.manual_seed(0)
    ours = EncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    torchs = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    torchs.load_state_dict(ours.state_dict())  # same parameter names
    x = torch.randn(3, 7, 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 4:] = True
    pad[1, 1:] = True
    outputs, grads = [], []
    for layer in (ours, torchs):
        layer.train()
        out = layer(x, src_key_padding_mask=pad)
        out[~pad].square().sum().backward()
        outputs.append(out[~pad].detach())
        grads.append(torch.cat([p.grad.flatten() for p in layer.parameters()]))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-4)
