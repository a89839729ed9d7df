"""Stage 1, ingest: ReDial raw JSONL -> conversations, utterances, movies and movie forms tables.

The raw files come either from the official release (downloaded, SHA-256 checked, cached) or from a local mirror.
Consecutive messages of one speaker are merged into one utterance, so turns alternate between seeker and
recommender; some public copies of ReDial are merged already and must come out the same. Movies appear in text as
"@<movieId>". The movie forms are what each worker answered after the conversation about each movie mentioned
(initiatorQuestions, respondentQuestions): whether the recommender suggested it, whether the seeker has seen it and
liked it (ReDial's recommender reads the seeker's likes).

Over 400 lines: one raw format's reading (the record checks, the turn merging, the forms, the movie lists) shares
one bad-record policy and one set of schemas, so it stays in one file.
"""

import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from stages.io.graph import STAGES
from stages.io.outputs import write_outputs
from stages.io.progress import progress
from stages.io.stage_log import NO_LOG, StageLog, StageOutcome, WarningTally
from stages.sources import raw
from stages.sources.fetch import extract_member, missing_mirror_files

log = logging.getLogger(__name__)

MENTION = re.compile(r"@(\d+)")
TITLE_WITH_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
REQUIRED_KEYS = ("conversationId", "initiatorWorkerId", "respondentWorkerId", "movieMentions", "messages")
REQUIRED_MESSAGE_KEYS = ("text", "senderWorkerId")
KGSF_VALID_IDS = Path(__file__).parent / "resources" / "kgsf_valid_conversation_ids.txt"

CONVERSATION_SCHEMA = {
    "conv_id": pl.Int64,
    "split": pl.String,
    "seeker_worker_id": pl.Int64,
    "recommender_worker_id": pl.Int64,
    "n_turns": pl.Int32,
    "n_messages": pl.Int32,
    "source_file": pl.String,
    "source_line": pl.Int32,
}
UTTERANCE_SCHEMA = {
    "conv_id": pl.Int64,
    "turn_idx": pl.Int32,
    "role": pl.String,
    "text": pl.String,
    "movie_ids": pl.List(pl.Int64),
}
FORM_SCHEMA = {
    "conv_id": pl.Int64,
    "movie_id": pl.Int64,
    "form": pl.String,  # whose answers: seeker (initiatorQuestions) or recommender (respondentQuestions)
    "suggested": pl.Int8,  # 1: the recommender suggested the movie, 0: the seeker named it
    "seen": pl.Int8,  # the seeker has seen it: 0 no, 1 yes, 2 did not say
    "liked": pl.Int8,  # the seeker liked it: 0 no, 1 yes, 2 did not say
}
FORMS = {"initiatorQuestions": "seeker", "respondentQuestions": "recommender"}
FORM_ANSWERS = {"suggested": (0, 1), "seen": (0, 1, 2), "liked": (0, 1, 2)}
MOVIE_SCHEMA = {
    "movie_id": pl.Int64,
    "title": pl.String,
    "year": pl.Int32,
    "mentions_redial_release": pl.Int64,
    "mentions_ingested": pl.Int64,
    "dbpedia_uri": pl.String,
    "imdb_id": pl.String,
}


REDIAL_ZIP = "redial_dataset.zip"  # the official release, as cached without a mirror


class BadRecordError(ValueError):
    """A raw record that cannot be ingested; the message names file, line and reason."""


@dataclass(frozen=True)
class RawRedialFiles:
    """The raw inputs; field names are the keys of data.files in params.yaml."""

    redial_train: Path
    redial_test: Path
    movies: Path
    movies_imdb: Path
    movies_dbpedia: Path

    def items(self) -> list[tuple[str, Path]]:
        return [(name, getattr(self, name)) for name in self.__dataclass_fields__]


@dataclass
class IngestResult:
    conversations: pl.DataFrame
    utterances: pl.DataFrame
    movies: pl.DataFrame
    forms: pl.DataFrame
    metrics: dict


