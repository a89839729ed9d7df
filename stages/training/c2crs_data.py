"""Tensors and batches for the C2-CRS training stages, from the triples stage's tables.

CPU speed comes from here as much as from the model: batches are length-bucketed (samples of similar context
length together, so a batch pads to its own longest context instead of 256), and each batch carries only the
review sentences and entities it needs.
"""

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from stages.triples import TEXT_ROLE, UNK, token_texts


@dataclass
class Graph:
    edge_index: torch.Tensor  # [2, E]: src -> dst
    edge_type: torch.Tensor  # [E]
    n_entities: int
    n_relations: int
    n_items: int


def load_graph(entities: pl.DataFrame, relations: pl.DataFrame, edges: pl.DataFrame) -> Graph:
    return Graph(
        edge_index=torch.from_numpy(np.stack([edges["src"].to_numpy(), edges["dst"].to_numpy()])).long(),
        edge_type=torch.from_numpy(edges["rel"].to_numpy()).long(),
        n_entities=entities.height,
        n_relations=relations.height,
        n_items=int(entities["is_item"].sum()),
    )


def sentence_token_ids(sentences: pl.DataFrame, vocabulary: pl.DataFrame, max_tokens: int) -> list[list[int]]:
    """Each review sentence as vocabulary ids (same tokenizer as the conversations), indexed by sentence_id."""
    token_id = dict(zip(vocabulary["token"], vocabulary["token_id"]))
    unk = token_id[UNK]
    ordered = sentences.sort("sentence_id")
    if ordered["sentence_id"].to_list() != list(range(ordered.height)):
        raise ValueError("review_sentences.parquet: sentence_id must run 0..n-1")
    return [[token_id.get(t, unk) for t in token_texts(text)][:max_tokens] or [unk] for text in ordered["text"]]


def pad(rows: list[list[int]], value: int, min_length: int = 1) -> torch.Tensor:
    width = max([min_length] + [len(r) for r in rows])
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def bucketed_batches(
    lengths: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | None,
    then_by: np.ndarray | None = None,
    group: int = 4,
) -> list[np.ndarray]:
    """Row indices in batches of similar length; batch order shuffled by rng (None: in length order, for eval).

    Rows are shuffled, cut into chunks of 50 batches, sorted by length within a chunk, then batched: similar
    lengths share a batch while an epoch still mixes short and long contexts. then_by (a second length, e.g. the
    response's) re-sorts each run of `group` neighbouring batches by it, so both paddings stay short: on ReDial's
    responses group 4 pads 48 % fewer response positions for 8 % more context tokens.
    """
    order = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        if then_by is not None:
            runs = [part[i : i + batch_size * group] for i in range(0, len(part), batch_size * group)]
            part = np.concatenate([run[np.argsort(then_by[run], kind="stable")] for run in runs])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def per_conversation(conv_ids: np.ndarray, k: int | None, rng: np.random.Generator) -> np.ndarray:
    """Row indices with at most k rows per conversation, drawn anew each epoch (None: every row).

    A conversation's samples are prefixes of one another; for contrastive pre-training a few per conversation
    and epoch carry nearly all of their signal at a fraction of the cost.
    """
    if k is None:
        return np.arange(len(conv_ids))
    order = rng.permutation(len(conv_ids))
    seen: dict[int, int] = {}
    picked = []
    for row in order:
        conv = int(conv_ids[row])
        if seen.get(conv, 0) < k:
            seen[conv] = seen.get(conv, 0) + 1
            picked.append(row)
    return np.sort(np.asarray(picked, dtype=np.int64))


@dataclass
class SampleTable:
    """The samples of one split as Python lists, plus the triples and review sentences of each sample."""

    sample_ids: np.ndarray
    conv_ids: np.ndarray
    roles: list[str]
    context_tokens: list[list[int]]
    context_entities: list[list[int]]
    context_items: list[list[int]]
    targets: list[list[int]]
    triples: list[list[tuple[int, int, int]]]  # per sample: (token_position, entity_id, sentence_id)
    documents: list[list[int]] | None = None  # review documents chosen otherwise (RevCore's retrieval)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def context_lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.context_tokens])

    def review_sentences(self, row: int, limit: int) -> list[int]:
        """The review document of a sample: the distinct sentences of its triples, most recent mention first
        (or the table's documents when it has its own)."""
        if self.documents is not None:
            return self.documents[row][:limit]
        return list(dict.fromkeys(s for _, _, s in reversed(self.triples[row])))[:limit]

    @property
    def is_text(self) -> np.ndarray:
        """Which rows are text samples (stages/text_triples.py), not conversation turns."""
        return np.array([role == TEXT_ROLE for role in self.roles], dtype=bool)

    def concat(self, other: "SampleTable") -> "SampleTable":
        """This table's rows, then other's (neither with documents of its own)."""

        def join(a, b):
            return np.concatenate([a, b]) if isinstance(a, np.ndarray) else a + b

        return SampleTable(
            **{
                f.name: None if getattr(self, f.name) is None else join(getattr(self, f.name), getattr(other, f.name))
                for f in dataclasses.fields(self)
            }
        )

    def subset(self, rows: np.ndarray) -> "SampleTable":
        """The table of these rows only (in this order)."""

        def pick(values):
            return values[rows] if isinstance(values, np.ndarray) else [values[r] for r in rows]

        return SampleTable(
            **{
                f.name: None if getattr(self, f.name) is None else pick(getattr(self, f.name))
                for f in dataclasses.fields(self)
            }
        )


