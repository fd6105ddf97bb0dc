"""GRUB: what /etc/default/grub asks for, grub.cfg, the module directories and the GRUB images.

kiln writes grub.cfg itself (no grub-mkconfig, no chroot): the kernel command line comes from the tree's
/etc/default/grub and /etc/default/grub.d/*.cfg. The core.img (BIOS) and the EFI binary are made with
the host's `grub-mkimage` from the tree's own modules, with an early config that finds the root
filesystem by UUID.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from kiln.host.run import run
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
    """The tree's GRUB modules for `platform` (usr/lib/grub/<platform>); DiskError naming the package if absent."""
    src = tree / "usr/lib/grub" / platform
    if not (src / "kernel.img").is_file():
        package = {"i386-pc": "grub-pc-bin", "x86_64-efi": "grub-efi-amd64-bin", "arm64-efi": "grub-efi-arm64-bin"}.get(
            platform, "GRUB"
        )
        raise DiskError(f"{src} has no GRUB {platform} modules: install {package} in the image")
    return src


def copy_grub_modules(src: Path, dst: Path) -> None:
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
