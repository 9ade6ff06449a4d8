"""The downloader against a loopback HTTP server: resume, retry, verification, atomic rename."""

import hashlib
import os

import pytest
from loopback import Loopback

from ajepa.datasets.download import Checksum, ChecksumMismatch, download
from ajepa.errors import AjepaError

FAST = dict(backoff_s=0.01, timeout_s=5)


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    payload = os.urandom(300_000)  # several read chunks would be needed at a smaller CHUNK; random = incompressible
    (root / "data.bin").write_bytes(payload)
    server = Loopback(root)
    yield server, payload
    server.close()


def sha256(b: bytes) -> Checksum:
    return Checksum("sha256", hashlib.sha256(b).hexdigest())


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_download_verifies_and_renames(served, tmp_path):
    server, payload = served
    dest = tmp_path / "dl" / "data.bin"
    digests = download(f"{server.url}/data.bin", dest, len(payload), sha256(payload), **FAST)
    assert dest.read_bytes() == payload and digests["sha256"] == hashlib.sha256(payload).hexdigest()
    assert leftovers(dest.parent) == ["data.bin"]
    # a verified file is reused without a request
    download(f"{server.url}/data.bin", dest, len(payload), sha256(payload), **FAST)
    assert len(server.requests) == 1


def test_md5_checksum(served, tmp_path):
    server, payload = served
    good = Checksum("md5", hashlib.md5(payload).hexdigest())
    digests = download(f"{server.url}/data.bin", tmp_path / "d.bin", None, good, **FAST)
    assert digests["md5"] == good.hexdigest
    with pytest.raises(ChecksumMismatch, match="md5 mismatch"):
        download(f"{server.url}/data.bin", tmp_path / "e.bin", None, Checksum("md5", "0" * 32), **FAST)


def test_checksum_mismatch_sets_aside_and_says_expected_vs_got(served, tmp_path):
    server, payload = served
    dest = tmp_path / "dl" / "data.bin"
    wrong = Checksum("sha256", "ab" * 32)
    with pytest.raises(ChecksumMismatch) as e:
        download(f"{server.url}/data.bin", dest, None, wrong, **FAST)
    msg = str(e.value)
    got = hashlib.sha256(payload).hexdigest()
    assert f"expected {'ab' * 32}, got {got}" in msg and "\n" not in msg
    assert not dest.exists()  # never a corrupt file under the real name
    kept = dest.parent / f"data.bin.{got[:16]}.corrupt"
    assert kept.read_bytes() == payload and leftovers(dest.parent) == [kept.name]


def test_mismatching_existing_file_is_kept_aside_not_deleted(served, tmp_path):
    server, payload = served
    dest = tmp_path / "data.bin"
    old = b"what the user had before"
    dest.write_bytes(old)
    download(f"{server.url}/data.bin", dest, len(payload), sha256(payload), **FAST)
    assert dest.read_bytes() == payload
    aside = tmp_path / f"data.bin.{hashlib.sha256(old).hexdigest()[:16]}.corrupt"
    assert aside.read_bytes() == old


def test_published_size_mismatch(served, tmp_path):
    server, payload = served
    with pytest.raises(ChecksumMismatch, match=f"size mismatch: expected {len(payload) + 1} bytes, got {len(payload)}"):
        download(f"{server.url}/data.bin", tmp_path / "d.bin", len(payload) + 1, None, **FAST)


def test_truncated_response_is_resumed_with_range(served, tmp_path):
    server, payload = served
    server.truncate_once["data.bin"] = 100_000
    dest = tmp_path / "data.bin"
    download(f"{server.url}/data.bin", dest, len(payload), sha256(payload), **FAST)
    assert dest.read_bytes() == payload
    assert server.requests == [("data.bin", None, 200), ("data.bin", "bytes=100000-", 206)]


def test_interrupted_run_resumes_from_part_file(served, tmp_path):
    server, payload = served
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(payload[:123_456])  # what a killed run left
    download(f"{server.url}/data.bin", dest, len(payload), sha256(payload), **FAST)
    assert dest.read_bytes() == payload and leftovers(tmp_path) == ["data.bin", "served"]
    assert server.requests == [("data.bin", "bytes=123456-", 206)]


def test_complete_part_file_answered_416_is_finished(served, tmp_path):
    server, payload = served
    (tmp_path / "data.bin.part").write_bytes(payload)
    download(f"{server.url}/data.bin", tmp_path / "data.bin", None, sha256(payload), **FAST)
    assert (tmp_path / "data.bin").read_bytes() == payload
    assert server.requests == [("data.bin", f"bytes={len(payload)}-", 416)]


def test_server_ignoring_range_restarts_cleanly(served, tmp_path):
    server, payload = served
    server.ignore_range = True
    (tmp_path / "data.bin.part").write_bytes(payload[:5000])
    download(f"{server.url}/data.bin", tmp_path / "data.bin", None, sha256(payload), **FAST)
    assert (tmp_path / "data.bin").read_bytes() == payload  # not the prefix twice


def test_server_error_is_retried(served, tmp_path):
    server, payload = served
    server.fail["data.bin"] = [500, 503]
    download(f"{server.url}/data.bin", tmp_path / "data.bin", len(payload), sha256(payload), **FAST)
    assert [r[2] for r in server.requests] == [500, 503, 200]


def test_retries_exhausted_keeps_partial_bytes(served, tmp_path):
    server, payload = served
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(payload[:50_000])
    server.fail["data.bin"] = [500, 502, 503]
    with pytest.raises(AjepaError) as e:
        download(f"{server.url}/data.bin", dest, len(payload), None, retries=2, **FAST)
    msg = str(e.value)
    assert "after 2 retries: HTTP 503" in msg and "the 50000 bytes received are kept" in msg
    assert not dest.exists() and (tmp_path / "data.bin.part").read_bytes() == payload[:50_000]
    assert len(server.requests) == 3
    download(f"{server.url}/data.bin", dest, len(payload), sha256(payload), **FAST)  # a later run resumes
    assert dest.read_bytes() == payload and server.requests[-1] == ("data.bin", "bytes=50000-", 206)


def test_not_found_fails_at_once(served, tmp_path):
    server, _ = served
    with pytest.raises(AjepaError) as e:
        download(f"{server.url}/nope.bin", tmp_path / "nope.bin", None, None, **FAST)
    assert str(e.value) == f"{server.url}/nope.bin: HTTP 404 Not Found"
    assert len(server.requests) == 1 and leftovers(tmp_path) == ["served"]


def test_checksum_text_form():
    assert Checksum.parse("sha256:" + "AB" * 32) == Checksum("sha256", "ab" * 32)
    for bad in ("sha1:" + "a" * 40, "md5:" + "a" * 31, "sha256:" + "g" * 64, "a" * 64):
        with pytest.raises(ValueError):
            Checksum.parse(bad)
