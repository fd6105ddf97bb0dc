"""kiln.download against a local server: resume, mirrors, retries, and what is left behind on failure."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import pytest

from kiln.sources.download import DownloadError, Progress, RetryPolicy, download
from kiln.sources.verify import ChecksumMismatchError, Digest
from tests import upstream_fixtures as uf

FAST = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05)


def _digest(path: Path) -> Digest:
    return Digest("sha256", hashlib.sha256(path.read_bytes()).hexdigest())


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))


def test_download_verifies_and_renames_into_place(server: uf.FixtureServer, published: uf.Published,
                                                  tmp_path: Path) -> None:
    src = published.files["disk.qcow2"]
    dest = tmp_path / "disk.qcow2"
    result = download(server.url("good/disk.qcow2"), dest, expected=_digest(src), retry=FAST, progress=False)
    assert dest.read_bytes() == src.read_bytes()
    assert (result.requests, result.resumed_from, result.reused) == (1, 0, False)
    assert _leftovers(tmp_path) == ["disk.qcow2"]
    again = download(server.url("good/disk.qcow2"), dest, expected=_digest(src), retry=FAST, progress=False)
    assert again.reused and again.requests == 0


def test_a_body_cut_off_halfway_resumes_with_a_range_request(server: uf.FixtureServer, published: uf.Published,
                                                             tmp_path: Path) -> None:
    published.case("cut", "disk.qcow2")
    server.truncate_once.add("/cut/disk.qcow2")
    src = published.files["disk.qcow2"]
    dest = tmp_path / "disk.qcow2"
    result = download(server.url("cut/disk.qcow2"), dest, expected=_digest(src), retry=FAST, progress=False)
    seen = server.seen("cut/disk.qcow2")
    assert len(seen) == 2
    assert "range" not in seen[0].headers
    half = src.stat().st_size // 2
    assert seen[1].headers["range"] == f"bytes={half}-" and seen[1].status == 206
    assert seen[1].headers.get("if-range"), "a resume must be conditional on the file being unchanged"
    assert result.resumed_from == half
    assert dest.read_bytes() == src.read_bytes()
    assert _leftovers(tmp_path) == ["disk.qcow2"]


def test_an_interrupted_run_leaves_a_partial_file_that_the_next_run_resumes(
    server: uf.FixtureServer, published: uf.Published, tmp_path: Path
) -> None:
    published.case("cut2", "root.squashfs")
    src = published.files["root.squashfs"]
    dest = tmp_path / "root.squashfs"
    server.truncate_once.add("/cut2/root.squashfs")
    with pytest.raises(DownloadError, match="bytes kept"):
        download(server.url("cut2/root.squashfs"), dest, expected=_digest(src),
                 retry=RetryPolicy(attempts=1), progress=False)
    assert not dest.exists() and (tmp_path / "root.squashfs.partial").stat().st_size == src.stat().st_size // 2
    result = download(server.url("cut2/root.squashfs"), dest, expected=_digest(src), retry=FAST, progress=False)
    assert server.seen("cut2/root.squashfs")[-1].headers["range"] == f"bytes={src.stat().st_size // 2}-"
    assert result.resumed_from == src.stat().st_size // 2
    assert dest.read_bytes() == src.read_bytes()


def test_a_changed_file_is_not_spliced_onto_an_old_partial(server: uf.FixtureServer, published: uf.Published,
                                                            tmp_path: Path) -> None:
    case = published.case("changed", "root.tar.xz")
    dest = tmp_path / "root.tar.xz"
    partial = tmp_path / "root.tar.xz.partial"
    partial.write_bytes(b"x" * 1000)
    (tmp_path / "root.tar.xz.partial.json").write_text(
        json.dumps({"url": server.url("changed/root.tar.xz"), "etag": '"stale"'}))
    src = case / "root.tar.xz"
    download(server.url("changed/root.tar.xz"), dest, expected=_digest(src), retry=FAST, progress=False)
    last = server.seen("changed/root.tar.xz")[-1]
    assert last.headers["if-range"] == '"stale"' and last.status == 200
    assert dest.read_bytes() == src.read_bytes()


def test_a_dead_first_mirror_falls_over_to_the_second_at_once(server: uf.FixtureServer, published: uf.Published,
                                                             tmp_path: Path) -> None:
    src = published.files["root.tar.xz"]
    dest = tmp_path / "root.tar.xz"
    slow = RetryPolicy(attempts=3, backoff=30)  # a backoff would show as a 30 s test
    start = time.monotonic()
    result = download([uf.dead_url("good/root.tar.xz"), server.url("good/root.tar.xz")], dest,
                      expected=_digest(src), retry=slow, progress=False)
    assert time.monotonic() - start < 5
    assert result.url == server.url("good/root.tar.xz") and result.requests == 2
    assert dest.read_bytes() == src.read_bytes()


def test_4xx_is_not_retried(server: uf.FixtureServer, tmp_path: Path) -> None:
    dest = tmp_path / "missing.img"
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        download(server.url("good/missing.img"), dest, retry=RetryPolicy(attempts=5, backoff=30), progress=False)
    assert len(server.seen("good/missing.img")) == 1
    assert "missing.img" in str(err.value)
    server.statuses["/good/forbidden.img"] = [403]
    with pytest.raises(DownloadError, match="HTTP 403"):
        download(server.url("good/forbidden.img"), dest, retry=FAST, progress=False)
    assert len(server.seen("good/forbidden.img")) == 1
    assert _leftovers(tmp_path) == []


def test_5xx_is_retried_with_backoff(server: uf.FixtureServer, published: uf.Published, tmp_path: Path) -> None:
    published.case("flaky", "root.tar.xz")
    server.statuses["/flaky/root.tar.xz"] = [500, 503]
    src = published.files["root.tar.xz"]
    dest = tmp_path / "root.tar.xz"
    download(server.url("flaky/root.tar.xz"), dest, expected=_digest(src), retry=FAST, progress=False)
    assert [s.status for s in server.seen("flaky/root.tar.xz")] == [500, 503, 200]
    assert dest.read_bytes() == src.read_bytes()


def test_5xx_gives_up_after_the_bounded_attempts(server: uf.FixtureServer, tmp_path: Path) -> None:
    server.statuses["/down/x.img"] = [502] * 10
    with pytest.raises(DownloadError, match=r"HTTP 502"):
        download(server.url("down/x.img"), tmp_path / "x.img", retry=FAST, progress=False)
    assert len(server.seen("down/x.img")) == FAST.attempts


def test_a_mismatch_is_not_retried_and_leaves_nothing(server: uf.FixtureServer, published: uf.Published,
                                                      tmp_path: Path) -> None:
    case = published.case("tampered", "disk.qcow2")
    good = _digest(case / "disk.qcow2")
    with open(case / "disk.qcow2", "r+b") as fh:
        fh.seek(70000)
        fh.write(b"tampered")
    dest = tmp_path / "disk.qcow2"
    good_requests = len(server.seen("good/disk.qcow2"))
    with pytest.raises(ChecksumMismatchError, match=rf"expected {good}"):
        download([server.url("tampered/disk.qcow2"), server.url("good/disk.qcow2")], dest, expected=good,
                 retry=FAST, progress=False)
    assert len(server.seen("tampered/disk.qcow2")) == 1
    assert len(server.seen("good/disk.qcow2")) == good_requests, "a mismatch is not tried on another mirror"
    assert _leftovers(tmp_path) == [], "neither the file nor a partial download may stay"


def test_a_stale_partial_that_does_not_verify_is_downloaded_whole_once(server: uf.FixtureServer,
                                                                       published: uf.Published,
                                                                       tmp_path: Path) -> None:
    src = published.files["root.tar.xz"]
    dest = tmp_path / "root.tar.xz"
    (tmp_path / "root.tar.xz.partial").write_bytes(b"garbage from another file" * 10)
    result = download(server.url("good/root.tar.xz"), dest, expected=_digest(src), retry=FAST, progress=False)
    assert dest.read_bytes() == src.read_bytes() and result.resumed_from == 0


def test_file_urls_and_timeouts(published: uf.Published, tmp_path: Path) -> None:
    src = published.files["root.tar.xz"]
    result = download(f"file://{src}", tmp_path / "r.tar.xz", expected=_digest(src), progress=False)
    assert result.size == src.stat().st_size
    with pytest.raises(DownloadError, match="no such file"):
        download(f"file://{tmp_path}/nope", tmp_path / "nope", progress=False)


def test_progress_bar_on_a_tty_and_log_lines_otherwise(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    bar = Progress("image.qcow2", enabled=True, stream=stream)
    bar.begin(0, 1000)
    bar.advance(500)
    bar.finish()
    assert "image.qcow2:  50.0%" in stream.getvalue() or "100.0%" in stream.getvalue()
    assert stream.getvalue().endswith("\n")
    caplog.set_level("INFO", logger="kiln.sources.download")
    quiet = Progress("image.qcow2", enabled=False, stream=io.StringIO(), interval=0)
    quiet.begin(0, 1000)
    quiet.advance(250)
    assert any("25.0%" in r.getMessage() for r in caplog.records)


def test_redirects_are_followed_and_a_resume_goes_through_them(server: uf.FixtureServer, published: uf.Published,
                                                               tmp_path: Path) -> None:
    """Like a distribution's mirror redirector: the Range header survives the redirect."""
    published.case("mirror", "disk.qcow2")
    server.redirects["/redirector/disk.qcow2"] = "mirror/disk.qcow2"
    server.truncate_once.add("/mirror/disk.qcow2")
    src = published.files["disk.qcow2"]
    dest = tmp_path / "disk.qcow2"
    download(server.url("redirector/disk.qcow2"), dest, expected=_digest(src), retry=FAST, progress=False)
    assert [s.status for s in server.seen("mirror/disk.qcow2")] == [200, 206]
    assert dest.read_bytes() == src.read_bytes()
