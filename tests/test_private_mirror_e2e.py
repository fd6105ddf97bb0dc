"""A base bootstrapped from a mirror signed by a key of its own (`mirror_keyring`), laid out as Ubuntu's
archive is (a release with its -updates and -security pockets, components main and universe), through
kiln's `distro: ubuntu` path.

No Ubuntu archive is reachable from these machines, so the archive is made here: the .debs this test
session's Debian build downloaded, indexed with apt-ftparchive under suites of their own, each InRelease
signed by a throwaway GPG key and served on 127.0.0.1. The -security pocket holds a newer build of one
package of the base (`hostname`, rebuilt with a higher version), as a security upload would. What runs
on it is the real thing: mmdebstrap checking the signatures against the spec's keyring and taking each
package at its newest version among the suites, then the element phases and the pack stage. A second
key that did not sign the archive is refused before anything is cached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.store.entries import Store
from tests.e2e import kiln, kiln_env, leftovers, manifest
from tests.test_build_e2e import debugfs_cat, debugfs_ls, root_offset
from tests.upstream_fixtures import FixtureServer, GpgKey, make_key

pytestmark = pytest.mark.slow

SUITE = "kilntest"
SECURITY = f"{SUITE}-security"
PATCHED = "hostname"  # a package of every base (Essential in Debian), given a newer build in -security


def ftparchive(args: list[str], *, cwd: Path) -> str:
    return subprocess.run(["apt-ftparchive", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def publish_suite(archive: Path, suite: str, pool: str | None, key: GpgKey,
                  components: tuple[str, ...] = ("main", "universe")) -> None:
    """dists/SUITE with main (the .debs under pool/POOL, none for None) and the other components empty,
    signed."""
    dists = archive / "dists" / suite
    for component in components:
        (dists / component / "binary-amd64").mkdir(parents=True, exist_ok=True)
        (dists / component / "binary-amd64" / "Packages").write_text("")
    packages = ftparchive(["packages", f"pool/{pool}"], cwd=archive) if pool else ""
    (dists / "main" / "binary-amd64" / "Packages").write_text(packages)
    for old in ("Release", "InRelease"):
        (dists / old).unlink(missing_ok=True)
    release = ftparchive(["-o", f"APT::FTPArchive::Release::Suite={suite}",
                          "-o", f"APT::FTPArchive::Release::Codename={suite}",
                          "-o", f"APT::FTPArchive::Release::Components={' '.join(components)}",
                          "-o", "APT::FTPArchive::Release::Architectures=amd64", "release", "."], cwd=dists)
    (dists / "Release").write_text(release)
    key.sign(dists / "Release", dists / "InRelease", clear=True)


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True,
                          check=True).stdout.strip()


def rebuild_newer(deb: Path, suffix: str, into: Path) -> tuple[str, Path]:
    """`deb` rebuilt with VERSION+SUFFIX (what a security upload of the same package looks like to apt)."""
    work = into / f"unpacked-{suffix}"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(work)], check=True)
    control = work / "DEBIAN" / "control"
    version = deb_field(deb, "Version") + suffix
    control.write_text("".join(f"Version: {version}\n" if line.startswith("Version:") else line
                               for line in control.read_text().splitlines(keepends=True)))
    out = into / f"{deb_field(deb, 'Package')}_{version.replace(':', '%3a')}_{deb_field(deb, 'Architecture')}.deb"
    subprocess.run(["dpkg-deb", "-b", "-Zxz", str(work), str(out)], check=True, capture_output=True)
    shutil.rmtree(work)
    return version, out


def distribution_debs(debs: Path, installed: list[dict[str, Any]]) -> list[Path]:
    """The .debs of the session's package cache that the default image build installed (`installed`: its
    manifest's packages): the cache is shared by every release and by these tests' own rebuilds, and an
    archive of bookworm must hold bookworm's packages only."""
    wanted = {(p["name"], p["version"].replace(":", "%3a")) for p in installed}
    return [deb for deb in sorted(debs.glob("*.deb")) if tuple(deb.name.split("_")[:2]) in wanted]


