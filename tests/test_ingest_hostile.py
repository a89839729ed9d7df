"""The ingest stage on hostile input (issue 14's probes): every malformed record is a named, counted bad record in
skip mode and a one-line error naming file, line and reason in error mode; nothing crashes, nothing is coerced;
a file that is not ReDial's JSON lines at all is an error in both modes."""

import json
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stages import ingest
from tests.test_ingest import files, run

GOOD = {
    "conversationId": "40",
    "initiatorWorkerId": 7,
    "respondentWorkerId": 8,
    "movieMentions": {"100": "Alpha"},
    "initiatorQuestions": {},
    "respondentQuestions": {},
    "messages": [
        {"messageId": 0, "senderWorkerId": 7, "text": "I liked @100"},
        {"messageId": 1, "senderWorkerId": 8, "text": "Then watch it again"},
    ],
}


def _line(**changes) -> str:
    record = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if key.startswith("message_"):
            record["messages"][0][key.removeprefix("message_")] = value
        else:
            record[key] = value
    return json.dumps(record)


def _train(mirror: Path, *lines: str, raw: bytes | None = None) -> ingest.RawRedialFiles:
    """The fixture's train file with these lines after its own (or raw bytes instead of it)."""
    path = mirror / "redial" / "hostile.jsonl"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text((mirror / "redial" / "train.jsonl").read_text() + "\n".join(lines) + "\n")
    return files(mirror, "redial/hostile.jsonl")


# (the line, the kind of bad record, what its message says)
HOSTILE = {
    "conversation id Infinity": (_line().replace('"40"', "Infinity", 1), "bad_id", "conversationId must be a whole"),
    "sender id Infinity": (
        _line().replace('"senderWorkerId": 7', '"senderWorkerId": Infinity', 1),
        "bad_id",
        "senderWorkerId must be a whole number",
    ),
    "id beyond int64": (_line(conversationId=2**64), "bad_id", "from 0 to 9223372036854775807"),
    "id true": (_line(conversationId=True), "bad_id", "got True"),
    "id with a fraction": (_line(conversationId=12345.7), "bad_id", "got 12345.7"),
    "negative id": (_line(respondentWorkerId=-8), "bad_id", "respondentWorkerId must be"),
    "sender id with a fraction": (_line(message_senderWorkerId=7.5), "bad_id", "got 7.5"),
    "one worker on both sides": (_line(respondentWorkerId=7), "bad_id", "the same worker (7)"),
    "text null": (_line(message_text=None), "bad_text", "text must be a string, got null"),
    "text a number": (_line(message_text=42), "bad_text", "got int"),
    "text a list": (_line(message_text=["a"]), "bad_text", "got list"),
    "text an object": (_line(message_text={"a": 1}), "bad_text", "got dict"),
    "text with NUL": (_line(message_text="a\x00b"), "bad_text", "control character"),
    "text with a lone surrogate": (
        _line().replace("I liked @100", "I liked @100 \\ud800", 1),
        "bad_text",
        "lone surrogate",
    ),
    "100,000 nested arrays": (
        _line().replace('"initiatorQuestions": {}', '"initiatorQuestions": ' + "[" * 100_000 + "]" * 100_000, 1),
        "malformed_json",
        "nested too deeply",
    ),
    "movieMentions a list": (_line(movieMentions=["100"]), "missing_keys", "movieMentions a mapping"),
    "movie id beyond int64": (_line(movieMentions={str(2**64): "Huge"}), "bad_id", "is no movie id"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_record_is_named_in_error_mode_and_counted_in_skip_mode(mirror, case):
    line, kind, message = HOSTILE[case]
    with pytest.raises(ingest.BadRecordError) as error:
        run(_train(mirror, line))
    assert "hostile.jsonl, line 5: " in str(error.value) and message in str(error.value)
    assert f"[{kind}]" in str(error.value)
    result = run(_train(mirror, line), on_bad_record="skip")
    assert result.metrics["bad_records"] == {kind: 1}
    assert 40 not in result.conversations["conv_id"].to_list() and result.conversations.height == 6


def test_two_records_on_one_line_are_two_bad_records(mirror):
    result = run(_train(mirror, _line() + _line(conversationId="41")), on_bad_record="skip")
    assert result.metrics["bad_records"] == {"joined_records": 2}
    with pytest.raises(ingest.BadRecordError, match=r"line 5: 2 JSON values on one line"):
        run(_train(mirror, _line() + " " + _line(conversationId="41")))


def test_an_empty_movie_mapping_written_as_a_list_is_accepted(mirror):
    line = _line(movieMentions=[]).replace("I liked @100", "I liked it")
    result = run(_train(mirror, line))
    assert 40 in result.conversations["conv_id"].to_list()


@pytest.mark.parametrize("on_bad_record", ["error", "skip"])
@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "no conversation could be read"),
        (b"\n  \n\n", "no conversation could be read"),
        (b'{"not": "a conversation"}\n', "no conversation could be read|line 1: record lacks"),  # (error: its record)
        (_line().encode("utf-16"), "the file is UTF-16"),
        (("[" + _line() + ",\n" + _line(conversationId="41") + "]").encode(), "one JSON array"),
    ],
)
def test_a_file_that_is_not_redial_json_lines_fails_in_both_modes(mirror, on_bad_record, content, message):
    with pytest.raises(ingest.BadRecordError, match=message) as error:
        run(_train(mirror, raw=content), on_bad_record=on_bad_record)
    assert "hostile.jsonl" in str(error.value)


