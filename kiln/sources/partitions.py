"""What a disk image holds: its partitions, the filesystems blkid finds on them, which one is the root.

The partition table is read with `sfdisk --json` (a disk without one is one filesystem); each partition
is probed with `blkid -p` at its byte offset, so no partition device nodes are needed. A partition is
mounted read-only through a loop device at its offset (`mount -o ro,loop,offset=…,sizelimit=…`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from kiln.host.mounts import MountStack
from kiln.host.run import run
from kiln.model.errors import KilnError


# kiln.sources.extract's error (it re-exports it); defined here, the lower module, so that a failed probe
# raises the same error as the rest of the extraction
class ExtractError(KilnError):
    """The image could not be turned into a root tree (unknown format, no root partition, LVM, …)."""


SECTOR = 512
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
LVM = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
XBOOTLDR = "BC13C2FF-59E6-4262-A352-B275FD6F7172"
LINUX_DATA = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
#: the Discoverable Partitions Specification's root partition type per architecture
ROOT_TYPES = {
    "amd64": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    "arm64": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
}
_NOT_ROOT_TYPES = {ESP, BIOS_BOOT, SWAP, XBOOTLDR, "EF", "82", "5", "F", "85", "EE"}
LVM_TYPES = {LVM, "8E"}
ROOT_LABELS = {"cloudimg-rootfs", "root", "rootfs", "img-rootfs", "fedora", "system-root", "root-x86-64", "root-arm64"}
MOUNTABLE = {"ext2", "ext3", "ext4", "xfs", "btrfs", "squashfs", "erofs"}
_MOUNT_OPTIONS = {
    "ext3": "noload",  # no journal replay: the loop device is read-only
    "ext4": "noload",
    "xfs": "norecovery,nouuid",  # nouuid: the same image may be mounted twice, or match a host filesystem
    "btrfs": "rescue=nologreplay",
}


@dataclass(frozen=True)
class Partition:
    """A partition (or the whole disk, number 0) with what blkid found on it; offsets in bytes."""

    number: int
    start: int
    size: int
    type: str = ""  # GPT type GUID or MBR type byte, upper case
    name: str = ""  # GPT partition name
    uuid: str = ""  # GPT partition UUID
    fstype: str = ""
    label: str = ""
    fs_uuid: str = ""

    def describe(self) -> str:
        what = f"partition {self.number}" if self.number else "the whole disk"
        tags = ", ".join(x for x in (self.fstype, f"label {self.label!r}" if self.label else "",
                                     f"name {self.name!r}" if self.name else "") if x)
        return f"{what} ({tags}, {self.size // (1 << 20)} MiB at byte {self.start})"


def probe_filesystem(disk: Path, start: int, size: int) -> dict[str, str]:
    """blkid's low-level probe of the filesystem at a byte offset: TYPE, LABEL, UUID, …"""
    result = run(["blkid", "-p", "-O", str(start), "-S", str(size), "-o", "export", str(disk)],
                 check=False, quiet=True, timeout=60, what=f"probe the filesystem at byte {start} of {disk.name}")
    if result.returncode not in (0, 2):  # 2: nothing recognised
        raise ExtractError(f"blkid failed on {disk} at byte {start}:\n" + result.output)
    tags: dict[str, str] = {}
    for line in result.lines:
        key, sep, value = line.partition("=")
        if sep:
            tags[key.strip()] = value.strip()
    return tags


def read_partitions(disk: Path) -> list[Partition]:
    """The disk's partitions with their filesystems; [whole disk] when it has no partition table."""
    result = run(["sfdisk", "--json", str(disk)], check=False, quiet=True, timeout=60,
                 what=f"read the partition table of {disk.name}")
    table: dict[str, object] = {}
    if result.returncode == 0 and result.output.strip():
        try:
            table = json.loads(result.output).get("partitiontable", {})
        except ValueError as exc:
            raise ExtractError(f"sfdisk printed no JSON for {disk}: {result.output[:200]}") from exc
    size = disk.stat().st_size
    if not table or not table.get("partitions"):
        tags = probe_filesystem(disk, 0, size)
        return [Partition(0, 0, size, fstype=tags.get("TYPE", ""), label=tags.get("LABEL", ""),
                          fs_uuid=tags.get("UUID", ""))]
    sector = int(str(table.get("sectorsize", SECTOR)))
    parts: list[Partition] = []
    raw_parts = table.get("partitions")
    assert isinstance(raw_parts, list)
    for entry in raw_parts:
        node = str(entry.get("node", ""))
        m = re.search(r"(\d+)$", node)
        number = int(m.group(1)) if m else len(parts) + 1
        start = int(entry["start"]) * sector
        length = int(entry["size"]) * sector
        ptype = str(entry.get("type", "")).upper()
        tags = probe_filesystem(disk, start, length) if ptype not in ("5", "F", "85") else {}
        parts.append(Partition(number, start, length, type=ptype, name=str(entry.get("name", "")),
                               uuid=str(entry.get("uuid", "")).upper(), fstype=tags.get("TYPE", ""),
                               label=tags.get("LABEL", ""), fs_uuid=tags.get("UUID", "")))
    return parts


def root_candidates(parts: list[Partition], arch: str) -> list[Partition]:
    """Partitions that may hold the root filesystem, most likely first."""
    root_type = ROOT_TYPES.get(arch, "")

    def rank(p: Partition) -> tuple[int, int, int]:
        return (0 if p.type == root_type else 1,
                0 if (p.label.lower() in ROOT_LABELS or p.name.lower() in ROOT_LABELS) else 1,
                -p.size)

    usable = [p for p in parts if p.type not in _NOT_ROOT_TYPES and p.type not in LVM_TYPES
              and p.fstype in MOUNTABLE]
    return sorted(usable, key=rank)


def mount_partition(stack: MountStack, disk: Path, part: Partition, where: Path, *, extra: str = "") -> Path:
    """Mount `part` of `disk` read-only at `where` through a loop device at its offset; `extra`: more options.
    A stranger's file system: its setuid bits, device nodes and programs mean nothing on this host (kiln copies
    the files out; it never runs them from here)."""
    opts = ["ro", "nosuid", "nodev", "noexec", "loop", f"offset={part.start}", f"sizelimit={part.size}"]
    if part.fstype in _MOUNT_OPTIONS:
        opts.append(_MOUNT_OPTIONS[part.fstype])
    if extra:
        opts.append(extra)
    return stack.mount(["-t", part.fstype, "-o", ",".join(opts), str(disk)], where,
                       what=f"mount {part.describe()} of {disk.name} read-only")
