"""Stage text_triples: pre-training samples from the review and plot sentences, beyond the conversations (beyond the
paper; the study's `more_text` setting reads them).

The fine-grained pre-training aligns words, entities and review sentences, and nothing in it needs a conversation.
Every review or plot sentence of the reviews stage in which the triples stage's linker finds a KG entity becomes one
sample, shaped like a conversation's: its "context" is the movie it is about as a mention token ("@123"), then the
sentence's tokens (the conversation vocabulary; other words are __unk__), its context entities that movie and the
entities linked in the sentence, and each of these mentions a triple (token position, entity, the review sentence
chosen for that entity by the triples stage's rule, never the sentence itself). Samples are in the train split, role
"text", each its own conversation (conv_id from TEXT_CONV_OFFSET), with no recommendation target and no response;
the pre-training stages draw `pretrain_text.ratio` of them per conversation sample and epoch.
"""

from pathlib import Path

import numpy as np
import polars as pl

from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.progress import progress
from stages.io.stage_log import NO_LOG, StageLog, StageOutcome
from stages.sources import raw
from stages.text import linking
from stages.triples import SAMPLE_SCHEMA, TEXT_ROLE, TRIPLE_SCHEMA, UNK, link_utterance, sentence_chooser

TEXT_CONV_OFFSET = 1_000_000_000  # conversation ids of text samples: far above ReDial's


def text_samples(
    sentences: pl.DataFrame, linked, vocabulary: pl.DataFrame, movie_entity: dict[int, int], chooser, min_entities: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(samples, triples) of the sentences with at least `min_entities` linked entities (movies not counted)."""
    token_id = dict(zip(vocabulary["token"], vocabulary["token_id"]))
    unk = token_id[UNK]
    samples, triples = [], []
    rows = sentences.select("sentence_id", "movie_id").iter_rows()
    for (sentence_id, movie_id), utterance in progress(
        zip(rows, linked), total=len(linked), desc="text samples", unit=" sentences"
    ):
        mentions = [(position, entity) for position, entity, kind in utterance.mentions if kind == "entity"]
        if len({entity for _, entity in mentions}) < min_entities:
            continue
        sample_id = len(samples)
        item = movie_entity.get(movie_id)
        entities = list(dict.fromkeys(([item] if item is not None else []) + [e for _, e in mentions]))
        tokens = [f"@{movie_id}"] + utterance.tokens  # the movie it is about, as a conversation names it
        samples.append(
            (
                sample_id,
                TEXT_CONV_OFFSET + sentence_id,
                0,
                TEXT_ROLE,
                "train",
                [token_id.get(t, unk) for t in tokens],
                entities,
                [item] if item is not None else [],
                [],
                [],
            )
        )
        mentions = ([(0, item)] if item is not None else []) + [(position + 1, e) for position, e in mentions]
        for position, entity in mentions:
            chosen = chooser.choose(entity, tokens, exclude=sentence_id)
            if chosen is not None:
                triples.append((sample_id, position, entity, chosen))
    return (
        pl.DataFrame(samples, schema=SAMPLE_SCHEMA, orient="row"),
        pl.DataFrame(triples, schema=TRIPLE_SCHEMA, orient="row"),
    )


def _share_of(samples: pl.DataFrame, vocabulary: pl.DataFrame) -> float:
    """The share of the samples' tokens outside the conversation vocabulary."""
    unk = vocabulary.filter(pl.col("token") == UNK)["token_id"].item()
    tokens = samples["context_token_ids"].explode().drop_nulls()
    return round(float((tokens == unk).mean()), 3) if len(tokens) else 0.0


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    spec = STAGES["text_triples"]
    dep = {Path(d).name: workspace / d for d in spec.deps}
    files = raw.raw_files(params.data, workspace, "stopwords")
    entities, edges = pl.read_parquet(dep["entities.parquet"]), pl.read_parquet(dep["edges.parquet"])
    sentences = pl.read_parquet(dep["review_sentences.parquet"]).sort("sentence_id")
    items = entities.filter(pl.col("is_item"))
    movie_entity = dict(zip(items["movie_id"], items["entity_id"]))
    linker = linking.kg_entity_linker(entities, edges, files["stopwords"], params.linking)
    linked = [
        link_utterance(text, linker, {})
        for text in progress(sentences["text"], desc="linking sentences", unit=" sentences")
    ]
    chooser = sentence_chooser(
        params.triples,
        entities,
        edges,
        pl.read_parquet(dep["movies.parquet"]),
        sentences,
        pl.read_parquet(dep["reviews.parquet"]),
    )
    vocabulary = pl.read_parquet(dep["vocab.parquet"])
    samples, triples = text_samples(
        sentences, linked, vocabulary, movie_entity, chooser, params.text_triples.min_entities
    )
    per_sample = triples.group_by("sample_id").len()["len"].to_numpy()
    metrics = {
        "sentences": sentences.height,
        "samples": samples.height,
        "triples": triples.height,
        "samples_by_source": dict(
            sentences.join(
                samples.select((pl.col("conv_id") - TEXT_CONV_OFFSET).alias("sentence_id")), on="sentence_id"
            )
            .group_by("source")
            .len()
            .sort("source")
            .iter_rows()
        ),
        "triples_per_sample": round(float(np.mean(per_sample)) if len(per_sample) else 0.0, 3),
        "unknown_token_share": _share_of(samples, vocabulary),
    }
    samples_out, triples_out = workspace / spec.output("samples"), workspace / spec.output("triples")
    write_outputs({samples_out: samples, triples_out: triples, workspace / spec.metrics_file: metrics})
    return StageOutcome({**files, **dep}, metrics)