def conversation_subset(conv_ids: np.ndarray, fraction: float) -> np.ndarray:
    """The rows of the first `fraction` of the conversations in a fixed order (by SHA-256 of the id, seed-free):
    the same conversations for every seed and arm, and each fraction's inside every larger one's (a learning
    curve's training sets are nested)."""
    conversations = sorted({int(c) for c in conv_ids}, key=lambda c: hashlib.sha256(str(c).encode()).hexdigest())
    kept = conversations[: max(1, round(fraction * len(conversations)))]
    return np.flatnonzero(np.isin(conv_ids, kept))


def sample_table(samples: pl.DataFrame, triples: pl.DataFrame, split: str) -> SampleTable:
    part = samples.filter(pl.col("split") == split).sort("sample_id")
    grouped = (
        triples.join(part.select("sample_id"), on="sample_id")
        .group_by("sample_id")
        .agg("token_position", "entity_id", "sentence_id")
    )
    by_sample = {s: list(zip(p, e, k)) for s, p, e, k in grouped.iter_rows()}
    return SampleTable(
        sample_ids=part["sample_id"].to_numpy(),
        conv_ids=part["conv_id"].to_numpy(),
        roles=part["role"].to_list(),
        context_tokens=[list(x) for x in part["context_token_ids"].to_list()],
        context_entities=[list(x) for x in part["context_entity_ids"].to_list()],
        context_items=[list(x) for x in part["context_item_ids"].to_list()],
        targets=[list(x) for x in part["target_item_ids"].to_list()],
        triples=[by_sample.get(s, []) for s in part["sample_id"].to_list()],
    )


def context_batch(table: SampleTable, rows: np.ndarray, pad_id: int, max_entities: int | None) -> dict:
    """Context tokens [B, L] and the most recent context entities [B, E] (padded with -1; max_entities None: all)."""
    return {
        "context_ids": pad([table.context_tokens[r] for r in rows], pad_id),
        "entity_ids": entity_batch(table, rows, max_entities),
    }


def entity_batch(table: SampleTable, rows: np.ndarray, max_entities: int | None) -> torch.Tensor:
    """The most recent context entities [B, E] of the rows (padded with -1; max_entities None: all)."""
    first = -max_entities if max_entities else 0
    return pad([table.context_entities[r][first:] for r in rows], -1)


def review_batch(
    table: SampleTable, rows: np.ndarray, sentence_tokens: list[list[int]], pad_id: int, max_sentences: int
) -> dict:
    """Each sample's review document as [B, K, Ls] token ids and a [B, K] mask of real sentences."""
    documents = [table.review_sentences(r, max_sentences) for r in rows]
    k = max([1] + [len(d) for d in documents])
    width = max([1] + [len(sentence_tokens[s]) for d in documents for s in d])
    ids = torch.full((len(rows), k, width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), k), dtype=torch.bool)
    for i, document in enumerate(documents):
        for j, sentence in enumerate(document):
            tokens = sentence_tokens[sentence]
            ids[i, j, : len(tokens)] = torch.as_tensor(tokens)
            mask[i, j] = True
    return {"sentence_ids": ids, "sentence_mask": mask}


def fine_batch(
    table: SampleTable, rows: np.ndarray, max_triples_per_sample: int, rng: np.random.Generator | None
) -> dict:
    """The word-entity-sentence triples of a batch: (row in batch, token position, entity, sentence)."""
    picked = []
    for i, r in enumerate(rows):
        triples = table.triples[r]
        if len(triples) > max_triples_per_sample:
            chosen = (
                rng.choice(len(triples), max_triples_per_sample, replace=False)
                if rng is not None
                else np.arange(max_triples_per_sample)
            )
            triples = [triples[c] for c in sorted(chosen)]
        picked += [(i, p, e, s) for p, e, s in triples]
    if not picked:
        empty = torch.zeros(0, dtype=torch.long)
        return {"triple_rows": empty, "triple_positions": empty, "triple_entities": empty, "triple_sentences": empty}
    columns = torch.as_tensor(picked, dtype=torch.long).T
    return {
        "triple_rows": columns[0],
        "triple_positions": columns[1],
        "triple_entities": columns[2],
        "triple_sentences": columns[3],
    }


def recommendation_rows(table: SampleTable) -> tuple[np.ndarray, np.ndarray]:
    """Training instances of the recommender: one per (sample, target item), as in the reference."""
    rows = [(r, item) for r in range(len(table)) for item in table.targets[r]]
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pairs = np.asarray(rows, dtype=np.int64)
    return pairs[:, 0], pairs[:, 1]