def test_a_byte_order_mark_and_cr_line_ends_are_read_as_they_are_meant(mirror):
    lines = (mirror / "redial" / "train.jsonl").read_text().splitlines()
    with_bom = run(_train(mirror, raw=b"\xef\xbb\xbf" + "\n".join(lines).encode()))
    cr_only = run(_train(mirror, raw="\r".join(lines).encode()))
    plain = run(files(mirror))

    def same(result) -> bool:
        return result.conversations.drop("source_file").equals(plain.conversations.drop("source_file"))

    assert same(with_bom) and same(cr_only)
    assert with_bom.utterances.equals(plain.utterances) and cr_only.metrics["bad_records"] == {}


def test_fifty_thousand_messages_of_one_speaker_merge_into_one_turn(mirror):
    messages = [{"messageId": i, "senderWorkerId": 7, "text": f"word{i}"} for i in range(50_000)]
    result = run(_train(mirror, _line(messages=messages + [{"senderWorkerId": 8, "text": "ok"}])))
    turns = result.utterances.filter(pl.col("conv_id") == 40)
    assert turns["role"].to_list() == ["seeker", "recommender"]
    assert turns["text"][0] == " ".join(f"word{i}" for i in range(50_000))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
FIELDS = [
    "conversationId",
    "initiatorWorkerId",
    "respondentWorkerId",
    "movieMentions",
    "messages",
    "initiatorQuestions",
    "message_text",
    "message_senderWorkerId",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=JSON_VALUES)
@example(field="conversationId", value=0)  # a valid id other than the record's own
def test_any_json_value_in_any_field_is_kept_checked_or_one_named_bad_record(mirror, field, value):
    try:
        line = _line(**{field: value})
    except ValueError:  # NaN and infinities have no strict JSON; the hostile cases above write them raw
        return
    result = run(_train(mirror, line), on_bad_record="skip")
    bad = sum(result.metrics["bad_records"].values())
    ours = result.conversations.filter(pl.col("source_line") == 5)  # its id may be the changed field
    kept = ours.height == 1
    assert kept != (bad >= 1) or (kept and set(result.metrics["bad_records"]) <= {"unknown_mention", "bad_movie_form"})
    if kept:  # what was kept has the types the tables promise
        row = ours.row(0, named=True)
        assert isinstance(row["seeker_worker_id"], int) and row["seeker_worker_id"] >= 0
        assert all(isinstance(t, str) for t in result.utterances.filter(pl.col("conv_id") == row["conv_id"])["text"])
