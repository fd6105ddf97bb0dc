"""Streaming downloads that survive flaky networks: resume, mirrors, bounded retries, a progress bar.

`download(urls, dest)` writes `dest.partial` and renames it to `dest` only when every byte is there
(and, with `expected=`, only when the bytes have that digest), so a half or wrong file never carries
the final name. An interrupted transfer resumes from the partial file with an HTTP Range request
(guarded by If-Range, so a file that changed upstream starts over instead of being spliced), also
across runs. URLs are mirrors of the same file, tried in order within each round: a dead mirror costs
one connection attempt, not a backoff. Rounds that fail on errors a retry can fix (connection errors,
timeouts, truncated bodies, 5xx, 408, 429) are repeated with exponential backoff and jitter, up to
`RetryPolicy.attempts`; a 4xx answer takes that mirror out for the rest of the call. A digest mismatch
raises ChecksumMismatchError (never retried; the partial file is removed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx

from kiln.model.errors import KilnError
from kiln.sources.verify import ChecksumMismatchError, Digest, file_digest, mismatch_message

log = logging.getLogger("kiln.download")

CHUNK = 1 << 20
USER_AGENT = "kiln (OpenStack image factory)"
RETRYABLE_4XX = frozenset({408, 429})  # "try again later" answers, not client errors


class DownloadError(KilnError):
    """No mirror delivered the file within the retry budget; names every URL and its last error."""

    retryable = True


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` rounds over all mirrors; before round n+1 sleep backoff*2**(n-1) (capped) with jitter."""

    attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0
    jitter: float = 0.5  # the sleep is drawn from [delay*(1-jitter), delay]

    def delay(self, round_no: int) -> float:
        base = min(self.max_backoff, self.backoff * 2 ** (round_no - 1))
        return random.uniform(base * (1 - self.jitter), base)


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    url: str  # the mirror that delivered the last byte
    size: int
    digest: Digest | None  # the verified digest (None when no `expected` was given)
    resumed_from: int  # bytes already present when the final transfer began (0: a fresh download)
    requests: int
    seconds: float
    reused: bool = False  # `dest` already existed with the expected digest: nothing was fetched


class _Retry(Exception):
    """A failure another attempt may fix."""


class _GiveUp(Exception):
    """A failure this mirror will not recover from (4xx, bad URL)."""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def redact(url: str) -> str:
    """The URL without user:password, for logs and messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=host))
    return url


class Progress:
    """A progress bar on a terminal; otherwise a log line every `interval` seconds."""

    def __init__(self, name: str, *, enabled: bool | None = None, stream: TextIO | None = None,
                 interval: float = 10.0) -> None:
        self.name = name
        self.stream = stream or sys.stderr
        self.tty = enabled if enabled is not None else self.stream.isatty()
        self.interval = interval
        self.total: int | None = None
        self.done = 0
        self.start = time.monotonic()
        self.start_bytes = 0
        self._last = 0.0
        self._drawn = False

    def begin(self, done: int, total: int | None) -> None:
        self.done = done
        self.start_bytes = done
        self.start = time.monotonic()
        self._last = self.start if not self.tty else 0.0  # log lines: the first after `interval`
        self.total = total

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= (0.2 if self.tty else self.interval):
            self._last = now
            self._show()

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = (self.done - self.start_bytes) / elapsed
        if self.total:
            pct = 100 * self.done / self.total
            eta = (self.total - self.done) / rate if rate > 0 else 0
            return (f"{self.name}: {pct:5.1f}% {_human(self.done)} of {_human(self.total)}, "
                    f"{_human(rate)}/s, {int(eta) // 60}:{int(eta) % 60:02d} left")
        return f"{self.name}: {_human(self.done)}, {_human(rate)}/s"

    def _show(self) -> None:
        if self.tty:
            width = 30
            filled = int(width * self.done / self.total) if self.total else 0
            bar = "#" * filled + "-" * (width - filled) if self.total else ""
            self.stream.write(f"\r[{bar}] {self._line()}\033[K" if bar else f"\r{self._line()}\033[K")
            self.stream.flush()
            self._drawn = True
        else:
            log.info("%s", self._line())

    def finish(self) -> None:
        if self.tty and self._drawn:
            self._show()
            self.stream.write("\n")
            self.stream.flush()
        log.info("%s: %s in %.1f s", self.name, _human(self.done), time.monotonic() - self.start)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Two kiln processes fetching the same file take turns (the second then finds it done)."""
    lock = path.with_name(path.name + ".lock")
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Partial:
    """`dest.partial`, the hash of its bytes so far, and the validators of the URL it came from."""

    def __init__(self, dest: Path, algorithm: str | None) -> None:
        self.path = dest.with_name(dest.name + ".partial")
        self.meta_path = dest.with_name(dest.name + ".partial.json")
        self.algorithm = algorithm
        self.hasher: hashlib._Hash | None = None
        self.size = 0
        self._load()

    def _load(self) -> None:
        self.hasher = hashlib.new(self.algorithm) if self.algorithm else None
        self.size = 0
        if self.path.exists():
            with open(self.path, "rb") as fh:
                for chunk in iter(lambda: fh.read(CHUNK), b""):
                    self.size += len(chunk)
                    if self.hasher:
                        self.hasher.update(chunk)

    def meta(self) -> dict[str, str]:
        try:
            data = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}

    def remember(self, url: str, response: httpx.Response) -> None:
        meta = {"url": url}
        etag = response.headers.get("etag")
        modified = response.headers.get("last-modified")
        if etag and not etag.startswith("W/"):
            meta["etag"] = etag
        if modified:
            meta["last-modified"] = modified
        self.meta_path.write_text(json.dumps(meta))

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)
        self._load()

    def digest(self) -> Digest | None:
        if self.hasher is None or self.algorithm is None:
            return None
        return Digest(self.algorithm, self.hasher.hexdigest())

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)


