"""Turn a root tree into a bootable raw GPT disk without device-mapper, vfat mounts or loop partitions.

The disk is assembled as a plain file: `sgdisk` writes the GPT, `mkfs.fat --offset` and `mtools` build
the EFI system partition in place, `mkfs.ext4 -E offset=… -d TREE` fills the root partition, and the
BIOS boot code is written with ordinary file I/O (what `grub-install`/`grub-bios-setup` would do).

Two steps, because the tree is a read-only overlay of cached layers:

1. `write_boot_files()` puts `/etc/fstab`, `/boot/grub/grub.cfg` and the GRUB module directories into
   an empty "pack layer" directory;
2. the caller mounts the pack layer over the tree (read-only overlay) and `assemble()` builds the disk
   from that merged view (kiln.image.pack does both).

The pieces follow diskimage-builder's block_device levels: kiln.image.layout (level 1: the partition
layout and the GPT), kiln.image.filesystems (levels 2 and 4: ext4, the ESP, the size check, fstab),
kiln.image.grub and kiln.image.bios (the boot loader). This module reads the tree and runs them in order.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from kiln.host.run import output, run
from kiln.image.bios import install_bios_boot
from kiln.image.filesystems import check_fits, fstab_text, make_esp, make_root, measure_tree
from kiln.image.grub import (
    DEFAULT_TIMEOUT,
    cmdline_from_defaults,
    copy_grub_modules,
    early_config,
    esp_files,
    grub_cfg_text,
    grub_cmdline,
    grub_defaults,
    grub_dir,
    linux_args,
    make_grub_image,
    signed_chain,
)
from kiln.image.layout import DiskLayout, human_size, write_gpt
from kiln.model.errors import DiskError
from kiln.sources.extract import read_os_release

log = logging.getLogger("kiln.disk")

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
    secure_boot: bool = False  # the ESP boots the distribution's signed chain (shim, signed GRUB)


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


def _os_name(tree: Path) -> str:
    """The boot menu's title: the tree's os-release PRETTY_NAME, read without leaving the tree."""
    values = read_os_release(tree)
    return values.get("PRETTY_NAME") or values.get("NAME") or "Linux"


# --------------------------------------------------------------------------------------------------
# step 1: the files the root filesystem needs but the tree must not be changed for


def write_boot_files(pack_layer: Path, tree: Path, layout: DiskLayout) -> None:
    """Write /etc/fstab, /boot/grub/grub.cfg, /boot/grub/<platform>/ and /boot/efi into `pack_layer`."""
    pack_layer.mkdir(parents=True, exist_ok=True)
    if any(pack_layer.iterdir()):
        raise DiskError(f"the pack layer {pack_layer} is not empty")
    _, _, version = kernel_in(tree)
    sources = {platform: grub_dir(tree, platform) for platform in layout.grub_platforms}
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
        copy_grub_modules(src, grub / platform)


# --------------------------------------------------------------------------------------------------
# step 2: the disk


def _require_tools() -> None:
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise DiskError(f"packing a disk needs these host packages: {', '.join(missing)}")


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


def assemble(merged: Path, out: Path, layout: DiskLayout, *, workdir: Path,
             source_date_epoch: int | None = None) -> PackResult:
    """Build the raw disk `out` from `merged` (the tree with the pack layer on top).

    Writes `out.partial` and renames it into place only when everything, checks included, succeeded.
    Scratch files (GRUB images, configs) go to `workdir` and are removed again. With `source_date_epoch`,
    every date in the file systems is that time or earlier, so the same tree packs to the same bytes.
    """
    started = time.monotonic()
    kernel, initrd, version = kernel_in(merged)
    tree_bytes, tree_inodes = measure_tree(merged)
    check_fits(tree_bytes, tree_inodes, layout)
    _require_tools()
    _check_boot_files(merged, layout)
    for platform in layout.grub_platforms:
        grub_dir(merged, platform)

    workdir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    early = workdir / "early.cfg"
    early.write_text(early_config(layout))
    efi_image = workdir / layout.platform.efi_loader
    core_img = workdir / "core.img"
    chain = signed_chain(merged, layout.platform.efi_platform)
    if chain is not None:
        log.info("the ESP boots the distribution's signed chain (shim, signed GRUB): Secure Boot capable")
    try:
        partial.unlink(missing_ok=True)
        with open(partial, "wb") as fh:
            fh.truncate(layout.size)
        # sgdisk sync()s the whole host and then sleeps a second; it only writes the first and last
        # 34 sectors, so it runs alongside the filesystems, which live strictly between them.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sgdisk") as pool:
            gpt = pool.submit(write_gpt, partial, layout)
            try:
                if chain is None:
                    make_grub_image(merged, layout.platform.efi_platform, efi_image, early)
                make_esp(partial, layout, esp_files(layout, efi_image=efi_image, chain=chain, early_cfg=early),
                         workdir=workdir, mtime=source_date_epoch)
                if layout.bios_boot is not None:
                    make_grub_image(merged, "i386-pc", core_img, early)
                make_root(partial, layout, merged, workdir, source_date_epoch=source_date_epoch)
            finally:
                wait([gpt])
            gpt.result()
        if layout.bios_boot is not None:
            # after the GPT: the MBR keeps sgdisk's protective partition table
            install_bios_boot(partial, layout, merged, core_img)
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
        human_size(layout.size),
        human_size(tree_bytes),
        human_size(layout.root_fs_size),
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
        cmdline=linux_args(layout, grub_cmdline(merged)),
        secure_boot=chain is not None,
    )
