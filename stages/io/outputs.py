"""Stage outputs on disk: Parquet tables and JSON metrics, written so that a killed stage leaves the old ones."""

import hashlib
import json
import os
from pathlib import Path

import polars as pl


def is_main_process() -> bool:
    """False only in a non-first process of a torchrun launch (RANK set by torchrun): those write nothing."""
    return os.environ.get("RANK", "0") == "0"


def write_outputs(outputs: dict[Path, pl.DataFrame | dict | str]) -> None:
    """Write every output to a temporary file beside its target, then rename them into place.

    Nothing is renamed until every file is written, so an exception or a kill during the slow part leaves the
    previous outputs untouched; a rename within one directory is atomic. In a distributed run only the first
    process writes.
    """
    if not is_main_process():
        return
    staged: list[tuple[Path, Path]] = []
    try:
        for target, content in outputs.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a killed run
                stale.unlink()
            temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            staged.append((temporary, target))
            if isinstance(content, pl.DataFrame):
                content.write_parquet(temporary, compression="zstd", statistics=True)
            elif isinstance(content, str):
                temporary.write_text(content, encoding="utf-8")
            else:
                temporary.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            with open(temporary, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    for temporary, target in staged:
        temporary.replace(target)


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
