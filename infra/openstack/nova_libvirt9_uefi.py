"""Make Nova 34 boot UEFI guests on Debian 12's libvirt 9.0.0 (run with the stack's venv python; idempotent).

Nova 34 writes the secure-boot choice twice for a UEFI guest: as `<os firmware='efi'><firmware><feature
name='secure-boot' enabled='no'/></firmware>` (firmware autoselection) and, for libvirt older than 8.6, as
`<loader secure='no'/>`. libvirt 9.0.0 refuses the second beside the first ("loader attribute 'secure'
cannot be specified when firmware autoselection is enabled", virDomainDefineXML), so every UEFI server of
this stack went to ERROR. With autoselection the feature element says it all: this drops the loader's
`secure` attribute (and the then empty `<loader/>`) when Nova asked for firmware autoselection.
Exit status 0 when the file was changed now, 1 when it already was (the caller restarts nova-compute only
after a change), 2 when Nova's code is not what this patch expects.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nova.virt.libvirt.config as config

MARK = "(self.os_loader_secure is not None and self.os_firmware is None)"
OLD = "self.os_loader_secure is not None"


def main() -> int:
    path = Path(config.__file__)
    text = path.read_text()
    start = text.index("    def _format_os(self, root):")
    end = text.index("\n    def ", start + 10)
    body = text[start:end]
    if MARK in body:
        return 1
    if body.count(OLD) != 2:
        print(f"{path}: _format_os is not what infra/openstack/nova_libvirt9_uefi.py expects", file=sys.stderr)
        return 2
    path.write_text(text[:start] + body.replace(OLD, MARK) + text[end:])
    for cached in path.parent.glob("__pycache__/config.*.pyc"):
        cached.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
