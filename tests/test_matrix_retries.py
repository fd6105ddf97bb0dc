"""Retries where a retry can help, none where it can't, against a flaky mirror on 127.0.0.1.

`FlakyMirror` is a small HTTP proxy in front of the host's Debian mirror (`kiln.sources.mirror.host_mirrors()`)
that answers 503 to the first N requests whose path matches a pattern, then passes everything through;
the builds get it as `--mirror`. Nothing is mocked: the real CLI, mmdebstrap, apt and Prefect's retry
machinery run, and the proxy's own log says which requests failed and which went through.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kiln.sources.mirror import host_mirrors
from tests.e2e import kiln, kiln_env

pytestmark = pytest.mark.slow
SMALL = ["tests/data/small.yaml", "--elements-path", "tests/data/elements", "--no-boot-test"]
CHUNK = 1 << 16


class FlakyMirror:
    """An HTTP proxy to `upstream` on 127.0.0.1 that fails the first `failures` requests matching `pattern`."""

    def __init__(self, upstream: str, *, pattern: str, failures: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.pattern = re.compile(pattern)
        self.failures = failures
        self.log: list[tuple[str, int]] = []  # (path, status) of every request
        self._lock = threading.Lock()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.do_GET(body=False)

            def do_GET(self, body: bool = True) -> None:
                with mirror._lock:
                    fail = bool(mirror.pattern.search(self.path)) and mirror.failures > 0
                    if fail:
                        mirror.failures -= 1
                if fail:
                    mirror.log.append((self.path, 503))
                    self.send_response(503, "flaky mirror")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                req = urllib.request.Request(mirror.upstream + self.path, method="GET" if body else "HEAD")
                try:
                    resp = urllib.request.urlopen(req, timeout=60)
                except urllib.error.HTTPError as exc:
                    resp = exc
                with resp:
                    status = resp.status if hasattr(resp, "status") else resp.code
                    mirror.log.append((self.path, status))
                    self.send_response(status)
                    for name in ("Content-Type", "Content-Length", "Last-Modified", "ETag"):
                        if resp.headers.get(name):
                            self.send_header(name, resp.headers[name])
                    if not resp.headers.get("Content-Length"):
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                    while body:
                        chunk = resp.read(CHUNK)
                        if not chunk:
                            break
                        self.wfile.write(chunk)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyMirror:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def failed(self) -> list[str]:
        return [p for p, s in self.log if s == 503]

    def passed(self, pattern: str) -> list[str]:
        return [p for p, s in self.log if s == 200 and re.search(pattern, p)]


@pytest.fixture
def upstream() -> str:
    mirrors = host_mirrors()
    if not mirrors:
        pytest.skip("the host's apt sources name no Debian mirror")
    return mirrors[0]


@pytest.fixture
def fresh_cache(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A store of its own (the proxy's URL is part of the base's key anyway), sharing the .deb cache of the
    test store so that the bootstrap downloads only the indices."""
    env = kiln_env()
    cache = tmp_path / "cache"
    shared_debs = Path(env["KILN_CACHE"]) / "debs"
    for d in sorted(shared_debs.iterdir()) if shared_debs.is_dir() else []:
        (cache / "debs" / d.name).mkdir(parents=True)
        for deb in d.glob("*.deb"):  # never apt's lock file: a hard link would share its lock
            (cache / "debs" / d.name / deb.name).hardlink_to(deb)
    yield {**env, "KILN_CACHE": str(cache)}
    assert mounts_under(cache) == []


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh if line.split()[4].startswith(str(path))]


def test_bootstrap_retries_when_the_mirror_fails_for_a_while(upstream: str, fresh_cache: dict[str, str],
                                                            tmp_path: Path) -> None:
    # every package index request fails until apt's own retries (Acquire::Retries 3) are spent and
    # mmdebstrap gives up; fetch_base's retry (10 s later) then finds the mirror answering again
    with FlakyMirror(upstream, pattern=r"/binary-amd64/|/by-hash/", failures=12) as mirror:
        proc = kiln("build", *SMALL, "--mirror", mirror.url,
                    "--env", f"DIB_RETRY_NONCE={uuid.uuid4().hex[:8]}", "--output", str(tmp_path / "out"),
                    env=fresh_cache, check=False, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert len(mirror.failed()) == 12
    assert "Retry 1/2 will start" in out, out[-5000:]  # Prefect's retry of fetch_base
    assert out.count("bootstrapping debian bookworm amd64") >= 2  # retried (how often depends on which requests fail)
    assert mirror.passed(r"/binary-amd64/|/by-hash/"), "the retry fetched the indices through the mirror"
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_a_mirror_hiccup_on_inrelease_is_retried(upstream: str, fresh_cache: dict[str, str], tmp_path: Path) -> None:
    with FlakyMirror(upstream, pattern=r"/InRelease$|/Release$", failures=2) as mirror:
        proc = kiln("build", *SMALL, "--mirror", mirror.url,
                    "--output", str(tmp_path / "out"), env=fresh_cache, check=False, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert len(mirror.failed()) == 2


def test_a_failing_hook_is_not_retried(fresh_cache: dict[str, str], tmp_path: Path) -> None:
    start = time.monotonic()
    proc = kiln("build", "tests/data/failing.yaml", "--elements-path", "tests/data/elements", "--no-boot-test",
                "--output", str(tmp_path), check=False, env=fresh_cache)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "element 'failing-hook': hook install.d/50-fail exited with" in proc.stderr
    assert out.count("running install.d/50-fail") == 1, "the hook ran exactly once"
    assert "Retry" not in out and "retries" not in out.lower().replace("retries=", "")
    assert time.monotonic() - start < 600


def test_a_missing_package_is_not_retried(fresh_cache: dict[str, str], tmp_path: Path) -> None:
    proc = kiln("build", *SMALL, "-p", "kiln-no-such-package", "--output", str(tmp_path), check=False,
                env=fresh_cache)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "kiln-no-such-package not available from the mirror" in proc.stderr
    assert out.count("running install.d/zz-image-packages") <= 1 and "Retry" not in out


def test_a_bad_spec_is_not_retried_and_starts_nothing(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("release: bookworm\nelements: [vm]\nsize: 1M\n")
    start = time.monotonic()
    proc = kiln("build", str(f), "--no-boot-test", "--output", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert f"{f}: field 'size'" in proc.stderr
    assert "Retry" not in proc.stdout + proc.stderr and "flow run" not in proc.stdout.lower()
    assert time.monotonic() - start < 30
