"""`python -m pipeline talk`: a conversation with the trained C2-CRS model in the terminal (stages/chat does the
work: the HTTP API of `pipeline serve` uses the same code).

Name a movie as "@<ReDial id>" or by its title in double quotes ("The Matrix"); `/find WORDS` lists matching titles;
`/why` (or `/why N`) says why the last reply recommends its movies: the conversation's entities the recommender
weighted most, the KG paths from them to the movie, and the movie's review sentences that match the conversation.
"""

from pathlib import Path

from pipeline.config import Params
from stages.chat.engine import Chat, Knowledge, Session, load_generator, load_recommender
from stages.io.graph import STAGES, stage_making
from stages.io.stage_log import registered_name

CHAT_MODELS = {"recommender": "finetune_rec", "generator": "finetune_conv"}  # what a chat loads: kind -> its stage


def workspace_model(workspace: Path, kind: str) -> Path:
    """The workspace's own file of a chat model (the DVC output of its stage)."""
    return workspace / STAGES[CHAT_MODELS[kind]].model_file


def chat_model_files(workspace: Path, models_from: str) -> dict[str, Path]:
    """Per kind (recommender, generator), the file a chat loads: models_from "registry" takes the champion
    (models:/c2crs-recommender@champion, c2crs-generator) when it was trained on the workspace's data, else the
    workspace's file; "workspace" the DVC outputs. A missing file is an error naming the stage that makes it."""
    from pipeline.tracking import model_sources

    names = {kind: registered_name("c2crs", kind) for kind in CHAT_MODELS}
    sources = model_sources(
        {names[kind]: workspace_model(workspace, kind) for kind in CHAT_MODELS}, workspace, models_from
    )
    files = {kind: sources[names[kind]] for kind in CHAT_MODELS}
    for file in files.values():
        if not file.is_file():
            needed = str(file.relative_to(workspace))
            stage = stage_making(needed)
            raise ValueError(f"{needed} is missing; stage {stage} makes it: python -m pipeline repro {stage}")
    return files


def talk(params: Params, workspace: Path, models_from: str = "registry") -> int:
    print("loading the models ...", flush=True)
    files = chat_model_files(workspace, models_from)
    knowledge = Knowledge(params, workspace)
    chat = Chat(
        knowledge, load_recommender(files["recommender"], knowledge), load_generator(files["generator"], knowledge)
    )
    print(__doc__.split("\n\n")[1].replace("\n", " "))
    print("Empty line, Ctrl-D or Ctrl-C ends the conversation.\n")
    return converse(Session(chat))


def converse(session: Session, read=input, write=print) -> int:
    """The session: read a line, answer it, until an empty line, end of input or Ctrl-C at the prompt. A reply
    that fails (or is stopped with Ctrl-C) is reported in one line and forgotten: the conversation goes on from
    the turn before it."""
    while True:
        try:
            text = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return 0
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").strip()
        if "\ufffd" in text:
            write("(your line held bytes that are not UTF-8; they are read as \ufffd)")
        if not text:
            return 0
        if text.startswith("/find "):
            write("\n".join(session.find(text[6:].strip())) or "no title contains that")
            continue
        if text == "/why" or text.startswith("/why "):
            which = text[4:].strip()
            if which and not which.isdigit():
                write("/why takes nothing or a number: /why 2")
            else:
                write(session.why(int(which) if which else None))
            continue
        before = len(session.turns)
        try:
            answer, recommended, unknown = session.reply(text)
        except KeyboardInterrupt:
            del session.turns[before:]
            write("(stopped; that line is forgotten)")
            continue
        except Exception as exc:  # a reply that fails must not end the conversation
            del session.turns[before:]
            write(f"error: this reply failed ({type(exc).__name__}: {exc}); that line is forgotten, go on")
            continue
        if unknown:
            write(f"(not a ReDial title, kept as words: {', '.join(unknown)}; try /find)")
        write(f"c2crs> {answer}")
        if session.template:  # the model's words name none of its recommendations
            write(f"       [template, not the model's words] {session.template}")
        write(f"       recommends: {'; '.join(recommended)}")
