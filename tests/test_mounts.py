"""kiln.mounts with real mounts: paths the kernel escapes in its mount table, and removal that never crosses
into another file system."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.host import mounts
from kiln.model.errors import MountError


@pytest.fixture
def tmpfs_at(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted at a path with a space, a tab-free non-ASCII name and a backslash in it."""
    target = tmp_path / "kæsh ø\\x" / "mnt"
    target.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "kiln-test-mounts", str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_non_ascii_path_with_a_space_is_seen_as_mounted(tmpfs_at: Path) -> None:
    assert str(tmpfs_at) in mounts.mounted_targets()


def test_mountinfo_escapes_are_decoded_on_bytes() -> None:
    assert mounts.decode_mount_path(b"/srv/bygg-\xc3\xb8\\040x\\134y") == "/srv/bygg-ø x\\y"
    assert mounts.decode_mount_path(b"/a\\011b\\012c") == "/a\tb\nc"


def test_remove_tree_unmounts_what_is_below_a_non_ascii_path(tmpfs_at: Path) -> None:
    (tmpfs_at / "f").write_text("x")
    top = tmpfs_at.parent
    mounts.remove_tree(top)
    assert not top.exists()


def test_remove_tree_never_enters_another_file_system_whatever_the_mount_table_says(
        tmpfs_at: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mount table is made to show nothing (the fault the st_dev check guards against: a table that was
    misread); the tmpfs's files survive, the rest of the tree goes, and the error names the mount."""
    (tmpfs_at / "precious").write_text("host data")
    top = tmpfs_at.parent
    (top / "junk").write_text("x")
    (top / "link").symlink_to(tmpfs_at / "precious")
    monkeypatch.setattr(mounts, "mounted_targets", lambda: set())
    with pytest.raises(MountError, match="on another file system"):
        mounts.remove_tree(top)
    assert (tmpfs_at / "precious").read_text() == "host data"
    assert not (top / "junk").exists() and not os.path.lexists(top / "link")
