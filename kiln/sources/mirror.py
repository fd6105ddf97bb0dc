"""Which package mirror to use: the spec's, DIB_DISTRIBUTION_MIRROR, or the host's apt sources."""

from __future__ import annotations

import hashlib
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from kiln.model import facts
from kiln.model.errors import KilnError, SpecError
from kiln.model.facts import BOOTSTRAPPED
from kiln.sources.extract import read_os_release

APT_DIR = Path("/etc/apt")


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if stanza:
                yield stanza
            stanza, last = {}, ""
            continue
        if line.startswith("#"):
            continue
        if line[0] in " \t" and last:
            stanza[last] += " " + line.strip()
            continue
        key, _, value = line.partition(":")
        last = key.strip().lower()
        stanza[last] = value.strip()
    if stanza:
        yield stanza


def host_sources(apt_dir: Path | None = None) -> list[tuple[str, list[str]]]:
    """The host's apt `deb` entries, (URI, suites), in the order apt reads them."""
    apt_dir = apt_dir or APT_DIR
    found: list[tuple[str, list[str]]] = []
    sources_d = apt_dir / "sources.list.d"
    for path in sorted(sources_d.glob("*.sources")) if sources_d.is_dir() else []:
        for stanza in _deb822_stanzas(path.read_text(errors="replace")):
            if "deb" not in stanza.get("types", "").split() or stanza.get("enabled", "yes") == "no":
                continue
            for uri in stanza.get("uris", "").split():
                found.append((uri.rstrip("/"), stanza.get("suites", "").split()))
    lists = [apt_dir / "sources.list"]
    if sources_d.is_dir():
        lists += sorted(sources_d.glob("*.list"))
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 3 or words[0] != "deb":
                continue
            if words[1].startswith("["):  # options: deb [signed-by=…] URI suite …
                while words and not words[0].endswith("]"):
                    words.pop(0)
                words = words[1:]
                if len(words) < 2:
                    continue
                found.append((words[0].rstrip("/"), words[1:2]))
            else:
                found.append((words[1].rstrip("/"), words[2:3]))
    return found


def _is_security(suite: str) -> bool:
    return suite.endswith(("-security", "/updates"))


def host_mirrors(apt_dir: Path | None = None) -> list[str]:
    """Mirror URIs of the host's apt sources serving a distribution suite (not a security suite)."""
    found: list[str] = []
    for uri, suites in host_sources(apt_dir):
        if any(not _is_security(s) for s in suites) and uri not in found:
            found.append(uri)
    return found


def host_security_mirrors(apt_dir: Path | None = None) -> list[str]:
    """Mirror URIs of the host's apt sources serving a security suite."""
    found: list[str] = []
    for uri, suites in host_sources(apt_dir):
        if any(_is_security(s) for s in suites) and uri not in found:
            found.append(uri)
    return found


def host_distro() -> str:
    return read_os_release(Path("/")).get("ID", "")


def resolve_mirror(spec_mirror: str | None, env: Mapping[str, str] | None = None, *, distro: str = "debian",
                   bootstrapped: bool = True) -> str:
    """The spec's mirror, else DIB_DISTRIBUTION_MIRROR, else the host's first apt mirror: for Debian, or
    for Ubuntu on an Ubuntu host. Other distros, and an Ubuntu upstream image on another host, get none
    (""): their image brings its own repositories."""
    env = os.environ if env is None else env
    if spec_mirror:
        return spec_mirror.rstrip("/")
    if env.get("DIB_DISTRIBUTION_MIRROR"):
        return env["DIB_DISTRIBUTION_MIRROR"].rstrip("/")
    if distro not in BOOTSTRAPPED:
        return ""
    if distro != "debian" and host_distro() != distro:
        if not bootstrapped:
            return ""
        raise SpecError(f"distro {distro}: no mirror: this host's apt sources are not {distro}'s; set the spec's "
                        f"'mirror' (or DIB_DISTRIBUTION_MIRROR) to a {distro} archive mirror")
    mirrors = host_mirrors()
    if not mirrors:
        raise SpecError(
            "no package mirror: the spec has no 'mirror', DIB_DISTRIBUTION_MIRROR is unset and the host's "
            f"apt sources under {APT_DIR} name none"
        )
    return mirrors[0]


