"""NoCloud seed ISOs and the cloud-config kiln's boot test feeds an image.

The host kernel has no iso9660, so the ISO is written by `xorriso` (or `cloud-localds`) and never
mounted.
"""

from __future__ import annotations

import re
import shlex
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kiln.host.run import run

VOLUME_ID = "cidata"
# the lines the boot-test user-data prints on the console (parsed by kiln.boot.serial_console)
MARKER_PREFIX = "KILN-MARKER="
ROOT_BYTES_PREFIX = "KILN-ROOT-BYTES="
DISK_BYTES_PREFIX = "KILN-DISK-BYTES="
FAILED_UNITS_PREFIX = "KILN-FAILED-UNITS="
_MARKER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def make_nocloud_seed(
    out_iso: Path, *, user_data: str, meta_data: str, network_config: str | None = None
) -> Path:
    """Write a NoCloud seed ISO (volume id `cidata`) holding user-data, meta-data [, network-config]."""
    out_iso = Path(out_iso)
    out_iso.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-seed-") as tmp:
        src = Path(tmp)
        files = {"user-data": user_data, "meta-data": meta_data}
        if network_config is not None:
            files["network-config"] = network_config
        for name, text in files.items():
            (src / name).write_text(text, encoding="utf-8")
        partial = out_iso.with_name(f".{out_iso.name}.partial")
        partial.unlink(missing_ok=True)
        if shutil.which("xorriso"):
            args = ["xorriso", "-as", "mkisofs", "-quiet", "-output", str(partial),
                    "-volid", VOLUME_ID, "-joliet", "-rock", *files]
        elif shutil.which("cloud-localds"):
            args = ["cloud-localds", str(partial), "user-data", "meta-data"]
            if network_config is not None:
                args[1:1] = ["--network-config", "network-config"]
        else:
            raise FileNotFoundError("a NoCloud seed ISO needs xorriso or cloud-localds: neither is installed")
        try:
            run(args, cwd=src, quiet=True, what="build the NoCloud seed ISO")
            partial.replace(out_iso)
        finally:
            partial.unlink(missing_ok=True)
    return out_iso


def boot_test_meta_data(hostname: str = "kiln-boot-test") -> str:
    """NoCloud meta-data with a fresh instance-id (so cloud-init always runs its per-instance modules)."""
    return yaml.safe_dump({"instance-id": f"kiln-{uuid.uuid4().hex}", "local-hostname": hostname},
                          sort_keys=False)


def boot_test_user_data(
    marker: str, *, root_password: str | None = None, extra_runcmd: Sequence[str] = (),
    write_files: Sequence[Mapping[str, Any]] = (),
) -> str:
    """#cloud-config printing the marker, the root filesystem size and the root disk size on the console."""
    if not _MARKER_RE.fullmatch(marker):
        raise ValueError(f"boot-test marker {marker!r} must match {_MARKER_RE.pattern}")
    # stdout reaches the console through cloud-final's journal+console; /dev/ttyS0 is belt and braces
    # (absent on arm64, where the write just fails quietly)
    script = "\n".join([
        'say() { echo "$1"; { echo "$1" > /dev/ttyS0; } 2>/dev/null || true; }',
        f"say {shlex.quote(MARKER_PREFIX + marker)}",
        f'say "{ROOT_BYTES_PREFIX}$(df -B1 --output=size / | tail -n 1 | tr -d " ")"',
        'src=$(findmnt -no SOURCE /)',
        'pk=$(lsblk -no PKNAME "$src" 2>/dev/null | head -n 1)',
        'if [ -n "$pk" ]; then disk="/dev/$pk"; else disk="$src"; fi',
        f'say "{DISK_BYTES_PREFIX}$(lsblk -bdno SIZE "$disk" | head -n 1 | tr -d " ")"',
        # the systemd units that failed by now (cloud-init's config stage among them), comma-separated
        f'say "{FAILED_UNITS_PREFIX}$(systemctl list-units --state=failed --no-legend --plain 2>/dev/null '
        '| awk \'{print $1}\' | paste -sd, -)"',
    ])
    config: dict[str, object] = {}
    if root_password is not None:
        config["ssh_pwauth"] = True
        config["chpasswd"] = {
            "expire": False,
            "users": [{"name": "root", "password": root_password, "type": "text"}],
        }
    if write_files:  # the conformance suite (kiln.boot.conformance), run per boot by cloud-init
        config["write_files"] = [dict(f) for f in write_files]
    config["runcmd"] = [["sh", "-c", script], *extra_runcmd]
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False, width=1000)


def with_default_user_password(user_data: str, password: str) -> str:
    """`user_data` (#cloud-config) that also gives cloud-init's default user `password` and turns on SSH
    password logins: the seed document's way, where the cloud-init-cfg element makes root the default user,
    so an injected password is root's."""
    return _amended(user_data, {"password": password, "chpasswd": {"expire": False}, "ssh_pwauth": True})


def with_host_key(user_data: str, private_key: str, public_key: str) -> str:
    """`user_data` (#cloud-config) that gives the guest this ed25519 host key (cloud-init's `ssh_keys`,
    replacing any it has), so that an SSH client can tell it from anything else answering at its address."""
    return _amended(user_data, {"ssh_keys": {"ed25519_private": private_key, "ed25519_public": public_key}})


def _amended(user_data: str, changes: Mapping[str, Any]) -> str:
    """#cloud-config `user_data` with these top-level keys set."""
    config = yaml.safe_load(user_data)
    config.update(changes)
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False, width=1000)
