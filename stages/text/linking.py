"""Tokenization and dictionary entity linking for the `triples` stage.

Over 400 lines: the tokenizer, label variants, the automaton and the gold-set evaluation are one linker measured as
a whole.

Utterances mention KG entities (actors, directors, genres, subjects) by name. The linker finds them by exact match of
normalized token n-grams against entity labels: one Aho-Corasick automaton (pyahocorasick) over all labels, so
linking costs one pass over the text whatever the number of labels. Matches are leftmost-longest and never overlap.
Movie mentions "@<movieId>" are single tokens that no label matches; the caller maps them to movie entities.

What is deliberately not linked: single-token labels that are stopwords or very short ("It", "Up", "Her"), and
labels shared by several entities unless one of them clearly dominates by KG degree. On ReDial this trades a little
recall for much precision: chit-chat is full of words that are also DBpedia titles.
"""

import json
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import ahocorasick
import polars as pl

# A movie mention, a word (letters/digits with any combining accents, inner apostrophes kept: "don't", "Ocean's"), or
# any other single non-space character.
_LETTERS = r"(?:[^\W_][\u0300-\u036f]*)+"
TOKEN = re.compile(rf"@\d+|{_LETTERS}(?:['’]{_LETTERS})*|\S")
MOVIE_TOKEN = re.compile(r"@\d+")
SEP = "\x1f"  # joins normalized tokens in keys and haystacks; Python counts it as whitespace, so no token has it
AMBIGUOUS = -1  # automaton value: a label that blocks its span but links nothing

# Chat words that are DBpedia titles ("Nice", "Haha", "LOL") but are rarely meant as entities in ReDial. Added to the
# stopword list the caller passes (KGSF's stopwords.txt has function words but not these).
CHAT_STOPWORDS = frozenset(
    {
        "lol",
        "haha",
        "hahaha",
        "hehe",
        "yeah",
        "yes",
        "yep",
        "nope",
        "ok",
        "okay",
        "hi",
        "hello",
        "hey",
        "bye",
        "thanks",
        "thank",
        "nice",
        "cool",
        "awesome",
        "great",
        "good",
        "love",
        "like",
        "fun",
        "funny",
        "movie",
        "movies",
        "film",
        "films",
        "watch",
        "seen",
        "enjoy",
        "sure",
        "wow",
        "omg",
        "oh",
        "really",
        "well",
        "today",
        "tonight",
    }
)

DBPEDIA_RESOURCE = "http://dbpedia.org/resource/"
DISAMBIGUATION = re.compile(r"\s*\([^()]*\)\s*$")  # "Heat (1995 film)" -> "Heat"
DBPEDIA_DUPLICATE = re.compile(r"__\d+$")  # "Adam_Pascal__1": DBpedia's intermediate node of the same name
FILM_SUFFIX = re.compile(r"^(?P<head>.+?)\s+(?:film|films|movie|movies)$", re.IGNORECASE)


@dataclass(frozen=True)
class Token:
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Mention:
    """A linked span: text[start:end] == surface; tokens token_start..token_end-1 of tokenize(text)."""

    start: int
    end: int
    token_start: int
    token_end: int
    entity_id: int
    surface: str


def tokenize(text: str) -> list[Token]:
    """Tokens with character offsets into text, so a match over tokens maps back to the original characters."""
    return [Token(m.group(), m.start(), m.end()) for m in TOKEN.finditer(text)]


def normalize(token_text: str) -> str:
    """Matching form of one token: lowercase, accents stripped (NFKD), curly apostrophe straightened; '@123' as is.

    A possessive "'s" ending is dropped too, so "Tom Hanks's movies" matches "Tom Hanks" (the tokenizer keeps
    "Hanks's" one token); labels go through the same function, so "Ocean's Eleven" still matches itself.
    """
    if MOVIE_TOKEN.fullmatch(token_text):
        return token_text
    decomposed = unicodedata.normalize("NFKD", token_text.replace("’", "'").lower())
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    if plain.endswith("'s") and len(plain) > 2:
        plain = plain[:-2]
    return plain.replace(SEP, "")  # a separator in the text must not fake a token boundary


def normalized_tokens(text: str) -> list[str]:
    return [normalize(token.text) for token in tokenize(text)]


