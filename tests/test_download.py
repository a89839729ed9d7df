"""Downloads: checksum, cache, zip members, and Prefect task retries on transient errors only."""

import hashlib
import io
import zipfile

import httpx
import pytest

from pipeline.config import load_params
from stages import ingest
from stages.ingest import redial_raw_files
from stages.sources import fetch
from stages.sources.raw import is_transient
from tests.conftest import FIXTURES

GITHUB, MIRROR = "https://github.com/o/r/raw/c/f.bin", "http://host.local:8080/a"


def mock_client(handler) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_checks_the_checksum_and_caches(tmp_path):
    calls = []

    def handler(request):
        calls.append(request.url)
        return httpx.Response(200, content=b"payload")

    dest = tmp_path / "f.bin"
    with mock_client(handler) as client:
        fetch.download_file("https://example.org/f.bin", dest, sha(b"payload"), 5, client)
        fetch.download_file("https://example.org/f.bin", dest, sha(b"payload"), 5, client)
    assert dest.read_bytes() == b"payload"
    assert len(calls) == 1


def test_a_wrong_checksum_keeps_nothing(tmp_path):
    dest = tmp_path / "f.bin"
    with mock_client(lambda request: httpx.Response(200, content=b"tampered")) as client:
        with pytest.raises(ValueError, match="sha256 is .* expected 0{64}; the file was not kept"):
            fetch.download_file("https://example.org/f.bin", dest, "0" * 64, 5, client)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("status,transient", [(500, True), (503, True), (429, True), (404, False), (403, False)])
def test_only_transient_http_errors_are_retried(tmp_path, status, transient):
    with mock_client(lambda request: httpx.Response(status)) as client:
        with pytest.raises(httpx.HTTPStatusError) as error:
            fetch.download_file("https://example.org/f.bin", tmp_path / "f", "0" * 64, 5, client)
    assert is_transient(error.value) is transient
    assert is_transient(httpx.ConnectTimeout("timed out")) is True


def official_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.write(FIXTURES / "mirror/redial/train.jsonl", "redial/train_data.jsonl")
        zf.write(FIXTURES / "mirror/redial/test.jsonl", "redial/test_data.jsonl")
        zf.write(FIXTURES / "mirror/redial/movies_with_mentions.csv", "redial/movies_with_mentions.csv")
    return buffer.getvalue()


def test_download_mode_retries_transient_failures_then_ingests(tmp_path, monkeypatch, prefect_harness):
    bodies = {
        "redial_dataset.zip": official_zip(),
        "movies_merged_with_imdb.csv": (FIXTURES / "mirror/redial/movies_merged_with_imdb.csv").read_bytes(),
        "id2entity.jsonl": (FIXTURES / "mirror/crslab_redial/id2entity.jsonl").read_bytes(),
    }
    failures = {"redial_dataset.zip": 2}  # two 503s before the archive comes through

    def handler(request):
        name = request.url.path.rsplit("/", 1)[-1]
        if failures.get(name, 0) > 0:
            failures[name] -= 1
            return httpx.Response(503)
        return httpx.Response(200, content=bodies[name])

    real_client = httpx.Client
    monkeypatch.setattr(fetch.httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(handler)))
    monkeypatch.delenv("C2CRS_DATA_DIR", raising=False)
    params = load_params(FIXTURES.parents[1] / "params.yaml")
    data = params.data.model_copy(
        update={
            "source": "download",
            "retry_backoff_seconds": 0.0,
            "downloads": params.data.downloads.model_copy(
                update={
                    "redial_zip": params.data.downloads.redial_zip.model_copy(
                        update={"sha256": sha(bodies["redial_dataset.zip"])}
                    ),
                    "movies_imdb": params.data.downloads.movies_imdb.model_copy(
                        update={"sha256": sha(bodies["movies_merged_with_imdb.csv"])}
                    ),
                    "movies_dbpedia": params.data.downloads.movies_dbpedia.model_copy(
                        update={"sha256": sha(bodies["id2entity.jsonl"])}
                    ),
                }
            ),
        }
    )
    raw = redial_raw_files(data, tmp_path)
    assert failures["redial_dataset.zip"] == 0
    assert raw.redial_train == tmp_path / "data/raw/train_data.jsonl"
    assert raw.redial_train.read_bytes() == (FIXTURES / "mirror/redial/train.jsonl").read_bytes()
    result = ingest.ingest(
        raw, on_bad_record="error", valid_split="fraction", valid_fraction=0.25, full_train_conversations=10006, seed=0
    )
    assert result.metrics["test"]["conversations"] == 2


@pytest.mark.parametrize(
    "url, location, refused",
    [
        (GITHUB, "https://raw.githubusercontent.com/o/r/c/f.bin", None),  # GitHub's content host: followed
        (GITHUB, "/o/r/raw/c/moved.bin", None),  # the same host
        (GITHUB, "https://evil.example.net/f.bin", "host 'evil.example.net'"),
        (GITHUB, "https://github.com:8443/f.bin", "port 8443"),
        (GITHUB, "http://github.com/f.bin", "a downgrade from https to http"),
        (GITHUB, "ftp://github.com/f.bin", "a downgrade from https to http"),
        # a mirror on a non-default port: its own origin, port included, is followed
        (MIRROR, "/b", None),
        (MIRROR, "http://host.local:8080/b", None),
        (MIRROR, "https://host.local:8080/b", None),  # up to https on the same port
        (MIRROR, "http://host.local:8081/b", "port 8081 .the request's: 8080."),
        (MIRROR, "http://host.local/b", "port default .the request's: 8080."),
        (MIRROR, "http://other.local:8080/b", "host 'other.local'"),
    ],
)
def test_a_download_follows_redirects_only_within_its_origin_and_content_hosts(tmp_path, url, location, refused):
    seen = []

    def handler(request):
        seen.append(str(request.url))
        if len(seen) == 1:
            return httpx.Response(302, headers={"location": location})
        return httpx.Response(200, content=b"payload")

    dest = tmp_path / "f.bin"
    with mock_client(handler) as client:
        if refused:
            with pytest.raises(fetch.RedirectRefused, match=f"redirected to .*: refused, {refused}"):
                fetch.download_file(url, dest, sha(b"payload"), 5, client)
            assert len(seen) == 1 and not dest.exists()  # the refused hop was never requested
        else:
            fetch.download_file(url, dest, sha(b"payload"), 5, client)
            assert dest.read_bytes() == b"payload" and len(seen) == 2


def test_a_redirect_loop_is_cut(tmp_path):
    with mock_client(lambda request: httpx.Response(302, headers={"location": "/again"})) as client:
        with pytest.raises(fetch.RedirectRefused, match="more than 5 redirects"):
            fetch.download_file("https://github.com/f.bin", tmp_path / "f", sha(b"x"), 5, client)
