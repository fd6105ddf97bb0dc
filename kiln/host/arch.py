"""The host's architecture, and foreign-architecture chroots: register qemu-user-static with binfmt_misc when
it is missing."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

from kiln.host.mounts import ensure_binfmt_misc
from kiln.model.errors import KilnError
from kiln.model.facts import arch_of_machine, machine_of

log = logging.getLogger("kiln.binfmt")

BINFMT_CONF = Path("/usr/lib/binfmt.d")


def host_arch() -> str:
    """The host's architecture in Debian's naming."""
    return arch_of_machine(platform.machine())


def ensure_binfmt(arch: str) -> None:
    """Make binaries of `arch` runnable in a chroot on this host (no-op for the host's own arch)."""
    if arch == host_arch():
        return
    name = f"qemu-{machine_of(arch)}"
    directory = ensure_binfmt_misc()
    entry = directory / name
    if entry.exists() and entry.read_text().startswith("enabled"):
        return
    conf = BINFMT_CONF / f"{name}.conf"
    if not conf.is_file():
        raise KilnError(f"building {arch} images on {host_arch()} needs qemu-user-static ({conf} is missing; "
                        "apt-get install qemu-user-static)")
    line = next(ln for ln in conf.read_text().splitlines() if ln.startswith(":"))
    interpreter = Path(line.split(":")[6])
    if not interpreter.exists():
        raise KilnError(f"building {arch} images needs {interpreter} (apt-get install qemu-user-static)")
    if entry.exists():  # registered but disabled
        entry.write_text("1")
    else:
        (directory / "register").write_text(line)
    log.info("registered %s with binfmt_misc for %s chroots", interpreter, arch)