def label_variants(label: str) -> set[str]:
    """Surface names to match for one entity label; the label itself is always one of them.

    Rules (each gives one more variant):
    1. a trailing parenthesised qualifier is dropped: "Thriller (genre)" -> "Thriller", "Heat (1995 film)" -> "Heat";
    2. a trailing "film"/"films"/"movie"/"movies" word is dropped, since chat names genres bare:
       "Science fiction film" -> "Science fiction", "Horror film" -> "Horror" (also after rule 1);
    3. hyphens become spaces and are also removed: "Spider-Man" -> "Spider Man", "SpiderMan"
       (the tokenizer splits "Spider-Man" into three tokens, so these are different token sequences).
    Whitespace is collapsed. The linker's filters (stopwords, length, qualifier, ambiguity) apply to every variant.
    """
    return set(_variants_with_qualifier(label))


def _variants_with_qualifier(label: str) -> dict[str, str | None]:
    """label_variants() -> the qualifier rule 1 dropped to reach each variant (None if it kept the label's)."""
    label = " ".join(label.split())
    variants: dict[str, str | None] = {label: None} if label else {}
    qualifier = DISAMBIGUATION.search(label)
    if qualifier and label[: qualifier.start()].strip():
        variants.setdefault(label[: qualifier.start()].strip(), qualifier.group().strip(" ()").lower())
    for name, dropped in list(variants.items()):
        match = FILM_SUFFIX.match(name)
        if match:
            variants.setdefault(match["head"], dropped)
    for name, dropped in list(variants.items()):
        if "-" in name:
            variants.setdefault(" ".join(name.replace("-", " ").split()), dropped)
            variants.setdefault(name.replace("-", ""), dropped)
    return {name: dropped for name, dropped in variants.items() if name}


def dbpedia_label(uri: str, keep_qualifier: bool = False) -> str | None:
    """Readable label of a DBpedia resource URI, None for anything else (other sites, literals).

    "<http://dbpedia.org/resource/Heat_(1995_film)>" -> "Heat" ("Heat (1995 film)" with keep_qualifier);
    percent-decoded, underscores to spaces, DBpedia's "__1" duplicate suffix dropped. Pass labels with their
    qualifier to EntityLinker.build: it then knows that a bare "Time" of "Time (magazine)" is not the word's main sense.
    """
    uri = uri.strip().strip("<>")
    if not uri.startswith(DBPEDIA_RESOURCE):
        return None
    name = DBPEDIA_DUPLICATE.sub("", unquote(uri[len(DBPEDIA_RESOURCE) :]))
    name = " ".join(name.replace("_", " ").split())
    if not keep_qualifier:
        name = DISAMBIGUATION.sub("", name).strip() or name
    return name or None