_CONTENT_RANGE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from a Content-Range header."""
    if not value:
        return None, None
    m = _CONTENT_RANGE.match(value.strip())
    if not m:
        return None, None
    first = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return first, total


def _fetch_http(client: httpx.Client, url: str, part: _Partial, progress: Progress, timeout: float) -> None:
    """One request for the rest of the file; raises _Retry/_GiveUp; returns when the partial is complete."""
    headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
    if part.size:
        headers["Range"] = f"bytes={part.size}-"
        meta = part.meta()
        if meta.get("url") == url and (meta.get("etag") or meta.get("last-modified")):
            headers["If-Range"] = meta.get("etag") or meta["last-modified"]
    try:
        with client.stream("GET", url, headers=headers, timeout=timeout) as r:
            status = r.status_code
            if status == 416 and part.size:
                _, total = _content_range(r.headers.get("content-range"))
                if total == part.size:
                    return  # the partial file is already complete
                log.warning("%s: range not satisfiable at byte %d; starting over", redact(url), part.size)
                part.reset()
                raise _Retry("HTTP 416 for a resume; starting over")
            if status >= 500 or status in RETRYABLE_4XX:
                raise _Retry(f"HTTP {status} {r.reason_phrase}")
            if 400 <= status < 500:
                raise _GiveUp(f"HTTP {status} {r.reason_phrase}")
            if status == 206:
                first, total = _content_range(r.headers.get("content-range"))
                if first != part.size:
                    part.reset()
                    raise _Retry(f"the server resumed at byte {first}, not {part.size}; starting over")
            elif status == 200:
                if part.size:
                    log.info("%s: the server sent the whole file (no resume, or it changed); starting over",
                             redact(url))
                    part.reset()
                length = r.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
            else:
                raise _GiveUp(f"unexpected HTTP {status} {r.reason_phrase}")
            part.remember(url, r)
            progress.begin(part.size, total)
            with open(part.path, "ab", buffering=CHUNK) as fh:
                # no chunk_size: httpx would drop a half-filled chunk when the connection breaks
                for chunk in r.iter_raw():
                    fh.write(chunk)
                    part.size += len(chunk)
                    if part.hasher:
                        part.hasher.update(chunk)
                    progress.advance(len(chunk))
            if total is not None and part.size != total:
                raise _Retry(f"the body ended after {part.size} of {total} bytes")
    except httpx.HTTPError as exc:
        if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
            raise _GiveUp(str(exc) or type(exc).__name__) from exc
        raise _Retry(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc


def _fetch_file(url: str, part: _Partial, progress: Progress) -> None:
    """A file:// URL (a local or pre-seeded image): copied, so the same checks apply."""
    src = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    try:
        size = src.stat().st_size
        part.reset()
        progress.begin(0, size)
        with open(src, "rb") as fin, open(part.path, "ab") as fout:
            for chunk in iter(lambda: fin.read(CHUNK), b""):
                fout.write(chunk)
                part.size += len(chunk)
                if part.hasher:
                    part.hasher.update(chunk)
                progress.advance(len(chunk))
    except FileNotFoundError as exc:
        raise _GiveUp(f"no such file: {src}") from exc


