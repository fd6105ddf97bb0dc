"""Reproducible builds (issue 17): SOURCE_DATE_EPOCH from the release's InRelease, the dates the pack stage
writes, and the report `kiln build --check-reproducible` prints on a difference."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.build.plan import make_plan
from kiln.cli.main import parser
from kiln.image.compare import (
    DiskComparison,
    FileDifference,
    Partition,
    differing_chunks,
    header_differences,
    region_of,
    tree_differences,
)
from kiln.image.filesystems import clamp_commands, hash_seed
from kiln.image.layout import plan_layout
from kiln.model.spec import spec_from_dict
from kiln.sources.bootstrap import BootstrapRequest
from kiln.sources.epoch import release_date
from kiln.sources.mirror import MirrorUnavailable

IN_RELEASE = b"""-----BEGIN PGP SIGNED MESSAGE-----
Hash: SHA512

Origin: Debian
Label: Debian
Suite: stable
Version: 12.12
Codename: bookworm
Changelogs: https://metadata.example/changelogs/@CHANGEPATH@_changelog
Date: Sat, 06 Sep 2025 09:43:27 UTC
Acquire-By-Hash: yes
Architectures: all amd64 arm64
Components: main contrib non-free-firmware non-free
Description: Debian 12.12 Released 06 September 2025
SHA256:
 0ff0b4f8e8c1b5b1c7d2a4a3a5e4f1c2b3a4d5e6f7a8b9c0d1e2f3a4b5c6d7e8  1234 main/binary-amd64/Packages
-----BEGIN PGP SIGNATURE-----

