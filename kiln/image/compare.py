"""Where two raw disks differ: byte ranges by partition, file system headers, and the files behind them.

Used by `kiln build --check-reproducible` (kiln.cli.reproducible) on two builds of the same spec. The root
file systems are mounted read-only (loop, at their partition's offset) and walked side by side; the EFI
system partitions (FAT: the kernel here has no vfat) are read with mtools. Bytes of the root partition
that differ with no file to blame are traced to their inode with debugfs (`icheck`, inode tables).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kiln.host.mounts import MountStack
from kiln.host.run import output, run
from kiln.model.errors import CommandError

CHUNK = 1024 * 1024
BLOCK = 4096
SECTOR = 512
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
MAX_TRACED_BLOCKS = 4000  # root blocks traced to inodes with debugfs
MAX_DIFFOSCOPE = 10  # differing files shown with diffoscope, where installed


@dataclass(frozen=True)
class Partition:
    number: int
    name: str
    type: str
    start: int  # bytes
    size: int  # bytes

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class FileDifference:
    path: str
    what: tuple[str, ...]  # "only in A", "content", "mtime 1 != 2", ...

    def line(self) -> str:
        return f"{self.path}: {'; '.join(self.what)}"


@dataclass
class DiskComparison:
    a: Path
    b: Path
    sha256_a: str
    sha256_b: str
    regions: dict[str, int] = field(default_factory=dict)  # where the differing bytes lie -> how many MiB chunks
    root_header: list[str] = field(default_factory=list)  # dumpe2fs -h lines that differ
    root_files: list[FileDifference] = field(default_factory=list)
    root_blocks: list[str] = field(default_factory=list)  # differing blocks traced to inodes / metadata
    esp_files: list[FileDifference] = field(default_factory=list)
    diffoscope: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.sha256_a == self.sha256_b

    def report(self, *, limit: int = 200) -> str:
        """The comparison as text for the operator: the checksums, then what differs."""
        lines = [f"A {self.sha256_a}  {self.a}", f"B {self.sha256_b}  {self.b}"]
        if self.identical:
            return "\n".join([*lines, "the disks are bit-identical"])
        lines.append("the disks differ; differing MiB by region: "
                     + ", ".join(f"{r} {n}" for r, n in sorted(self.regions.items())))
        sections = (("root file system header (dumpe2fs -h), A | B", self.root_header),
                    ("files of the root file system", [d.line() for d in self.root_files]),
                    ("differing root blocks, by owner (debugfs)", self.root_blocks),
                    ("files of the EFI system partition", [d.line() for d in self.esp_files]),
                    ("diffoscope", self.diffoscope))
        for title, items in sections:
            if items:
                lines.append(f"{title}: {len(items)}")
                lines += [f"  {item}" for item in items[:limit]]
                if len(items) > limit:
                    lines.append(f"  … and {len(items) - limit} more")
        return "\n".join(lines)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * CHUNK):
            h.update(chunk)
    return h.hexdigest()


def partitions(disk: Path) -> list[Partition]:
    """The disk's partitions as its partition table lists them (sfdisk --json), by start."""
    table = json.loads(output(["sfdisk", "--json", str(disk)], timeout=60, what=f"read the partition table of {disk}"))
    table = table["partitiontable"]
    unit = int(table.get("sectorsize", SECTOR))
    parts = []
    for p in table.get("partitions", []):
        number = int("".join(c for c in p["node"].removeprefix(str(disk)) if c.isdigit()) or 0)
        parts.append(Partition(number, p.get("name", ""), p.get("type", "").upper(), int(p["start"]) * unit,
                               int(p["size"]) * unit))
    return sorted(parts, key=lambda p: p.start)


