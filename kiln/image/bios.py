"""BIOS boot code, written with ordinary file I/O: what `grub-bios-setup` does to sector 0 and core.img."""

from __future__ import annotations

import struct
from pathlib import Path

from kiln.image.grub import grub_dir
from kiln.image.layout import SECTOR, DiskLayout, human_size
from kiln.model.errors import DiskError

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


def install_bios_boot(disk: Path, layout: DiskLayout, merged: Path, core_img: Path) -> None:
    """Write core.img into the BIOS boot partition and the tree's boot.img into sector 0, both patched."""
    bios = layout.bios_boot
    assert bios is not None
    core = core_img.read_bytes()
    if len(core) > bios.size:
        raise DiskError(
            f"core.img ({len(core)} bytes) does not fit into the {human_size(bios.size)} BIOS boot partition"
        )
    boot_img = (grub_dir(merged, "i386-pc") / "boot.img").read_bytes()
    with open(disk, "r+b") as fh:
        mbr = fh.read(SECTOR)
        sector0, core = patch_bios_boot(mbr, boot_img, core, bios.first_sector)
        fh.seek(bios.start)
        fh.write(core)
        fh.seek(0)
        fh.write(sector0)
