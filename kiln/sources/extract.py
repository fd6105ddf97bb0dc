"""A root filesystem tree out of what distributions publish: tarballs, squashfs, qcow2 and raw disks.

`extract_rootfs(image, target, workdir=…)` fills the empty directory `target` with the image's root
tree, owners, modes, xattrs, ACLs, hard links and device nodes preserved:

- tar (gzip, xz, zstd, bzip2; recognised by content, not name): `tar --xattrs --acls --numeric-owner`;
- squashfs: `unsquashfs`;
- qcow2 and raw disks: a qcow2 is converted to a sparse raw file (`qemu-img convert`; there is no
  nbd here), the partition table is read with `sfdisk --json` (a disk without one is one filesystem),
  the root partition is chosen by GPT root type for the architecture, then by label, then as the
  largest Linux partition, and confirmed by its `etc/os-release`. It is mounted read-only through a
  loop device at its byte offset (`mount -o ro,loop,offset=…,sizelimit=…`, no device-mapper, no
  partition nodes), through kiln's MountStack so that a crash is reclaimed, and copied out with
  `cp -a`. Filesystems the root's `/etc/fstab` mounts from the same disk (a separate `/boot`, btrfs
  subvolumes such as Fedora's `home`, an EFI system partition, copied with mtools because the
  kernel here has no vfat) are copied to their mount points, so the tree is the whole system.

LVM root partitions need device-mapper and are refused with a message saying so. Reading the partition
table, probing and mounting the partitions is kiln.sources.partitions.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from kiln.host.mounts import MountStack
from kiln.host.run import capture, run
from kiln.host.treepath import regular_file_in_root, resolve_in_root
from kiln.model.base import BaseFormat as BaseFormat
from kiln.model.base import guess_format as guess_format
from kiln.model.errors import CommandError
from kiln.sources.partitions import LVM_TYPES, MOUNTABLE, Partition, mount_partition, read_partitions, root_candidates
from kiln.sources.partitions import ExtractError as ExtractError  # re-exported: extract_rootfs raises it

log = logging.getLogger("kiln.extract")

# bump when extraction changes what a tree contains (it is part of the cache key); 2: no fstab mount filled
# through a link, no subvolume that climbs out
EXTRACT_VERSION = "2"


# --------------------------------------------------------------------------------------------------
# what a file really is


_COMPRESSION_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
)


@dataclass(frozen=True)
class Sniffed:
    """What the first bytes of a file say: a compression (or None) and a container (or None)."""

    compression: str | None
    container: BaseFormat | None


def _container(head: bytes) -> BaseFormat | None:
    if head.startswith(b"QFI\xfb"):
        return BaseFormat.qcow2
    if head.startswith(b"hsqs"):
        return BaseFormat.squashfs
    if len(head) >= 262 and head[257:262] == b"ustar":
        return BaseFormat.tar
    return None


def sniff(path: Path) -> Sniffed:
    with open(path, "rb") as fh:
        head = fh.read(4096)
    for magic, name in _COMPRESSION_MAGIC:
        if head.startswith(magic):
            return Sniffed(name, None)
    return Sniffed(None, _container(head))


def _open_decompressed(path: Path, compression: str) -> io.BufferedIOBase:
    if compression == "gzip":
        return gzip.GzipFile(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    if compression == "bzip2":
        return bz2.open(path, "rb")
    raise ExtractError(f"no Python decompressor for {compression}")  # pragma: no cover


def _decompress(path: Path, compression: str, out: Path, timeout: float) -> Path:
    log.info("decompressing %s (%s)", path.name, compression)
    if compression == "zstd":
        run(["zstd", "-q", "-d", "-f", "-o", str(out), str(path)], quiet=True, timeout=timeout,
            what=f"decompress {path.name} (zstd)")
        return out
    with _open_decompressed(path, compression) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 4 << 20)
    return out


def _peek_decompressed(path: Path, compression: str) -> bytes:
    if compression == "zstd":
        return b""  # tar reads zstd itself; a zstd-compressed disk image is recognised by its name
    with _open_decompressed(path, compression) as fh:
        return fh.read(4096)


# --------------------------------------------------------------------------------------------------
# mounting and copying


def _has_os(tree: Path) -> bool:
    return (tree / "etc").is_dir() and (
        os.path.lexists(tree / "etc/os-release") or (tree / "usr/lib/os-release").is_file()
    )


def _find_root_in(top: Path, fstype: str) -> Path | None:
    """The root tree inside a mounted filesystem: its top, or (btrfs) the subvolume holding the OS."""
    if _has_os(top):
        return top
    if fstype == "btrfs":
        # a subvolume is a directory of the top, never a link (a link to / would make the host's root "the OS")
        preferred = [top / n for n in ("root", "@", "@rootfs", "rootfs")]
        others = sorted(p for p in top.iterdir() if _real_dir(p) and p not in preferred)
        for sub in preferred + others:
            if _real_dir(sub) and _has_os(sub):
                return sub
    return None


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _dir_in_tree(root: Path, rel: str) -> Path | None:
    """`root/rel` as a directory inside `root` whose every component is a real directory (made where
    missing), or None when one of them is a link or not a directory: a stranger's tree must not make kiln
    write through a link (`opt -> /etc/cron.d` with a partition mounted at /opt/x)."""
    path = root
    for part in PurePosixPath(rel).parts:
        if part in ("", ".", "..", "/"):
            return None
        path = path / part
        if path.is_symlink():
            return None
        if not path.exists():
            path.mkdir()
        elif not path.is_dir():
            return None
    return path


def copy_tree(src: Path, dest: Path, *, timeout: float) -> None:
    """Copy the contents of `src` into `dest`, preserving owners, modes, xattrs, links and devices."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["cp", "-a", "--sparse=auto", "--", f"{src}/.", f"{dest}/"], quiet=True, timeout=timeout,
        what=f"copy the tree out of {src}")