iQIzBAEBCgAdFiEE
-----END PGP SIGNATURE-----
"""


def test_source_date_epoch_is_the_inrelease_date() -> None:
    assert release_date(IN_RELEASE) == 1757151807  # 2025-09-06 09:43:27 UTC
    assert release_date(b"Origin: x\nDate: Sat, 06 Sep 2025 09:43:27 +0000\n") == 1757151807
    assert release_date(b"Date: Sat, 06 Sep 2025 11:43:27 +0200\n") == 1757151807
    with pytest.raises(MirrorUnavailable, match="no Date field"):
        release_date(b"Origin: Debian\nSuite: stable\n")
    with pytest.raises(MirrorUnavailable, match="not an RFC 2822 date"):
        release_date(b"Date: yesterday\n")


def test_the_epoch_is_in_the_base_key_and_the_hooks_environment(make_element: Callable[..., Path],
                                                                  host_env: dict[str, str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kiln.build.plan.suite_digest", lambda mirror, suite, **_: f"{mirror}|{suite}")
    asked: list[tuple[str, str]] = []

    def epoch(mirror: str, suite: str) -> int:
        asked.append((mirror, suite))
        return 1757151807

    monkeypatch.setattr("kiln.build.plan.release_epoch", epoch)
    make_element("debian", files={"package-installs.yaml": "systemd-sysv:\n"})
    spec = spec_from_dict({"release": "bookworm"}, "t")
    plan = make_plan(spec, elements_path=[make_element.root], host_env=host_env)  # type: ignore[attr-defined]
    assert asked == [("http://mirror.invalid/debian", "bookworm")]  # the release's InRelease, once
    assert plan.source_date_epoch == 1757151807
    assert plan.env["SOURCE_DATE_EPOCH"] == "1757151807"
    monkeypatch.setattr("kiln.build.plan.release_epoch", lambda mirror, suite: 1757151808)
    later = make_plan(spec, elements_path=[make_element.root], host_env=host_env)  # type: ignore[attr-defined]
    assert later.base_key != plan.base_key  # a republished release is a new base


def test_the_bootstrap_key_names_the_epoch_only_when_there_is_one() -> None:
    plain = BootstrapRequest("debian", "bookworm", "amd64", "http://m")
    dated = BootstrapRequest("debian", "bookworm", "amd64", "http://m", source_date_epoch=5)
    assert "source_date_epoch" not in plain.key_fields()
    assert dated.key_fields()["source_date_epoch"] == 5


def test_clamp_commands_date_every_inode_and_clamp_only_later_mtimes() -> None:
    lines = clamp_commands({12: 100, 2: 300}, 200)
    assert lines == [
        "sif <2> ctime @200", "sif <2> atime @200", "sif <2> crtime @200", "sif <2> mtime @200",
        "sif <12> ctime @200", "sif <12> atime @200", "sif <12> crtime @200",
    ]


def test_the_hash_seed_follows_the_root_uuid() -> None:
    one = plan_layout(size=4 * 1024**3, arch="amd64", root_uuid="6f1c6b1e-3d0a-4c55-9d6e-000000000001",
                      esp_serial="ABCD-0001")
    two = plan_layout(size=4 * 1024**3, arch="amd64", root_uuid="6f1c6b1e-3d0a-4c55-9d6e-000000000002",
                      esp_serial="ABCD-0001")
    assert hash_seed(one) == hash_seed(one) != hash_seed(two)


def _tree(root: Path, files: dict[str, str], *, mtime: int = 1_700_000_000) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for dirpath, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            os.utime(os.path.join(dirpath, name), (mtime, mtime))
    os.utime(root, (mtime, mtime))
    return root


def test_tree_differences_name_each_file_and_what_differs(tmp_path: Path) -> None:
    files = {"etc/hostname": "localhost\n", "etc/os-release": "ID=debian\n", "usr/bin/tool": "#!/bin/sh\n",
             "var/log/dpkg.log": "one\n"}
    a = _tree(tmp_path / "a", files)
    b = _tree(tmp_path / "b", {**files, "var/log/dpkg.log": "two\n", "var/cache/new": "x"})
    (a / "usr/bin/tool").chmod(0o755)
    (b / "usr/bin/tool").chmod(0o755)
    os.symlink("os-release", a / "etc/link")
    os.symlink("hostname", b / "etc/link")
    os.utime(b / "etc/hostname", (1_700_000_001, 1_700_000_001))
    (b / "etc/os-release").chmod(0o600)
    os.utime(b / "etc/os-release", (1_700_000_000, 1_700_000_000))
    for d in (a, b):
        os.utime(d / "etc", (1_700_000_000, 1_700_000_000), follow_symlinks=False)
        os.utime(d / "etc/link", (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    os.utime(b / "var/log/dpkg.log", (1_700_000_000, 1_700_000_000))
    os.utime(b / "var/cache", (1_700_000_000, 1_700_000_000))
    os.utime(b / "var/cache/new", (1_700_000_000, 1_700_000_000))
    os.utime(b / "var", (1_700_000_000, 1_700_000_000))
    found = {d.path: d.what for d in tree_differences(a, b)}
    assert found == {
        "etc/hostname": ("mtime 1700000000.000000000 != 1700000001.000000000",),
        "etc/link": ("target os-release != hostname",),
        "etc/os-release": ("mode -rw-r--r-- != -rw-------",),
        "var/cache": ("only in B",),
        "var/cache/new": ("only in B",),
        "var/log/dpkg.log": ("content",),
    }
    assert tree_differences(a, a) == []


def test_byte_ranges_are_told_by_region(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(bytes(4 * 4096))
    data = bytearray(4 * 4096)
    data[5000] = 1
    b.write_bytes(bytes(data))
    assert list(differing_chunks(a, b, chunk=4096)) == [4096]
    parts = [Partition(1, "root", "X", 1 << 20, 1 << 30)]
    assert region_of(0, parts, 2 << 30) == "MBR and GPT"
    assert region_of((1 << 20) + 5, parts, 2 << 30) == "partition 1 (root)"
    assert region_of((2 << 30) - 512, parts, 2 << 30) == "backup GPT"


def test_the_report_says_identical_or_lists_what_differs(tmp_path: Path) -> None:
    same = DiskComparison(tmp_path / "a.raw", tmp_path / "b.raw", "ab" * 32, "ab" * 32)
    assert same.report().endswith("the disks are bit-identical")
    other = DiskComparison(tmp_path / "a.raw", tmp_path / "b.raw", "ab" * 32, "cd" * 32,
                           regions={"partition 1 (root)": 3},
                           root_header=header_differences({"Directory Hash Seed": "x", "Inode count": "5"},
                                                          {"Directory Hash Seed": "y", "Inode count": "5"}),
                           root_files=[FileDifference("boot/initrd.img", ("content",))])
    text = other.report()
    assert "the disks differ; differing MiB by region: partition 1 (root) 3" in text
    assert "Directory Hash Seed: x | y" in text and "Inode count" not in text
    assert "files of the root file system: 1\n  boot/initrd.img: content" in text


def test_build_takes_check_reproducible() -> None:
    args = parser().parse_args(["build", "images/debian-12.yaml", "--check-reproducible"])
    assert args.check_reproducible is True
    assert parser().parse_args(["build"]).check_reproducible is False


def test_the_esp_is_the_same_bytes_whatever_the_clock_and_the_sources_dates(tmp_path: Path) -> None:
    from kiln.host.run import output
    from kiln.image.filesystems import _mtools_env, make_esp

    epoch = 1_757_151_807  # 2025-09-06
    lay = plan_layout(size=1024**3, arch="amd64", root_uuid="6f1c6b1e-3d0a-4c55-9d6e-000000000001",
                      esp_serial="ABCD-0001")
    loader, cfg = tmp_path / "grubx64.efi", tmp_path / "grub.cfg"
    loader.write_bytes(b"MZ" + bytes(5000))
    cfg.write_text("configfile $prefix/grub.cfg\n")
    files = [(loader, "EFI/BOOT/BOOTX64.EFI"), (cfg, "EFI/debian/grub.cfg"), (loader, "EFI/debian/grubx64.efi")]
    disks = []
    for n, source_time in enumerate((1_600_000_000, 1_800_000_000)):
        for f in (loader, cfg):
            os.utime(f, (source_time, source_time))
        disk = tmp_path / f"disk{n}.raw"
        with open(disk, "wb") as fh:
            fh.truncate(lay.size)
        make_esp(disk, lay, files, workdir=tmp_path / "work", mtime=epoch)
        disks.append(disk)
    def esp_bytes(disk: Path) -> bytes:
        with open(disk, "rb") as fh:
            fh.seek(lay.esp.start)
            return fh.read(lay.esp.size)

    assert esp_bytes(disks[0]) == esp_bytes(disks[1])
    listing = output(["mdir", "-/", "-a", "-i", f"{disks[0]}@@{lay.esp.start}", "::/"], env=_mtools_env())
    dated = [line for line in listing.splitlines() if re.search(r"\d{4}-\d\d-\d\d", line)]
    assert len(dated) >= 8 and all("2025-09-06" in line for line in dated), listing
    assert not (tmp_path / "work" / "esp-stage").exists()
