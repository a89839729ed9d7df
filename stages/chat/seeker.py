"""The simulated seeker of stages/simulate.py: a test conversation's real seeker, replayed by fixed rules.

The rules (docs/simulation.md states them too; they were written before the first result and are not tuned on
results):
- Target: a movie the real seeker liked (liked = 1 in the seeker's own form) that the recommender suggested
  (suggested = 1): a movie the seeker came to find. Of several, the one the conversation named first. It must be an
  item of the KG and have metadata (genre, stars, director); a conversation without such a movie is not simulated.
- Opening: the conversation's first seeker turn, as it was. Where it names the target, "Hi! I liked @<movie>. Can
  you recommend a movie?" with the first other movie the seeker liked, in the order the conversation named them;
  with none, "Hi! Can you recommend a movie?".
- Each turn the system answers (its top k, the generator's words) and the seeker accepts when the target is among
  the top k. It never stops early: one simulation of T turns gives the first success at every k.
- Otherwise it gives one hint, the next kind in a fixed round robin (params simulate.hint_kinds) that has a hint
  left, each kind's hints in the metadata's order:
  genre ("I'm in the mood for <genre>."), star ("Do you know one with <star>?"), director ("Maybe something by
  <director>?"), similar: a movie sharing the target's genre, a star or its director, first those the seeker liked
  ("I also liked @<movie>."), then other movies by its director, then with one of its stars, most mentioned in
  ReDial first ("Something like @<movie>?"). With no hint left: "Anything else?".
- Never the title: a message that would name the target (its "@id", or its title's words in a row, case and
  punctuation aside, with movies shown as titles) is never said; the next option is used instead.
"""

import re
from dataclasses import dataclass
from itertools import cycle

import polars as pl

HINT_KINDS = ("genre", "star", "director", "similar")
HINTS = {
    "genre": "I'm in the mood for {}.",
    "star": "Do you know one with {}?",
    "director": "Maybe something by {}?",
    "liked": "I also liked @{}.",  # a "similar" hint: a movie the seeker liked
    "similar": "Something like @{}?",  # a "similar" hint: another movie by the director or with a star
}
OPENINGS = ("Hi! I liked @{}. Can you recommend a movie?", "Hi! Can you recommend a movie?")
NO_HINT = "Anything else?"
METADATA_FIELDS = ("genre", "star", "director")
SIMILAR_FROM_CATALOGUE = 5  # "similar" hints from other movies at most (a seeker gives fewer than T hints)


@dataclass(frozen=True)
class Seeker:
    """One simulated seeker: its conversation, the movie it looks for, what it says first and its hints."""

    conv_id: int
    target: int  # ReDial movie id
    opening: str  # movies as "@id"
    hints: dict[str, tuple[str, ...]]  # kind -> its hint messages, in the order they are given

    def messages(self, kinds: tuple[str, ...], n: int) -> list[str]:
        """The seeker's messages after the opening, one per turn (n of them): the round robin over `kinds` of the
        hints left, then "Anything else?". They do not depend on the system's answers, so they are fixed here."""
        left = {kind: list(self.hints.get(kind, ())) for kind in kinds}
        said, order = [], cycle(kinds)
        for _ in range(n):
            for _ in kinds:
                kind = next(order)
                if left[kind]:
                    said.append(left[kind].pop(0))
                    break
            else:
                said.append(NO_HINT)
        return said


def folded(text: str) -> str:
    """Lower-case words separated by single spaces, padded with one (so word runs compare with `in`)."""
    return " " + " ".join(re.findall(r"\w+", text.lower())) + " "


class TitleGuard:
    """Whether a message names a movie: its "@id", or its title's words in a row once movies are shown as titles."""

    def __init__(self, titles: dict[int, str]):
        self.titles = titles  # ReDial movie id -> title (without the year)

    def names(self, text: str, movie: int) -> bool:
        if re.search(rf"@{movie}\b", text):
            return True
        shown = re.sub(r"@(\d+)", lambda m: self.titles.get(int(m.group(1)), m.group(0)), text)
        return folded(self.titles[movie]) in folded(shown)


