"""The conformance suite's vocabulary: its built-in checks, check names, results and waivers.

The suite itself (the guest script, the verdict) is kiln.boot.conformance; elements add checks from their
`checks.d/` (kiln.build.elements.element_checks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kiln.model.errors import SpecError

# name -> what it asserts (docs/conformance.md lists them from here)
BUILTIN: dict[str, str] = {
    "cloud-init": "cloud-init finished (`cloud-init status` done) with no [ERROR], [CRITICAL] or Traceback in "
                  "/var/log/cloud-init.log",
    "failed-units": "no systemd unit failed",
    "root-locked": "root's password is locked (skipped when the boot test set one: boot_test.root_login)",
    "sshd-no-passwords": "sshd refuses password and keyboard-interactive logins (skipped without sshd, or when "
                         "the boot test asked for password logins: boot_test.root_login)",
    "host-keys-fresh": "the SSH host keys were made at the first boot, none baked into the image (first boot)",
    "machine-id-fresh": "/etc/machine-id was made at the first boot, none baked into the image (first boot)",
    "no-leftovers": "no shell history, apt lists, or files in /tmp and /var/tmp left in the image (first boot)",
    "security-suite": "the apt sources name the release's security suite (skipped when the image's packages "
                      "came from no security suite)",
    "serial-console": "the kernel command line has console= on the serial port the cloud's console reads",
    "time-sync": "a time sync service (systemd-timesyncd, chrony, ntpsec, ntp or openntpd) is running",
    "power-button": "something handles the ACPI power button (systemd-logind or acpid), so a cloud's soft reboot "
                    "or stop shuts the guest down cleanly instead of pulling the plug after its timeout",
    "secure-boot": "Secure Boot was on (the uefi-secureboot firmware only; skipped elsewhere)",
    "root-grown": "the root file system grew to fill the bigger disk it booted on (checked from the host)",
    "guest-agent": "the QEMU guest agent answers guest-ping on its virtio channel (from the host; QEMU only, "
                   "skipped without qemu-guest-agent)",
}
HOST_CHECKS = ("root-grown", "guest-agent")  # made from the host, at the first boot
RESULTS = ("pass", "fail", "skip", "waived")
# a built-in name, or <element>/<file> for an element's checks.d
CHECK_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}|[A-Za-z0-9][A-Za-z0-9_.-]{0,63}/[0-9A-Za-z_-]{1,64}")


@dataclass(frozen=True)
class CheckOutcome:
    """One check at one boot (1: the first, 2: after the reboot)."""

    name: str
    boot: int
    result: str  # one of RESULTS
    detail: str = ""


def check_waivers(waive: Mapping[str, str], names: Sequence[str], *, where: str = "boot_test.waive") -> None:
    """Every waived check exists and has a reason; SpecError naming the first that does not."""
    for name, reason in waive.items():
        if name not in names:
            raise SpecError(f"field '{where}': no conformance check is named {name!r} (the checks: "
                            f"{', '.join(names)})")
        if not str(reason).strip():
            raise SpecError(f"field '{where}.{name}': a waiver needs a reason")