def make_archive(root: Path, debs: Path, key: GpgKey, installed: list[dict[str, Any]]) -> tuple[Path, str]:
    """The archive (the release, an empty -updates, and -security with a newer PATCHED); that version."""
    archive = root / "archive"
    pool = archive / "pool" / "main"
    pool.mkdir(parents=True)
    for deb in distribution_debs(debs, installed):
        os.link(deb, pool / deb.name)
    original = max(pool.glob(f"{PATCHED}_*.deb"))
    (archive / "pool" / "security").mkdir()
    version, _ = rebuild_newer(original, "+kiln1", archive / "pool" / "security")
    publish_suite(archive, SUITE, "main", key)
    publish_suite(archive, f"{SUITE}-updates", None, key)
    publish_suite(archive, SECURITY, "security", key)
    return archive, version


@pytest.fixture(scope="module")
def archive(seed_build: tuple[Path, dict[str, Any], float],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FixtureServer, GpgKey, GpgKey, str]]:
    root = tmp_path_factory.mktemp("private-mirror")
    debs = Path(kiln_env()["KILN_CACHE"]) / "debs" / "debian-amd64"
    if not list(debs.glob("libc6_*.deb")):
        # a store whose base was bootstrapped before kiln kept the essential packages' .debs: bootstrap
        # again (the cold store of a CI run has them from its first build)
        spec = root / "debs.yaml"
        spec.write_text("name: debs\ndistro: debian\nrelease: bookworm\nelements: [vm]\nformats: [raw]\n")
        kiln("build", str(spec), "--no-cache", "--no-boot-test", "--output", str(root / "debs-out"))
        shutil.rmtree(root / "debs-out")
    key = make_key(root / "archive-key", "kiln private archive")
    attacker = make_key(root / "other-key", "kiln someone else")
    archive, patched = make_archive(root, debs, key, seed_build[1]["packages"])
    server = FixtureServer(archive)
    try:
        yield server, key, attacker, patched
    finally:
        key.stop()
        attacker.stop()
        server.close()


def spec_file(path: Path, server: FixtureServer, keyring: Path) -> Path:
    path.write_text(f"name: private-mirror\ndistro: ubuntu\nrelease: {SUITE}\nelements: [vm]\nformats: [raw]\n"
                    f"mirror: {server.url('')}\nmirror_keyring: {keyring}\n")
    return path


def test_a_mirror_signed_by_its_own_key_bootstraps_the_ubuntu_way_with_its_security_pocket(
        archive: tuple[FixtureServer, GpgKey, GpgKey, str], tmp_path: Path) -> None:
    server, key, _, patched = archive
    mirror = server.url("").rstrip("/")
    spec = spec_file(tmp_path / "spec.yaml", server, key.keyring)
    kiln("build", str(spec), "--no-boot-test", "--output", str(tmp_path / "out"))
    m = manifest(tmp_path / "out")
    assert m["base"]["kind"] == "bootstrap" and m["base"]["distro"] == "ubuntu"
    assert m["base"]["mirror"] == mirror and m["base"]["release_digest"]
    assert [s["name"] for s in m["base"]["suites"]] == [SUITE, f"{SUITE}-updates", SECURITY]
    assert all(s["digest"] and s["mirror"] == mirror for s in m["base"]["suites"])
    assert m["base"]["suites_opted_out"] == []
    assert any(p["name"].startswith("linux-image") for p in m["packages"])
    for suite in (SUITE, f"{SUITE}-updates", SECURITY):
        assert server.seen(f"dists/{suite}/InRelease"), suite
    # the security upload is what the image has, and the manifest says where it came from
    got = {p["name"]: p for p in m["packages"]}
    assert got[PATCHED]["version"] == patched and got[PATCHED]["suite"] == SECURITY, got[PATCHED]
    assert got["libc6"]["suite"] == SUITE
    assert m["security_updates"] == 1 and m["package_origins"][SECURITY] == 1
    # its own apt sources: deb822, every suite, signed by the private key copied into the image
    raw = tmp_path / "out" / "private-mirror.raw"
    offset = root_offset(raw)
    assert debugfs_cat(raw, offset, "/etc/apt/sources.list") is None
    sources = debugfs_cat(raw, offset, "/etc/apt/sources.list.d/ubuntu.sources") or ""
    signed_by = "/etc/apt/keyrings/kiln-ubuntu-mirror.gpg"
    assert sources.strip() == (
        f"Types: deb\nURIs: {mirror}\nSuites: {SUITE} {SUITE}-updates\nComponents: main universe\n"
        f"Signed-By: {signed_by}\n\nTypes: deb\nURIs: {mirror}\nSuites: {SECURITY}\n"
        f"Components: main universe\nSigned-By: {signed_by}").strip(), sources
    assert "kiln-ubuntu-mirror.gpg" in debugfs_ls(raw, offset, "/etc/apt/keyrings")
    assert leftovers() == []


