"""The raw files a stage reads, by their params key (data.files): from the local mirror, or downloaded once,
checked by checksum and cached, with network hiccups retried (exponential backoff with jitter)."""

import logging
import random
import time
from pathlib import Path

import httpx

from stages.sources import fetch

log = logging.getLogger(__name__)

TRANSIENT_HTTP_STATUS = {408, 425, 429, 500, 502, 503, 504}


def is_transient(exc: BaseException) -> bool:
    """Network hiccups and server-side errors are worth a retry; a 404 or a checksum mismatch is not."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in TRANSIENT_HTTP_STATUS
    return isinstance(exc, httpx.TransportError)


def download(data, url: str, dest: Path, sha256: str | None, md5: str | None = None) -> Path:
    """fetch.download_file, retried data.retries times on a transient failure, waiting data.retry_backoff_seconds
    x 2^attempt (+/- 50 %) in between; a 404 or a checksum mismatch fails at once."""
    attempt = 0
    while True:
        try:
            return fetch.download_file(url, dest, sha256, data.timeout_seconds, md5=md5)
        except Exception as exc:
            if attempt == data.retries or not is_transient(exc):
                raise
            attempt += 1
            wait = data.retry_backoff_seconds * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            log.warning("%s: %s; retry %d of %d in %.1f s", url, exc, attempt, data.retries, wait)
            time.sleep(wait)


def mirror_dir(data, workspace: Path) -> Path:
    mirror = data.resolved_mirror_dir(workspace)
    if mirror is None:
        raise ValueError("params.yaml: data.source is mirror but neither C2CRS_DATA_DIR nor data.mirror_dir is set")
    return mirror


def raw_files(data, workspace: Path, *names: str) -> dict[str, Path]:
    """Raw files by their data.files key: from the mirror, or downloaded (checksum-checked, cached) without one."""
    if data.resolved_source() == "mirror":
        mirror = mirror_dir(data, workspace)
        paths = {name: mirror / getattr(data.files, name) for name in names}
        fetch.missing_mirror_files(mirror, paths)
        return paths
    cache = workspace / data.cache_dir
    paths = {}
    for name in names:
        source = getattr(data.downloads, name)
        paths[name] = download(data, source.url, cache / source.url.rsplit("/", 1)[-1], source.sha256, md5=source.md5)
    return paths