@dataclass(frozen=True)
class FstabEntry:
    spec: str
    mountpoint: str
    fstype: str
    options: tuple[str, ...]

    def option(self, name: str) -> str | None:
        for opt in self.options:
            key, sep, value = opt.partition("=")
            if key == name:
                return value if sep else ""
        return None


def parse_fstab(text: str) -> list[FstabEntry]:
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        fields = line.split()
        if len(fields) < 3:
            continue
        mountpoint = fields[1].replace("\\040", " ")
        entries.append(FstabEntry(fields[0], mountpoint, fields[2],
                                  tuple(fields[3].split(",")) if len(fields) > 3 else ()))
    return entries


def _matches(spec: str, part: Partition) -> bool:
    """Whether an fstab source (UUID=, LABEL=, PARTUUID=, PARTLABEL=, /dev/disk/by-*/) is `part`."""
    for prefix, value in (("UUID=", part.fs_uuid), ("LABEL=", part.label), ("PARTUUID=", part.uuid),
                          ("PARTLABEL=", part.name), ("/dev/disk/by-uuid/", part.fs_uuid),
                          ("/dev/disk/by-label/", part.label), ("/dev/disk/by-partuuid/", part.uuid),
                          ("/dev/disk/by-partlabel/", part.name)):
        if spec.startswith(prefix) and value:
            return spec[len(prefix):].strip('"').lower() == value.lower()
    return False


def _safe_mountpoint(mountpoint: str) -> str | None:
    clean = os.path.normpath(mountpoint)
    if not clean.startswith("/") or clean == "/" or ".." in clean.split("/"):
        return None
    return clean.lstrip("/")