def download(
    urls: str | Sequence[str],
    dest: Path,
    *,
    expected: Digest | None = None,
    timeout: float = 30.0,
    retry: RetryPolicy | None = None,
    progress: bool | None = None,
    what: str | None = None,
    client: httpx.Client | None = None,
) -> DownloadResult:
    """Fetch the file at `urls` (mirrors of one file, in order of preference) to `dest`.

    `timeout` bounds connecting and each read (a stalled transfer fails and resumes; a slow one
    does not). With `expected`, an existing `dest` with that digest is reused, and the new bytes
    must have it. `progress` forces the progress bar on or off (default: on when stderr is a TTY).
    """
    url_list = [urls] if isinstance(urls, str) else list(urls)
    if not url_list:
        raise DownloadError(f"{what or dest.name}: no URL to download from")
    retry = retry or RetryPolicy()
    label = what or dest.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _locked(dest):
        if dest.exists() and expected is not None:
            if file_digest(dest, expected.algorithm) == expected:
                log.info("%s: already downloaded (%s)", label, expected)
                return DownloadResult(dest, url_list[0], dest.stat().st_size, expected, dest.stat().st_size, 0,
                                      time.monotonic() - started, reused=True)
            log.warning("%s: the file at %s has another digest; downloading again", label, dest)
            dest.unlink()
        part = _Partial(dest, expected.algorithm if expected else None)
        if part.size:
            log.info("%s: resuming from byte %d of an earlier attempt", label, part.size)
        owns_client = client is None
        http = client or httpx.Client(follow_redirects=True, timeout=timeout)
        bar = Progress(label, enabled=progress)
        requests = 0
        restarted = False
        try:
            while True:
                resumed_from, url, requests_now = _transfer(http, url_list, part, bar, retry, timeout, label)
                requests += requests_now
                digest = part.digest()
                if expected is not None and digest != expected:
                    assert digest is not None
                    if resumed_from and not restarted:
                        # the prefix may be from an older upstream file or another mirror's copy
                        log.warning("%s: resumed download does not match %s; downloading it whole once more",
                                    label, expected)
                        part.reset()
                        restarted = True
                        continue
                    part.discard()
                    raise ChecksumMismatchError(
                        mismatch_message(f"{label} ({redact(url)})", expected=expected, actual=digest)
                    )
                break
            bar.finish()
            os.replace(part.path, dest)
            part.meta_path.unlink(missing_ok=True)
            return DownloadResult(dest, url, dest.stat().st_size, digest if expected else None, resumed_from,
                                  requests, time.monotonic() - started)
        finally:
            if owns_client:
                http.close()


def _transfer(http: httpx.Client, urls: list[str], part: _Partial, bar: Progress, retry: RetryPolicy,
              timeout: float, label: str) -> tuple[int, str, int]:
    """Rounds over the mirrors until one completes the partial file: (resumed_from, url, requests)."""
    failures: dict[str, str] = {}
    dead: set[str] = set()
    requests = 0
    for round_no in range(1, retry.attempts + 1):
        for url in urls:
            if url in dead:
                continue
            resumed_from = part.size
            requests += 1
            try:
                if urllib.parse.urlsplit(url).scheme == "file":
                    _fetch_file(url, part, bar)
                else:
                    _fetch_http(http, url, part, bar, timeout)
                return resumed_from, url, requests
            except _GiveUp as exc:
                failures[url] = str(exc)
                dead.add(url)
                log.warning("%s: %s: %s; not retrying this URL", label, redact(url), exc)
            except _Retry as exc:
                failures[url] = str(exc)
                log.warning("%s: %s: %s (attempt %d of %d)", label, redact(url), exc, round_no, retry.attempts)
        if len(dead) == len(urls) or round_no == retry.attempts:
            break
        pause = retry.delay(round_no)
        log.info("%s: retrying in %.1f s", label, pause)
        time.sleep(pause)
    lines = "\n".join(f"  {redact(u)}: {failures.get(u, 'not tried')}" for u in urls)
    kept = f"; {part.size} bytes kept in {part.path.name} for the next attempt" if part.size else ""
    raise DownloadError(f"{label}: could not download from any of {len(urls)} URL(s){kept}:\n{lines}")