def differing_chunks(a: Path, b: Path, *, chunk: int = CHUNK) -> Iterator[int]:
    """Offsets of the `chunk`-sized pieces in which the two files differ (a longer file's tail differs)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            ca, cb = fa.read(chunk), fb.read(chunk)
            if not ca and not cb:
                return
            if ca != cb:
                yield offset
            offset += chunk


def region_of(offset: int, parts: list[Partition], size: int) -> str:
    for p in parts:
        if p.start <= offset < p.end:
            return f"partition {p.number} ({p.name or p.type})"
    if offset < 34 * SECTOR:
        return "MBR and GPT"
    if offset >= size - 33 * SECTOR:
        return "backup GPT"
    return "outside the partitions"


# ---------------------------------------------------------------------------------------- trees


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
        return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}
    except OSError:
        return {}


def _digest(path: str) -> str:
    return sha256_of(Path(path))


def _walk(top: Path) -> dict[str, os.stat_result]:
    found: dict[str, os.stat_result] = {}
    for root, dirs, files in os.walk(top):
        dirs.sort()
        for name in [*dirs, *sorted(files)]:
            full = os.path.join(root, name)
            found[os.path.relpath(full, top)] = os.lstat(full)
    return found


def _compare_entry(rel: str, a: Path, b: Path, sa: os.stat_result, sb: os.stat_result, inodes: bool) -> list[str]:
    what = []
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
        return [f"type {stat.filemode(sa.st_mode)[0]} != {stat.filemode(sb.st_mode)[0]}"]
    if sa.st_mode != sb.st_mode:
        what.append(f"mode {stat.filemode(sa.st_mode)} != {stat.filemode(sb.st_mode)}")
    if (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
        what.append(f"owner {sa.st_uid}:{sa.st_gid} != {sb.st_uid}:{sb.st_gid}")
    pa, pb = str(a / rel), str(b / rel)
    if stat.S_ISLNK(sa.st_mode):
        if os.readlink(pa) != os.readlink(pb):
            what.append(f"target {os.readlink(pa)} != {os.readlink(pb)}")
    elif stat.S_ISREG(sa.st_mode):
        if sa.st_size != sb.st_size:
            what.append(f"content (size {sa.st_size} != {sb.st_size})")
        elif _digest(pa) != _digest(pb):
            what.append("content")
    elif (stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode)) and sa.st_rdev != sb.st_rdev:
        what.append("device number")
    if sa.st_mtime_ns != sb.st_mtime_ns:
        what.append(f"mtime {sa.st_mtime_ns / 1e9:.9f} != {sb.st_mtime_ns / 1e9:.9f}")
    if inodes:
        if sa.st_ctime_ns != sb.st_ctime_ns:
            what.append(f"ctime {sa.st_ctime_ns / 1e9:.9f} != {sb.st_ctime_ns / 1e9:.9f}")
        if sa.st_ino != sb.st_ino:
            what.append(f"inode {sa.st_ino} != {sb.st_ino}")
    if sa.st_nlink != sb.st_nlink and not stat.S_ISDIR(sa.st_mode):
        what.append(f"links {sa.st_nlink} != {sb.st_nlink}")
    if _xattrs(pa) != _xattrs(pb):
        what.append("xattrs")
    return what


def tree_differences(a: Path, b: Path, *, inodes: bool = False) -> list[FileDifference]:
    """Every path whose presence, type, mode, owner, content, link target, mtime, link count or xattrs differ
    between the trees `a` and `b` (with `inodes`, also ctime and inode number: what a file system image
    records), in path order. Links are not followed."""
    wa, wb = _walk(a), _walk(b)
    out = []
    for rel in sorted(wa.keys() | wb.keys()):
        if rel not in wb:
            out.append(FileDifference(rel, ("only in A",)))
        elif rel not in wa:
            out.append(FileDifference(rel, ("only in B",)))
        else:
            what = _compare_entry(rel, a, b, wa[rel], wb[rel], inodes)
            if what:
                out.append(FileDifference(rel, tuple(what)))
    return out


# ----------------------------------------------------------------------------------- the root fs


def _e2fs(disk: Path, part: Partition) -> str:
    return f"{disk}?offset={part.start}"


def ext4_header(disk: Path, part: Partition) -> dict[str, str]:
    text = output(["dumpe2fs", "-h", _e2fs(disk, part)], timeout=60, what=f"dumpe2fs -h {disk}")
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    return fields


def header_differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return [f"{k}: {a.get(k, '-')} | {b.get(k, '-')}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _debugfs(disk: Path, part: Partition, request: str) -> str:
    return output(["debugfs", "-R", request, _e2fs(disk, part)], timeout=300, what=f"debugfs {request.split()[0]}")


def _inode_tables(disk: Path, part: Partition) -> list[tuple[int, int, int]]:
    """(first block, last block, first inode) of every group's inode table."""
    text = output(["dumpe2fs", _e2fs(disk, part)], timeout=120, what=f"dumpe2fs {disk}")
    per_group = 0
    tables = []
    group = 0
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Inodes per group:"):
            per_group = int(line.split(":")[1])
        elif line.startswith("Group ") and line.split()[1].rstrip(":").isdigit():
            group = int(line.split()[1].rstrip(":"))
        elif line.startswith("Inode table at "):
            span = line.removeprefix("Inode table at ").split()[0]
            first, _, last = span.partition("-")
            tables.append((int(first), int(last or first), group * per_group + 1))
    return tables


