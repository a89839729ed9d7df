"""An error about a raw data file names the params key that points at it and the params file: what to fix.

The stages read their raw files by key (data.files.* from the mirror, data.downloads.* into the cache) and their
errors name the file's path. The CLI, which knows the params file, adds the key: "params.yaml: data.files.movies:
/mirror/redial/movies.jsonl: expected a CSV file with columns movieId, movieName, nbMentions".
"""

from pathlib import Path

from stages.ingest import REDIAL_ZIP


def raw_file_keys(params, workspace: Path) -> dict[str, str]:
    """Every raw file path the params point at -> its key. Mirror files under data.files; downloads under
    data.downloads, cached by their URL's last part (ReDial's zip as REDIAL_ZIP, its members by their names)."""
    data = params.data
    keys = {}
    mirror = data.resolved_mirror_dir(workspace)
    if mirror is not None:
        keys.update({str(mirror / path): f"data.files.{name}" for name, path in data.files.model_dump().items()})
    cache = workspace / data.cache_dir
    for name, download in data.downloads:
        keys[str(cache / download.url.rsplit("/", 1)[-1])] = f"data.downloads.{name}"
    zipped = data.downloads.redial_zip
    keys[str(cache / REDIAL_ZIP)] = "data.downloads.redial_zip"
    for member in ("redial_train", "redial_test", "movies"):
        keys[str(cache / getattr(zipped, member))] = f"data.downloads.redial_zip.{member}"
    return keys


def data_key_of(exc: BaseException, params, params_file: Path) -> str | None:
    """'<params file>: <key>' when exc is about a raw file a key points at (the longest matching path), else None."""
    text, filename = str(exc), getattr(exc, "filename", None)
    keys = raw_file_keys(params, params_file.parent)
    for path in sorted(keys, key=len, reverse=True):
        if path in text or filename == path:
            return f"{params_file}: {keys[path]}"
    return None
