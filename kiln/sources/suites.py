"""The suites a bootstrapped image is built from, and the apt sources it leaves in the image.

A Debian image comes from `<release>`, `<release>-updates` and `<release>-security`; an Ubuntu image from
the release and its `-updates` and `-security` pockets. Every suite's digest is part of the base key: the
checksums its InRelease lists for the package indices the build reads (its components, for the image's
architecture and `all`), so a new upload to any of them makes a new base, and a republished InRelease
with nothing new (a new Date, a new signature) does not. apt takes each package at its newest version
among them. The image's own apt sources are deb822 `.sources` files naming the same suites, signed by the
distribution's keyring, at the mirror the spec names for the image.

The manifest says where each installed package came from: its version is looked up in the Packages
indices of the suites other than the release (the small ones), each checked against its suite's
InRelease before it is believed.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import logging
import lzma
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kiln.model.facts import SECURITY_POCKET
from kiln.sources.mirror import MirrorUnavailable, fetch_url, release_file

log = logging.getLogger("kiln.suites")

# the keyring the distribution's apt package brings, named by the image's Signed-By
DISTRO_KEYRINGS = {"debian": "/usr/share/keyrings/debian-archive-keyring.gpg",
                   "ubuntu": "/usr/share/keyrings/ubuntu-archive-keyring.gpg"}
# where the image keeps a private mirror's key (the spec's mirror_keyring), by its format
IMAGE_KEYRING_DIR = "/etc/apt/keyrings"


@dataclass(frozen=True)
class SuiteSource:
    """One suite as the build sees it: where it is and what the mirror published for it."""

    name: str
    mirror: str
    digest: str = ""  # of its package indices' checksums as its InRelease listed them at plan time

    @property
    def security(self) -> bool:
        return self.name.endswith("-" + SECURITY_POCKET)

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "mirror": self.mirror, "digest": self.digest}


def index_digest(release: bytes, components: Sequence[str], arch: str) -> str:
    """sha256 of the SHA256 entries a Release/InRelease file lists for the package indices of `components`
    (binary-ARCH and binary-all): what changes when a package is uploaded, and only then. A file that lists
    none is taken whole."""
    wanted = tuple(f"{c}/binary-{a}/Packages" for c in components for a in (arch, "all"))
    entries = sorted(f"{sha} {size} {path}" for path, (sha, size) in _release_hashes(release).items()
                     if path.startswith(wanted))
    if not entries:
        return hashlib.sha256(release).hexdigest()
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def suite_digest(mirror: str, suite: str, *, components: Sequence[str], arch: str) -> str:
    return index_digest(release_file(mirror, suite), components, arch)


def suite_sources(release: str, suites: Sequence[str], *, mirror: str, security_mirror: str,
                  components: Sequence[str] = ("main",), arch: str = "amd64",
                  digest: Callable[..., str] | None = None) -> tuple[SuiteSource, ...]:
    """Each suite with its mirror (security suites on the security mirror) and its digest (`suite_digest`)."""
    digest = digest or suite_digest
    out = []
    for name in suites:
        where = security_mirror if name.endswith("-" + SECURITY_POCKET) else mirror
        try:
            value = digest(where, name, components=components, arch=arch)
        except MirrorUnavailable as exc:
            if name == release:
                raise
            raise MirrorUnavailable(f"{exc}\n  (the build asks for suite {name}: a spec that must do without it "
                                    f"lists the suites it wants in 'suites', e.g. [{release}])") from exc
        out.append(SuiteSource(name, where, value))
    return tuple(out)


def apt_sources(distro: str, suites: Sequence[SuiteSource], components: Sequence[str], *, image_mirror: str,
                image_security_mirror: str, signed_by: str) -> str:
    """The image's deb822 sources: one stanza for the release mirror's suites, one for the security ones."""
    plain = [s.name for s in suites if not s.security]
    security = [s.name for s in suites if s.security]
    stanzas = []
    for uri, names in ((image_mirror, plain), (image_security_mirror, security)):
        if names:
            stanzas.append(f"Types: deb\nURIs: {uri}\nSuites: {' '.join(names)}\n"
                           f"Components: {' '.join(components)}\nSigned-By: {signed_by}\n")
    return "\n".join(stanzas)


def image_keyring_path(keyring_bytes: bytes, distro: str) -> str:
    """Where a private mirror's key lives in the image, named as apt wants it (.asc armored, .gpg binary)."""
    suffix = ".asc" if keyring_bytes.lstrip().startswith(b"-----BEGIN PGP") else ".gpg"
    return f"{IMAGE_KEYRING_DIR}/kiln-{distro}-mirror{suffix}"