def trace_blocks(disk: Path, part: Partition, blocks: list[int], *, inode_size: int = 256) -> list[str]:
    """What owns each of `blocks` of the ext4 in `part`: file data (path), an inode table (the paths of the
    inodes in it), or other metadata; one line per owner with its number of blocks."""
    owners: dict[str, int] = {}
    tables = _inode_tables(disk, part)
    data_blocks = []
    inode_blocks: dict[int, list[int]] = {}
    for blk in blocks:
        table = next((t for t in tables if t[0] <= blk <= t[1]), None)
        if table is None:
            data_blocks.append(blk)
            continue
        per_block = BLOCK // inode_size
        first = table[2] + (blk - table[0]) * per_block
        inode_blocks[blk] = list(range(first, first + per_block))
    by_inode: dict[int, int] = {}
    if data_blocks:
        for line in _debugfs(disk, part, "icheck " + " ".join(map(str, data_blocks))).splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                by_inode[int(parts[1])] = by_inode.get(int(parts[1]), 0) + 1
            elif parts:
                owners["metadata (no inode: superblock, bitmaps, journal…)"] = (
                    owners.get("metadata (no inode: superblock, bitmaps, journal…)", 0) + 1)
    wanted = set(by_inode) | {i for v in inode_blocks.values() for i in v}
    names = _inode_names(disk, part, sorted(wanted))
    for ino, n in by_inode.items():
        key = f"data of {names.get(ino, f'inode {ino}')}"
        owners[key] = owners.get(key, 0) + n
    for _blk, inos in sorted(inode_blocks.items()):
        shown = [names[i] for i in inos if i in names][:4]
        more = ", …" if len(shown) == 4 else ""
        key = f"inode table, inodes {inos[0]}-{inos[-1]} ({', '.join(shown) or 'unnamed'}{more})"
        owners[key] = owners.get(key, 0) + 1
    return [f"{n} block{'s' if n > 1 else ''}: {owner}" for owner, n in sorted(owners.items(), key=lambda o: -o[1])]


def _inode_names(disk: Path, part: Partition, inodes: list[int]) -> dict[int, str]:
    names: dict[int, str] = {}
    for i in range(0, len(inodes), 500):
        text = _debugfs(disk, part, "ncheck " + " ".join(map(str, inodes[i:i + 500])))
        for line in text.splitlines()[1:]:
            ino, _, path = line.strip().partition("\t")
            if ino.isdigit() and int(ino) not in names:
                names[int(ino)] = path
    return names


