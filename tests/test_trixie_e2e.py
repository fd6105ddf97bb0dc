"""Debian 13 (trixie): the default spec's elements built from trixie, trixie-updates and trixie-security,
and booted to cloud-init's end under SeaBIOS and under OVMF (TCG), each boot in this session.

Its network is netplan for systemd-networkd with systemd-resolved, as in Debian's own trixie cloud images:
with ifupdown, networking.service waited five minutes for a DHCPv6 lease (cloud-init's fallback asks for
one, QEMU's and most clouds' networks give none), then failed, and every boot took six minutes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import kiln, leftovers, manifest
from tests.test_build_e2e import root_offset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def test_trixie_builds_from_its_three_suites_and_boots_under_bios_and_uefi(
        tmp_path: Path, default_boots: dict[str, dict[str, Any]]) -> None:
    kiln("build", "images/debian-12.yaml", "--release", "trixie", "--name", "debian-13-amd64", "--output",
         str(tmp_path), timeout=2300)
    m = manifest(tmp_path)
    assert m["spec"]["release"] == "trixie"
    assert [s["name"] for s in m["base"]["suites"]] == ["trixie", "trixie-updates", "trixie-security"]
    boots = {b["firmware"]: b for b in m["boot_test"]}
    assert set(boots) == {"bios", "uefi", "uefi-secureboot"}
    for firmware, b in boots.items():
        assert b["passed"] and b["cached"] is False, b
        assert b["failed_units"] == [], b  # networking.service was one, on every boot
        # the conformance suite passed at both boots (a failed check would have failed the build)
        assert not [c for c in b["checks"] if c["result"] == "fail"] and {c["boot"] for c in b["checks"]} == {1, 2}
        assert next(c for c in b["checks"] if c["name"] == "security-suite")["detail"] == "trixie-security"
        # the five-minute wait for DHCPv6 is gone: within 1.5x bookworm's boot under the same firmware (the
        # default image, booted in this session on this machine)
        bookworm = default_boots[firmware]["seconds"]
        print(f"trixie {firmware}: booted to cloud-init's end in {b['seconds']:.0f} s ({b['accel']}); "
              f"bookworm {bookworm:.0f} s")
        assert b["seconds"] <= 1.5 * bookworm, (firmware, b["seconds"], bookworm)
    packages = {p["name"] for p in m["packages"]}
    assert {"netplan.io", "systemd-resolved"} <= packages and "ifupdown" not in packages
    # DNS: the image's resolv.conf is resolved's stub (the build host's was removed, not this link)
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(tmp_path / "debian-13-amd64.qcow2"), str(raw)],
                   check=True)
    stat = subprocess.run(["debugfs", "-R", "stat /etc/resolv.conf", f"{raw}?offset={root_offset(raw)}"],
                          capture_output=True, text=True, check=True).stdout
    assert 'Fast link dest: "../run/systemd/resolve/stub-resolv.conf"' in stat, stat
    raw.unlink()
    assert leftovers() == []
