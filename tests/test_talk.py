"""The terminal chat's session loop (pipeline/talk.converse) on what a person at a terminal does: Ctrl-C, bytes
that are not UTF-8, and a reply that fails; the session goes on or ends cleanly, never with a traceback."""

import io

import pytest

from pipeline.talk import converse


class FakeChat:
    """Session's interface: reply() appends the seeker's and the recommender's turns, or fails as told."""

    def __init__(self, failures=()):
        self.turns, self.failures, self.heard = [], list(failures), []
        self.template = None

    def find(self, words):
        return [f"@1  {words.title()}"]

    def why(self, which=None):
        return f"why {which}"

    def reply(self, text):
        self.turns.append(("seeker", text))
        self.heard.append(text)
        if self.failures:
            raise self.failures.pop(0)
        self.turns.append(("recommender", "ok"))
        return "try __movie__", ["Heat (1995)"], []


def run(lines, chat):
    said, feed = [], iter(lines)

    def read(prompt):
        line = next(feed)
        if isinstance(line, BaseException):
            raise line
        return line

    return converse(chat, read, said.append), said


def test_a_failed_or_stopped_reply_is_forgotten_and_the_session_goes_on():
    chat = FakeChat([ValueError("no entity"), KeyboardInterrupt()])
    code, said = run(["hi", "again", "and again", "/find heat", ""], chat)
    assert code == 0
    assert said[0] == "error: this reply failed (ValueError: no entity); that line is forgotten, go on"
    assert said[1] == "(stopped; that line is forgotten)"
    assert said[2:5] == ["c2crs> try __movie__", "       recommends: Heat (1995)", "@1  Heat"]
    assert chat.turns == [("seeker", "and again"), ("recommender", "ok")]


def test_ctrl_c_or_end_of_input_at_the_prompt_ends_cleanly():
    assert run([KeyboardInterrupt()], FakeChat()) == (0, [""])
    assert run([EOFError()], FakeChat()) == (0, [""])


def test_bytes_that_are_not_utf8_are_replaced_not_passed_on():
    chat = FakeChat()
    line = b"I loved \xff\xfe it".decode("utf-8", "surrogateescape")  # what input() gives for such bytes
    code, said = run([line, ""], chat)
    assert chat.heard == ["I loved \ufffd\ufffd it"]
    assert said[0] == "(your line held bytes that are not UTF-8; they are read as \ufffd)"
    chat.heard[0].encode("utf-8")  # no lone surrogate left to crash polars


def test_why_explains_all_or_one_and_says_what_it_takes():
    code, said = run(["/why", "/why 2", "/why two", ""], FakeChat())
    assert said == ["why None", "why 2", "/why takes nothing or a number: /why 2"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("command", ["talk", "serve"])
def test_a_conversation_shows_no_progress_bars(command, monkeypatch):
    """The stages' bars show on a terminal; talk and serve turn them off before the first turn."""
    from pipeline import cli, serve, talk
    from stages.io import progress

    monkeypatch.setattr(progress, "_shown", True)
    assert not progress.progress(range(3), file=_Terminal()).disable
    monkeypatch.setattr(talk, "talk", lambda *args: 0)
    monkeypatch.setattr(serve, "serve", lambda *args: 0)
    monkeypatch.setattr(cli, "load_params", lambda path: None)
    assert cli.main([command]) == 0
    assert progress.progress(range(3), file=_Terminal()).disable
