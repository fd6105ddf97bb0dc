"""A base bootstrapped from a mirror signed by a key of its own (`mirror_keyring`), laid out as Ubuntu's
archive is (a suite, components main and universe), through kiln's `distro: ubuntu` path.

No Ubuntu archive is reachable from these machines, so the archive is made here: the .debs this test
session's Debian build downloaded, indexed with apt-ftparchive under a suite of their own, its InRelease
signed by a throwaway GPG key and served on 127.0.0.1. What runs on it is the real thing: mmdebstrap
checking the signature against the spec's keyring, then the element phases and the pack stage. A
second key that did not sign the archive is refused before anything is cached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.store import Store
from tests.e2e import kiln, kiln_env, leftovers, manifest
from tests.test_build_e2e import debugfs_cat, root_offset, seed_build  # noqa: F401  (seed_build: the .debs)
from tests.upstream_fixtures import FixtureServer, GpgKey, make_key

pytestmark = pytest.mark.slow

SUITE = "kilntest"


def ftparchive(args: list[str], *, cwd: Path) -> str:
    return subprocess.run(["apt-ftparchive", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def make_archive(root: Path, debs: Path, key: GpgKey) -> Path:
    archive = root / "archive"
    pool = archive / "pool" / "main"
    pool.mkdir(parents=True)
    for deb in debs.glob("*.deb"):
        os.link(deb, pool / deb.name)
    dists = archive / "dists" / SUITE
    for component in ("main", "universe"):
        (dists / component / "binary-amd64").mkdir(parents=True)
    packages = ftparchive(["packages", "pool/main"], cwd=archive)
    (dists / "main" / "binary-amd64" / "Packages").write_text(packages)
    (dists / "universe" / "binary-amd64" / "Packages").write_text("")
    release = ftparchive(["-o", f"APT::FTPArchive::Release::Suite={SUITE}",
                      "-o", f"APT::FTPArchive::Release::Codename={SUITE}",
                      "-o", "APT::FTPArchive::Release::Components=main universe",
                      "-o", "APT::FTPArchive::Release::Architectures=amd64", "release", "."], cwd=dists)
    (dists / "Release").write_text(release)
    key.sign(dists / "Release", dists / "InRelease", clear=True)
    return archive


@pytest.fixture(scope="module")
def archive(seed_build: tuple[Path, dict[str, Any], float],  # noqa: F811
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FixtureServer, GpgKey, GpgKey]]:
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
    server = FixtureServer(make_archive(root, debs, key))
    key.stop()
    attacker.stop()
    try:
        yield server, key, attacker
    finally:
        server.close()


def spec_file(path: Path, server: FixtureServer, keyring: Path) -> Path:
    path.write_text(f"name: private-mirror\ndistro: ubuntu\nrelease: {SUITE}\nelements: [vm]\nformats: [raw]\n"
                    f"mirror: {server.url('')}\nmirror_keyring: {keyring}\n")
    return path


def test_a_mirror_signed_by_its_own_key_bootstraps_the_ubuntu_way(
        archive: tuple[FixtureServer, GpgKey, GpgKey], tmp_path: Path) -> None:
    server, key, _ = archive
    spec = spec_file(tmp_path / "spec.yaml", server, key.keyring)
    kiln("build", str(spec), "--no-boot-test", "--output", str(tmp_path / "out"))
    m = manifest(tmp_path / "out")
    assert m["base"]["kind"] == "bootstrap" and m["base"]["distro"] == "ubuntu"
    assert m["base"]["mirror"] == server.url("").rstrip("/") and m["base"]["release_digest"]
    assert any(p["name"].startswith("linux-image") for p in m["packages"])
    assert server.seen(f"dists/{SUITE}/InRelease")
    raw = tmp_path / "out" / "private-mirror.raw"
    sources = debugfs_cat(raw, root_offset(raw), "/etc/apt/sources.list") or ""
    assert f"{SUITE} main universe" in sources, sources
    assert leftovers() == []


def test_a_mirror_the_keyring_did_not_sign_is_refused_and_nothing_is_cached(
        archive: tuple[FixtureServer, GpgKey, GpgKey], tmp_path: Path) -> None:
    server, _, attacker = archive
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


def test_mirror_keyring_changes_the_base_key(archive: tuple[FixtureServer, GpgKey, GpgKey], tmp_path: Path) -> None:
    """Two keyrings, two bases: the key that vouched for a base is part of what names it."""
    from kiln.plan import make_plan
    from kiln.spec import load_spec

    server, key, attacker = archive
    a = make_plan(load_spec(spec_file(tmp_path / "a.yaml", server, key.keyring), {}))
    b = make_plan(load_spec(spec_file(tmp_path / "b.yaml", server, attacker.keyring), {}))
    assert a.base_key != b.base_key