@dataclass
class BadRecords:
    """Applies the on_bad_record policy: raise at once, or count per kind and go on."""

    policy: str
    tally: WarningTally = field(default_factory=lambda: WarningTally(log))

    @property
    def counts(self) -> Counter:
        return self.tally.counts

    def report(self, kind: str, path: Path, line: int, reason: str) -> None:
        message = f"{path}, line {line}: {reason} [{kind}]"
        if self.policy == "error":
            raise BadRecordError(f"{message}. Set ingest.on_bad_record: skip to drop such records and count them.")
        self.tally.warn(kind, message)


# ---------------------------------------------------------------- finding the raw files


def locate_mirror_files(
    mirror_dir: Path, redial_train: str, redial_test: str, movies: str, movies_imdb: str, movies_dbpedia: str
) -> RawRedialFiles:
    files = RawRedialFiles(
        redial_train=mirror_dir / redial_train,
        redial_test=mirror_dir / redial_test,
        movies=mirror_dir / movies,
        movies_imdb=mirror_dir / movies_imdb,
        movies_dbpedia=mirror_dir / movies_dbpedia,
    )
    missing_mirror_files(mirror_dir, dict(files.items()))
    return files


# ---------------------------------------------------------------- conversations


def read_conversations(
    path: Path, split: str, bad: BadRecords, seen: dict[int, str]
) -> tuple[list[dict], list[dict], list[dict]]:
    """Parse one ReDial JSONL file into conversation rows, merged utterance rows and movie form rows.

    `seen` maps the conversation ids read so far (from any file) to where they were read, to catch duplicates.
    Accepted as they are: a UTF-8 byte order mark and CR or CRLF line ends. A file that is not JSON lines at all
    (UTF-16, one JSON array, empty) is an error in either on_bad_record mode: skipping every record of it would
    look like a successful ingest.
    """
    conversations, utterances, forms = [], [], []
    for line_no, raw_line in enumerate(progress(_json_lines(path), desc=path.name, unit=" conv"), start=1):
        if not raw_line.strip():
            continue
        for record in _parse_records(raw_line, path, line_no, bad):
            turns = _merge_turns(record, path, line_no, bad)
            if turns is None:
                continue
            conv_id = record["conversationId"]
            if conv_id in seen:
                bad.report(
                    "duplicate_conversation",
                    path,
                    line_no,
                    f"conversation {conv_id} was already read from {seen[conv_id]}",
                )
                continue
            seen[conv_id] = f"{path.name} line {line_no}"
            conversations.append(
                {
                    "conv_id": conv_id,
                    "split": split,
                    "seeker_worker_id": record["initiatorWorkerId"],
                    "recommender_worker_id": record["respondentWorkerId"],
                    "n_turns": len(turns),
                    "n_messages": len(record["messages"]),
                    "source_file": path.name,
                    "source_line": line_no,
                }
            )
            utterances.extend({"conv_id": conv_id, "turn_idx": i, **turn} for i, turn in enumerate(turns))
            forms.extend(_movie_forms(record, conv_id, path, line_no, bad))
    if not conversations:
        raise BadRecordError(
            f"{path}: no conversation could be read ({sum(bad.counts.values())} bad records so "
            "far): expected ReDial's JSON lines, one conversation object per line, in UTF-8"
        )
    return conversations, utterances, forms