def _copy_vfat(disk: Path, part: Partition, dest: Path, timeout: float) -> None:
    """Copy a FAT filesystem's files with mtools (the kernel here has no vfat)."""
    dest.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null", "LC_ALL": "C"}
    listing = run(["mdir", "-b", "-i", f"{disk}@@{part.start}", "::/"], env=env, check=False, quiet=True,
                  timeout=60, what=f"list {part.describe()}")
    if listing.returncode != 0:
        raise ExtractError(f"cannot read the FAT filesystem on {part.describe()}:\n{listing.output}")
    if not any(line.strip() for line in listing.lines):
        return
    run(["mcopy", "-s", "-p", "-m", "-n", "-Q", "-i", f"{disk}@@{part.start}", "::/*", f"{dest}/"], env=env,
        quiet=True, timeout=timeout, what=f"copy {part.describe()} with mtools")


# --------------------------------------------------------------------------------------------------
# the entry point


@dataclass(frozen=True)
class ExtractResult:
    format: BaseFormat
    root: Partition | None = None  # for disk images: where the root tree came from
    subvolume: str = ""  # for btrfs: the subvolume that is the root
    grafted: tuple[str, ...] = ()  # mount points filled from other filesystems of the disk
    os_release: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        name = self.os_release.get("PRETTY_NAME") or self.os_release.get("ID") or "an unknown OS"
        where = f" from {self.root.describe()}" if self.root else ""
        sub = f" subvolume {self.subvolume!r}" if self.subvolume else ""
        grafts = f", with {', '.join(self.grafted)}" if self.grafted else ""
        return f"{name} ({self.format}{where}{sub}{grafts})"


def read_os_release(tree: Path) -> dict[str, str]:
    """KEY=value pairs of the tree's os-release, following a symlink inside the tree (never the host's)."""
    for rel in ("etc/os-release", "usr/lib/os-release"):
        path = tree / rel
        for _ in range(8):
            if not path.is_symlink():
                break
            link = os.readlink(path)
            path = tree / link.lstrip("/") if link.startswith("/") else path.parent / link
        try:
            if not path.resolve().is_relative_to(tree.resolve()) or not path.is_file():
                continue
            text = path.read_text(errors="replace")
        except OSError:
            continue
        values: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
                values[key] = value.strip().strip("\"'")
        return values
    return {}


def extract_rootfs(
    image: Path,
    target: Path,
    *,
    workdir: Path,
    format: BaseFormat | str | None = None,
    arch: str = "amd64",
    timeout: float = 3600,
) -> ExtractResult:
    """Fill the empty directory `target` with the root tree of `image`.

    `format` is what the spec or the file name says; the file's content decides between qcow2 and
    raw and which decompressor runs. `workdir` holds the raw conversion of a qcow2, the mount points
    and the mount journal (`kiln.host.mounts.reclaim(workdir)` cleans up after a killed process); it is
    emptied again on return. On error `target` may hold a partial tree: extract into a temporary
    directory (a store entry) that is thrown away on failure.
    """
    declared = BaseFormat(format) if format is not None else guess_format(image.name)
    target.mkdir(parents=True, exist_ok=True)
    if any(target.iterdir()):
        raise ExtractError(f"{target} is not empty: kiln extracts a base image only into an empty directory")
    workdir.mkdir(parents=True, exist_ok=True)
    found = sniff(image)
    container = found.container
    if found.compression and found.compression != "zstd":
        container = _container(_peek_decompressed(image, found.compression))
    if found.compression == "zstd" and declared in (BaseFormat.qcow2, BaseFormat.raw):
        container = None  # decided after decompression
    fmt = _decide_format(image, declared, found, container)
    log.info("extracting %s (%s%s) into %s", image.name, fmt, f", {found.compression}" if found.compression else "",
             target)
    if fmt is BaseFormat.tar:
        _extract_tar(image, target, found.compression, timeout)
        result = ExtractResult(fmt)
    elif fmt is BaseFormat.squashfs:
        src = image
        if found.compression:
            src = _decompress(image, found.compression, workdir / "image.squashfs", timeout)
        run(["unsquashfs", "-no-progress", "-force", "-dest", str(target), str(src)], quiet=True, timeout=timeout,
            what=f"unpack {image.name} (unsquashfs)")
        if src != image:
            src.unlink(missing_ok=True)
        result = ExtractResult(fmt)
    else:
        result = _extract_disk(image, target, workdir=workdir, compression=found.compression, arch=arch,
                               timeout=timeout)
    if not _has_os(target):
        raise ExtractError(f"{image.name} unpacked, but the tree has no etc/os-release: is it a root filesystem?")
    result = ExtractResult(result.format, result.root, result.subvolume, result.grafted, read_os_release(target))
    log.info("extracted %s", result.describe())
    return result


