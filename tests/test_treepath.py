"""kiln.host.treepath: a stranger's symlinks resolve inside the tree, never to the host's files."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kiln.host.treepath import regular_file_in_root, resolve_in_root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "usr/lib/shim").mkdir(parents=True)
    (root / "usr/lib/shim/shimx64.efi.signed.latest").write_bytes(b"MZ-in-tree")
    (root / "etc").mkdir()
    (root / "etc/shadow").write_text("tree's own shadow\n")
    return root


def test_links_inside_the_tree_are_followed(tree: Path) -> None:
    (tree / "usr/lib/shim/shimx64.efi.signed").symlink_to("shimx64.efi.signed.latest")
    (tree / "lib").symlink_to("usr/lib")
    found = regular_file_in_root(tree, "lib/shim/shimx64.efi.signed")
    assert found == tree / "usr/lib/shim/shimx64.efi.signed.latest"


@pytest.mark.parametrize("target", ["/etc/shadow", "../../../../../../etc/shadow", "/../../etc/shadow"])
def test_absolute_and_climbing_links_stay_in_the_tree(tree: Path, target: str) -> None:
    (tree / "boot").mkdir()
    (tree / "boot/vmlinuz").symlink_to(target)
    found = regular_file_in_root(tree, "boot/vmlinuz")
    assert found == tree / "etc/shadow"
    assert found.read_text() == "tree's own shadow\n"


def test_a_directory_link_to_the_host_resolves_in_the_tree(tree: Path, tmp_path: Path) -> None:
    host = tmp_path / "host-dir"
    host.mkdir()
    (host / "grubx64.efi.signed").write_text("host file")
    (tree / "usr/lib/grub").mkdir(parents=True)
    (tree / "usr/lib/grub/x86_64-efi-signed").symlink_to(host)
    assert regular_file_in_root(tree, "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed") is None
    assert str(resolve_in_root(tree, "usr/lib/grub/x86_64-efi-signed/x")).startswith(str(tree) + os.sep)


def test_loops_and_non_files(tree: Path) -> None:
    (tree / "a").symlink_to("b")
    (tree / "b").symlink_to("a")
    with pytest.raises(OSError) as exc:
        resolve_in_root(tree, "a/x")
    assert exc.value.errno == errno.ELOOP
    assert regular_file_in_root(tree, "a") is None
    assert regular_file_in_root(tree, "usr/lib") is None
    assert regular_file_in_root(tree, "missing/file") is None


def test_grub_readers_never_read_a_host_file_through_the_trees_links(tmp_path: Path) -> None:
    from kiln.image.grub import copy_grub_modules, grub_defaults, grub_dir

    host = tmp_path / "host"
    (host / "grub.d").mkdir(parents=True)
    (host / "grub").write_text('GRUB_CMDLINE_LINUX="host-secret"\n')
    (host / "grub.d/50.cfg").write_text('GRUB_CMDLINE_LINUX_DEFAULT="host-secret-2"\n')
    (host / "mods").mkdir()
    (host / "mods/kernel.img").write_text("host")
    (host / "mods/secret.mod").write_text("host module")
    tree = tmp_path / "tree"
    (tree / "etc/default").mkdir(parents=True)
    (tree / "etc/default/grub").symlink_to(host / "grub")
    (tree / "etc/default/grub.d").symlink_to(host / "grub.d")
    assert grub_defaults(tree) == {}
    (tree / "usr/lib/grub").mkdir(parents=True)
    (tree / "usr/lib/grub/i386-pc").symlink_to(host / "mods")
    with pytest.raises(Exception, match="no GRUB i386-pc modules"):
        grub_dir(tree, "i386-pc")
    (tree / "usr/lib/grub/i386-pc").unlink()
    (tree / "usr/lib/grub/i386-pc").mkdir()
    (tree / "usr/lib/grub/i386-pc/kernel.img").write_text("tree")
    (tree / "usr/lib/grub/i386-pc/linked.mod").symlink_to(host / "mods/secret.mod")
    copy_grub_modules(grub_dir(tree, "i386-pc"), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # kernel.img is not copied, the link neither
