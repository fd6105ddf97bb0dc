"""The pack stage's inventory of a tree: the licence each package declares, and what takes the space. The tree
is hostile: links out of it, huge or malformed files declare nothing and read nothing of the host."""

from __future__ import annotations

import os
from pathlib import Path

from kiln.image.inventory import COPYRIGHT_MAX_BYTES, declared_license, space_report, with_licenses

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: {name}

Files: debian/*
Copyright: 2020 Someone
License: GPL-2+

Files: *
Copyright: 2019 Upstream
License: {license}
"""


def _doc(root: Path, package: str, text: str) -> Path:
    d = root / "usr/share/doc" / package
    d.mkdir(parents=True, exist_ok=True)
    (d / "copyright").write_text(text)
    return d / "copyright"


def test_licences_declared_by_dep5_copyright_files(tmp_path: Path) -> None:
    _doc(tmp_path, "coreutils", DEP5.format(name="coreutils", license="GPL-3+"))
    # no Files: * stanza: every licence it names
    _doc(tmp_path, "split", "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
                            "Files: a/*\nCopyright: x\nLicense: MIT\n\n"
                            "Files: b/*\nCopyright: y\nLicense: BSD-3-clause\n")
    _doc(tmp_path, "oldstyle", "This package was debianized by someone in 1999.\nIt is GPL.\n")
    _doc(tmp_path, "garbage", "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
                              "\0\0\0")
    assert declared_license(tmp_path, "coreutils") == "GPL-3+"
    assert declared_license(tmp_path, "split") == "MIT AND BSD-3-clause"
    assert declared_license(tmp_path, "oldstyle") is None
    assert declared_license(tmp_path, "garbage") is None
    assert declared_license(tmp_path, "absent") is None
    packages = [{"name": "coreutils", "version": "9.1-1", "arch": "amd64"},
                {"name": "oldstyle", "version": "1", "arch": "all"},
                {"name": "rpmish", "version": "1", "arch": "x86_64", "license": "MIT"}]
    assert [p.get("license") for p in with_licenses(tmp_path, packages)] == ["GPL-3+", None, "MIT"]


def test_a_copyright_file_that_leads_out_of_the_tree_or_is_huge_declares_nothing(tmp_path: Path) -> None:
    outside = tmp_path / "host-secret"
    outside.write_text(DEP5.format(name="host", license="HOST-SECRET"))
    root = tmp_path / "tree"
    (root / "usr/share/doc/evil").mkdir(parents=True)
    os.symlink(outside, root / "usr/share/doc/evil/copyright")  # absolute: resolved inside the tree, not there
    (root / "usr/share/doc/evil2").mkdir(parents=True)
    os.symlink("../../../../../host-secret", root / "usr/share/doc/evil2/copyright")
    os.symlink(tmp_path, root / "usr/share/doc/evil3")  # the package's doc directory itself a link out
    _doc(root, "fifo-like", "")
    (root / "usr/share/doc/fifo-like/copyright").unlink()
    os.mkfifo(root / "usr/share/doc/fifo-like/copyright")  # would block a reader
    _doc(root, "huge", DEP5.format(name="huge", license="MIT") + "#" * COPYRIGHT_MAX_BYTES)
    for name in ("evil", "evil2", "evil3", "fifo-like", "huge"):
        assert declared_license(root, name) is None, name


def test_the_space_report_names_the_largest_directories_and_packages(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "usr/lib/big").mkdir(parents=True)
    (root / "usr/lib/big/blob").write_bytes(os.urandom(3 << 20))
    (root / "var/cache").mkdir(parents=True)
    (root / "var/cache/small").write_bytes(os.urandom(1 << 20))
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(
        "Package: big\nStatus: install ok installed\nInstalled-Size: 3072\n\n"
        "Package: small\nStatus: install ok installed\nInstalled-Size: 1024\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nInstalled-Size: 99999\n\n"
        "Package: odd\nStatus: install ok installed\nInstalled-Size: lots\n")
    os.symlink("/", root / "usr/lib/hostroot")  # not followed
    report = space_report(root)
    dirs = {d.path: d.bytes for d in report.directories}
    assert list(dirs)[:2] == ["/usr", "/usr/lib"] and dirs["/usr/lib"] >= 3 << 20 and dirs["/var/cache"] >= 1 << 20
    assert dirs["/usr/lib"] < 4 << 20  # the link to / was not followed
    assert report.tree_bytes >= 4 << 20
    assert [(p.path, p.bytes) for p in report.packages] == [("big", 3 << 20), ("small", 1 << 20)]