# ----------------------------------------------------------------------------------- package origins


def _release_hashes(release: bytes) -> dict[str, tuple[str, int]]:
    """path -> (sha256, size) from a Release/InRelease file's SHA256 section."""
    out: dict[str, tuple[str, int]] = {}
    in_sha = False
    for raw in release.decode("utf-8", "replace").splitlines():
        if raw.startswith("SHA256:"):
            in_sha = True
            continue
        if in_sha:
            if not raw.startswith(" "):
                in_sha = False
                continue
            parts = raw.split()
            if len(parts) == 3 and parts[1].isdigit():
                out[parts[2]] = (parts[0], int(parts[1]))
    return out


_DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {
    ".xz": lzma.decompress, ".gz": gzip.decompress, ".bz2": bz2.decompress, "": lambda b: b,
}


def _packages_index(suite: SuiteSource, release: bytes, component: str, arch: str) -> bytes | None:
    """The suite's Packages index for one component, verified against its InRelease (`release`); None where
    the suite has none for it. An index whose digest does not match is an error (the mirror changed under
    the build or lies)."""
    listed = _release_hashes(release)
    for ext, decompress in _DECOMPRESS.items():
        path = f"{component}/binary-{arch}/Packages{ext}"
        if path not in listed:
            continue
        data = fetch_url(f"{suite.mirror}/dists/{suite.name}/{path}")
        sha, size = listed[path]
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise MirrorUnavailable(f"suites: {suite.mirror}/dists/{suite.name}/{path} does not match its "
                                    f"suite's InRelease (sha256 {sha})")
        return decompress(data)
    return None


def _versions(index: bytes) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    name = version = ""
    for line in [*index.decode("utf-8", "replace").splitlines(), ""]:
        if not line.strip():
            if name and version:
                out.add((name, version))
            name = version = ""
        elif line.startswith("Package:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("Version:"):
            version = line.split(":", 1)[1].strip()
    return out


def package_origins(packages: Sequence[dict[str, Any]], suites: Sequence[SuiteSource], *, arch: str,
                    components: Sequence[str]) -> list[dict[str, Any]]:
    """`packages` (name, version, arch) each with `suite`: the first of the security suites, then the other
    pockets, whose index has that version; the release otherwise."""
    if not suites:
        return [dict(p) for p in packages]
    release = suites[0].name
    pockets = sorted(suites[1:], key=lambda s: not s.security)  # a security upload wins over -updates
    found: list[tuple[str, set[tuple[str, str]]]] = []
    for suite in pockets:
        versions: set[tuple[str, str]] = set()
        listing = release_file(suite.mirror, suite.name)
        if suite.digest and index_digest(listing, components, arch) != suite.digest:
            log.warning("suites: %s has new uploads since the plan; origins follow the newer indices", suite.name)
        for component in components:  # binary-ARCH lists the Architecture: all packages too
            index = _packages_index(suite, listing, component, arch)
            if index is not None:
                versions |= _versions(index)
        found.append((suite.name, versions))
    out = []
    for p in packages:
        origin = next((name for name, versions in found if (p["name"], p["version"]) in versions), release)
        out.append({**p, "suite": origin})
    return out


def origin_counts(packages: Sequence[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in packages:
        if "suite" in p:
            counts[p["suite"]] = counts.get(p["suite"], 0) + 1
    return counts
