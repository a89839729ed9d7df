"""Diagnostics of pre-training without fine-tuning (the pre-training study): zero-shot recall and a frozen probe."""

from collections.abc import Iterator

import numpy as np
import torch

from models.c2crs import C2CRS, SelfAttentivePooling
from stages.training.c2crs_data import SampleTable, recommendation_rows
from stages.training.c2crs_train import Run, _table_graph, recall_at, recommendation_batch, score_in_blocks, valid_ranks
from stages.training.loop import adam, epoch_generator


def zero_shot_blocks(
    model: C2CRS, run: Run, table: SampleTable, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Item scores with no recommendation training: the graph view e_G of the context (the pooling pre-training
    trained) dotted with the item rows of N. Above an untrained model's, pre-training put item signal in N."""
    graph = _table_graph(model, run, table)
    return score_in_blocks(
        model,
        table,
        batch_size,
        lambda rows: (
            model.graph_view(graph()[0], graph()[1][torch.as_tensor(rows, device=run.device)])
            @ graph()[0][: run.graph.n_items].T
        ),
    )


class FrozenProbe(torch.nn.Module):
    """A recommender on frozen entity rows N: only a fresh self-attentive pooling and a per-item bias are trained.

    Trained on N from pre-training and on N from an untrained model, it says how much item signal the rows carry
    by themselves, with nothing that fine-tuning could overwrite."""

    def __init__(self, N: torch.Tensor, n_items: int):
        super().__init__()
        self.register_buffer("N", N.detach())
        self.n_items = n_items
        self.pooling = SelfAttentivePooling(N.size(1))
        self.item_bias = torch.nn.Parameter(torch.zeros(n_items))

    def forward(self, entity_ids: torch.Tensor) -> torch.Tensor:
        user = self.pooling(self.N[entity_ids.clamp(min=0)], entity_ids < 0)
        return user @ self.N[: self.n_items].T + self.item_bias


def train_frozen_probe(
    model: C2CRS, run: Run, epochs: int, batch_size: int, learning_rate: float, seed: int
) -> tuple[FrozenProbe, list[dict]]:
    """Fit a FrozenProbe on model's N (train split), keeping the epoch with the best validation recall@50."""
    with torch.no_grad():
        model.eval()
        N = model.entity_graph(run.graph.edge_index.to(run.device), run.graph.edge_type.to(run.device))
    torch.manual_seed(seed)
    probe = FrozenProbe(N, run.graph.n_items).to(run.device)
    optimizer = adam(probe.parameters(), learning_rate)
    sample_rows, target_items = recommendation_rows(run.train)
    history, best = [], None
    for epoch in range(epochs):
        probe.train()
        order = epoch_generator(seed, epoch).permutation(len(sample_rows))
        for start in range(0, len(order), batch_size):
            picked = order[start : start + batch_size]
            entity_ids = recommendation_batch(run.train, sample_rows[picked], run.max_context_entities, run.device)
            loss = torch.nn.functional.cross_entropy(
                probe(entity_ids), torch.as_tensor(target_items[picked], device=run.device)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        metrics = {
            "epoch": epoch + 1,
            **recall_at(valid_ranks(score_probe(probe, run, run.valid, batch_size), run.valid)),
        }
        history.append(metrics)
        if best is None or metrics["recall@50"] > best[0]:
            best = (metrics["recall@50"], {k: v.clone() for k, v in probe.state_dict().items()})
    probe.load_state_dict(best[1])
    return probe, history


def score_probe(
    probe: FrozenProbe, run: Run, table: SampleTable, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    return score_in_blocks(
        probe,
        table,
        batch_size,
        lambda rows: probe(recommendation_batch(table, rows, run.max_context_entities, run.device)),
    )