def _decide_format(
    image: Path, declared: BaseFormat | None, found: Sniffed, container: BaseFormat | None
) -> BaseFormat:
    disks = (BaseFormat.qcow2, BaseFormat.raw)
    if container is BaseFormat.qcow2:
        if declared not in (None, *disks):
            raise ExtractError(f"{image.name} was declared {declared} but is a qcow2 disk image")
        return BaseFormat.qcow2
    if container in (BaseFormat.squashfs, BaseFormat.tar):
        if declared not in (None, container):
            raise ExtractError(f"{image.name} was declared {declared} but is a {container}")
        return container
    if found.compression and declared is None:
        return BaseFormat.tar  # a compressed file of no other kind: the usual root tarball
    if declared is None:
        return BaseFormat.raw
    if declared is BaseFormat.squashfs:
        raise ExtractError(f"{image.name} was declared squashfs but has no squashfs superblock")
    return BaseFormat.raw if declared in disks else declared


def _extract_tar(image: Path, target: Path, compression: str | None, timeout: float) -> None:
    argv = ["tar", "--extract", "--file", str(image), "--directory", str(target), "--numeric-owner",
            "--same-owner", "--preserve-permissions", "--xattrs", "--xattrs-include=*", "--acls"]
    if compression:
        argv.append(f"--{compression}")
    run(argv, quiet=True, timeout=timeout, what=f"unpack {image.name} (tar)")


@contextmanager
def _scratch(workdir: Path) -> Iterator[Path]:
    scratch = workdir / "extract"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def refuse_external_files(disk: Path, name: str) -> None:
    """A qcow2 from upstream may name other files that qemu-img would read as part of it: a backing file (a
    host disk, say, whose contents would end up in the built image) or an external data file. Refuse both
    before anything opens it (the class of OSSA-2024-001)."""
    info = json.loads(capture(["qemu-img", "info", "--output=json", "-f", "qcow2", str(disk)], timeout=60,
                              what=f"inspect {name} (qemu-img info)"))
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing:
        raise ExtractError(f"{name}: the qcow2 names a backing file ({backing!r}); an upstream image must be "
                           "self-contained: refused")
    data_file = ((info.get("format-specific") or {}).get("data") or {}).get("data-file")
    if data_file:
        raise ExtractError(f"{name}: the qcow2 names an external data file ({data_file!r}); an upstream image "
                           "must be self-contained: refused")