def build_seekers(
    conv_ids: list[int],
    utterances: pl.DataFrame,
    forms: pl.DataFrame,
    movies: pl.DataFrame,
    movie_info: dict,
    items: set[int],
) -> tuple[list[Seeker], dict[str, int]]:
    """The seekers of the conversations `conv_ids` that have a target, and the count of those left out, by reason.

    utterances/forms/movies: the ingest stage's tables; movie_info: the metadata (id2info.json as read: ReDial id ->
    {genre, star, director: [names]}); items: the ReDial ids that are items of the KG."""
    guard = TitleGuard(dict(movies.select("movie_id", "title").iter_rows()))
    mentions = dict(movies.select("movie_id", "mentions_ingested").iter_rows())
    metadata = {int(m): {f: list(info.get(f) or []) for f in METADATA_FIELDS} for m, info in movie_info.items()}
    by_person = _movies_by(metadata, mentions, items)
    wanted = pl.Series(conv_ids).implode()
    turns = (
        utterances.filter(pl.col("conv_id").is_in(wanted))
        .sort("conv_id", "turn_idx")
        .partition_by("conv_id", as_dict=True)
    )
    liked = (
        forms.filter(pl.col("conv_id").is_in(wanted) & (pl.col("form") == "seeker") & (pl.col("liked") == 1))
        .group_by("conv_id")
        .agg("movie_id", "suggested")
    )
    liked = {c: dict(zip(m, s)) for c, m, s in liked.iter_rows()}
    seekers, left_out = [], {"no liked suggested movie with metadata in the KG": 0, "no opening without the title": 0}
    for conv_id in conv_ids:
        conversation = turns.get((conv_id,))
        named = _named_order(conversation)
        candidates = [m for m in named if liked.get(conv_id, {}).get(m) == 1 and m in items and m in metadata]
        if conversation is None or not candidates:
            left_out["no liked suggested movie with metadata in the KG"] += 1
            continue
        target = candidates[0]
        others = [m for m in named if m in liked.get(conv_id, {}) and m != target and m in items]
        opening = _opening(conversation, target, others, guard)
        if opening is None:
            left_out["no opening without the title"] += 1
            continue
        hints = _hints(target, others, metadata, by_person, guard)
        seekers.append(Seeker(conv_id, target, opening, hints))
    return seekers, left_out


def _named_order(conversation: pl.DataFrame | None) -> list[int]:
    """The movies a conversation names, in the order it first names them."""
    if conversation is None:
        return []
    return list(dict.fromkeys(m for ids in conversation.sort("turn_idx")["movie_ids"] for m in ids))


def _opening(conversation: pl.DataFrame, target: int, others: list[int], guard: TitleGuard) -> str | None:
    """The first seeker turn, or the first opening template that does not name the target (None: none)."""
    first = conversation.filter(pl.col("role") == "seeker").sort("turn_idx").head(1)
    options = [first["text"][0]] if first.height else []
    options += [OPENINGS[0].format(m) for m in others[:1]] + [OPENINGS[1]]
    return next((text for text in options if not guard.names(text, target)), None)


def _movies_by(metadata: dict, mentions: dict, items: set[int]) -> dict[tuple[str, str], list[int]]:
    """(field, name) -> the KG's movies whose metadata lists that director or star, most mentioned first."""
    by: dict[tuple[str, str], list[int]] = {}
    for movie, info in metadata.items():
        if movie in items:
            for field in ("director", "star"):
                for name in info[field]:
                    by.setdefault((field, name), []).append(movie)
    for movies in by.values():
        movies.sort(key=lambda m: (-mentions.get(m, 0), m))
    return by


def _hints(target: int, liked: list[int], metadata: dict, by_person: dict, guard: TitleGuard) -> dict:
    """Each kind's hints for the target, in order, without any that would name it."""
    info = metadata[target]
    hints = {kind: [HINTS[kind].format(name) for name in info[kind]] for kind in METADATA_FIELDS}
    shares = [m for m in liked if any(set(metadata.get(m, {}).get(f, ())) & set(info[f]) for f in METADATA_FIELDS)]
    others = [m for field in ("director", "star") for name in info[field] for m in by_person.get((field, name), [])]
    similar = [HINTS["liked"].format(m) for m in shares]
    others = [m for m in dict.fromkeys(others) if m != target and m not in shares][:SIMILAR_FROM_CATALOGUE]
    similar += [HINTS["similar"].format(m) for m in others]
    hints["similar"] = similar
    return {kind: tuple(dict.fromkeys(t for t in texts if not guard.names(t, target))) for kind, texts in hints.items()}