def _json_lines(path: Path) -> list[bytes]:
    """The file's lines (split at LF, CR or CRLF), without a UTF-8 byte order mark."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise BadRecordError(
            f"{path}: the file is UTF-16; ReDial's JSON lines are UTF-8 (convert it, e.g. iconv -f UTF-16 -t UTF-8)"
        )
    if data.lstrip()[:1] == b"[":
        raise BadRecordError(
            f"{path}: the file is one JSON array; ReDial's format is one conversation object per line (JSON lines)"
        )
    return data.removeprefix(b"\xef\xbb\xbf").splitlines()


def _movie_forms(record: dict, conv_id: int, path: Path, line_no: int, bad: BadRecords) -> list[dict]:
    """The rows of a record's movie forms. Both are optional (an empty form is {} or [] in public copies); a form
    that is not a mapping of movie id -> {suggested, seen, liked} with ReDial's answer codes is dropped and
    counted (the conversation itself is kept: nothing else reads the forms)."""
    rows = []
    declared = {str(movie_id) for movie_id in record["movieMentions"]}
    for key, form in FORMS.items():
        answers = record.get(key)
        if answers in (None, [], {}):
            continue
        where = f"conversation {conv_id}: {key}"
        if not isinstance(answers, dict):
            bad.report(
                "bad_movie_form",
                path,
                line_no,
                f"{where} must be a mapping, got {type(answers).__name__} (the form is dropped)",
            )
            continue
        form_rows = []
        for movie_id, answer in answers.items():
            valid = (
                isinstance(answer, dict)
                and str(movie_id) in declared
                and all(type(answer.get(name)) is int and answer[name] in codes for name, codes in FORM_ANSWERS.items())
            )
            if not valid:
                bad.report(
                    "bad_movie_form",
                    path,
                    line_no,
                    f"{where}: movie {movie_id!r} needs a movie of movieMentions and "
                    f"{{suggested: 0|1, seen: 0|1|2, liked: 0|1|2}}, got {answer!r} (the form is dropped)",
                )
                form_rows = None
                break
            form_rows.append(
                {
                    "conv_id": conv_id,
                    "movie_id": int(movie_id),
                    "form": form,
                    **{name: answer[name] for name in FORM_ANSWERS},
                }
            )
        rows += form_rows or []
    return rows


MAX_ID = 2**63 - 1  # ids are stored as int64
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # no text of a conversation holds these


def _parse_records(raw_line: bytes, path: Path, line_no: int, bad: BadRecords) -> list[dict]:
    """The checked record of a line (ids as ints), or none; several objects run together on one line (a lost
    line break) are each a bad record."""
    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad.report("invalid_utf8", path, line_no, f"invalid UTF-8 at byte {exc.start}")
        return []
    decoder, records, end = json.JSONDecoder(), [], 0
    try:
        while end < len(text.rstrip()):
            record, end = decoder.raw_decode(text, len(text) - len(text[end:].lstrip()))
            records.append(record)
    except json.JSONDecodeError as exc:
        bad.report("malformed_json", path, line_no, f"malformed JSON: {exc.msg} at column {exc.colno}")
        return []
    except RecursionError:
        bad.report("malformed_json", path, line_no, "JSON nested too deeply")
        return []
    if len(records) > 1:
        for _ in records:
            bad.report(
                "joined_records",
                path,
                line_no,
                f"{len(records)} JSON values on one line (a line break is missing between them)",
            )
        return []
    record = _check_record(records[0], path, line_no, bad)
    return [] if record is None else [record]


def _check_record(record, path: Path, line_no: int, bad: BadRecords) -> dict | None:
    """The record with its ids as ints, or None (reported) when it does not follow ReDial's format."""
    if not isinstance(record, dict):
        bad.report("malformed_json", path, line_no, f"expected a JSON object, got {type(record).__name__}")
        return None
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        bad.report("missing_keys", path, line_no, f"record lacks required key(s) {', '.join(missing)}")
        return None
    record = dict(record)
    for key in ("conversationId", "initiatorWorkerId", "respondentWorkerId"):
        value = _parse_id(record[key])
        if value is None:
            bad.report(
                "bad_id",
                path,
                line_no,
                f"{key} must be a whole number from 0 to {MAX_ID} (or its digits as a string), got {record[key]!r}",
            )
            return None
        record[key] = value
    where = f"conversation {record['conversationId']}"
    if record["initiatorWorkerId"] == record["respondentWorkerId"]:
        bad.report(
            "bad_id",
            path,
            line_no,
            f"{where}: the initiator and the respondent are the same worker ({record['initiatorWorkerId']})",
        )
        return None
    if record["movieMentions"] == []:  # an empty mapping written as [] by some copies
        record["movieMentions"] = {}
    mentions = record["movieMentions"]
    if not isinstance(record["messages"], list) or not isinstance(mentions, dict):
        bad.report(
            "missing_keys",
            path,
            line_no,
            f"{where}: messages must be a list and movieMentions a mapping "
            f"of movie id to title, got {type(record['messages']).__name__} and {type(mentions).__name__}",
        )
        return None
    wrong_movie = next((m for m in mentions if _parse_id(m) is None), None)
    if wrong_movie is not None:
        bad.report(
            "bad_id",
            path,
            line_no,
            f"{where}: movieMentions key {wrong_movie!r} is no movie id (digits, at most {MAX_ID})",
        )
        return None
    for index, message in enumerate(record["messages"]):
        absent = [k for k in REQUIRED_MESSAGE_KEYS if not isinstance(message, dict) or k not in message]
        if absent:
            bad.report("missing_keys", path, line_no, f"{where}: message {index} lacks {', '.join(absent)}")
            return None
        problem = _text_problem(message["text"])
        if problem:
            bad.report("bad_text", path, line_no, f"{where}: message {index}: text {problem}")
            return None
        if _parse_id(message["senderWorkerId"]) is None:
            bad.report(
                "bad_id",
                path,
                line_no,
                f"{where}: message {index}: senderWorkerId must be a whole number, got {message['senderWorkerId']!r}",
            )
            return None
    return record


