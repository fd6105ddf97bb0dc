"""Level 1 of the disk, as diskimage-builder's block_device calls it: the partition layout and the GPT.

Layout (like Debian's cloud images): partition 14 = BIOS boot (1 MiB at 1 MiB, amd64 only), 15 = ESP
up to 128 MiB, 1 = Linux root filling the rest, last on disk so that cloud-init's growpart can grow it.
`sgdisk` writes the GPT into the disk file; the partitions' GUIDs are derived from the root UUID.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from kiln.host.run import run
from kiln.model.errors import DiskError
from kiln.model.facts import firmware_of

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


@dataclass(frozen=True)
class Arch:
    """What differs between architectures: GRUB platforms and the removable-media EFI loader name."""

    name: str
    efi_platform: str
    efi_loader: str
    bios: bool


ARCHES: dict[str, Arch] = {
    "amd64": Arch("amd64", "x86_64-efi", "BOOTX64.EFI", bios="bios" in firmware_of("amd64")),
    "arm64": Arch("arm64", "arm64-efi", "BOOTAA64.EFI", bios="bios" in firmware_of("arm64")),
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
            f"disk size {human_size(size)} is too small: the layout needs at least "
            f"{human_size(ROOT_START + MIN_ROOT + GPT_BACKUP)}"
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


def human_size(n: int) -> str:
    """A size for messages: "1.5 GiB", "64 MiB"."""
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB"


def write_gpt(disk: Path, layout: DiskLayout) -> None:
    """Write the layout's GPT (and the protective MBR) into the disk file with sgdisk."""
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

