"""GRUB: what /etc/default/grub asks for, grub.cfg, the module directories and the GRUB images.

kiln writes grub.cfg itself (no grub-mkconfig, no chroot): the kernel command line comes from the tree's
/etc/default/grub and /etc/default/grub.d/*.cfg. The core.img (BIOS) and the EFI binary are made with
the host's `grub-mkimage` from the tree's own modules, with an early config that finds the root
filesystem by UUID.
"""

from __future__ import annotations

import shutil
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kiln.host.run import run
from kiln.host.treepath import regular_file_in_root, resolve_in_root
from kiln.image.layout import DiskLayout
from kiln.image.shellvars import parse_shell_assignments
from kiln.model.errors import DiskError

DEFAULT_CMDLINE = "console=tty0 console=ttyS0,115200n8"
DEFAULT_TIMEOUT = 1

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


def grub_defaults(tree: Path) -> dict[str, str]:
    """TREE/etc/default/grub, then TREE/etc/default/grub.d/*.cfg in order, as grub-mkconfig reads them (the
    tree's links resolved inside the tree: a link to a host file reads the tree's file of that name, if any)."""
    confd = resolve_in_root(tree, "etc/default/grub.d")
    names = sorted(p.name for p in confd.glob("*.cfg")) if confd.is_dir() and not confd.is_symlink() else []
    files = [regular_file_in_root(tree, "etc/default/grub"),
             *(regular_file_in_root(tree, f"etc/default/grub.d/{n}") for n in names)]
    values: dict[str, str] = {}
    for f in files:
        if f is not None:
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


def linux_args(layout: DiskLayout, cmdline: str) -> str:
    """What follows the kernel path on GRUB's `linux` line: root=UUID=… ro, then the command line."""
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
  linux /boot/vmlinuz-{version} {linux_args(layout, cmdline)}
  echo 'Loading initial ramdisk ...'
  initrd /boot/initrd.img-{version}
}}
"""


def grub_dir(tree: Path, platform: str) -> Path:
    """The tree's GRUB modules for `platform` (usr/lib/grub/<platform>, its links resolved inside the tree);
    DiskError naming the package if absent."""
    src = resolve_in_root(tree, f"usr/lib/grub/{platform}")
    if regular_file_in_root(tree, f"usr/lib/grub/{platform}/kernel.img") is None:
        package = {"i386-pc": "grub-pc-bin", "x86_64-efi": "grub-efi-amd64-bin", "arm64-efi": "grub-efi-arm64-bin"}.get(
            platform, "GRUB"
        )
        raise DiskError(f"{src} has no GRUB {platform} modules: install {package} in the image")
    return src


def copy_grub_modules(src: Path, dst: Path) -> None:
    """Copy what grub-install copies to /boot/grub/<platform>: modules, their lists, efiemu."""
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        # a link among the modules is not followed: it could name any host file
        if stat.S_ISREG(f.lstat().st_mode) and (
            f.suffix in (".mod", ".lst")
            or f.name in ("modinfo.sh", "boot.img")
            or (f.name.startswith("efiemu") and f.suffix == ".o")
        ):
            shutil.copyfile(f, dst / f.name)
            (dst / f.name).chmod(0o644)


# the distribution's signed boot chain, per EFI platform: shim (signed by the UEFI CA) and GRUB (signed by the
# distribution, its modules built in); shim lets GRUB boot only kernels the distribution signed
SIGNED_CHAIN = {
    "x86_64-efi": ("usr/lib/shim/shimx64.efi.signed", "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
                   "usr/lib/shim/mmx64.efi.signed"),
}


@dataclass(frozen=True)
class SignedChain:
    shim: Path
    grub: Path
    mok_manager: Path | None


def signed_chain(tree: Path, platform: str) -> SignedChain | None:
    """The tree's signed shim and GRUB for `platform`, when it has both (shim-signed, grub-efi-*-signed).

    Read as the tree names them: its links are resolved inside the tree, never to a host file."""
    names = SIGNED_CHAIN.get(platform)
    if names is None:
        return None
    shim, grub, mok = (regular_file_in_root(tree, n) for n in names)
    return SignedChain(shim, grub, mok) if shim is not None and grub is not None else None


def esp_files(layout: DiskLayout, *, efi_image: Path | None, chain: SignedChain | None,
              early_cfg: Path) -> list[tuple[Path, str]]:
    """(source, ESP path) of the boot loader's files: shim as the removable-media loader with the signed GRUB
    beside it and the early config where that GRUB looks for it; else kiln's own GRUB image."""
    loader = layout.platform.efi_loader
    grub_name = "grub" + loader.removeprefix("BOOT").lower()  # grubx64.efi / grubaa64.efi
    if chain is None:
        if efi_image is None:
            raise DiskError("no GRUB EFI image and no signed chain to put on the ESP")
        return [(efi_image, f"EFI/BOOT/{loader}"), (efi_image, f"EFI/debian/{grub_name}")]
    shim_name = "shim" + loader.removeprefix("BOOT").lower()
    files = [(chain.shim, f"EFI/BOOT/{loader}"), (chain.grub, f"EFI/BOOT/{grub_name}"),
             (chain.shim, f"EFI/debian/{shim_name}"), (chain.grub, f"EFI/debian/{grub_name}"),
             # the signed GRUB reads grub.cfg from its vendor directory, else from the one it was loaded from
             (early_cfg, "EFI/debian/grub.cfg"), (early_cfg, "EFI/BOOT/grub.cfg")]
    if chain.mok_manager is not None:
        mok = "mm" + loader.removeprefix("BOOT").lower()
        files += [(chain.mok_manager, f"EFI/BOOT/{mok}"), (chain.mok_manager, f"EFI/debian/{mok}")]
    return files


def early_config(layout: DiskLayout) -> str:
    """The config built into the GRUB images: find the root filesystem by UUID and read its grub.cfg."""
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
    moddir = grub_dir(merged, platform)
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
