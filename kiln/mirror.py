"""Which package mirror to use: the spec's, DIB_DISTRIBUTION_MIRROR, or the host's apt sources."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from kiln.bootstrap import BOOTSTRAPPED
from kiln.errors import KilnError, SpecError

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


def host_mirrors(apt_dir: Path | None = None) -> list[str]:
    """Mirror URIs of the host's apt sources serving a distribution suite (not a security suite)."""
    apt_dir = apt_dir or APT_DIR
    found: list[str] = []

    def add(uri: str, suites: list[str]) -> None:
        if any(not s.endswith(("-security", "/updates")) for s in suites) and uri not in found:
            found.append(uri.rstrip("/"))

    sources_d = apt_dir / "sources.list.d"
    for path in sorted(sources_d.glob("*.sources")) if sources_d.is_dir() else []:
        for stanza in _deb822_stanzas(path.read_text(errors="replace")):
            if "deb" not in stanza.get("types", "").split() or stanza.get("enabled", "yes") == "no":
                continue
            for uri in stanza.get("uris", "").split():
                add(uri, stanza.get("suites", "").split())
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
                add(words[0], words[1:2])
            else:
                add(words[1], words[2:3])
    return found


def host_distro() -> str:
    from kiln.extract import read_os_release

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


class MirrorUnavailable(KilnError):
    """The mirror did not answer (after retries); bad input as far as the operator is concerned."""

    exit_code = 2


def release_digest(mirror: str, release: str, *, timeout: float = 20.0, attempts: int = 3,
                   backoff: float = 1.0) -> str:
    """sha256 of the suite's InRelease (or Release) file: it changes whenever the mirror publishes, so a
    base keyed on it is rebuilt exactly when there is something new to bootstrap.

    A mirror that fails for a moment is retried with exponential backoff and jitter; a suite the mirror
    does not have (404) is not."""
    import hashlib
    import random
    import time
    import urllib.error
    import urllib.request

    errors: list[str] = []
    for attempt in range(attempts):
        errors = []
        for name in ("InRelease", "Release"):
            url = f"{mirror}/dists/{release}/{name}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return hashlib.sha256(resp.read()).hexdigest()
            except urllib.error.HTTPError as exc:
                errors.append(f"{url}: HTTP {exc.code} {exc.reason}")
            except (urllib.error.URLError, OSError) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
        if all(" HTTP 404 " in e or " HTTP 410 " in e for e in errors):
            break
        if attempt + 1 < attempts:
            time.sleep(backoff * 2**attempt * (1 + random.uniform(-0.3, 0.3)))
    raise MirrorUnavailable(f"mirror {mirror} does not answer for release {release!r}:\n  " + "\n  ".join(errors))
