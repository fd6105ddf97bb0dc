"""Suites: which a build comes from, where each is fetched, what the image's apt sources say, and where
each installed package came from (read from a real HTTP mirror on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import lzma
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.model.errors import SpecError
from kiln.model.facts import check_suites, default_suites, opted_out
from kiln.model.spec import spec_from_dict
from kiln.sources.mirror import MirrorUnavailable, host_security_mirrors, resolve_security_mirror
from kiln.sources.suites import (
    SuiteSource,
    apt_sources,
    package_origins,
    suite_sources,
)
from tests.upstream_fixtures import FixtureServer


def test_default_suites_are_the_release_and_its_updates_and_security_pockets() -> None:
    assert default_suites("bookworm") == ["bookworm", "bookworm-updates", "bookworm-security"]
    assert default_suites("noble") == ["noble", "noble-updates", "noble-security"]
    assert default_suites("sid") == ["sid"]


def test_a_spec_may_opt_out_of_suites_and_must_keep_the_release_first() -> None:
    assert check_suites("bookworm", ["bookworm", "bookworm-updates"]) == ["bookworm", "bookworm-updates"]
    assert opted_out("bookworm", ["bookworm"]) == ["bookworm-updates", "bookworm-security"]
    with pytest.raises(SpecError, match="must start with the release"):
        check_suites("bookworm", ["bookworm-security", "bookworm"])
    with pytest.raises(SpecError, match="'trixie-security' is not the release 'bookworm'"):
        check_suites("bookworm", ["bookworm", "trixie-security"])
    with pytest.raises(SpecError, match="suites"):
        spec_from_dict({"release": "bookworm", "suites": ["trixie"]}, "images/x.yaml")


def test_host_security_entry_is_the_default_security_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://security.example/debian-security/\nSuites: bookworm-security\nComponents: main\n")
    assert host_security_mirrors(tmp_path) == ["http://security.example/debian-security"]
    monkeypatch.setattr("kiln.sources.mirror.APT_DIR", tmp_path)
    assert resolve_security_mirror(None, {}) == "http://security.example/debian-security"
    assert resolve_security_mirror(None, {"DIB_DEBIAN_SECURITY_MIRROR": "http://dib.example/s/"}) == \
        "http://dib.example/s"
    assert resolve_security_mirror("http://spec.example/s", {"DIB_DEBIAN_SECURITY_MIRROR": "x"}) == \
        "http://spec.example/s"
    # Ubuntu's -security pocket is on the archive mirror
    assert resolve_security_mirror(None, {}, distro="ubuntu", mirror="http://u.example/ubuntu") == \
        "http://u.example/ubuntu"
    (d / "debian.sources").write_text("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n")
    with pytest.raises(SpecError, match=r"no security mirror.*'suites'"):
        resolve_security_mirror(None, {})


def test_image_sources_are_deb822_with_signed_by() -> None:
    suites = [SuiteSource("bookworm", "http://build/debian"), SuiteSource("bookworm-updates", "http://build/debian"),
              SuiteSource("bookworm-security", "http://build/debian-security")]
    text = apt_sources("debian", suites, ["main"], image_mirror="http://img/debian",
                       image_security_mirror="http://img/debian-security",
                       signed_by="/usr/share/keyrings/debian-archive-keyring.gpg")
    assert text == (
        "Types: deb\nURIs: http://img/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://img/debian-security\nSuites: bookworm-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    only_release = apt_sources("ubuntu", suites[:1], ["main", "universe"], image_mirror="http://u",
                               image_security_mirror="http://u", signed_by="/k.gpg")
    assert "security" not in only_release and "Components: main universe" in only_release


def _suite(root: Path, name: str, packages: str, *, lie: bool = False) -> None:
    d = root / "dists" / name
    (d / "main" / "binary-amd64").mkdir(parents=True, exist_ok=True)
    data = lzma.compress(packages.encode())
    (d / "main" / "binary-amd64" / "Packages.xz").write_bytes(b"tampered" if lie else data)
    sha = hashlib.sha256(data).hexdigest()
    (d / "InRelease").write_text(f"Suite: {name}\nSHA256:\n {sha} {len(data)} main/binary-amd64/Packages.xz\n")


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[FixtureServer]:
    _suite(tmp_path, "bookworm", "Package: openssl\nVersion: 3.0.20-1~deb12u2\n\nPackage: bash\nVersion: 5.2.15-2+b7\n")
    _suite(tmp_path, "bookworm-updates", "Package: tzdata\nVersion: 2026f-0+deb12u1\n")
    _suite(tmp_path, "bookworm-security", "Package: openssl\nVersion: 3.0.22-1~deb12u2\n\n"
                                          "Package: tzdata\nVersion: 2026f-0+deb12u1\n")
    server = FixtureServer(tmp_path)
    yield server
    server.close()


def test_every_suite_is_pinned_by_its_inrelease_digest(mirror: FixtureServer, tmp_path: Path) -> None:
    url = mirror.url("").rstrip("/")
    sources = suite_sources("bookworm", default_suites("bookworm"), mirror=url, security_mirror=url)
    assert [s.name for s in sources] == default_suites("bookworm")
    first = {s.name: s.digest for s in sources}
    _suite(tmp_path, "bookworm-security", "Package: openssl\nVersion: 3.0.23-1~deb12u1\n")
    again = {s.name: s.digest for s in suite_sources("bookworm", default_suites("bookworm"), mirror=url,
                                                      security_mirror=url)}
    assert again["bookworm"] == first["bookworm"] and again["bookworm-security"] != first["bookworm-security"]
    with pytest.raises(MirrorUnavailable, match="lists the suites it wants in 'suites'"):
        suite_sources("bookworm", ["bookworm", "bookworm-backports"], mirror=url, security_mirror=url)


def test_package_origins_name_the_suite_each_version_came_from(mirror: FixtureServer) -> None:
    url = mirror.url("").rstrip("/")
    sources = suite_sources("bookworm", default_suites("bookworm"), mirror=url, security_mirror=url)
    installed = [{"name": "openssl", "version": "3.0.22-1~deb12u2", "arch": "amd64"},
                 {"name": "bash", "version": "5.2.15-2+b7", "arch": "amd64"},
                 {"name": "tzdata", "version": "2026f-0+deb12u1", "arch": "all"}]
    origins = {p["name"]: p["suite"] for p in package_origins(installed, sources, arch="amd64",
                                                                components=["main"])}
    # tzdata is in both pockets: the security suite is named, it is what an operator counts
    assert origins == {"openssl": "bookworm-security", "bash": "bookworm", "tzdata": "bookworm-security"}


def test_an_index_that_does_not_match_its_inrelease_is_refused(tmp_path: Path) -> None:
    _suite(tmp_path, "bookworm", "")
    _suite(tmp_path, "bookworm-security", "Package: openssl\nVersion: 9\n", lie=True)
    server = FixtureServer(tmp_path)
    try:
        url = server.url("").rstrip("/")
        sources = suite_sources("bookworm", ["bookworm", "bookworm-security"], mirror=url, security_mirror=url)
        with pytest.raises(MirrorUnavailable, match="does not match its suite's InRelease"):
            package_origins([{"name": "openssl", "version": "9", "arch": "amd64"}], sources, arch="amd64",
                            components=["main"])
    finally:
        server.close()


def test_the_suite_digest_follows_its_package_indices_not_the_inrelease_date() -> None:
    """A republished InRelease (new Date, new signature) with the same indices keeps the base; an upload
    (a changed Packages checksum for the build's components and arch) makes a new one."""
    from kiln.sources.suites import index_digest

    def release(date: str, main: str, contrib: str = "c0") -> bytes:
        return (f"Suite: bookworm-security\nDate: {date}\nSHA256:\n {main} 10 main/binary-amd64/Packages.xz\n"
                f" {contrib} 10 contrib/binary-amd64/Packages.xz\n {main}0 9 main/binary-arm64/Packages.xz\n"
                f" aa 3 main/i18n/Translation-en.bz2\n").encode()

    base = index_digest(release("Sat, 05 Dec 2026", "m1"), ["main"], "amd64")
    assert index_digest(release("Sun, 06 Dec 2026", "m1"), ["main"], "amd64") == base
    assert index_digest(release("Sun, 06 Dec 2026", "m1", contrib="c1"), ["main"], "amd64") == base
    assert index_digest(release("Sun, 06 Dec 2026", "m2"), ["main"], "amd64") != base
    assert index_digest(b"Date: 1\n", ["main"], "amd64") != index_digest(b"Date: 2\n", ["main"], "amd64")
