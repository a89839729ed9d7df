"""Getting raw files: from a local mirror, or downloaded once with a checksum check.

Retries are not here: stages/sources/raw.py retries transient failures around download_file.
"""

import contextlib
import hashlib
import logging
import shutil
import zipfile
from pathlib import Path

import httpx

from stages.io.progress import progress

log = logging.getLogger(__name__)

USER_AGENT = "c2crs-pipeline/0.1 (research; reproducing C2-CRS)"
MAX_REDIRECTS = 5
# Where a download may be redirected besides its own host (GitHub serves /raw/ files from its content hosts).
REDIRECT_HOSTS = {
    "github.com": {
        "raw.githubusercontent.com",
        "objects.githubusercontent.com",
        "media.githubusercontent.com",
        "codeload.github.com",
    }
}
REDIRECT_STATUSES = {301, 302, 303, 307, 308}


class RedirectRefused(ValueError):
    """A download redirected somewhere it may not go (another host or port, or from https to http)."""


def redirect_problem(target: httpx.URL, start: httpx.URL, hosts: frozenset[str]) -> str | None:
    """Why a redirect to target is refused, or None to follow it. Followed: the start's own origin (its host and
    port, on its scheme or up to https), or another of `hosts` on the default port. Refused: other hosts, other
    ports, and any step down from https to http (the checksum is checked after, but MD5 (aclImdb) is weak)."""
    if target.scheme not in ("http", "https") or (start.scheme == "https" and target.scheme != "https"):
        return "a downgrade from https to http" if start.scheme == "https" else f"the scheme {target.scheme!r}"
    if target.host.lower() == start.host.lower():
        same_port = target.port == start.port
        return None if same_port else f"port {target.port or 'default'} (the request's: {start.port or 'default'})"
    if target.host.lower() not in hosts:
        return f"host {target.host!r} (allowed: {', '.join(sorted({start.host, *hosts}))})"
    return None if target.port is None else f"port {target.port}"


def _check_hop(target: httpx.URL, start: httpx.URL) -> None:
    """A download follows a redirect within its origin or to its host's known content hosts (REDIRECT_HOSTS)."""
    problem = redirect_problem(target, start, frozenset(REDIRECT_HOSTS.get(start.host, ())))
    if problem:
        raise RedirectRefused(f"{start}: redirected to {target}: refused, {problem}; not downloaded")


@contextlib.contextmanager
def _get(client: httpx.Client, url: str):
    """client.stream("GET") for url, following redirects by hand so that each hop is checked (_check_hop)."""
    start = target = httpx.URL(url)
    for _ in range(MAX_REDIRECTS + 1):
        _check_hop(target, start)
        response = client.send(client.build_request("GET", target), stream=True, follow_redirects=False)
        if response.status_code not in REDIRECT_STATUSES:
            try:
                yield response
            finally:
                response.close()
            return
        response.close()
        if "location" not in response.headers:
            raise RedirectRefused(f"{url}: HTTP {response.status_code} from {target} without a Location header")
        target = target.join(response.headers["location"])
    raise RedirectRefused(f"{url}: more than {MAX_REDIRECTS} redirects (the last to {target})")


def missing_mirror_files(mirror_dir: Path, files: dict[str, Path]) -> None:
    """Fail naming every params key whose file is not in the mirror."""
    missing = [
        f"data.files.{name} ({path}{': a directory, not a file' if path.is_dir() else ''})"
        for name, path in files.items()
        if not path.is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"data mirror {mirror_dir} lacks: {', '.join(missing)}. Check C2CRS_DATA_DIR or data.mirror_dir, "
            "and the file names under data.files in params.yaml."
        )


def download_file(
    url: str, dest: Path, sha256: str | None, timeout: float, client: httpx.Client | None = None, md5: str | None = None
) -> Path:
    """Fetch url to dest once: a cached file with the right checksum is reused; a partial download never lands.

    SHA-256 where known; MD5 only for files whose publisher gives nothing else (the aclImdb tarball).
    """
    algorithm, expected = ("sha256", sha256) if sha256 else ("md5", md5)
    if not expected:
        raise ValueError(f"{url}: no checksum given; refusing to download unverified data")
    if dest.is_file() and file_digest(dest, algorithm) == expected:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    own_client = client is None
    client = client or httpx.Client(timeout=timeout, headers={"User-Agent": USER_AGENT})
    try:
        log.info("downloading %s", url)
        with _get(client, url) as response:
            response.raise_for_status()
            digest = hashlib.new(algorithm)
            total = int(response.headers.get("content-length", 0)) or None
            with (
                open(partial, "wb") as out,
                progress(total=total, unit="B", unit_scale=True, desc=dest.name) as bar,
            ):
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    finally:
        if own_client:
            client.close()
    if digest.hexdigest() != expected:
        partial.unlink()
        raise ValueError(f"{url}: {algorithm} is {digest.hexdigest()}, expected {expected}; the file was not kept")
    partial.replace(dest)
    return dest


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Extract one file of a zip (wherever it sits inside) to dest, atomically."""
    with zipfile.ZipFile(archive) as zf:
        matches = [name for name in zf.namelist() if name == member or name.endswith("/" + member)]
        if not matches:
            raise FileNotFoundError(f"{archive}: has no member {member!r} (it has {', '.join(zf.namelist())})")
        partial = dest.with_name(dest.name + ".part")
        with zf.open(matches[0]) as src, open(partial, "wb") as out:
            shutil.copyfileobj(src, out)
    partial.replace(dest)
    return dest


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
