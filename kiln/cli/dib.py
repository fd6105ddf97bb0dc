"""`kiln dib`: diskimage-builder's `disk-image-create` command line, run by kiln.

A line from a DIB how-to works as it is (`kiln dib -a amd64 -o debian-bookworm-amd64 vm cloud-init-cfg
debian`), with the DIB environment variables it reads (DIB_RELEASE, DIB_DISTRIBUTION_MIRROR,
ELEMENTS_PATH, DIB_* for the elements). What kiln does not support is an error naming the option.
kiln's own boot test can be steered without changing the line: KILN_BOOT_FIRMWARE=bios,uefi and
KILN_BOOT_ROOT_LOGIN=1 (or the kiln-only flags --firmware, --no-boot-test).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from kiln.build import elements as kiln_elements
from kiln.cli.common import add_cache, dib_variables
from kiln.model import facts
from kiln.model.errors import KilnError, SpecError
from kiln.model.facts import BOOTSTRAPPED
from kiln.model.spec import ImageSpec, spec_from_dict

# the distribution elements of a DIB line: the distro they build. The element itself stays on the line, as in
# DIB: `debian` brings more than the `debian-minimal` base every Debian spec has (sshd, cloud-init, …)
DISTRO_ELEMENTS = {"debian": "debian", "debian-minimal": "debian", "ubuntu": "ubuntu", "ubuntu-minimal": "ubuntu",
                   "fedora": "fedora", "centos": "centos", "rocky": "rocky", "almalinux": "almalinux"}
ARCHES = {**{a: a for a in facts.ARCHES}, **facts.MACHINES}  # DIB's -a takes either naming
TYPES = {"qcow2": "qcow2", "raw": "raw", "vmdk": "vmdk", "vdi": "vdi", "vhd": "vhd", "vhdx": "vhdx"}
UNSUPPORTED = ("--mkfs-options", "--root-label", "--ramdisk-element", "--install-type", "--docker-target",
               "--max-online-resize", "--min-tmpfs", "--mkfs-journal-size", "--image-extra-size")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's default exits 2 with usage; keep kiln's error style
        raise SpecError(f"kiln dib: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kiln dib", description="Build an image from a disk-image-create command line.")
    p.add_argument("-a", dest="arch", default=os.environ.get("ARCH", "amd64"), help="architecture (amd64, arm64)")
    p.add_argument("-o", dest="output", default="image", help="image name, optionally with a directory")
    p.add_argument("-t", dest="types", default="qcow2", help="comma-separated image types")
    p.add_argument("-x", dest="trace", action="count", default=0, help="trace hooks (set -x)")
    p.add_argument("-u", dest="uncompressed", action="store_true", help="do not compress the qcow2 image")
    p.add_argument("-c", dest="clear_env", action="store_true", help="accepted; kiln always scrubs the environment")
    p.add_argument("-n", dest="skip_base", action="store_true", help="accepted; kiln has no 'base' element")
    p.add_argument("-p", dest="packages", action="append", default=[], help="comma-separated extra packages")
    p.add_argument("--checksum", action="store_true", help="write .md5 and .sha256 files beside each image")
    p.add_argument("--image-size", help="image size in GB")
    p.add_argument("--image-cache", help="DIB_IMAGE_CACHE for elements that download things")
    p.add_argument("--offline", action="store_true", help="DIB_OFFLINE=1 for the elements")
    p.add_argument("--qemu-img-options", help="options for qemu-img convert -o")
    p.add_argument("--logfile", help="also write the build log to this file")
    p.add_argument("--no-tmpfs", action="store_true", help="accepted; kiln uses no tmpfs")
    for opt in UNSUPPORTED:
        p.add_argument(opt, dest=f"unsupported_{opt.strip('-').replace('-', '_')}", help=argparse.SUPPRESS)
    # kiln's own additions
    p.add_argument("--no-boot-test", action="store_true", help="kiln: skip the QEMU boot test")
    p.add_argument("--firmware", help="kiln: boot test firmware (bios,uefi)")
    add_cache(p)
    p.add_argument("--dib-elements", action="store_true",
                   help="kiln: put the installed diskimage-builder package's elements on the search path")
    p.add_argument("--break", dest="break_at", help="kiln: drop into a shell in the chroot, e.g. before-install")
    p.add_argument("elements", nargs="+", help="element names")
    return p


def _has_sshd(distro: str, names: list[str], env: dict[str, str], dib_elements: bool) -> bool:
    """Whether the line's elements bring openssh-server (False when they do not resolve: the build says why)."""
    try:
        resolved = kiln_elements.resolve_image(distro, names, env_path=env.get("ELEMENTS_PATH", ""),
                                                  dib_elements=dib_elements)
    except KilnError:
        return False
    return "openssh-server" in resolved.names