@dataclass
class LinkerStats:
    """What build() did with the labels; the ambiguity counts are per distinct normalized surface."""

    entities: int = 0
    surfaces: int = 0  # distinct normalized surfaces in the automaton (linking or blocking)
    skipped_stopword: int = 0
    skipped_short: int = 0
    skipped_qualified: int = 0
    skipped_empty: int = 0
    ambiguous_resolved: int = 0  # shared surface linked to its dominant entity
    ambiguous_skipped: int = 0  # shared surface with no dominant entity: blocks its span, links nothing

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class EntityLinker:
    """Leftmost-longest, non-overlapping dictionary matching of normalized token n-grams; build with build()."""

    automaton: ahocorasick.Automaton
    labels: dict[int, frozenset[str]]  # entity_id -> normalized surfaces that link to it (for checks and tests)
    stats: LinkerStats = field(default_factory=LinkerStats)

    @classmethod
    def build(
        cls,
        labels: Mapping[int, Iterable[str]],
        stopwords: Iterable[str],
        degree: Mapping[int, int] | None = None,
        min_label_chars: int = 3,
        dominance_ratio: float = 3.0,
        min_dominant_degree: int = 1,
        use_variants: bool = True,
        add_chat_stopwords: bool = True,
        skip_all_stopword_labels: bool = True,
        kept_qualifiers: Iterable[str] | None = ("genre", "film genre"),
    ) -> "EntityLinker":
        """Compile labels into the automaton.

        labels: entity_id -> surface names. stopwords: words that never link alone (normalized here).
        degree: entity_id -> KG degree, used only to resolve shared surfaces; without it shared surfaces never link.
        Filters look at a surface's content tokens (those with a letter or digit; "Ha!" has one, "ha"). A surface
        with one content token links only if it is not a stopword, has at least min_label_chars characters, is not
        all digits and, when kept_qualifiers is not None, was not reached by dropping a parenthesised qualifier
        outside kept_qualifiers: "Time" of "Time (magazine)" or "War" of "War (band)" is not linked, "Thriller" of
        "Thriller (genre)" is. With skip_all_stopword_labels a surface whose content tokens are all stopwords
        ("The Who", "Let It Be") does not link either. A surface of several entities links to the one with the
        highest degree if that degree is >= dominance_ratio times the runner-up's and >= min_dominant_degree; else
        it is kept as a blocker, so a shorter label inside it ("Jordan" in an ambiguous "Michael Jordan") does not
        fire in its place.
        """
        if min_label_chars < 1 or dominance_ratio < 1:
            raise ValueError(
                f"min_label_chars must be >= 1 (got {min_label_chars}) and dominance_ratio >= 1 (got {dominance_ratio})"
            )
        stop = {normalize(word) for word in stopwords if word.strip()}
        if add_chat_stopwords:
            stop |= CHAT_STOPWORDS
        kept = None if kept_qualifiers is None else {q.lower() for q in kept_qualifiers}
        stats = LinkerStats()
        owners: dict[tuple[str, ...], set[int]] = {}
        for entity_id, names in labels.items():
            if isinstance(names, str):
                raise TypeError(f"labels[{entity_id}] is a str ({names!r}); pass an iterable of names, e.g. [name]")
            stats.entities += 1
            surfaces: dict[str, str | None] = {}
            for name in names:
                for surface, dropped in (_variants_with_qualifier(name) if use_variants else {name: None}).items():
                    if surfaces.get(surface, "") is not None:  # reached without a qualifier wins
                        surfaces[surface] = dropped
            for surface, dropped in surfaces.items():
                key = tuple(normalized_tokens(surface))
                content = [token for token in key if any(ch.isalnum() for ch in token)]
                if not content or any(not token for token in key):
                    stats.skipped_empty += 1
                elif len(content) == 1 and content[0] in stop:
                    stats.skipped_stopword += 1
                elif len(content) == 1 and (len(content[0]) < min_label_chars or content[0].isdigit()):
                    stats.skipped_short += 1
                elif len(content) == 1 and dropped is not None and kept is not None and dropped not in kept:
                    stats.skipped_qualified += 1
                elif skip_all_stopword_labels and all(token in stop for token in content):
                    stats.skipped_stopword += 1
                else:
                    owners.setdefault(key, set()).add(int(entity_id))

        automaton = ahocorasick.Automaton()
        linked: dict[int, set[str]] = {}
        for key, entity_ids in owners.items():
            target = _resolve(entity_ids, degree, dominance_ratio, min_dominant_degree)
            if len(entity_ids) > 1:
                if target == AMBIGUOUS:
                    stats.ambiguous_skipped += 1
                else:
                    stats.ambiguous_resolved += 1
            automaton.add_word(SEP + SEP.join(key) + SEP, (len(key), target))
            if target != AMBIGUOUS:
                linked.setdefault(target, set()).add(" ".join(key))
        stats.surfaces = len(owners)
        if len(automaton):
            automaton.make_automaton()
        return cls(automaton, {eid: frozenset(s) for eid, s in linked.items()}, stats)

    def link(self, text: str) -> list[Mention]:
        """Entity mentions in text, leftmost-longest and non-overlapping, in text order."""
        return self.link_details(text)[0]

    def link_details(self, text: str) -> tuple[list[Mention], list[tuple[int, int]]]:
        """link(), plus the (start, end) character spans that matched only an ambiguous (blocking) surface."""
        tokens = tokenize(text)
        if not tokens or not len(self.automaton):
            return [], []
        haystack_parts, end_to_token = [SEP], {}
        position = 0
        for index, token in enumerate(tokens):
            norm = normalize(token.text)
            haystack_parts.append(norm)
            haystack_parts.append(SEP)
            position += len(norm) + 1
            end_to_token[position] = index  # haystack index of the SEP after token `index`
        haystack = "".join(haystack_parts)

        candidates = []  # (token_start, -n_tokens, entity_id)
        for end_index, (n_tokens, entity_id) in self.automaton.iter(haystack):
            last = end_to_token[end_index]
            candidates.append((last - n_tokens + 1, -n_tokens, entity_id))
        candidates.sort()
        mentions, blocked, next_free = [], [], 0
        for token_start, neg_n, entity_id in candidates:
            if token_start < next_free:
                continue
            token_end = token_start - neg_n
            next_free = token_end
            start, end = tokens[token_start].start, tokens[token_end - 1].end
            if entity_id == AMBIGUOUS:
                blocked.append((start, end))
            else:
                mentions.append(Mention(start, end, token_start, token_end, entity_id, text[start:end]))
        return mentions, blocked

    def entity_ids(self, text: str) -> set[int]:
        return {mention.entity_id for mention in self.link(text)}