def resolve_security_mirror(spec_mirror: str | None, env: Mapping[str, str] | None = None, *,
                            distro: str = "debian", mirror: str = "") -> str:
    """Where the security suite comes from: the spec's `security_mirror`, else DIB_DEBIAN_SECURITY_MIRROR
    (diskimage-builder's variable, for Debian), else for Debian the host's apt sources' security entry, and
    for Ubuntu the build's mirror (Ubuntu's archive mirrors carry the -security pocket)."""
    env = os.environ if env is None else env
    if spec_mirror:
        return spec_mirror.rstrip("/")
    if distro == "debian" and env.get("DIB_DEBIAN_SECURITY_MIRROR"):
        return env["DIB_DEBIAN_SECURITY_MIRROR"].rstrip("/")
    if distro != "debian":
        return mirror
    found = host_security_mirrors()
    if not found:
        raise SpecError(
            "no security mirror: the spec has no 'security_mirror', DIB_DEBIAN_SECURITY_MIRROR is unset and the "
            f"host's apt sources under {APT_DIR} name no security suite; set one of them, or list the suites "
            "to build from in the spec's 'suites' (e.g. [bookworm, bookworm-updates]) to do without it")
    return found[0]


class MirrorUnavailable(KilnError):
    """The mirror did not answer (after retries); bad input as far as the operator is concerned."""

    exit_code = 2


class MirrorHasNot(MirrorUnavailable):
    """The mirror answered, and has no such file (404 or 410 for every URL)."""


def fetch_url(url: str, *, timeout: float = 20.0, attempts: int = 3, backoff: float = 1.0) -> bytes:
    """The body of `url`. A mirror that fails for a moment is retried with exponential backoff and jitter;
    a file the mirror does not have (404, 410) is not. MirrorUnavailable names every URL tried."""
    return _fetch_first([url], timeout=timeout, attempts=attempts, backoff=backoff)


def release_file(mirror: str, suite: str, *, timeout: float = 20.0, attempts: int = 3,
                 backoff: float = 1.0) -> bytes:
    """The suite's InRelease (or Release) file as the mirror serves it now."""
    try:
        return _fetch_first([f"{mirror}/dists/{suite}/InRelease", f"{mirror}/dists/{suite}/Release"],
                            timeout=timeout, attempts=attempts, backoff=backoff)
    except MirrorHasNot as exc:
        known = sorted({*facts.DEBIAN_VERSIONS, *facts.UBUNTU_VERSIONS, *facts.NO_POCKETS} - {"rc-buggy"})
        release = suite.split("-")[0]
        hint = (f"; is {release!r} misspelt? releases kiln knows: {', '.join(known)}" if release not in known
                else "; this mirror does not carry it")
        raise MirrorHasNot(f"mirror {mirror} has no release {suite!r} (no dists/{suite}/InRelease or Release)"
                           f"{hint}:\n  {exc}") from None
    except MirrorUnavailable as exc:
        raise MirrorUnavailable(f"mirror {mirror} does not answer for release {suite!r}:\n  {exc}") from None


def release_digest(mirror: str, release: str, *, timeout: float = 20.0, attempts: int = 3,
                   backoff: float = 1.0) -> str:
    """sha256 of the suite's InRelease (or Release) file: it changes whenever the mirror publishes, so a
    base keyed on it is rebuilt exactly when there is something new to bootstrap."""
    return hashlib.sha256(release_file(mirror, release, timeout=timeout, attempts=attempts,
                                       backoff=backoff)).hexdigest()


def _fetch_first(urls: list[str], *, timeout: float, attempts: int, backoff: float) -> bytes:
    errors: list[str] = []
    for attempt in range(attempts):
        errors = []
        for url in urls:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    data: bytes = resp.read()
                    return data
            except urllib.error.HTTPError as exc:
                errors.append(f"{url}: HTTP {exc.code} {exc.reason}")
            except (urllib.error.URLError, OSError) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
        if all(" HTTP 404 " in e or " HTTP 410 " in e for e in errors):
            raise MirrorHasNot("\n  ".join(errors))
        if attempt + 1 < attempts:
            time.sleep(backoff * 2**attempt * (1 + random.uniform(-0.3, 0.3)))
    raise MirrorUnavailable("\n  ".join(errors))