def parse(argv: list[str], env: dict[str, str] | None = None) -> tuple[ImageSpec, dict[str, Any]]:
    """The ImageSpec and run options a disk-image-create command line asks for."""
    env = dict(os.environ) if env is None else env
    args = parser().parse_args(argv)
    for opt in UNSUPPORTED:
        if getattr(args, f"unsupported_{opt.strip('-').replace('-', '_')}") is not None:
            raise SpecError(f"kiln dib: {opt} is not supported by kiln")
    arch = ARCHES.get(args.arch)
    if arch is None:
        known = ", ".join(sorted(ARCHES))
        raise SpecError(f"kiln dib: -a {args.arch}: unsupported architecture (kiln builds {known})")
    distros = [e for e in args.elements if e in DISTRO_ELEMENTS]
    if not distros:
        raise SpecError(f"kiln dib: no distribution element among {' '.join(args.elements)} "
                        f"(kiln builds: {', '.join(sorted(DISTRO_ELEMENTS))})")
    if len({DISTRO_ELEMENTS[d] for d in distros}) > 1:
        raise SpecError(f"kiln dib: the line names two distributions ({' '.join(distros)}); keep one")
    elements = list(args.elements)
    formats = []
    for t in args.types.split(","):
        if t not in TYPES:
            raise SpecError(f"kiln dib: -t {t}: image type not supported (kiln writes {', '.join(TYPES)})")
        formats.append(TYPES[t])
    out = Path(args.output)
    hook_env: dict[str, str] = {}
    if args.trace:
        hook_env["DIB_DEBUG_TRACE"] = str(args.trace)
    if args.offline:
        hook_env["DIB_OFFLINE"] = "1"
    if args.image_cache:
        hook_env["DIB_IMAGE_CACHE"] = args.image_cache
    distro = DISTRO_ELEMENTS[distros[0]]
    dib = dib_variables(env, release=None, size=f"{args.image_size}G" if args.image_size else None,
                        where="the kiln dib line")
    release = dib.get("release") or facts.DEFAULT_RELEASES.get(distro)
    if not release:
        raise SpecError(f"kiln dib: element {distros[0]}: set DIB_RELEASE (e.g. DIB_RELEASE=41)")
    data: dict[str, Any] = {
        "name": out.name,
        "distro": distro,
        "release": release,
        "arch": arch,
        "elements": elements,
        "packages": [p for group in args.packages for p in group.split(",") if p],
        "env": hook_env,
        "formats": formats,
        "compression": "none" if args.uncompressed else "zstd",
    }
    if distro not in BOOTSTRAPPED:
        data["base"] = {}  # as DIB's element does: start from the distribution's published cloud image
    if args.image_size or "size" in dib:
        data["size"] = f"{args.image_size}G" if args.image_size else dib["size"]
    if args.qemu_img_options:
        data["qemu_img_options"] = args.qemu_img_options
    boot: dict[str, Any] = {}
    firmware = args.firmware or env.get("KILN_BOOT_FIRMWARE")
    if firmware:
        boot["firmware"] = [f for f in firmware.split(",") if f]
    if env.get("KILN_BOOT_ROOT_LOGIN", "") not in ("", "0", "no", "false"):
        boot["root_login"] = True
        # an image with sshd (DIB's debian and ubuntu bring it) is logged in to over SSH as well, as the
        # line's user would: with the password injected through user-data
        boot["ssh_login"] = _has_sshd(distro, elements, env, args.dib_elements)
    if boot:
        data["boot_test"] = boot
    spec = spec_from_dict(data, "kiln dib command line")
    options = {
        "output": str(out.parent) if str(out.parent) else ".",
        "boot_test": not args.no_boot_test,
        "cache": args.cache,
        "checksum": args.checksum,
        "logfile": args.logfile,
        "dib_elements": args.dib_elements,
        "break_at": args.break_at,
    }
    return spec, options