def _resolve(entity_ids: set[int], degree: Mapping[int, int] | None, ratio: float, min_degree: int) -> int:
    if len(entity_ids) == 1:
        return next(iter(entity_ids))
    if degree is None:
        return AMBIGUOUS
    ranked = sorted(entity_ids, key=lambda e: (-degree.get(e, 0), e))
    top, runner_up = degree.get(ranked[0], 0), degree.get(ranked[1], 0)
    return ranked[0] if top >= min_degree and top >= ratio * runner_up else AMBIGUOUS


def read_stopwords(path: Path) -> set[str]:
    """One word per line (KGSF's dbpedia_kgsf/stopwords.txt); blank lines ignored."""
    try:
        return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the stopword list (one word per line): {exc}") from None


# ---------------------------------------------------------------- evaluation against CRSLab's annotations


def evaluate_linker(
    linker: EntityLinker,
    valid_data_path: Path,
    uri_to_entity_id: Mapping[str, int],
    movie_uris: set[str],
    sample_size: int = 20,
    seed: int = 0,
) -> dict:
    """Micro P/R/F1 of the linker against the `entity` annotations of CRSLab's ReDial file (valid_data.json).

    Per utterance, the predicted set is the non-movie entity ids linked in " ".join(text); the gold set is the
    non-movie URIs of `entity` (angle brackets kept, as in the file), mapped through uri_to_entity_id. Gold URIs the
    map does not know are counted in gold_unmapped and stay in the gold set as misses (no prediction can hit them).

    The gold annotations are not human: KBRD (THUDM/KBRD, parlai/tasks/redial/extract_entities.py) ran DBpedia
    Spotlight at confidence 0.5 over every raw message, and KGSF/CRSLab kept its output. Spotlight is a statistical
    surface-form linker over all of DBpedia, so the gold has systematic false positives ("helo" -> Karl_Agathon,
    "love" -> Glossary_of_tennis_terms, "haha" -> Haha_(entertainer), "nice" -> Nice) and about half of its URIs are
    outside the 64k-entity KG. Recall is therefore bounded by the mapped share of the gold (recall_bound below), and
    precision is understated by every correct link Spotlight missed; F1 against it is a consistency check with the
    reference pipeline, not accuracy. recall_mapped/f1_mapped score against the mapped gold only.
    """
    conversations = _read_annotated(valid_data_path)
    movie_ids = {uri_to_entity_id[uri] for uri in movie_uris if uri in uri_to_entity_id}

    counts = Counter()
    f1_per_utterance, misses, false_hits = [], [], []
    for c_index, conversation in enumerate(conversations):
        dialog = conversation.get("dialog") if isinstance(conversation, dict) else None
        if not isinstance(dialog, list):
            raise ValueError(f"{valid_data_path}: conversation {c_index} has no 'dialog' list")
        conv_id = conversation.get("conv_id", c_index)
        for u_index, utterance in enumerate(dialog):
            if not isinstance(utterance, dict) or not isinstance(utterance.get("text"), list):
                raise ValueError(
                    f"{valid_data_path}: conversation {conv_id}, utterance {u_index}: "
                    "expected an object with a 'text' token list"
                )
            text = " ".join(str(token) for token in utterance["text"])
            gold = _gold_entities(utterance, uri_to_entity_id, movie_uris, movie_ids)
            unmapped = sum(isinstance(g, str) for g in gold)
            counts["gold_unmapped"] += unmapped
            counts["gold_mapped"] += len(gold) - unmapped
            mentions, blocked = linker.link_details(text)
            predicted = {m.entity_id for m in mentions if m.entity_id not in movie_ids}
            hits = gold & predicted
            counts["utterances"] += 1
            counts["gold"] += len(gold)
            counts["predicted"] += len(predicted)
            counts["true_positives"] += len(hits)
            counts["ambiguous_spans"] += len(blocked)
            if gold or predicted:
                f1_per_utterance.append(2 * len(hits) / (len(gold) + len(predicted)))
            where = {"conv_id": conv_id, "utt_id": utterance.get("utt_id", u_index), "text": text}
            misses += [{**where, "gold": g} for g in sorted(gold - hits, key=str)]
            false_hits += [
                {**where, "entity_id": m.entity_id, "surface": m.surface}
                for m in mentions
                if m.entity_id in predicted - gold
            ]

    return _linker_scores(counts, f1_per_utterance, misses, false_hits, sample_size, seed)