def _parse_id(value) -> int | None:
    """An id as ReDial writes them (a JSON integer, or a string of digits) within int64; None for anything else
    (true, 12345.7, -3, Infinity, "12a")."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if type(value) is not int or not 0 <= value <= MAX_ID:
        return None
    return value


def _text_problem(text) -> str | None:
    if not isinstance(text, str):
        return f"must be a string, got {'null' if text is None else type(text).__name__}"
    if CONTROL_CHARACTERS.search(text):
        return "holds a control character (such as NUL)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate (an escape such as \\ud800 that is no character)"
    return None


def _merge_turns(record: dict, path: Path, line_no: int, bad: BadRecords) -> list[dict] | None:
    """Consecutive same-speaker messages become one turn; movie ids are kept once per turn, in order."""
    where = f"conversation {record['conversationId']}"
    roles = {record["initiatorWorkerId"]: "seeker", record["respondentWorkerId"]: "recommender"}
    declared = {str(movie_id) for movie_id in record["movieMentions"]}
    turns: list[dict] = []  # each turn's text parts and movie ids are joined at the end (linear in the record)
    for message in record["messages"]:
        text = message["text"].strip()
        if not text:
            continue
        role = roles.get(_parse_id(message["senderWorkerId"]))
        if role is None:
            bad.report(
                "unknown_sender",
                path,
                line_no,
                f"{where}: sender {message['senderWorkerId']!r} is neither the initiator nor the respondent",
            )
            return None
        movie_ids = []
        for movie_id in MENTION.findall(text):
            if movie_id not in declared:
                bad.report(
                    "unknown_mention",
                    path,
                    line_no,
                    f"{where}: text mention @{movie_id} is absent from movieMentions (the mention is dropped)",
                )
                continue
            movie_ids.append(int(movie_id))
        if turns and turns[-1]["role"] == role:
            turn = turns[-1]
            turn["text"].append(text)
            # (as ingested so far: a movie named twice in a merged message counts twice; noted in the README)
            turn["movie_ids"] += [m for m in movie_ids if m not in turn["seen"]]
            turn["seen"].update(movie_ids)
        else:
            first = list(dict.fromkeys(movie_ids))
            turns.append({"role": role, "text": [text], "movie_ids": first, "seen": set(first)})
    if not turns:
        bad.report("empty_conversation", path, line_no, f"{where}: no message with text")
        return None
    return [{"role": t["role"], "text": " ".join(t["text"]), "movie_ids": t["movie_ids"]} for t in turns]


def assign_validation(
    conversations: list[dict], valid_split: str, valid_fraction: float, full_train_conversations: int, seed: int
) -> str:
    """Move part of the train conversations to valid, in place; returns the rule that was applied.

    With the full official train file the KGSF/CRSLab validation ids are used, so numbers compare with theirs;
    with a partial copy those ids would hold most of it, so a seeded fraction is drawn instead.
    """
    train = [c for c in conversations if c["split"] == "train"]
    rule = valid_split
    if rule == "auto":
        rule = "kgsf_ids" if len(train) >= full_train_conversations else "fraction"
    if rule == "kgsf_ids":
        lines = KGSF_VALID_IDS.read_text().splitlines()
        valid_ids = {int(x) for x in lines if x and not x.startswith("#")}
        found = sum(c["conv_id"] in valid_ids for c in train)
        if found < len(valid_ids):
            log.warning("only %d of the %d KGSF validation ids are in the train file", found, len(valid_ids))
    else:
        ids = sorted(c["conv_id"] for c in train)
        valid_ids = set(random.Random(seed).sample(ids, round(valid_fraction * len(ids))))
    for conversation in train:
        if conversation["conv_id"] in valid_ids:
            conversation["split"] = "valid"
    return rule


# ---------------------------------------------------------------- movies


def read_movies(files: RawRedialFiles, utterances: pl.DataFrame) -> pl.DataFrame:
    """The item set: every movie of the ReDial release, with title, year, IMDb id and DBpedia URI when known."""
    catalogue = _read_csv(files.movies, {"movieId": pl.Int64, "movieName": pl.String, "nbMentions": pl.Int64})
    parsed = [_split_title(name) for name in catalogue["movieName"]]
    movies = pl.DataFrame(
        {
            "movie_id": catalogue["movieId"],
            "title": [title for title, _ in parsed],
            "year": pl.Series([year for _, year in parsed], dtype=pl.Int32),
            "mentions_redial_release": catalogue["nbMentions"],
        }
    )
    counts = (
        utterances.select(pl.col("movie_ids").explode().alias("movie_id"))
        .drop_nulls()
        .group_by("movie_id")
        .len(name="mentions_ingested")
    )
    imdb = (
        _read_csv(files.movies_imdb, {"databaseId": pl.Int64, "imdbId": pl.String})
        .filter(pl.col("databaseId") >= 0, pl.col("imdbId").str.contains(r"^\d+$"))
        .select(pl.col("databaseId").alias("movie_id"), ("tt" + pl.col("imdbId").str.zfill(7)).alias("imdb_id"))
        .unique("movie_id", keep="first")
    )
    dbpedia = _read_dbpedia_uris(files.movies_dbpedia)
    return (
        movies.join(counts, on="movie_id", how="left")
        .with_columns(pl.col("mentions_ingested").fill_null(0).cast(pl.Int64))
        .join(dbpedia, on="movie_id", how="left")
        .join(imdb, on="movie_id", how="left")
        .select(list(MOVIE_SCHEMA))
        .cast(MOVIE_SCHEMA)
        .sort("movie_id")
    )


def _read_csv(path: Path, columns: dict) -> pl.DataFrame:
    try:
        table = pl.read_csv(path, schema_overrides=columns, columns=list(columns))
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise BadRecordError(f"{path}: expected a CSV file with columns {', '.join(columns)}: {exc}") from None
    return table


def _split_title(name: str) -> tuple[str, int | None]:
    name = " ".join(name.split())
    match = TITLE_WITH_YEAR.match(name)
    return (match["title"], int(match["year"])) if match else (name, None)


def _read_dbpedia_uris(path: Path) -> pl.DataFrame:
    """ReDial movieId -> DBpedia URI (CRSLab's id2entity file: one JSON object; null where no URI was found)."""
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(mapping, dict):
            raise ValueError(f"expected a JSON object, got {type(mapping).__name__}")
        rows = [(int(k), v.strip("<>") if isinstance(v, str) else None) for k, v in mapping.items()]
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRecordError(f"{path}: expected a JSON object movieId -> DBpedia URI: {exc}") from None
    return pl.DataFrame(rows, schema={"movie_id": pl.Int64, "dbpedia_uri": pl.String}, orient="row")


# ---------------------------------------------------------------- the stage


def split_statistics(conversations: pl.DataFrame, utterances: pl.DataFrame) -> dict:
    per_turn = utterances.join(conversations.select("conv_id", "split"), on="conv_id").with_columns(
        pl.col("movie_ids").list.len().alias("mentions")
    )
    stats = {}
    for split in ("train", "valid", "test"):
        turns = per_turn.filter(pl.col("split") == split)
        stats[split] = {
            "conversations": conversations.filter(pl.col("split") == split).height,
            "turns": turns.height,
            "movie_mentions": int(turns["mentions"].sum()),
            "mentions_by_recommender": int(turns.filter(pl.col("role") == "recommender")["mentions"].sum()),
        }
    return stats


def ingest(
    files: RawRedialFiles,
    on_bad_record: str,
    valid_split: str,
    valid_fraction: float,
    full_train_conversations: int,
    seed: int,
) -> IngestResult:
    bad = BadRecords(on_bad_record)
    conversations, utterances, forms, seen = [], [], [], {}
    for path, split in ((files.redial_train, "train"), (files.redial_test, "test")):
        convs, utts, conv_forms = read_conversations(path, split, bad, seen)
        conversations += convs
        utterances += utts
        forms += conv_forms
    rule = assign_validation(conversations, valid_split, valid_fraction, full_train_conversations, seed)

    conversations_df = pl.DataFrame(conversations, schema=CONVERSATION_SCHEMA).sort("conv_id")
    utterances_df = pl.DataFrame(utterances, schema=UTTERANCE_SCHEMA).sort("conv_id", "turn_idx")
    movies_df = read_movies(files, utterances_df)
    forms_df = pl.DataFrame(forms, schema=FORM_SCHEMA).sort("conv_id", "form", "movie_id")
    outside = (
        utterances_df.select(pl.col("movie_ids").explode())
        .drop_nulls()
        .filter(~pl.col("movie_ids").is_in(movies_df["movie_id"].implode()))
        .height
    )
    metrics = {
        **split_statistics(conversations_df, utterances_df),
        "validation_rule": rule,
        "movies": movies_df.height,
        "movies_with_dbpedia_uri": movies_df["dbpedia_uri"].is_not_null().sum(),
        "movies_with_imdb_id": movies_df["imdb_id"].is_not_null().sum(),
        "mentions_outside_movie_list": outside,
        "movie_forms": {
            form: {
                "conversations": part["conv_id"].n_unique(),
                "movies": part.height,
                "liked": int((part["liked"] == 1).sum()),
                "disliked": int((part["liked"] == 0).sum()),
            }
            for form in FORMS.values()
            for part in [forms_df.filter(pl.col("form") == form)]
        },
        "bad_records": dict(sorted(bad.counts.items())),
    }
    bad.tally.summary()
    return IngestResult(conversations_df, utterances_df, movies_df, forms_df, metrics)


def redial_raw_files(data, workspace: Path) -> RawRedialFiles:
    """The raw ReDial files; without a mirror the conversations come from the official zip."""
    if data.resolved_source() == "mirror":
        return locate_mirror_files(
            raw.mirror_dir(data, workspace),
            **data.files.model_dump(include={"redial_train", "redial_test", "movies", "movies_imdb", "movies_dbpedia"}),
        )
    cache = workspace / data.cache_dir
    zipped = data.downloads.redial_zip
    archive = raw.download(data, zipped.url, cache / REDIAL_ZIP, zipped.sha256)
    extracted = {
        name: extract_member(archive, getattr(zipped, name), cache / getattr(zipped, name))
        for name in ("redial_train", "redial_test", "movies")
    }
    return RawRedialFiles(**extracted, **raw.raw_files(data, workspace, "movies_imdb", "movies_dbpedia"))


def run(params, workspace: Path, log: StageLog = NO_LOG) -> StageOutcome:
    files = redial_raw_files(params.data, workspace)
    result = ingest(files, seed=params.seed, **params.ingest.model_dump())
    spec = STAGES["ingest"]
    conversations, utterances, movies, forms = (
        workspace / spec.output(name) for name in ("conversations", "utterances", "movies", "movie_forms")
    )
    write_outputs(
        {
            conversations: result.conversations,
            utterances: result.utterances,
            movies: result.movies,
            forms: result.forms,
            workspace / spec.metrics_file: result.metrics,
        }
    )
    return StageOutcome(dict(files.items()), result.metrics)
