"""The word_graph stage: KGSF's word-level knowledge graph (Zhou et al., KDD 2020), for the KGSF baseline.

KGSF encodes the context's words with a GCN over a ConceptNet subgraph: every word of the graph is a node, an edge of
any relation joins two words in both directions (relation types ignored), and edges with a stopword at either end
are dropped (its concept_edge_list4GCN). A context word is matched to the graph by its lowercase form. The mirror's
ConceptNet file is a KGSF fork's one-hop subgraph, not KGSF's own file (which is not public at a fetchable size):
the README says so next to KGSF's numbers.

Outputs: words.parquet (word_id, word), edges.parquet (source, target word ids, both directions, no duplicates) and
token_words.parquet (token_id of the conversation vocabulary -> word_id, for the tokens that are graph words).
"""

import json
from pathlib import Path

import polars as pl

from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.stage_log import NO_LOG, StageLog, StageOutcome
from stages.sources import raw


def read_word_index(path: Path) -> dict[str, int]:
    """ConceptNet's key2index JSON: {word: id}, ids distinct and >= 0."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON word index ({exc})") from None
    if not isinstance(index, dict) or not index:
        raise ValueError(f"{path}: expected a non-empty JSON object {{word: id}}")
    bad = next(((w, i) for w, i in index.items() if not isinstance(i, int) or isinstance(i, bool) or i < 0), None)
    if bad is not None:
        raise ValueError(f"{path}: word {bad[0]!r} has id {bad[1]!r}; expected an integer >= 0")
    if len(set(index.values())) != len(index):
        raise ValueError(f"{path}: two words share an id")
    return index


def read_word_edges(path: Path, words: dict[str, int]) -> list[tuple[str, str]]:
    """ConceptNet edge lines 'relation<TAB>word1<TAB>word2' -> (word1, word2); a word's '/...' suffix (part of
    speech in ConceptNet URIs) is cut, as KGSF does. Every word must be in the word index."""
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable UTF-8 edge list ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.strip().split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path}:{number}: expected 'relation<TAB>word<TAB>word', got {len(fields)} fields")
        ends = tuple(field.split("/")[0] for field in fields[1:])
        missing = [w for w in ends if w not in words]
        if missing:
            raise ValueError(f"{path}:{number}: word {missing[0]!r} is not in the word index")
        pairs.append(ends)
    return pairs


def build_word_graph(
    words: dict[str, int],
    pairs: list[tuple[str, str]],
    vocabulary: pl.DataFrame,
    stopwords: set[str],
    drop_stopwords: bool,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict]:
    """(words, edges, token_words, metrics). Word ids are renumbered 0..n-1 in the index's id order."""
    ordered = sorted(words, key=words.get)
    word_id = {w: i for i, w in enumerate(ordered)}
    kept = [(a, b) for a, b in pairs if not (drop_stopwords and (a in stopwords or b in stopwords))]
    directed = sorted({(word_id[a], word_id[b]) for a, b in kept} | {(word_id[b], word_id[a]) for a, b in kept})
    tokens = (
        vocabulary.select("token_id", "token")
        .with_columns(
            pl.col("token")
            .str.to_lowercase()
            .replace_strict(word_id, default=None, return_dtype=pl.Int32)
            .alias("word_id")
        )
        .drop_nulls("word_id")
    )
    words_table = pl.DataFrame(
        {"word_id": range(len(ordered)), "word": ordered}, schema={"word_id": pl.Int32, "word": pl.String}
    )
    edges = pl.DataFrame(directed, schema={"source": pl.Int32, "target": pl.Int32}, orient="row")
    token_words = tokens.select(pl.col("token_id").cast(pl.Int32), "word_id")
    touched = edges["source"].n_unique() if edges.height else 0
    metrics = {
        "words": len(ordered),
        "edges": edges.height,
        "input_edges": len(pairs),
        "stopword_edges_dropped": len(pairs) - len(kept),
        "words_with_edges": touched,
        "vocabulary_tokens": vocabulary.height,
        "vocabulary_tokens_in_graph": token_words.height,
    }
    return words_table, edges, token_words, metrics


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    spec = STAGES["word_graph"]
    files = raw.raw_files(params.data, workspace, "conceptnet_edges", "conceptnet_words", "stopwords")
    words = read_word_index(files["conceptnet_words"])
    pairs = read_word_edges(files["conceptnet_edges"], words)
    stopwords = {line.strip() for line in files["stopwords"].read_text(encoding="utf-8").splitlines() if line.strip()}
    vocabulary = pl.read_parquet(workspace / spec.input("vocab"))
    words_table, edges, token_words, metrics = build_word_graph(
        words, pairs, vocabulary, stopwords, params.word_graph.drop_stopwords
    )
    words_out, edges_out, token_words_out = (
        workspace / spec.output(name) for name in ("words", "edges", "token_words")
    )
    write_outputs(
        {words_out: words_table, edges_out: edges, token_words_out: token_words, workspace / spec.metrics_file: metrics}
    )
    return StageOutcome({**files, "vocab": workspace / spec.input("vocab")}, metrics)
