"""An image built from an upstream qcow2 cloud image, verified, customized, packed and booted.

The "upstream" is the qcow2 this test session built from the seed example (tests/test_build_e2e.py),
published on 127.0.0.1 with a SHA256SUMS signed by a throwaway GPG key, as a distribution publishes its
cloud images."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kiln.host.run import run
from kiln.store.entries import Store
from tests import dib_parity
from tests.e2e import kiln, kiln_env, leftovers, manifest
from tests.test_build_e2e import debugfs_cat, root_offset
from tests.upstream_fixtures import FixtureServer, GpgKey, _sha256, make_key

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def published(seed_build: tuple[Path, dict[str, Any], float],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FixtureServer, GpgKey, GpgKey, Path]]:
    out, _, _ = seed_build
    root = tmp_path_factory.mktemp("upstream")
    served = root / "served"
    served.mkdir()
    shutil.copyfile(out / "debian-12-seed-example.qcow2", served / "cloud.qcow2")
    (served / "SHA256SUMS").write_text(f"{_sha256(served / 'cloud.qcow2')}  cloud.qcow2\n")
    key = make_key(root / "publisher", "kiln upstream publisher")
    attacker = make_key(root / "attacker", "kiln upstream attacker")
    key.sign(served / "SHA256SUMS", served / "SHA256SUMS.gpg")
    attacker.sign(served / "SHA256SUMS", served / "SHA256SUMS.attacker.gpg")
    key.stop()
    attacker.stop()
    server = FixtureServer(served)
    try:
        yield server, key, attacker, root
    finally:
        server.close()


def write_spec(path: Path, server: FixtureServer, keyring: Path, signature: str = "SHA256SUMS.gpg") -> Path:
    path.write_text(
        "name: from-upstream\n"
        "distro: debian\nrelease: bookworm\n"
        "elements: [vm, cloud-init, growroot, small-step]\n"
        "formats: [qcow2]\n"
        # the upstream image is the seed example, whose cloud-init-cfg asks cloud-init for password logins
        "boot_test: {firmware: [bios], waive: {sshd-no-passwords: 'the seed image asks for password logins'}}\n"
        "base:\n"
        f"  url: {server.url('cloud.qcow2')}\n"
        f"  checksum_url: {server.url('SHA256SUMS')}\n"
        f"  signature_url: {server.url(signature)}\n"
        f"  keyring: {keyring}\n")
    return path


def test_qcow2_upstream_base_builds_and_boots(published: tuple[FixtureServer, GpgKey, GpgKey, Path],
                                              tmp_path: Path) -> None:
    server, key, _, _ = published
    spec = write_spec(tmp_path / "spec.yaml", server, key.keyring)
    kiln("build", str(spec), "--elements-path", "tests/data/elements", "--output", str(tmp_path / "out"))
    m = manifest(tmp_path / "out")
    assert m["base"]["kind"] == "upstream"
    assert m["base"]["trust"] and m["base"]["signer"] == key.fingerprint
    [boot] = m["boot_test"]
    assert boot["passed"] and boot["root_bytes"] > 4.2 * 1024**3
    assert any(s["name"] == "60-small-step" for s in m["steps"])
    assert leftovers() == []


def test_badly_signed_upstream_is_refused_and_nothing_is_cached(
        published: tuple[FixtureServer, GpgKey, GpgKey, Path], tmp_path: Path) -> None:
    server, key, _, _ = published
    store = Store(Path(kiln_env()["KILN_CACHE"]))
    before = {e.key for e in store.entries()}
    spec = write_spec(tmp_path / "spec.yaml", server, key.keyring, signature="SHA256SUMS.attacker.gpg")
    proc = kiln("build", str(spec), "--elements-path", "tests/data/elements", "--no-boot-test",
                "--output", str(tmp_path / "out"), check=False)
    assert proc.returncode != 0
    err = proc.stderr.split("kiln: error:")[-1]
    assert "signature" in err.lower() and "Traceback" not in err
    assert {e.key for e in store.entries()} == before
    assert leftovers() == []


HELLO_SPEC = """Name: kiln-hello-rpm
Version: 1.0
Release: 1
Summary: kiln's dnf test package
License: MIT
BuildArch: noarch
%description
One file, for kiln's dnf test.
%install
mkdir -p %{buildroot}/usr/share/kiln-hello
echo "hello from an rpm" > %{buildroot}/usr/share/kiln-hello/hello.txt
%files
/usr/share/kiln-hello/hello.txt
"""


STAND_IN_SPEC = """Name: {name}
Version: 0
Release: 1
Summary: a stand-in for the Red Hat family's {name}
License: MIT
BuildArch: noarch
%description
Stands in for {name} in kiln's dnf test (no Red Hat family mirror is reachable here).
%files
"""


def rpm_repository(root: Path, stand_ins: Sequence[str] = ()) -> Path:
    """A real dnf repository, indexed with createrepo_c: one noarch RPM with a file, built with rpmbuild, and
    an empty one for each name in `stand_ins`."""
    root.mkdir(parents=True)
    (root / "hello.spec").write_text(HELLO_SPEC)
    for name in stand_ins:
        (root / f"{name}.spec").write_text(STAND_IN_SPEC.format(name=name))
    for spec in sorted(root.glob("*.spec")):
        run(["rpmbuild", "-bb", "--quiet", "--define", f"_topdir {root / 'rpmbuild'}", str(spec)], quiet=True)
    repo = root / "repo"
    repo.mkdir()
    for rpm in (root / "rpmbuild" / "RPMS").rglob("*.rpm"):
        shutil.copy(rpm, repo)
    run(["createrepo_c", "-q", str(repo)], quiet=True)
    return repo


def test_redhat_family_packages_go_through_dnf_and_the_redhat_pkg_map(
        published: tuple[FixtureServer, GpgKey, GpgKey, Path], make_element: Callable[..., Path],
        tmp_path: Path) -> None:
    """distro: fedora on an upstream base: install-packages runs dnf (KILN_PACKAGE_FAMILY=redhat) and
    package-installs names go through pkg-map's redhat family. The base is this session's Debian image
    (no Fedora mirror is reachable here), so an earlier hook puts Debian's own dnf and rpm into it and
    points dnf at a repository served on 127.0.0.1; what installs the packages is a real dnf. Besides the
    test's own package, the repository has an empty stand-in for every package diskimage-builder's `fedora`
    installs (derived from DIB's files): kiln's `fedora` and `redhat-common` ask dnf for each of them."""
    server, key, _, _ = published
    dib_packages = dib_parity.dib_side("fedora", "fedora", "41")[1]
    repo = FixtureServer(rpm_repository(tmp_path / "rpm", dib_packages))
    try:
        # before package-installs' own pre-install.d/01 (redhat-common installs gettext at pre-install)
        make_element("dnf-from-debian", hooks={"pre-install.d/00-dnf": (
            "set -eu\napt-get update -q\n"
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dnf rpm\n"
            # Debian's rpm keeps its database in ~/.rpmdb; a Red Hat family image keeps it here
            "mkdir -p /etc/rpm /etc/yum.repos.d\necho '%_dbpath /var/lib/rpm' > /etc/rpm/macros.dbpath\n"
            f"printf '[kiln-test]\\nname=kiln test\\nbaseurl={repo.url('')}\\ngpgcheck=0\\n' "
            "> /etc/yum.repos.d/kiln-test.repo\n")})
        make_element("hello", deps=["dnf-from-debian"], files={
            "package-installs.yaml": "hello-tool:\n",
            "pkg-map": '{"family": {"redhat": {"hello-tool": "kiln-hello-rpm"}, "debian": {"hello-tool": "hello"}}}',
        })
        spec = tmp_path / "spec.yaml"
        spec.write_text(
            "name: redhat-family\ndistro: fedora\nrelease: '41'\nelements: [hello]\nformats: [raw]\n"
            "base:\n"
            f"  url: {server.url('cloud.qcow2')}\n"
            f"  checksum_url: {server.url('SHA256SUMS')}\n"
            f"  signature_url: {server.url('SHA256SUMS.gpg')}\n"
            f"  keyring: {key.keyring}\n")
        kiln("build", str(spec), "--elements-path", str(make_element.root),  # type: ignore[attr-defined]
            "--no-boot-test", "--output", str(tmp_path / "out"))
    finally:
        repo.close()
    m = manifest(tmp_path / "out")
    # listed from the image's rpm database: dnf installed it, under the name pkg-map's redhat family gave
    installed = {p["name"]: p for p in m["packages"]}
    assert installed["kiln-hello-rpm"]["version"] == "1.0-1" and installed["kiln-hello-rpm"]["arch"] == "noarch"
    assert "hello" not in installed  # the debian family's name was not used
    assert [p for p in dib_packages if installed.get(p, {}).get("version") != "0-1"] == []
    raw = tmp_path / "out" / "redhat-family.raw"
    assert debugfs_cat(raw, root_offset(raw), "/usr/share/kiln-hello/hello.txt") == "hello from an rpm\n"
    assert debugfs_cat(raw, root_offset(raw), "/etc/os-release") is not None
    assert leftovers() == []