def test_a_new_security_upload_makes_a_new_base_and_opting_out_is_recorded(
        archive: tuple[FixtureServer, GpgKey, GpgKey, str], tmp_path: Path) -> None:
    """Every suite's InRelease is in the base key: an upload to -security alone makes a new base (and so
    everything after it); a spec that lists its suites leaves the others out of the key and the plan."""
    from kiln.build.plan import make_plan
    from kiln.model.spec import load_spec

    server, key, _, _ = archive
    spec = spec_file(tmp_path / "spec.yaml", server, key.keyring)
    before = make_plan(load_spec(spec, {}))
    archive_root = server.root
    _, newer = rebuild_newer(max((archive_root / "pool" / "main").glob(f"{PATCHED}_*.deb")), "+kiln2",
                             archive_root / "pool" / "security")
    try:
        publish_suite(archive_root, SECURITY, "security", key)
        after = make_plan(load_spec(spec, {}))
        assert after.base_key != before.base_key
        assert after.steps[-1].key != before.steps[-1].key
        assert [s.digest for s in after.suites][:2] == [s.digest for s in before.suites][:2]
        spec.write_text(spec.read_text() + f"suites: [{SUITE}]\n")
        only = make_plan(load_spec(spec, {}))
        assert [s.name for s in only.suites] == [SUITE]
        assert only.suites_opted_out == [f"{SUITE}-updates", SECURITY]
        assert only.base_key not in (before.base_key, after.base_key)
    finally:
        newer.unlink()  # the next test sees the archive as the module made it
        publish_suite(archive_root, SECURITY, "security", key)


def test_a_mirror_the_keyring_did_not_sign_is_refused_and_nothing_is_cached(
        archive: tuple[FixtureServer, GpgKey, GpgKey, str], tmp_path: Path) -> None:
    server, _, attacker, _ = archive
    store = Store(Path(kiln_env()["KILN_CACHE"]))
    before = {e.key for e in store.entries()}
    spec = spec_file(tmp_path / "spec.yaml", server, attacker.keyring)
    proc = kiln("build", str(spec), "--no-boot-test", "--output", str(tmp_path / "out"), check=False)
    assert proc.returncode != 0
    err = proc.stderr.split("kiln: error:")[-1]
    assert "bootstrap of ubuntu" in err and "Traceback" not in err, err[-3000:]
    assert "NO_PUBKEY" in err or "not signed" in err or "signature" in err.lower(), err[-3000:]
    assert {e.key for e in store.entries()} == before
    assert leftovers() == []


def test_mirror_keyring_changes_the_base_key(archive: tuple[FixtureServer, GpgKey, GpgKey, str],
                                            tmp_path: Path) -> None:
    """Two keyrings, two bases: the key that vouched for a base is part of what names it."""
    from kiln.build.plan import make_plan
    from kiln.model.spec import load_spec

    server, key, attacker, _ = archive
    a = make_plan(load_spec(spec_file(tmp_path / "a.yaml", server, key.keyring), {}))
    b = make_plan(load_spec(spec_file(tmp_path / "b.yaml", server, attacker.keyring), {}))
    assert a.base_key != b.base_key
