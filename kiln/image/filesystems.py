"""Levels 2 and 4 of the disk: the filesystems (how big the root tree may be, the ext4 root made with
`mkfs.ext4 -d`, the EFI system partition made with `mkfs.fat --offset` and mtools) and the fstab naming them.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from kiln.host.mounts import MountStack, remove_tree
from kiln.host.run import output, run
from kiln.image.layout import BLOCK, GPT_BACKUP, ROOT_START, SECTOR, DiskLayout, GiB, KiB, MiB, human_size
from kiln.model.errors import DiskError

ROOT_LABEL = "cloudimg-rootfs"
HASH_SEED_NAMESPACE = uuid.UUID("6f1c6b1e-3d0a-4c55-9d6e-6b696c6e0002")

# Pinned so that the host's /etc/mke2fs.conf cannot add features GRUB 2.06 cannot read
# (orphan_file, metadata_csum_seed): bookworm's own ext4 defaults.
MKE2FS_CONF = """\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
"""


def fstab_text(layout: DiskLayout) -> str:
    """The image's /etc/fstab: the root filesystem and the ESP, by UUID."""
    return (
        "# Written by kiln: the root filesystem and the EFI system partition, by UUID.\n"
        f"UUID={layout.root_uuid}\t/\text4\trw,discard,errors=remount-ro\t0\t1\n"
        f"UUID={layout.esp_serial}\t/boot/efi\tvfat\tumask=0077\t0\t1\n"
    )


def default_journal_blocks(blocks: int) -> int:
    """mke2fs 1.47's default journal size (ext2fs_default_journal_size) for a filesystem of `blocks`."""
    for limit, journal in (
        (32768, 1024),
        (256 * 1024, 4096),
        (512 * 1024, 8192),
        (4096 * 1024, 16384),
        (8192 * 1024, 32768),
        (16384 * 1024, 65536),
        (32768 * 1024, 131072),
    ):
        if blocks < limit:
            return journal
    return 262144


