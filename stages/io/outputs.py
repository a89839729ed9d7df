"""Stage outputs on disk: Parquet tables and JSON metrics, committed as a set, so that a killed stage leaves either
its previous outputs or its new ones (never a mix), and a stage that is running cannot be started twice."""

import contextlib
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path

import polars as pl


def is_main_process() -> bool:
    """False only in a non-first process of a torchrun launch (RANK set by torchrun): those write nothing."""
    return os.environ.get("RANK", "0") == "0"


COMMIT_JOURNAL = ".outputs-commit"  # <root>/.outputs-commit.<pid>.json: the renames of a commit under way
COMMIT_LOCK = ".outputs.lock"


class OutputsBusyError(OSError):
    """Another live process holds what this one needs (a stage's lock, a commit under way); names it."""


def write_outputs(outputs: dict[Path, pl.DataFrame | dict | str]) -> None:
    """Write a stage's outputs as one set: all of them or none, even if the process is killed.

    Every output is written to a temporary file beside its target (named with this process's id) and synced; then a
    journal listing the renames is written atomically, the renames run, and the journal is removed. A kill before
    the journal leaves the previous outputs (and temporaries that the next writer removes); a kill during the
    renames leaves the journal, and settle_workspace (run by every entry point before it reads) completes it: the
    new set.
    Commits into the same folder take turns (a lock), so two concurrent writers never mix their sets. In a
    distributed run only the first process writes.
    """
    if not is_main_process():
        return
    targets = list(outputs)
    root = Path(os.path.commonpath([t.parent for t in targets]))
    finish_interrupted_commits(root)
    staged: list[tuple[Path, Path]] = []
    try:
        for target, content in outputs.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_dead_temporaries(target, root)
            temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            staged.append((temporary, target))
            if isinstance(content, pl.DataFrame):
                content.write_parquet(temporary, compression="zstd", statistics=True)
            elif isinstance(content, str):
                temporary.write_text(content, encoding="utf-8")
            else:
                temporary.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            _sync(temporary)
    except BaseException:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    with _locked(root / COMMIT_LOCK):
        _complete_journals(root)  # (one a writer killed since this one started)
        journal = root / f"{COMMIT_JOURNAL}.{os.getpid()}.json"
        pending = journal.with_name(journal.name + ".tmp")
        pending.write_text(json.dumps([[str(t), str(d)] for t, d in staged]), encoding="utf-8")
        _sync(pending)
        pending.replace(journal)  # from here on, the new set is the committed one
        for temporary, target in staged:
            temporary.replace(target)
        journal.unlink()


def finish_interrupted_commits(root: Path) -> list[Path]:
    """Complete the commits in `root` that a killed writer left half done (their journals); returns the targets
    moved into place."""
    with _locked(root / COMMIT_LOCK):
        return _complete_journals(root)


OUTPUT_FOLDERS = ("data", "metrics", "reports")  # where stages write: a commit's root is one of them or the workspace
_TEMPORARY = re.compile(r"^\.(?:.+\.(\d+)\.tmp|outputs-commit\.(\d+)\.json\.tmp)$")


def settle_workspace(workspace: Path) -> list[Path]:
    """Complete every commit a killed writer left half done in the workspace, and remove the temporaries of dead
    writers; returns the targets moved into place. Every entry point that reads stage outputs (the CLI's commands,
    the stage command, serve, the study) runs it first, so no reader ever sees a half-made set."""
    folders = [workspace] + [
        Path(folder)
        for name in OUTPUT_FOLDERS
        if (workspace / name).is_dir()
        for folder, _, _ in os.walk(workspace / name, followlinks=True)
    ]
    finished = []
    for folder in folders:
        if any(folder.glob(f"{COMMIT_JOURNAL}.*.json")):
            finished += finish_interrupted_commits(folder)
    for folder in folders:  # the journals are done: a dead writer's temporaries are nobody's now
        for path in folder.iterdir():
            match = _TEMPORARY.match(path.name)
            if match and not _alive(int(match.group(1) or match.group(2))):
                path.unlink(missing_ok=True)
    return finished


def _complete_journals(root: Path) -> list[Path]:
    """Under the commit lock: a journal left here is a killed writer's (a live one removes its own before letting
    go of the lock); do its remaining renames."""
    finished = []
    for journal in sorted(root.glob(f"{COMMIT_JOURNAL}.*.json")):
        for temporary, target in json.loads(journal.read_text(encoding="utf-8")):
            if Path(temporary).exists():
                Path(temporary).replace(target)
                finished.append(Path(target))
        journal.unlink()
    return finished


def _remove_dead_temporaries(target: Path, root: Path) -> None:
    """Temporaries of this target left by killed writers (a live writer's are its own business, and a journal's
    are kept for it to complete)."""
    journaled = set()
    for journal in root.glob(f"{COMMIT_JOURNAL}.*.json"):
        try:
            journaled.update(temporary for temporary, _ in json.loads(journal.read_text(encoding="utf-8")))
        except FileNotFoundError:  # a live writer's, just finished
            continue
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        pid = stale.name.removeprefix(f".{target.name}.").removesuffix(".tmp")
        if (not pid.isdigit() or not _alive(int(pid))) and str(stale) not in journaled:
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _sync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on a file (released when the holder exits or is killed)."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def stage_lock(workspace: Path, stage: str):
    """Holds `stage`'s lock in this workspace while it runs: a second run of the same stage fails at once, naming
    the process that runs it (two runs would compute the same outputs and race to write them)."""
    locks = workspace / "data" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{stage}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise OutputsBusyError(
                f"stage {stage} is already running in {workspace} (pid {holder}); wait for it or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def content_hash(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files (relative names and contents, in sorted order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