def _extract_disk(image: Path, target: Path, *, workdir: Path, compression: str | None, arch: str,
                  timeout: float) -> ExtractResult:
    with _scratch(workdir) as scratch, ExitStack() as cleanup:
        disk = image
        if compression:
            disk = _decompress(image, compression, scratch / "image.decompressed", timeout)
        fmt = BaseFormat.qcow2 if sniff(disk).container is BaseFormat.qcow2 else BaseFormat.raw
        if fmt is BaseFormat.qcow2:
            refuse_external_files(disk, image.name)
            raw = scratch / "disk.raw"
            log.info("converting %s to raw", image.name)
            run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(raw)], quiet=True,
                timeout=timeout, what=f"convert {image.name} to raw (qemu-img)")
            if disk != image:
                disk.unlink()
            disk = raw
        parts = read_partitions(disk)
        candidates = root_candidates(parts, arch)
        if not candidates:
            if any(p.type in LVM_TYPES or p.fstype == "LVM2_member" for p in parts):
                raise ExtractError(
                    f"{image.name}: the root filesystem is on LVM, which needs device-mapper (not available "
                    "here): use the distribution's non-LVM image (e.g. GenericCloud-Base rather than -LVM)"
                )
            listed = "; ".join(p.describe() for p in parts) or "none"
            raise ExtractError(f"{image.name}: no partition with a Linux filesystem kiln can mount (found: {listed})")
        stack = cleanup.enter_context(MountStack(workdir))
        mounts = scratch / "mnt"
        root_part: Partition | None = None
        root_tree: Path | None = None
        top: Path | None = None
        for part in candidates:
            where = mounts / f"p{part.number}"
            try:
                top = mount_partition(stack, disk, part, where,
                                       extra="subvolid=5" if part.fstype == "btrfs" else "")
            except CommandError as exc:
                log.warning("%s: cannot mount %s: %s", image.name, part.describe(), exc)
                continue
            root_tree = _find_root_in(top, part.fstype)
            if root_tree is not None:
                root_part = part
                break
            log.info("%s: %s holds no OS tree", image.name, part.describe())
        if root_part is None or root_tree is None or top is None:
            raise ExtractError(
                f"{image.name}: none of the mountable partitions holds etc/os-release "
                f"({'; '.join(p.describe() for p in candidates)})"
            )
        subvolume = "" if root_tree == top else str(root_tree.relative_to(top))
        log.info("%s: root filesystem on %s%s", image.name, root_part.describe(),
                 f", subvolume {subvolume!r}" if subvolume else "")
        copy_tree(root_tree, target, timeout=timeout)
        grafted = _graft_fstab(disk, parts, root_part, top, target, stack, mounts, timeout)
        stack.unmount_all()
        return ExtractResult(fmt, root=root_part, subvolume=subvolume, grafted=tuple(grafted))


def _graft_fstab(disk: Path, parts: list[Partition], root_part: Partition, root_top: Path, target: Path,
                 stack: MountStack, mounts: Path, timeout: float) -> list[str]:
    """Copy the filesystems the image's fstab mounts from this disk into their mount points."""
    fstab = regular_file_in_root(target, "etc/fstab")  # `etc -> /etc` must not read the host's
    if fstab is None:
        return []
    grafted: list[str] = []
    entries = sorted(parse_fstab(fstab.read_text(errors="replace")), key=lambda e: e.mountpoint.count("/"))
    for entry in entries:
        rel = _safe_mountpoint(entry.mountpoint)
        if rel is None or entry.fstype in ("swap", "none", "tmpfs", "proc", "sysfs") or "bind" in entry.options:
            continue
        part = next((p for p in parts if _matches(entry.spec, p)), None)
        if part is None:
            continue
        subvol = entry.option("subvol")
        if subvol and (".." in PurePosixPath(subvol).parts or "," in subvol):
            log.warning("fstab: subvolume %r for /%s climbs out of its filesystem; not filling it", subvol, rel)
            continue
        if part == root_part and (part.fstype != "btrfs" or not subvol):
            continue
        dest = _dir_in_tree(target, rel)
        if dest is None:
            log.warning("fstab mount point /%s goes through a link (or a file) in the image; not filling it", rel)
            continue
        if part == root_part:
            try:
                src = resolve_in_root(root_top, subvol or "")  # links in the filesystem stay inside it
            except OSError:
                src = root_top
            if src == root_top or not _real_dir(src):
                log.warning("fstab: subvolume %r for /%s is not on the disk", subvol, rel)
                continue
            copy_tree(src, dest, timeout=timeout)
        elif part.fstype == "vfat":
            _copy_vfat(disk, part, dest, timeout)
        elif part.fstype in MOUNTABLE:
            where = mounts / f"graft{len(grafted)}-p{part.number}"
            mount_partition(stack, disk, part, where, extra=f"subvol={subvol}" if subvol else "")
            copy_tree(where, dest, timeout=timeout)
        else:
            log.warning("fstab: /%s is %s on %s; kiln cannot read it, leaving it empty", rel, part.fstype,
                        part.describe())
            continue
        grafted.append("/" + rel)
        log.info("filled /%s from %s", rel, part.describe())
    return grafted
