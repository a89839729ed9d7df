"""Kostric and Balog's standardized ReDial protocol ("A Standardized Re-evaluation of Conversational Recommender
Systems on the ReDial Dataset", SIGIR '26; its definition is scripts/create_recommendation_dataset.py of
iai-group/redial-reproducibility), computed on the test file's raw messages exactly as they define it:

- an instance is every recommender *message* (not a merged turn) that names at least one movie and has context
  (at least one earlier message); its context is every earlier message;
- a message names movie m when "@m" occurs in its text, for every m of the conversation's movieMentions (their
  substring test, in movieMentions' order, so each movie once per message);
- standard_full: its targets are the movies it names; standard_dedup (their --fresh-only): only those no earlier
  message named; R@k over all movies, nothing masked.

The instances become samples as the triples stage makes them (each message its own turn: context tokens, linked
entities and movies of the earlier messages), so every model scores them as it scores a turn.
"""

import json
from pathlib import Path

import polars as pl

from stages import triples
from stages.evaluation import rec_metrics

PROTOCOLS = {"standard_full": "recommender_turns", "standard_dedup": "new_items"}  # -> the row mask that equals it
# Their Table 2 (trained on all 10,006 ReDial train conversations), R@1/10/50 full | dedup
PEER_TABLE2 = {
    "KBRD": ((0.033, 0.177, 0.332), (0.017, 0.148, 0.300)),
    "KGSF": ((0.032, 0.177, 0.369), (0.016, 0.147, 0.327)),
    "UniCRS": ((0.049, 0.213, 0.421), (0.024, 0.180, 0.335)),
    "ECR": ((0.049, 0.220, 0.428), (0.026, 0.181, 0.337)),
    "MESE": ((0.032, 0.178, 0.381), (0.025, 0.159, 0.361)),
    "PECRS": ((0.044, 0.189, 0.383), (0.022, 0.143, 0.341)),
    "ReFICR": ((0.049, 0.270, 0.507), (0.018, 0.213, 0.465)),
    "naive repeat": ((0.043, 0.090, 0.090), (0.0, 0.0, 0.0)),
}
PEER_NOTE = (
    "Kostric and Balog, SIGIR '26, Table 2: trained on all 10,006 ReDial train conversations (ours: the mirror's 2,251)"
)


def messages(path: Path) -> pl.DataFrame:
    """One row per message of a ReDial JSONL file: conv_id, turn_idx (the message's index), role, text, movie_ids
    (their substring rule) and fresh (per movie: no earlier message named it)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        conversation = json.loads(line)
        mentions = conversation.get("movieMentions") or {}
        mentions = mentions if isinstance(mentions, dict) else {}
        recommender = conversation["respondentWorkerId"]
        named: set[str] = set()
        for index, message in enumerate(conversation["messages"]):
            movies = [movie for movie in mentions if f"@{movie}" in message["text"]]
            rows.append(
                {
                    "conv_id": int(conversation["conversationId"]),
                    "turn_idx": index,
                    "role": "recommender" if message["senderWorkerId"] == recommender else "seeker",
                    "text": message["text"],
                    "movie_ids": [int(m) for m in movies],
                    "fresh": [m not in named for m in movies],
                }
            )
            named.update(movies)
    return pl.DataFrame(
        rows,
        schema={
            "conv_id": pl.Int64,
            "turn_idx": pl.Int32,
            "role": pl.String,
            "text": pl.String,
            "movie_ids": pl.List(pl.Int64),
            "fresh": pl.List(pl.Boolean),
        },
    )


def instances(
    path: Path,
    linker,
    vocabulary: pl.DataFrame,
    item_entity: dict[int, int],
    context_max_tokens: int,
    response_max_tokens: int,
) -> tuple[pl.DataFrame, pl.DataFrame, tuple[list[list[int]], list[int]]]:
    """(samples of the instances, their evaluation rows, their history): one sample per recommender message that
    names a movie and has context; rows as rec_metrics.expand_mentions makes them, with in_context = named by an
    earlier message; history: each instance's context movies by recency and its new-or-repeat state, replayed over
    every message (evaluate.score_split's `history`)."""
    utterances = messages(path).with_columns(pl.lit("test").alias("split"))
    linked = triples.link_all(utterances, linker, item_entity)
    every, _ = triples.build_samples(
        utterances, linked, vocabulary, item_entity, context_max_tokens, response_max_tokens
    )
    recent, states = rec_metrics.context_items_by_recency(every), rec_metrics.choice_states(every)
    keep = ((every["role"] == "recommender") & (every["target_item_ids"].list.len() > 0)).to_numpy()
    samples = every.filter(pl.Series(keep))
    history = ([r for r, k in zip(recent, keep) if k], [s for s, k in zip(states, keep) if k])
    rows = rec_metrics.expand_mentions(samples)
    fresh = (
        samples.select("conv_id", "turn_idx")
        .join(
            utterances.select("conv_id", "turn_idx", "fresh"),
            on=["conv_id", "turn_idx"],
            how="left",
            maintain_order="left",
        )["fresh"]
        .explode()
    )
    if len(fresh) != rows.height:
        raise ValueError(f"{path}: {len(fresh)} movie flags for {rows.height} targets")
    return samples, rows.with_columns((~fresh).alias("in_context")), history


def peer_table(results: dict, labels: dict[str, str]) -> str:
    """Our models beside the peer's Table 2 rows: R@1/10/50 under standard_full and standard_dedup."""
    lines = ["| model | full R@1 | R@10 | R@50 | dedup R@1 | R@10 | R@50 |", "|---|---|---|---|---|---|---|"]
    for model, label in labels.items():
        if model in results and "standard_full" in results[model]:
            cells = [f"{results[model][p][k]:.3f}" for p in PROTOCOLS for k in ("recall@1", "recall@10", "recall@50")]
            lines.append(f"| {label} (ours) | " + " | ".join(cells) + " |")
    for name, (full, dedup) in PEER_TABLE2.items():
        lines.append(f"| {name} (peer) | " + " | ".join(f"{v:.3f}" for v in (*full, *dedup)) + " |")
    return "\n".join(lines) + f"\n\nPeer rows: {PEER_NOTE}.\n"
