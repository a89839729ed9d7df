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

import numpy as np
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
# Our models in the peer tables, in their order: label
STANDARD_LABELS = {
    "repeat": "naive repeat",
    "popularity": "popularity",
    "textcnn": "TextCNN",
    "redial": "ReDial",
    "kbrd": "KBRD-style",
    "kecrs": "KECRS",
    "kgsf": "KGSF",
    "revcore": "RevCore",
    "c2crs": "C2-CRS",
    rec_metrics.REPEAT_CHOICE: "C2-CRS + learned repeat choice",
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


def peer_table(results: dict) -> str:
    """Our models beside the peer's Table 2 rows: R@1/10/50 under standard_full and standard_dedup."""
    lines = ["| model | full R@1 | R@10 | R@50 | dedup R@1 | R@10 | R@50 |", "|---|---|---|---|---|---|---|"]
    for model, label in STANDARD_LABELS.items():
        if model in results and "standard_full" in results[model]:
            cells = [f"{results[model][p][k]:.3f}" for p in PROTOCOLS for k in ("recall@1", "recall@10", "recall@50")]
            lines.append(f"| {label} (ours) | " + " | ".join(cells) + " |")
    for name, (full, dedup) in PEER_TABLE2.items():
        lines.append(f"| {name} (peer) | " + " | ".join(f"{v:.3f}" for v in (*full, *dedup)) + " |")
    return "\n".join(lines) + f"\n\nPeer rows: {PEER_NOTE}.\n"


# Their Table 4 (trained on all 10,006 ReDial train conversations): SR and RDL, full | dedup
PEER_TABLE4 = {
    "KBRD": ((0.103, 0.049), (0.046, 0.036)),
    "KGSF": ((0.093, 0.048), (0.036, 0.036)),
    "UniCRS": ((0.101, 0.041), (0.048, 0.030)),
    "ECR": ((0.104, 0.041), (0.063, 0.033)),
    "MESE": ((0.113, 0.051), (0.051, 0.043)),
    "PECRS": ((0.121, 0.053), (0.052, 0.047)),
    "ReFICR": ((0.151, 0.074), (0.053, 0.053)),
    "naive repeat": ((0.100, 0.009), (0.0, 0.0)),
}
LIKED_REWARD, SEEN_REWARD = 1.0, 0.5


def seeker_rewards(path: Path, item_entity: dict[int, int]) -> tuple[dict[int, dict[int, float]], dict[int, int]]:
    """Per conversation of a ReDial JSONL file: item -> its reward from the seeker's form (initiatorQuestions: liked
    -> 1.0, else seen -> 0.5; movies the seeker did not like or see get none), and the conversation's number of
    messages (the dialogue length of RDL)."""
    rewards, lengths = {}, {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        conversation = json.loads(line)
        conv_id = int(conversation["conversationId"])
        answers = conversation.get("initiatorQuestions") or {}
        answers = answers if isinstance(answers, dict) else {}
        rewards[conv_id] = {
            item_entity[int(movie)]: LIKED_REWARD if form.get("liked") == 1 else SEEN_REWARD
            for movie, form in answers.items()
            if isinstance(form, dict) and int(movie) in item_entity and 1 in (form.get("liked"), form.get("seen"))
        }
        lengths[conv_id] = len(conversation["messages"])
    return rewards, lengths


def dialogue_measures(
    rows: pl.DataFrame,
    top1: dict[int, int],
    rewards: dict[int, dict[int, float]],
    lengths: dict[int, int],
    resamples: int,
    seed: int,
) -> dict:
    """Success rate and reward per dialogue length (Kostric and Balog, Table 4) over the dialogues with a row:

    - an instance succeeds when its top-1 item is one of its targets (`rows`: one per instance and target, of the
      protocol) that the seeker liked or saw; its reward is 1.0 for a liked item, 0.5 for a seen one;
    - SR: the share of dialogues with a success at any instance; RDL: the mean over dialogues of their rewards
      summed over instances, divided by the dialogue's number of messages.

    top1: sample_id -> the model's best item. 95 % intervals resample dialogues (`resamples` times)."""
    per_instance = rows.group_by("sample_id", "conv_id").agg(pl.col("target_item")).sort("sample_id")
    by_dialogue: dict[int, float] = {}
    succeeded: dict[int, bool] = {}
    for sample_id, conv_id, targets in per_instance.iter_rows():
        best = top1[sample_id]
        reward = rewards.get(conv_id, {}).get(best, 0.0) if best in targets else 0.0
        by_dialogue[conv_id] = by_dialogue.get(conv_id, 0.0) + reward
        succeeded[conv_id] = succeeded.get(conv_id, False) or reward > 0
    dialogues = sorted(by_dialogue)
    success = np.array([succeeded[c] for c in dialogues], dtype=float)
    rdl = np.array([by_dialogue[c] / lengths[c] for c in dialogues])
    draws = np.random.default_rng(seed).integers(0, len(dialogues), size=(resamples, len(dialogues)))

    def interval(values: np.ndarray) -> list[float]:
        return [float(q) for q in np.quantile(values[draws].mean(axis=1), [0.025, 0.975])]

    return {
        "success_rate": float(success.mean()),
        "reward_per_dialogue_length": float(rdl.mean()),
        "dialogues": len(dialogues),
        "ci95": {"success_rate": interval(success), "reward_per_dialogue_length": interval(rdl)},
    }


def peer_dialogue_table(results: dict) -> str:
    """Our models beside the peer's Table 4 rows: SR and RDL under standard_full and standard_dedup."""
    lines = ["| model | full SR | full RDL | dedup SR | dedup RDL |", "|---|---|---|---|---|"]
    for model, label in STANDARD_LABELS.items():
        if model in results and "success_rate" in results[model].get("standard_full", {}):
            cells = [
                f"{results[model][p][k]:.3f}" for p in PROTOCOLS for k in ("success_rate", "reward_per_dialogue_length")
            ]
            lines.append(f"| {label} (ours) | " + " | ".join(cells) + " |")
    for name, (full, dedup) in PEER_TABLE4.items():
        lines.append(f"| {name} (peer) | " + " | ".join(f"{v:.3f}" for v in (*full, *dedup)) + " |")
    return "\n".join(lines) + f"\n\nPeer rows: {PEER_NOTE.replace('Table 2', 'Table 4')}.\n"