def _differing_blocks(a: Path, b: Path, part: Partition, chunks: list[int]) -> list[int]:
    out = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for chunk in chunks:
            start = max(chunk, part.start)
            fa.seek(start)
            fb.seek(start)
            ca, cb = fa.read(CHUNK - (start - chunk)), fb.read(CHUNK - (start - chunk))
            for off in range(0, len(ca), BLOCK):
                if ca[off:off + BLOCK] != cb[off:off + BLOCK]:
                    out.append((start + off - part.start) // BLOCK)
                    if len(out) >= MAX_TRACED_BLOCKS:
                        return out
    return out


def _mount_ext4(mounts: MountStack, disk: Path, part: Partition, target: Path) -> Path:
    return mounts.mount(["-t", "ext4", "-o", f"ro,noload,nosuid,nodev,noexec,loop,offset={part.start},"
                         f"sizelimit={part.size}", str(disk)], target, what=f"mount the root file system of {disk}")


def _extract_fat(disk: Path, part: Partition, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null", "LC_ALL": "C"}
    run(["mcopy", "-s", "-p", "-m", "-n", "-Q", "-i", f"{disk}@@{part.start}", "::/", str(dest)], env=env,
        quiet=True, timeout=120, what=f"read the EFI system partition of {disk} (mcopy)")


def _diffoscope(pairs: list[tuple[Path, Path]]) -> list[str]:
    if shutil.which("diffoscope") is None:
        return []
    lines: list[str] = []
    for a, b in pairs[:MAX_DIFFOSCOPE]:
        try:
            done = run(["diffoscope", "--no-progress", "--text", "-", "--max-text-report-size", "20000",
                        str(a), str(b)], check=False, quiet=True, timeout=300, what=f"diffoscope {a.name}")
            lines += done.lines
        except CommandError as exc:
            lines.append(f"diffoscope {a} {b}: {exc}")
    return lines


def compare_disks(a: Path, b: Path, *, workdir: Path) -> DiskComparison:
    """Compare the raw disks `a` and `b` (same layout expected); `workdir` holds the mount points."""
    result = DiskComparison(a, b, sha256_of(a), sha256_of(b))
    if result.identical:
        return result
    parts = partitions(a)
    size = a.stat().st_size
    chunks = list(differing_chunks(a, b))
    for offset in chunks:
        region = region_of(offset, parts, size)
        result.regions[region] = result.regions.get(region, 0) + 1
    if parts != partitions(b):
        result.root_header.append("the partition tables differ: partitions not compared")
        return result
    pairs: list[tuple[Path, Path]] = []
    with MountStack(workdir) as mounts:
        for part in parts:
            touched = [c for c in chunks if c < part.end and c + CHUNK > part.start]
            if not touched:
                continue
            if part.type == LINUX_FS:
                result.root_header = header_differences(ext4_header(a, part), ext4_header(b, part))
                ra = _mount_ext4(mounts, a, part, workdir / f"root-a-{part.number}")
                rb = _mount_ext4(mounts, b, part, workdir / f"root-b-{part.number}")
                result.root_files = tree_differences(ra, rb, inodes=True)
                pairs += [(ra / d.path, rb / d.path) for d in result.root_files
                          if any(w.startswith("content") for w in d.what)]
                result.root_blocks = trace_blocks(a, part, _differing_blocks(a, b, part, touched))
            elif part.type == ESP:
                ea, eb = workdir / f"esp-a-{part.number}", workdir / f"esp-b-{part.number}"
                _extract_fat(a, part, ea)
                _extract_fat(b, part, eb)
                result.esp_files = tree_differences(ea, eb)
                if not result.esp_files:
                    result.esp_files = [FileDifference("(FAT metadata)", ("bytes differ, files do not: timestamps "
                                                                          "or allocation",))]
        result.diffoscope = _diffoscope(pairs)
        mounts.unmount_all()
    return result
