"""Hostile upstream disks and trees (issue 15), each made for real by the test (no mocks) and each ending
with the host unchanged: the checksums of /etc and of the test's own host directories, the number of /dev
nodes and the host's mount table (outside the temporary trees) are the same before and after.

- a disk whose root has `/opt` as a link to a host directory, and whose fstab mounts a second partition at
  `/opt/x` (the attack that wrote a partition's files into /etc/cron.d);
- the same through a relative link that climbs out of the tree;
- a btrfs root whose fstab names `subvol=../..`, or a subvolume that is a link to a host directory, and a
  filesystem whose only "OS" is a link to a host tree;
- a setuid program and a device node of an upstream tree, unusable by an unprivileged user from the store,
  and mounted `nosuid,nodev` when kiln overlays the tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.host.mounts import MountStack
from kiln.host.run import run
from kiln.sources.extract import ExtractError, extract_rootfs
from kiln.store.entries import Store
from tests import upstream_fixtures as uf

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="mounting disk images needs root"),
              pytest.mark.timeout(300)]

MiB = 1 << 20
ROOT_UUID = "6a1f0c2e-1d3b-4e5f-8a9b-0c1d2e3f4a5b"
DATA_UUID = "7b2e1d3f-2e4c-4f60-9bac-1d2e3f4a5b6c"
VOLATILE_MOUNTS = ("/var/tmp/", "/tmp/", "/run/", "/proc/", "/sys/")


def _etc_sums() -> dict[str, str]:
    sums = {}
    for dirpath, _dirs, files in os.walk("/etc"):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                with open(path, "rb") as fh:
                    sums[path] = hashlib.file_digest(fh, "sha256").hexdigest()
            except OSError:
                continue
    return sums


def _host_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        targets = [line.split()[4] for line in fh]
    return sorted(t for t in targets if not t.startswith(VOLATILE_MOUNTS))


def _tree_sums(root: Path) -> dict[str, Any]:
    return uf.snapshot(root) if root.exists() else {}


@pytest.fixture
def host_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory of 'the host' (standing in for /etc/cron.d) that an attack would write into, checked with
    /etc, /dev and the mount table: all unchanged at the end."""
    target = tmp_path / "host" / "cron.d"
    target.mkdir(parents=True)
    (target / "existing").write_text("the host's own file\n")
    (tmp_path / "host" / "etc").mkdir()
    (tmp_path / "host" / "etc" / "os-release").write_text('ID=host\nNAME="The Host"\n')
    before = (_etc_sums(), len(os.listdir("/dev")), _host_mounts(), _tree_sums(tmp_path / "host"))
    yield target
    after = (_etc_sums(), len(os.listdir("/dev")), _host_mounts(), _tree_sums(tmp_path / "host"))
    assert after[0] == before[0], "a file of /etc changed"
    assert after[1] == before[1], "/dev lost or gained nodes"
    assert after[2] == before[2], "the host's mount table changed"
    assert after[3] == before[3], "the test's host directory changed"
    assert uf.mounts_and_loops(tmp_path) == []


def _disk(tmp_path: Path, root: Path, data: Path | None, name: str = "hostile") -> Path:
    """A qcow2 with GPT: the root ext4 (the larger, so the one kiln takes) and optionally a data ext4."""
    raw = tmp_path / f"{name}.raw"
    with open(raw, "wb") as fh:
        fh.truncate(80 * MiB)
    layout = ["--new=1:2048:+56M", "--typecode=1:8304"]
    if data is not None:
        layout += ["--new=2:0:+16M", "--typecode=2:8300"]
    run(["sgdisk", "--clear", *layout, str(raw)], quiet=True)
    parts = [(1 * MiB, 56 * MiB, ROOT_UUID, root)] + ([(57 * MiB, 16 * MiB, DATA_UUID, data)] if data else [])
    for start, size, uuid, tree in parts:
        run(["mkfs.ext4", "-q", "-F", "-E", f"offset={start}", "-U", uuid, "-d", str(tree), str(raw),
             f"{size // 1024}k"], quiet=True)
    out = tmp_path / f"{name}.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], quiet=True)
    raw.unlink()
    return out


def _os_tree(path: Path, fstab: str) -> Path:
    (path / "etc").mkdir(parents=True)
    (path / "etc/os-release").write_text(uf.OS_RELEASE)
    (path / "etc/fstab").write_text(fstab)
    (path / "usr/bin").mkdir(parents=True)
    (path / "usr/bin/hello").write_text("#!/bin/sh\necho hello\n")
    return path