def _read_annotated(path: Path) -> list:
    """CRSLab's valid_data.json: a JSON list of conversations (a clear error naming the file otherwise)."""
    try:
        conversations = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: expected CRSLab's valid_data.json (a JSON list of conversations): {exc}") from None
    if not isinstance(conversations, list):
        raise ValueError(f"{path}: expected a JSON list of conversations, got {type(conversations).__name__}")
    return conversations


def _gold_entities(utterance: dict, uri_to_entity_id: Mapping[str, int], movie_uris: set[str], movie_ids: set) -> set:
    """The utterance's non-movie gold: entity ids, and the URIs the map lacks (misses no prediction can hit)."""
    gold: set = set()
    for uri in utterance.get("entity", []):
        entity_id = uri_to_entity_id.get(uri)
        if uri not in movie_uris and entity_id not in movie_ids:
            gold.add(uri if entity_id is None else entity_id)
    return gold


def _linker_scores(
    counts: Counter, f1_per_utterance: list, misses: list, false_hits: list, sample_size: int, seed: int
) -> dict:
    """Micro and macro scores from the counts, and samples of misses and false hits."""
    gold_reachable = counts["gold_mapped"]  # all counts are of distinct entities per utterance
    tp, predicted, gold = counts["true_positives"], counts["predicted"], counts["gold"]
    precision = tp / predicted if predicted else 0.0
    recall = tp / gold if gold else 0.0
    recall_mapped = tp / gold_reachable if gold_reachable > 0 else 0.0
    rng = random.Random(seed)
    return {
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "recall_mapped": recall_mapped,
        "f1_mapped": _f1(precision, recall_mapped),
        "recall_bound": gold_reachable / gold if gold else 0.0,
        "macro_f1": sum(f1_per_utterance) / len(f1_per_utterance) if f1_per_utterance else 0.0,
        "counts": {
            key: counts[key]
            for key in (
                "utterances",
                "gold",
                "predicted",
                "true_positives",
                "gold_unmapped",
                "gold_mapped",
                "ambiguous_spans",
            )
        },
        "sample_misses": _sample(misses, sample_size, rng),
        "sample_false_hits": _sample(false_hits, sample_size, rng),
    }


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _sample(rows: list[dict], size: int, rng: random.Random) -> list[dict]:
    return rng.sample(rows, size) if len(rows) > size else list(rows)


# ---------------------------------------------------------------- reference inputs from the CRSLab files


@dataclass
class MirrorLinkerInputs:
    """Linker inputs built from crslab_redial/ (used by tests/test_linking.py and bench/linker.py)."""

    labels: dict[int, list[str]]  # non-movie entity_id -> [readable label with its qualifier: "Time (magazine)"]
    degree: dict[int, int]
    uri_to_entity_id: dict[str, int]
    movie_uris: set[str]
    stopwords: set[str]


def mirror_linker_inputs(data_dir: Path) -> MirrorLinkerInputs:
    """Labels of the non-movie DBpedia entities of crslab_redial/entity2id.json, degrees from dbpedia_subkg.json.

    DBpedia's "X__1" nodes (12k; intermediate nodes named after X) get no label: they would make every such name
    ambiguous and leave it to the degree rule (same links with degrees, F1 0.165 instead of 0.365 without them).
    Degree counts raw triples at either end (before CRSLab's relation filter). The pipeline proper takes labels
    from the kg stage's entities table; this exists to evaluate the linker on the reference files alone.
    """
    crslab = Path(data_dir) / "crslab_redial"
    uri_to_entity_id = {uri: int(i) for uri, i in _read_json(crslab / "entity2id.json").items()}
    movie_entity_ids = {int(i) for i in _read_json(crslab / "movie_ids.json")}
    movie_uris = {uri for uri, i in uri_to_entity_id.items() if i in movie_entity_ids}
    movie_uris |= {uri for uri in _read_json(crslab / "id2entity.jsonl").values() if isinstance(uri, str)}
    degree: Counter = Counter()
    for head, edges in _read_json(crslab / "dbpedia_subkg.json").items():
        for _, tail in edges:
            degree[int(head)] += 1
            degree[int(tail)] += 1
    labels = {}
    for uri, entity_id in uri_to_entity_id.items():
        label = dbpedia_label(uri, keep_qualifier=True)
        if label and entity_id not in movie_entity_ids and not DBPEDIA_DUPLICATE.search(uri.strip("<>")):
            labels[entity_id] = [label]
    stopwords = read_stopwords(Path(data_dir) / "dbpedia_kgsf" / "stopwords.txt")
    return MirrorLinkerInputs(labels, dict(degree), uri_to_entity_id, movie_uris, stopwords)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read JSON: {exc}") from None