def root_capacity(fs_bytes: int) -> tuple[int, int]:
    """(bytes, inodes) that files can use in an ext4 of `fs_bytes` made with our mke2fs.conf.

    Subtracts the inode tables (256 bytes per 16 KiB), the journal, group metadata and the 5 % reserved
    for root, so that the image does not boot with a full root filesystem.
    """
    blocks = fs_bytes // BLOCK
    inodes = fs_bytes // 16384
    metadata = inodes * 256 + default_journal_blocks(blocks) * BLOCK + fs_bytes // 200 + 4 * MiB
    return max(fs_bytes - metadata - fs_bytes // 20, 0), inodes


def _needed(tree_bytes: int) -> int:
    # extent blocks, directories growing as entries are added in another order, xattr blocks
    return tree_bytes + tree_bytes // 50 + 8 * MiB


def check_fits(tree_bytes: int, tree_inodes: int, layout: DiskLayout) -> None:
    """Raise DiskError if a tree of `tree_bytes` (du) and `tree_inodes` cannot fill the root partition."""
    capacity, inodes = root_capacity(layout.root_fs_size)
    needed = _needed(tree_bytes)
    if needed <= capacity and tree_inodes + 64 <= inodes:
        return
    size = math.ceil(layout.size / GiB) * GiB
    while True:
        cap, ino = root_capacity((size - GPT_BACKUP - ROOT_START) // BLOCK * BLOCK)
        if needed <= cap and tree_inodes + 64 <= ino:
            break
        size += GiB
    if needed > capacity:
        problem = (
            f"needs about {human_size(needed)} ({human_size(tree_bytes)} in {tree_inodes} files, plus ext4 "
            f"overhead) but the root partition of a {human_size(layout.size)} disk has room for about "
            f"{human_size(capacity)} after ext4 metadata and the 5 % root reserve"
        )
    else:
        problem = (
            f"has {tree_inodes} files but the root filesystem of a {human_size(layout.size)} disk has only "
            f"{inodes} inodes"
        )
    raise DiskError(f"the root tree does not fit: it {problem}; raise the image's size to at least {size // GiB} GiB")


def measure_tree(tree: Path) -> tuple[int, int]:
    """(allocated bytes, inodes) of a tree, hard links counted once, as `du` reports them."""
    used = output(["du", "-s", "-x", "-B1", str(tree)], what=f"measure {tree}")
    inodes = output(["du", "-s", "-x", "--inodes", str(tree)], what=f"count files in {tree}")
    try:
        return int(used.split()[0]), int(inodes.split()[0])
    except (ValueError, IndexError) as exc:
        raise DiskError(f"cannot read du's output for {tree}: {used!r} / {inodes!r}") from exc


def _mtools_env() -> dict[str, str]:
    return {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null", "LC_ALL": "C"}


def _stage(stage: Path, name: str, mtime: int | None, source: Path | None = None) -> Path:
    """A copy of `source` (or an empty directory) named `name` under its own directory in `stage`, dated
    `mtime`: what mcopy -m copies onto the ESP with that date."""
    holder = stage / str(len(list(stage.iterdir())))
    holder.mkdir()
    staged = holder / name
    if source is None:
        staged.mkdir()
    else:
        shutil.copyfile(source, staged)
    if mtime is not None:
        os.utime(staged, (mtime, mtime))
    return staged


def make_esp(disk: Path, layout: DiskLayout, files: Sequence[tuple[Path, str]], *, workdir: Path,
             mtime: int | None = None) -> None:
    """Format the ESP in place (FAT32) and copy the boot loader's `files` (source, path on the ESP) onto it.

    Reproducible: mkfs.fat --invariant (no clock in the volume label's entry; the serial is ours), every
    directory and file made one by one in path order (never in the order a host directory lists them), each
    dated `mtime` (mcopy -m; mtools itself has no SOURCE_DATE_EPOCH)."""
    esp = layout.esp
    # mkfs.fat sizes clusters by the whole file, not by BLOCKS: give FAT32 enough clusters explicitly
    run(
        [
            "mkfs.fat",
            "--invariant",
            "-F",
            "32",
            "-S",
            str(SECTOR),
            "-s",
            "1",
            f"--offset={esp.first_sector}",
            "-h",
            str(esp.first_sector),
            "-i",
            layout.esp_serial.replace("-", ""),
            "-n",
            "EFI",
            str(disk),
            str(esp.size // KiB),
        ],
        quiet=True,
        timeout=60,
        what="format the EFI system partition (mkfs.fat)",
    )
    image = f"{disk}@@{esp.start}"
    env = _mtools_env()
    dirs = sorted({str(PurePosixPath(target).parent) for _, target in files} - {"."})
    parents = sorted({str(p) for d in dirs for p in PurePosixPath(d).parents if str(p) != "."} | set(dirs),
                     key=lambda d: (d.count("/"), d))
    stage = workdir / "esp-stage"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        for d in parents:
            path = PurePosixPath(d)
            run(["mcopy", "-s", "-m", "-i", image, str(_stage(stage, path.name, mtime)), f"::/{path.parent}"],
                env=env, quiet=True, timeout=60, what=f"make the directory {d} on the ESP (mcopy)")
        for source, target in sorted(files, key=lambda f: f[1]):
            staged = _stage(stage, PurePosixPath(target).name, mtime, source)
            run(["mcopy", "-m", "-i", image, str(staged), f"::/{target}"], env=env, quiet=True, timeout=60,
                what=f"copy {source.name} to {target} on the ESP (mcopy)")
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def hash_seed(layout: DiskLayout) -> str:
    """The root file system's directory hash seed: derived from its UUID (itself from the pack key), so
    that the same tree always gets the same htree order, and so the same bytes."""
    return str(uuid.uuid5(HASH_SEED_NAMESPACE, layout.root_uuid))


def make_root(disk: Path, layout: DiskLayout, merged: Path, workdir: Path, *,
              source_date_epoch: int | None = None) -> None:
    """Make the ext4 root filesystem in place, filled from `merged` (mkfs.ext4 -d).

    With `source_date_epoch`, reproducible: the superblock's and new inodes' dates are that time
    (E2FSPROGS_FAKE_TIME), and every file's ctime, atime and creation time too, its mtime clamped to it
    (mkfs.ext4 1.47.0 copies the tree's ctime and atime, which no one can set: `clamp_times`)."""
    conf = workdir / "mke2fs.conf"
    conf.write_text(MKE2FS_CONF)
    # The file is fresh and sparse, so its blocks read as zeros: nothing needs discarding or zeroing.
    extended = f"offset={layout.root.start},nodiscard,assume_storage_prezeroed=1,hash_seed={hash_seed(layout)}"
    env = {**os.environ, "MKE2FS_CONFIG": str(conf), "LC_ALL": "C"}
    if source_date_epoch is not None:
        env["E2FSPROGS_FAKE_TIME"] = str(source_date_epoch)
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-E",
            extended,
            "-d",
            str(merged),
            "-U",
            layout.root_uuid,
            "-L",
            ROOT_LABEL,
            str(disk),
            f"{layout.root_fs_size // KiB}k",
        ],
        env=env,
        timeout=1800,
        what="make the root filesystem (mkfs.ext4 -d)",
    )
    if source_date_epoch is not None:
        clamp_times(disk, layout, workdir, source_date_epoch)


def clamp_commands(inodes: Mapping[int, int], epoch: int) -> list[str]:
    """debugfs requests that date every inode (number -> mtime) at `epoch`: ctime, atime and creation time
    set, mtime only where it is later (a package's files keep their own older dates)."""
    lines = []
    for ino in sorted(inodes):
        lines += [f"sif <{ino}> {field} @{epoch}" for field in ("ctime", "atime", "crtime")]
        if inodes[ino] > epoch:
            lines.append(f"sif <{ino}> mtime @{epoch}")
    return lines


def _inode_mtimes(top: Path) -> dict[int, int]:
    found = {os.lstat(top).st_ino: int(os.lstat(top).st_mtime)}
    for root, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            st = os.lstat(os.path.join(root, name))
            found[st.st_ino] = int(st.st_mtime)
    return found


def clamp_times(disk: Path, layout: DiskLayout, workdir: Path, epoch: int) -> None:
    """Date every inode of the new root file system at `epoch` (see `clamp_commands`): its inode numbers are
    read from a read-only mount of it, the dates written with debugfs."""
    root = layout.root
    where = workdir / "clamp-times"
    with MountStack(where) as mounts:
        top = mounts.mount(["-t", "ext4", "-o", f"ro,noload,nosuid,nodev,noexec,loop,offset={root.start},"
                            f"sizelimit={root.size}", str(disk)], where / "root",
                           what="mount the new root file system read-only")
        inodes = _inode_mtimes(top)
        mounts.unmount_all()
    remove_tree(where)
    script = workdir / "clamp-times.debugfs"
    script.write_text("\n".join(clamp_commands(inodes, epoch)) + "\n")
    try:
        done = run(["debugfs", "-w", "-f", str(script), f"{disk}?offset={root.start}"], quiet=True, timeout=600,
                   env={**os.environ, "E2FSPROGS_FAKE_TIME": str(epoch), "LC_ALL": "C"}, stderr_apart=True,
                   what="date the root file system's files at SOURCE_DATE_EPOCH (debugfs)")
    finally:
        script.unlink(missing_ok=True)
    errors = [line for line in done.stderr_lines if line.strip() and not line.startswith("debugfs ")]
    if errors:  # debugfs reports a failed request on stderr and still exits 0
        raise DiskError("debugfs could not date the root file system's files: " + "; ".join(errors[:5]))
