"""Distribution and architecture facts: the one place kiln keeps them.

Architectures are named as Debian names them (amd64, arm64); everything else (the kernel's `uname -m`,
QEMU's binary names, Glance's `architecture` property) is mapped from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kiln.model.errors import SpecError


@dataclass(frozen=True)
class ArchFacts:
    name: str  # Debian's: amd64, arm64
    machine: str  # the kernel's uname -m, QEMU's system binary suffix, Glance's `architecture`
    firmware: tuple[str, ...]  # what its machines boot with: arm64 machines have no BIOS, only UEFI
    serial: str  # the serial console's device: what QEMU's -serial and a cloud's console log read
    secure_boot: bool = False  # kiln's boot test has a Secure Boot firmware (OVMF with Microsoft's keys) for it


ARCHES: dict[str, ArchFacts] = {a.name: a for a in (
    ArchFacts("amd64", "x86_64", ("bios", "uefi"), "ttyS0", secure_boot=True),
    ArchFacts("arm64", "aarch64", ("uefi",), "ttyAMA0"),
)}
MACHINES: dict[str, str] = {a.machine: a.name for a in ARCHES.values()} | {"arm64": "arm64"}  # macOS says arm64


def arch_of_machine(machine: str) -> str:
    """`uname -m` (x86_64, aarch64) as Debian's architecture name; unknown machines unchanged."""
    return MACHINES.get(machine, machine)


def machine_of(arch: str) -> str:
    """Debian's architecture name as the kernel's (and QEMU's, and Glance's)."""
    return ARCHES[arch].machine if arch in ARCHES else arch


def firmware_of(arch: str) -> tuple[str, ...]:
    """What machines of `arch` boot with."""
    return ARCHES[arch].firmware if arch in ARCHES else ("bios", "uefi")


SECURE_BOOT = "uefi-secureboot"  # UEFI with Secure Boot enforced: a firmware of the boot test


def boot_firmware_of(arch: str) -> tuple[str, ...]:
    """The firmware the boot test can boot `arch` with: its machines', and UEFI with Secure Boot where kiln
    has that firmware."""
    able = firmware_of(arch)
    return (*able, SECURE_BOOT) if arch in ARCHES and ARCHES[arch].secure_boot else able


def serial_console_of(arch: str) -> str:
    """The serial console's device name (ttyS0, ttyAMA0)."""
    return ARCHES[arch].serial if arch in ARCHES else "ttyS0"


def uefi_only(arch: str) -> bool:
    return firmware_of(arch) == ("uefi",)


# ---------------------------------------------------------------------------------------------------
# distributions

COMPONENTS = {"debian": ("main",), "ubuntu": ("main", "universe")}  # what kiln's bootstrap enables
BOOTSTRAPPED = frozenset(COMPONENTS)  # the distributions kiln bootstraps with mmdebstrap

# os_version, as Glance's and Nova's os_version property wants it (a number, not a codename)
DEBIAN_VERSIONS = {"buster": "10", "bullseye": "11", "bookworm": "12", "trixie": "13", "forky": "14"}
UBUNTU_VERSIONS = {"focal": "20.04", "jammy": "22.04", "noble": "24.04", "oracular": "24.10", "plucky": "25.04",
                   "questing": "25.10"}
VERSIONS = {"debian": DEBIAN_VERSIONS, "ubuntu": UBUNTU_VERSIONS}


def os_version(distro: str, release: str) -> str:
    """The release's version number (bookworm -> 12, noble -> 24.04); a release kiln does not know (or one
    that is a number already: fedora 41) unchanged."""
    return VERSIONS.get(distro, {}).get(release, release)


# package URLs (purl) of a distribution's packages: the purl type of its package format and its namespace
# (pkg:deb/debian/libc6@2.36-9?arch=amd64, pkg:rpm/fedora/bash@5.2.26-3.fc40?arch=x86_64)
PURL_NAMESPACES = {"debian": ("deb", "debian"), "ubuntu": ("deb", "ubuntu"), "fedora": ("rpm", "fedora"),
                   "centos": ("rpm", "centos"), "rocky": ("rpm", "rocky"), "almalinux": ("rpm", "almalinux"),
                   "rhel": ("rpm", "redhat")}


def purl_namespace(distro: str) -> tuple[str, str]:
    """(purl type, namespace) of `distro`'s packages; a distribution kiln does not know: generic/<distro>."""
    return PURL_NAMESPACES.get(distro, ("generic", distro))


# ---------------------------------------------------------------------------------------------------
# apt suites: a release and its pockets

POCKETS = ("updates", "security")
SECURITY_POCKET = "security"
# suites that have no -updates or -security pocket
NO_POCKETS = frozenset({"sid", "unstable", "experimental", "rc-buggy"})


def is_security_suite(suite: str) -> bool:
    """Whether packages from `suite` are security updates (RELEASE-security)."""
    return suite.endswith("-" + SECURITY_POCKET)


# the release a distribution's images are built from when nothing names one (diskimage-builder's defaults)
DEFAULT_RELEASES = {"debian": "bookworm", "ubuntu": "noble", "centos": "9", "rocky": "9", "almalinux": "9"}


def default_suites(release: str) -> list[str]:
    if release in NO_POCKETS:
        return [release]
    return [release, *(f"{release}-{p}" for p in POCKETS)]


def check_suites(release: str, suites: Sequence[str]) -> list[str]:
    """The spec's `suites`, checked: the release itself first, then pockets of that release, each once."""
    out: list[str] = []
    for suite in suites:
        if suite in out:
            raise SpecError(f"suites: {suite!r} is listed twice")
        if suite != release and not (suite.startswith(release + "-") and len(suite) > len(release) + 1):
            raise SpecError(f"suites: {suite!r} is not the release {release!r} or one of its pockets "
                            f"({', '.join(default_suites(release)[1:]) or 'none'})")
        out.append(suite)
    if not out or out[0] != release:
        raise SpecError(f"suites: the list must start with the release itself ({release!r}), got {list(suites)}")
    return out


def opted_out(release: str, suites: Sequence[str]) -> list[str]:
    """The default suites a spec's `suites` leaves out (what the manifest reports)."""
    return [s for s in default_suites(release) if s not in suites]