def entity_labels(uris: Mapping[int, str]) -> dict[int, list[str]]:
    """Linker labels of KG entities from their keys: DBpedia resources with their qualifier ("Time (magazine)"),
    metadata entities by name ("meta:star:Tom Hanks" -> "Tom Hanks"). DBpedia's "X__1" nodes get none (see
    mirror_linker_inputs)."""
    labels = {}
    for entity_id, uri in uris.items():
        if uri.startswith("meta:"):
            label = uri.split(":", 2)[-1]
        elif DBPEDIA_DUPLICATE.search(uri.strip("<>")):
            continue
        else:
            label = dbpedia_label(uri, keep_qualifier=True)
        if label:
            labels[int(entity_id)] = [label]
    return labels


def evaluation_report(evaluation: dict, labels: Mapping[int, str] | None = None) -> str:
    """evaluate_linker's result as markdown: the scores, and the sampled misses and false hits for error analysis."""
    labels = labels or {}
    counts = evaluation["counts"]

    def cell(text) -> str:
        return str(text).replace("|", "\\|")

    lines = [
        "# Entity linking against CRSLab's annotations",
        "",
        f"Non-movie entities per utterance, {counts['utterances']:,} utterances of the 901 annotated validation "
        "conversations (crslab_redial/valid_data.json; the gold comes from DBpedia Spotlight via KBRD, so it holds "
        "noise, and entities outside our KG count as misses).",
        "",
        "| precision | recall | F1 | macro F1 | recall on gold in the KG | F1 on gold in the KG | gold | predicted | "
        "true positives | gold outside the KG |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {evaluation['precision']:.3f} | {evaluation['recall']:.3f} | {evaluation['f1']:.3f} | "
        f"{evaluation['macro_f1']:.3f} | {evaluation['recall_mapped']:.3f} | {evaluation['f1_mapped']:.3f} | "
        f"{counts['gold']:,} | {counts['predicted']:,} | {counts['true_positives']:,} | {counts['gold_unmapped']:,} |",
        "",
        "## Sampled misses (gold entity not linked)",
        "",
        "| conversation | utterance | gold | text |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {m['conv_id']} | {m['utt_id']} | {cell(labels.get(m['gold'], m['gold']))} | {cell(m['text'])} |"
        for m in evaluation["sample_misses"]
    ]
    lines += [
        "",
        "## Sampled false hits (linked, not in the gold)",
        "",
        "| conversation | utterance | surface | entity | text |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {h['conv_id']} | {h['utt_id']} | {cell(h['surface'])} | "
        f"{cell(labels.get(h['entity_id'], h['entity_id']))} | {cell(h['text'])} |"
        for h in evaluation["sample_false_hits"]
    ]
    return "\n".join(lines) + "\n"


def build_linker(labels: dict[int, list[str]], degree: dict[int, int], stopwords: Path, cfg) -> EntityLinker:
    """The linker with params.linking's rules (cfg) over these labels."""
    return EntityLinker.build(
        labels,
        read_stopwords(stopwords),
        degree=degree,
        min_label_chars=cfg.min_label_chars,
        dominance_ratio=cfg.dominance_ratio,
        min_dominant_degree=cfg.min_dominant_degree,
        use_variants=cfg.use_variants,
        add_chat_stopwords=cfg.add_chat_stopwords,
    )


def kg_entity_linker(entities: pl.DataFrame, edges: pl.DataFrame, stopwords: Path, cfg) -> EntityLinker:
    """The linker over the kg stage's non-item entities, degrees from its edges (self loops aside)."""
    others = entities.filter(~pl.col("is_item"))
    degree = dict(edges.filter(pl.col("src") != pl.col("dst"))["src"].value_counts().iter_rows())
    return build_linker(entity_labels(dict(zip(others["entity_id"], others["uri"]))), degree, stopwords, cfg)
