"""Turn a root tree into a bootable raw GPT disk without device-mapper, vfat mounts or loop partitions.

The disk is assembled as a plain file: `sgdisk` writes the GPT, `mkfs.fat --offset` and `mtools` build
the EFI system partition in place, `mkfs.ext4 -E offset=… -d TREE` fills the root partition, and the
BIOS boot code is written with ordinary file I/O (what `grub-install`/`grub-bios-setup` would do).

Two steps, because the tree is a read-only overlay of cached layers:

1. `write_boot_files()` puts `/etc/fstab`, `/boot/grub/grub.cfg` and the GRUB module directories into
   an empty "pack layer" directory;
2. the caller mounts the pack layer over the tree (read-only overlay) and `assemble()` builds the disk
   from that merged view. `pack()` does both for a plain directory tree.

Layout (like Debian's cloud images): partition 14 = BIOS boot (1 MiB at 1 MiB, amd64 only), 15 = ESP
up to 128 MiB, 1 = Linux root filling the rest, last on disk so that cloud-init's growpart can grow it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from kiln.host.mounts import MountStack
from kiln.host.run import output, run
from kiln.model.errors import DiskError

log = logging.getLogger("kiln.disk")

SECTOR = 512
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
BLOCK = 4096  # ext4 block size (pinned in our mke2fs.conf)

BIOS_BOOT_START = 1 * MiB
BIOS_BOOT_SIZE = 1 * MiB
ESP_END = 128 * MiB
ROOT_START = ESP_END
MIN_ROOT = 64 * MiB
# The backup GPT (32 sectors of entries + the header) occupies the disk's last 33 sectors.
GPT_BACKUP = 33 * SECTOR

ROOT_LABEL = "cloudimg-rootfs"
DEFAULT_CMDLINE = "console=tty0 console=ttyS0,115200n8"
DEFAULT_TIMEOUT = 1

# boot.img / diskboot.img offsets, from GRUB 2.06 include/grub/i386/pc/boot.h and
# grub-core/boot/i386/pc/{boot,diskboot}.S.
BOOT_CODE_END = 0x1B8  # GRUB_BOOT_MACHINE_WINDOWS_NT_MAGIC: disk signature and partition table follow
KERNEL_SECTOR = 0x5C  # GRUB_BOOT_MACHINE_KERNEL_SECTOR: 8-byte LBA of core.img's first sector
BOOT_DRIVE = 0x64  # GRUB_BOOT_MACHINE_BOOT_DRIVE: 0xff = use the drive the BIOS booted from
DRIVE_CHECK = 0x66  # GRUB_BOOT_MACHINE_DRIVE_CHECK: a 2-byte jmp that grub-setup turns into nops
BLOCKLIST = 0x1F4  # diskboot.S firstlist: u64 start, u16 length, u16 segment (12 bytes, at 0x200 - 12)
BLOCKLIST_SEGMENT = 0x820  # GRUB_BOOT_MACHINE_KERNEL_SEG + 0x20
PART_TABLE = 0x1BE
PROTECTIVE_TYPE = 0xEE

_ESSENTIAL_MODULES = ("part_gpt", "ext2", "search", "search_fs_uuid", "normal", "configfile", "linux")
_BIOS_MODULES = ("biosdisk", *_ESSENTIAL_MODULES, "part_msdos", "serial", "terminal", "echo", "test", "gzio", "boot")
_EFI_MODULES = (
    *_ESSENTIAL_MODULES,
    "part_msdos",
    "fat",
    "serial",
    "terminal",
    "echo",
    "test",
    "gzio",
    "boot",
    "efi_gop",
    "all_video",
)


@dataclass(frozen=True)
class Arch:
    """What differs between architectures: GRUB platforms and the removable-media EFI loader name."""

    name: str
    efi_platform: str
    efi_loader: str
    bios: bool


ARCHES: dict[str, Arch] = {
    "amd64": Arch("amd64", "x86_64-efi", "BOOTX64.EFI", bios=True),
    "arm64": Arch("arm64", "arm64-efi", "BOOTAA64.EFI", bios=False),
}


@dataclass(frozen=True)
class Partition:
    """One GPT partition; offsets and sizes in bytes, sector-aligned."""

    number: int
    name: str
    type_code: str  # sgdisk's short type code
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def first_sector(self) -> int:
        return self.start // SECTOR

    @property
    def last_sector(self) -> int:
        return self.end // SECTOR - 1


@dataclass(frozen=True)
class DiskLayout:
    """Where everything goes on the disk, and the identities the boot files refer to."""

    size: int
    arch: str
    root_uuid: str
    esp_serial: str  # "ABCD-1234", as blkid and fstab spell a FAT volume serial
    bios_boot: Partition | None
    esp: Partition
    root: Partition

    @property
    def partitions(self) -> tuple[Partition, ...]:
        """The partitions in on-disk order."""
        return tuple(p for p in (self.bios_boot, self.esp, self.root) if p is not None)

    @property
    def platform(self) -> Arch:
        return ARCHES[self.arch]

    @property
    def grub_platforms(self) -> tuple[str, ...]:
        """GRUB platforms whose modules go to /boot/grub/<platform>."""
        arch = self.platform
        return ("i386-pc", arch.efi_platform) if arch.bios else (arch.efi_platform,)

    @property
    def root_fs_size(self) -> int:
        """Bytes of the root filesystem: the partition rounded down to whole ext4 blocks."""
        return self.root.size // BLOCK * BLOCK

    def guid(self, what: str) -> str:
        """A GUID for the disk or a partition, derived from the root UUID so that rebuilds agree."""
        return str(uuid.uuid5(uuid.UUID(self.root_uuid), f"kiln-disk:{what}"))


@dataclass(frozen=True)
class PackResult:
    """A finished disk; `kernel`/`initrd` are relative to the root filesystem (e.g. boot/vmlinuz-…)."""

    path: Path
    size: int
    root_uuid: str
    esp_serial: str
    kernel: str
    initrd: str
    kernel_version: str
    cmdline: str  # everything after the kernel path on GRUB's `linux` line, root=UUID=… included


# --------------------------------------------------------------------------------------------------
# layout


def _normalize_serial(serial: str) -> str:
    digits = serial.replace("-", "").strip()
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", digits):
        raise DiskError(f"ESP volume serial {serial!r} is not 8 hex digits (like 'ABCD-1234')")
    digits = digits.upper()
    return f"{digits[:4]}-{digits[4:]}"


def plan_layout(*, size: int, arch: str, root_uuid: str, esp_serial: str) -> DiskLayout:
    """Lay out a disk of `size` bytes: BIOS boot (amd64), ESP, then root to the end of the disk."""
    if arch not in ARCHES:
        raise DiskError(f"unsupported architecture {arch!r}; kiln builds disks for {', '.join(ARCHES)}")
    if size % SECTOR:
        raise DiskError(f"disk size {size} is not a multiple of {SECTOR} bytes")
    if size < ROOT_START + MIN_ROOT + GPT_BACKUP:
        raise DiskError(
            f"disk size {_human(size)} is too small: the layout needs at least "
            f"{_human(ROOT_START + MIN_ROOT + GPT_BACKUP)}"
        )
    try:
        canonical_uuid = str(uuid.UUID(root_uuid))
    except ValueError as exc:
        raise DiskError(f"root filesystem UUID {root_uuid!r} is not a UUID") from exc
    spec = ARCHES[arch]
    bios_boot = Partition(14, "bios-boot", "EF02", BIOS_BOOT_START, BIOS_BOOT_SIZE) if spec.bios else None
    esp_start = BIOS_BOOT_START + BIOS_BOOT_SIZE if spec.bios else BIOS_BOOT_START
    esp = Partition(15, "esp", "EF00", esp_start, ESP_END - esp_start)
    # root runs to the last usable sector, in front of the backup GPT
    root = Partition(1, "root", "8300", ROOT_START, size - GPT_BACKUP - ROOT_START)
    return DiskLayout(
        size=size,
        arch=arch,
        root_uuid=canonical_uuid,
        esp_serial=_normalize_serial(esp_serial),
        bios_boot=bios_boot,
        esp=esp,
        root=root,
    )


# --------------------------------------------------------------------------------------------------
# reading the tree


def _version_key(version: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|[^\d]+", version)]


def kernel_in(tree: Path) -> tuple[Path, Path, str]:
    """The newest kernel in TREE/boot: (vmlinuz path, initrd path, version)."""
    boot = tree / "boot"
    versions = []
    if boot.is_dir():
        for entry in boot.iterdir():
            version = entry.name.removeprefix("vmlinuz-")
            if entry.name.startswith("vmlinuz-") and entry.is_file() and not version.endswith((".bak", ".old")):
                versions.append(version)
    if not versions:
        raise DiskError(f"no kernel in {boot} (expected boot/vmlinuz-VERSION): install a kernel package")
    version = max(versions, key=_version_key)
    initrd = boot / f"initrd.img-{version}"
    if not initrd.is_file():
        raise DiskError(f"kernel {version} in {boot} has no initrd.img-{version}: is initramfs-tools installed?")
    return boot / f"vmlinuz-{version}", initrd, version


_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _expand(text: str, i: int, env: Mapping[str, str]) -> tuple[str, int]:
    """Expand `$NAME` or `${NAME}` at text[i] == '$'; anything fancier stays literal."""
    if text.startswith("${", i):
        close = text.find("}", i)
        if close != -1 and _NAME.fullmatch(text[i + 2 : close]):
            return env.get(text[i + 2 : close], ""), close + 1
        return "$", i + 1
    m = _NAME.match(text, i + 1)
    if m:
        return env.get(m.group(), ""), m.end()
    return "$", i + 1


def _shell_word(text: str, env: Mapping[str, str]) -> str:
    """The value of the first shell word in `text`: quotes, backslashes and $VAR; stops at a blank."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in " \t;&|":
            break
        if c == "'":
            close = text.find("'", i + 1)
            close = len(text) if close == -1 else close
            out.append(text[i + 1 : close])
            i = close + 1
        elif c == '"':
            i += 1
            while i < len(text) and text[i] != '"':
                if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in '$`"\\':
                    out.append(text[i + 1])
                    i += 2
                elif text[i] == "$":
                    value, i = _expand(text, i, env)
                    out.append(value)
                else:
                    out.append(text[i])
                    i += 1
            i += 1
        elif c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif c == "$":
            value, i = _expand(text, i, env)
            out.append(value)
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_shell_assignments(text: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Read `NAME=value` lines as a shell would assign them, without running anything.

    Later assignments win and may refer to earlier ones (`X="$X quiet"`); conditionals are not
    evaluated, command substitutions stay literal.
    """
    values = dict(env or {})
    for line in text.replace("\\\n", "").splitlines():
        m = _ASSIGNMENT.match(line)
        if m:
            values[m.group(1)] = _shell_word(m.group(2), values)
    return values


def grub_defaults(tree: Path) -> dict[str, str]:
    """TREE/etc/default/grub, then TREE/etc/default/grub.d/*.cfg in order, as grub-mkconfig reads them."""
    files = [tree / "etc/default/grub", *sorted((tree / "etc/default/grub.d").glob("*.cfg"))]
    values: dict[str, str] = {}
    for f in files:
        if f.is_file():
            values = parse_shell_assignments(f.read_text(errors="replace"), values)
    return values


def cmdline_from_defaults(values: Mapping[str, str]) -> str:
    """GRUB_CMDLINE_LINUX then GRUB_CMDLINE_LINUX_DEFAULT, or kiln's serial-console default if neither is set."""
    keys = ("GRUB_CMDLINE_LINUX", "GRUB_CMDLINE_LINUX_DEFAULT")
    if not any(k in values for k in keys):
        return DEFAULT_CMDLINE
    return " ".join(" ".join(values.get(k, "").split()) for k in keys if values.get(k, "").strip())


def grub_cmdline(tree: Path) -> str:
    """The kernel command line (without root=) that grub-mkconfig would use for this tree."""
    return cmdline_from_defaults(grub_defaults(tree))


def _os_name(tree: Path) -> str:
    for f in (tree / "etc/os-release", tree / "usr/lib/os-release"):
        if f.is_file():
            values = parse_shell_assignments(f.read_text(errors="replace"))
            return values.get("PRETTY_NAME") or values.get("NAME") or "Linux"
    return "Linux"


# --------------------------------------------------------------------------------------------------
# step 1: the files the root filesystem needs but the tree must not be changed for


def fstab_text(layout: DiskLayout) -> str:
    return (
        "# Written by kiln: the root filesystem and the EFI system partition, by UUID.\n"
        f"UUID={layout.root_uuid}\t/\text4\trw,discard,errors=remount-ro\t0\t1\n"
        f"UUID={layout.esp_serial}\t/boot/efi\tvfat\tumask=0077\t0\t1\n"
    )


def _linux_args(layout: DiskLayout, cmdline: str) -> str:
    return " ".join(filter(None, [f"root=UUID={layout.root_uuid} ro", cmdline]))


def grub_cfg_text(*, layout: DiskLayout, version: str, cmdline: str, title: str, timeout: int) -> str:
    if "\n" in cmdline:
        raise DiskError("the kernel command line from /etc/default/grub contains a newline")
    return f"""\
# Written by kiln (not grub-mkconfig); the kernel command line comes from /etc/default/grub.
set default=0
set timeout={timeout}
if serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1; then
  terminal_input serial console
  terminal_output serial console
fi
if [ "${{grub_platform}}" = "efi" ]; then
  insmod all_video
fi
insmod part_gpt
insmod ext2
search --no-floppy --fs-uuid --set=root {layout.root_uuid}

menuentry '{title.replace("'", "")}, with Linux {version}' --id kiln-default {{
  insmod gzio
  echo 'Loading Linux {version} ...'
  linux /boot/vmlinuz-{version} {_linux_args(layout, cmdline)}
  echo 'Loading initial ramdisk ...'
  initrd /boot/initrd.img-{version}
}}
"""


def _grub_dir(tree: Path, platform: str) -> Path:
    src = tree / "usr/lib/grub" / platform
    if not (src / "kernel.img").is_file():
        package = {"i386-pc": "grub-pc-bin", "x86_64-efi": "grub-efi-amd64-bin", "arm64-efi": "grub-efi-arm64-bin"}.get(
            platform, "GRUB"
        )
        raise DiskError(f"{src} has no GRUB {platform} modules: install {package} in the image")
    return src


def _copy_grub_modules(src: Path, dst: Path) -> None:
    """Copy what grub-install copies to /boot/grub/<platform>: modules, their lists, efiemu."""
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and (
            f.suffix in (".mod", ".lst")
            or f.name in ("modinfo.sh", "boot.img")
            or (f.name.startswith("efiemu") and f.suffix == ".o")
        ):
            shutil.copyfile(f, dst / f.name)
            (dst / f.name).chmod(0o644)


def write_boot_files(pack_layer: Path, tree: Path, layout: DiskLayout) -> None:
    """Write /etc/fstab, /boot/grub/grub.cfg, /boot/grub/<platform>/ and /boot/efi into `pack_layer`."""
    pack_layer.mkdir(parents=True, exist_ok=True)
    if any(pack_layer.iterdir()):
        raise DiskError(f"the pack layer {pack_layer} is not empty")
    _, _, version = kernel_in(tree)
    sources = {platform: _grub_dir(tree, platform) for platform in layout.grub_platforms}
    defaults = grub_defaults(tree)
    try:
        timeout = int(defaults.get("GRUB_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        timeout = DEFAULT_TIMEOUT

    etc = pack_layer / "etc"
    etc.mkdir(mode=0o755)
    (etc / "fstab").write_text(fstab_text(layout))
    (etc / "fstab").chmod(0o644)
    boot = pack_layer / "boot"
    boot.mkdir(mode=0o755)
    (boot / "efi").mkdir(mode=0o755)
    grub = boot / "grub"
    grub.mkdir(mode=0o755)
    cfg = grub_cfg_text(
        layout=layout, version=version, cmdline=cmdline_from_defaults(defaults), title=_os_name(tree), timeout=timeout
    )
    (grub / "grub.cfg").write_text(cfg)
    (grub / "grub.cfg").chmod(0o644)
    for platform, src in sources.items():
        _copy_grub_modules(src, grub / platform)


# --------------------------------------------------------------------------------------------------
# BIOS boot code


def patch_bios_boot(mbr: bytes, boot_img: bytes, core_img: bytes, core_lba: int) -> tuple[bytes, bytes]:
    """Return (sector 0, core.img) as grub-bios-setup would write them for core.img at `core_lba`.

    Sector 0 keeps the disk's disk signature and protective partition table; boot.img gets the LBA of
    core.img and the hard-disk drive check. core.img's first sector (diskboot.img) gets the LBA of the
    rest of core.img in its blocklist; grub-mkimage has already filled in the length.
    """
    if len(mbr) != SECTOR or mbr[510:512] != b"\x55\xaa":
        raise DiskError("sector 0 of the disk is not an MBR (missing 55 AA)")
    if mbr[PART_TABLE + 4] != PROTECTIVE_TYPE:
        raise DiskError("sector 0 of the disk has no protective GPT partition (type EE)")
    if len(boot_img) != SECTOR or boot_img[510:512] != b"\x55\xaa":
        raise DiskError("boot.img is not a 512-byte boot sector")
    sectors = -(-len(core_img) // SECTOR)
    if sectors < 2:
        raise DiskError(f"core.img is too small ({len(core_img)} bytes)")
    start, length, segment = struct.unpack_from("<QHH", core_img, BLOCKLIST)
    if length != sectors - 1 or segment != BLOCKLIST_SEGMENT:
        raise DiskError(
            f"core.img's blocklist is unexpected (start {start}, length {length}, segment "
            f"{segment:#x}; expected length {sectors - 1}, segment {BLOCKLIST_SEGMENT:#x}): "
            "is grub-mkimage's diskboot.img from another GRUB version?"
        )
    if any(core_img[BLOCKLIST - 12 : BLOCKLIST]):
        raise DiskError("core.img has a second blocklist entry; expected a terminator")

    boot = bytearray(boot_img[:BOOT_CODE_END])
    struct.pack_into("<Q", boot, KERNEL_SECTOR, core_lba)
    boot[BOOT_DRIVE] = 0xFF
    # as grub-setup does for hard disks: nop the jmp so that a bogus %dl from the BIOS is forced to 0x80
    boot[DRIVE_CHECK : DRIVE_CHECK + 2] = b"\x90\x90"
    sector0 = bytes(boot) + mbr[BOOT_CODE_END:]

    core = bytearray(core_img)
    struct.pack_into("<Q", core, BLOCKLIST, core_lba + 1)
    return sector0, bytes(core)


# --------------------------------------------------------------------------------------------------
# size check


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
            f"needs about {_human(needed)} ({_human(tree_bytes)} in {tree_inodes} files, plus ext4 "
            f"overhead) but the root partition of a {_human(layout.size)} disk has room for about "
            f"{_human(capacity)} after ext4 metadata and the 5 % root reserve"
        )
    else:
        problem = (
            f"has {tree_inodes} files but the root filesystem of a {_human(layout.size)} disk has only {inodes} inodes"
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


def _human(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB"


# --------------------------------------------------------------------------------------------------
# step 2: the disk


REQUIRED_TOOLS = {
    "sgdisk": "gdisk",
    "mkfs.fat": "dosfstools",
    "mmd": "mtools",
    "mcopy": "mtools",
    "mkfs.ext4": "e2fsprogs (>= 1.47)",
    "e2fsck": "e2fsprogs",
    "grub-mkimage": "grub-common",
    "du": "coreutils",
}

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


def _require_tools() -> None:
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise DiskError(f"packing a disk needs these host packages: {', '.join(missing)}")


def _early_config(layout: DiskLayout) -> str:
    return (
        f"search --no-floppy --fs-uuid --set=root {layout.root_uuid}\n"
        "set prefix=($root)/boot/grub\n"
        "configfile $prefix/grub.cfg\n"
    )


def _modules(moddir: Path, wanted: Iterable[str]) -> list[str]:
    present = [m for m in wanted if (moddir / f"{m}.mod").is_file()]
    missing = [m for m in _ESSENTIAL_MODULES if m not in present]
    if missing:
        raise DiskError(f"{moddir} lacks the GRUB modules {', '.join(missing)}")
    return present


def make_grub_image(merged: Path, platform: str, out: Path, early_cfg: Path) -> None:
    """grub-mkimage a core.img / EFI binary for `platform` from the tree's modules with our early config."""
    moddir = _grub_dir(merged, platform)
    wanted = _BIOS_MODULES if platform == "i386-pc" else _EFI_MODULES
    run(
        [
            "grub-mkimage",
            "-O",
            platform,
            "-d",
            moddir,
            "-o",
            out,
            "-c",
            early_cfg,
            "-p",
            "/boot/grub",
            *_modules(moddir, wanted),
        ],
        quiet=True,
        timeout=120,
        what=f"grub-mkimage -O {platform}",
    )


def _sgdisk(disk: Path, layout: DiskLayout) -> None:
    args: list[str] = ["sgdisk", "--clear", f"--disk-guid={layout.guid('disk')}"]
    for p in layout.partitions:
        n = p.number
        args += [
            f"--new={n}:{p.first_sector}:{p.last_sector}",
            f"--typecode={n}:{p.type_code}",
            f"--change-name={n}:{p.name}",
            f"--partition-guid={n}:{layout.guid(f'part{n}')}",
        ]
    run([*args, str(disk)], quiet=True, timeout=60, what="write the GPT (sgdisk)")


def _mtools_env() -> dict[str, str]:
    return {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null", "LC_ALL": "C"}


def _make_esp(disk: Path, layout: DiskLayout, efi_image: Path) -> None:
    esp = layout.esp
    # mkfs.fat sizes clusters by the whole file, not by BLOCKS: give FAT32 enough clusters explicitly
    run(
        [
            "mkfs.fat",
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
    run(
        ["mmd", "-i", image, "::/EFI", "::/EFI/BOOT", "::/EFI/debian"],
        env=env,
        quiet=True,
        timeout=60,
        what="make directories on the ESP (mmd)",
    )
    loader = layout.platform.efi_loader
    grub_name = "grub" + loader.removeprefix("BOOT").lower()  # grubx64.efi / grubaa64.efi
    for target in (f"::/EFI/BOOT/{loader}", f"::/EFI/debian/{grub_name}"):
        run(
            ["mcopy", "-i", image, "-m", str(efi_image), target],
            env=env,
            quiet=True,
            timeout=60,
            what=f"copy GRUB to {target} on the ESP (mcopy)",
        )


def _install_bios_boot(disk: Path, layout: DiskLayout, merged: Path, core_img: Path) -> None:
    bios = layout.bios_boot
    assert bios is not None
    core = core_img.read_bytes()
    if len(core) > bios.size:
        raise DiskError(f"core.img ({len(core)} bytes) does not fit into the {_human(bios.size)} BIOS boot partition")
    boot_img = (_grub_dir(merged, "i386-pc") / "boot.img").read_bytes()
    with open(disk, "r+b") as fh:
        mbr = fh.read(SECTOR)
        sector0, core = patch_bios_boot(mbr, boot_img, core, bios.first_sector)
        fh.seek(bios.start)
        fh.write(core)
        fh.seek(0)
        fh.write(sector0)


def _make_root(disk: Path, layout: DiskLayout, merged: Path, workdir: Path) -> None:
    conf = workdir / "mke2fs.conf"
    conf.write_text(MKE2FS_CONF)
    # The file is fresh and sparse, so its blocks read as zeros: nothing needs discarding or zeroing.
    extended = f"offset={layout.root.start},nodiscard,assume_storage_prezeroed=1"
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
        env={**os.environ, "MKE2FS_CONFIG": str(conf), "LC_ALL": "C"},
        timeout=1800,
        what="make the root filesystem (mkfs.ext4 -d)",
    )


def _verify(disk: Path, layout: DiskLayout) -> None:
    gpt = output(["sgdisk", "--verify", str(disk)], timeout=60, what="verify the GPT (sgdisk --verify)")
    if "No problems found" not in gpt:
        raise DiskError(f"sgdisk --verify found problems in {disk}:\n{gpt}")
    run(
        ["e2fsck", "-f", "-n", f"{disk}?offset={layout.root.start}"],
        quiet=True,
        timeout=600,
        what="check the root filesystem (e2fsck -fn)",
    )


def _check_boot_files(merged: Path, layout: DiskLayout) -> None:
    cfg = merged / "boot/grub/grub.cfg"
    fstab = merged / "etc/fstab"
    if (
        not cfg.is_file()
        or layout.root_uuid not in cfg.read_text(errors="replace")
        or not fstab.is_file()
        or layout.root_uuid not in fstab.read_text(errors="replace")
    ):
        raise DiskError(
            f"{merged} lacks the boot files for root UUID {layout.root_uuid}: "
            "mount write_boot_files()'s pack layer over the tree before assemble()"
        )


def assemble(merged: Path, out: Path, layout: DiskLayout, *, workdir: Path) -> PackResult:
    """Build the raw disk `out` from `merged` (the tree with the pack layer on top).

    Writes `out.partial` and renames it into place only when everything, checks included, succeeded.
    Scratch files (GRUB images, configs) go to `workdir` and are removed again.
    """
    started = time.monotonic()
    kernel, initrd, version = kernel_in(merged)
    tree_bytes, tree_inodes = measure_tree(merged)
    check_fits(tree_bytes, tree_inodes, layout)
    _require_tools()
    _check_boot_files(merged, layout)
    for platform in layout.grub_platforms:
        _grub_dir(merged, platform)

    workdir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    early = workdir / "early.cfg"
    early.write_text(_early_config(layout))
    efi_image = workdir / layout.platform.efi_loader
    core_img = workdir / "core.img"
    try:
        partial.unlink(missing_ok=True)
        with open(partial, "wb") as fh:
            fh.truncate(layout.size)
        # sgdisk sync()s the whole host and then sleeps a second; it only writes the first and last
        # 34 sectors, so it runs alongside the filesystems, which live strictly between them.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sgdisk") as pool:
            gpt = pool.submit(_sgdisk, partial, layout)
            try:
                make_grub_image(merged, layout.platform.efi_platform, efi_image, early)
                _make_esp(partial, layout, efi_image)
                if layout.bios_boot is not None:
                    make_grub_image(merged, "i386-pc", core_img, early)
                _make_root(partial, layout, merged, workdir)
            finally:
                wait([gpt])
            gpt.result()
        if layout.bios_boot is not None:
            # after the GPT: the MBR keeps sgdisk's protective partition table
            _install_bios_boot(partial, layout, merged, core_img)
        _verify(partial, layout)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        for scratch in (early, efi_image, core_img, workdir / "mke2fs.conf"):
            scratch.unlink(missing_ok=True)
    log.info(
        "packed %s (%s, root %s of %s used by the tree) in %.1f s",
        out,
        _human(layout.size),
        _human(tree_bytes),
        _human(layout.root_fs_size),
        time.monotonic() - started,
    )
    rel_kernel = kernel.relative_to(merged).as_posix()
    rel_initrd = initrd.relative_to(merged).as_posix()
    return PackResult(
        path=out,
        size=layout.size,
        root_uuid=layout.root_uuid,
        esp_serial=layout.esp_serial,
        kernel=rel_kernel,
        initrd=rel_initrd,
        kernel_version=version,
        cmdline=_linux_args(layout, grub_cmdline(merged)),
    )


def pack(tree: Path, out: Path, layout: DiskLayout, *, workdir: Path) -> PackResult:
    """Both steps for a plain tree: boot files into workdir/pack-layer, overlay, assemble, unmount."""
    pack_layer = workdir / "pack-layer"
    if pack_layer.exists():
        shutil.rmtree(pack_layer)
    write_boot_files(pack_layer, tree, layout)
    with MountStack(workdir) as mounts:
        merged = mounts.overlay([pack_layer, tree], workdir / "merged")
        return assemble(merged, out, layout, workdir=workdir / "assemble")