@pytest.mark.parametrize("link", ["absolute", "climbing"])
def test_a_mount_point_below_a_link_to_the_host_is_never_filled(tmp_path: Path, host_dir: Path, link: str) -> None:
    root = _os_tree(tmp_path / "rootpart", f"UUID={ROOT_UUID} / ext4 defaults 0 1\n"
                                           f"UUID={DATA_UUID} /opt/x ext4 defaults 0 2\n")
    # /opt leads to the host's directory: by its absolute path, or by enough ../ to climb out of any tree
    (root / "opt").symlink_to(host_dir if link == "absolute" else "../" * 20 + str(host_dir).lstrip("/"))
    data = tmp_path / "datapart"
    data.mkdir()
    (data / "payload").write_text("* * * * * root touch /tmp/owned\n")
    disk = _disk(tmp_path, root, data)
    tree = tmp_path / "tree"
    result = extract_rootfs(disk, tree, workdir=tmp_path / "work", format="qcow2")
    assert result.grafted == ()  # /opt/x was not filled
    assert (tree / "opt").is_symlink() and (tree / "usr/bin/hello").is_file()
    assert sorted(p.name for p in host_dir.iterdir()) == ["existing"]


def _btrfs_disk(tmp_path: Path, fill: Any) -> Path:
    """A GPT disk with one btrfs partition, filled by `fill(top)` through a read-write loop mount."""
    fs = tmp_path / "btrfs.fs"
    with open(fs, "wb") as fh:
        fh.truncate(128 * MiB)
    run(["mkfs.btrfs", "-q", "-f", "-U", ROOT_UUID, str(fs)], quiet=True)
    with MountStack(tmp_path / "fill-journal") as stack:
        top = stack.mount(["-o", "loop", str(fs)], tmp_path / "fill", what="fill the btrfs fixture")
        fill(top)
    disk = tmp_path / "btrfs.raw"
    with open(disk, "wb") as fh:
        fh.truncate(130 * MiB)
    run(["sgdisk", "--new=1:2048:+128M", "--typecode=1:8304", str(disk)], quiet=True)
    with open(fs, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(1 * MiB)
        shutil.copyfileobj(src, dst, 4 * MiB)
    fs.unlink()
    return disk


@pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="needs btrfs-progs (the Makefile installs it)")
@pytest.mark.parametrize("subvol", ["../..", "escape"])
def test_a_btrfs_subvolume_that_climbs_out_is_never_copied(tmp_path: Path, host_dir: Path, subvol: str) -> None:
    def fill(top: Path) -> None:
        run(["btrfs", "-q", "subvolume", "create", str(top / "root")], quiet=True)
        _os_tree(top / "root", f"UUID={ROOT_UUID} / btrfs subvol=root 0 0\n"
                               f"UUID={ROOT_UUID} /srv btrfs subvol={subvol} 0 0\n")
        (top / "escape").symlink_to(host_dir.parent)  # a "subvolume" that is a link to the host

    disk = _btrfs_disk(tmp_path, fill)
    tree = tmp_path / "tree"
    result = extract_rootfs(disk, tree, workdir=tmp_path / "work", format="raw")
    assert result.subvolume == "root" and result.grafted == ()
    assert not (tree / "srv").exists() or list((tree / "srv").iterdir()) == []
    assert not (tree / "srv/cron.d/existing").exists()


@pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="needs btrfs-progs (the Makefile installs it)")
def test_a_filesystem_whose_only_os_is_a_link_to_a_host_tree_is_refused(tmp_path: Path, host_dir: Path) -> None:
    def fill(top: Path) -> None:
        (top / "zz-host").symlink_to(host_dir.parent)  # the host dir has etc/os-release: an "OS"

    disk = _btrfs_disk(tmp_path, fill)
    tree = tmp_path / "tree"
    with pytest.raises(ExtractError, match="holds etc/os-release"):
        extract_rootfs(disk, tree, workdir=tmp_path / "work", format="raw")
    assert not tree.exists() or not any(tree.iterdir())


def test_setuid_programs_and_devices_of_an_upstream_tree_are_of_no_use_to_other_users(
        published: uf.Published, tmp_path: Path, host_dir: Path) -> None:
    store = Store(tmp_path / "store")
    with store.step("c" * 64, kind="base", description="upstream") as entry:
        extract_rootfs(published.files["disk.qcow2"], entry.data / "tree", workdir=tmp_path / "work",
                       format="qcow2")
    tree = store.data("c" * 64) / "tree"
    assert stat.S_IMODE(os.stat(tree / "usr/bin/suid").st_mode) & stat.S_ISUID  # kept, as the image has it
    assert stat.S_ISCHR(os.lstat(tree / "dev/null").st_mode)
    # an unprivileged user cannot reach them: the store's root is 0700
    assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700
    for path in (tree / "usr/bin/suid", tree / "dev/null"):
        probe = subprocess.run(["runuser", "-u", "nobody", "--", "stat", str(path)], capture_output=True, text=True)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr, probe
    # and when kiln overlays the tree, the overlay grants nothing: nosuid, nodev
    with MountStack(tmp_path / "journal") as mounts:
        (tmp_path / "empty").mkdir()  # a read-only overlay needs two lower layers
        merged = mounts.overlay([tmp_path / "empty", tree], tmp_path / "merged")
        with open("/proc/self/mountinfo") as fh:
            options = next(line.split()[5] for line in fh if line.split()[4] == str(merged))
        assert {"nosuid", "nodev"} <= set(options.split(",")), options
