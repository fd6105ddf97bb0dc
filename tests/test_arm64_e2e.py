"""arm64 on an amd64 host: the chroot through qemu-user-static (binfmt registered by kiln), an arm64
kernel and GRUB EFI, and a boot under qemu-system-aarch64 with AAVMF (TCG) to cloud-init's end.

Cold, it takes 10-18 minutes of the two cores here (the package step runs emulated); its base and
layers stay in the test store (/var/tmp/kiln-test), so on a machine that ran it before only the steps a
new upload changed run again. The boot always runs (the session's boot generation: see conftest).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import kiln, leftovers, manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2700)]


def test_arm64_image_builds_and_boots_under_aavmf(tmp_path: Path) -> None:
    kiln("build", "images/debian-12.yaml", "--arch", "arm64", "--name", "debian-12-arm64",
         "--output", str(tmp_path), timeout=5400)
    m = manifest(tmp_path)
    assert m["spec"]["arch"] == "arm64"
    assert any(p["name"] == "linux-image-cloud-arm64" for p in m["packages"])
    assert any(p["name"] == "grub-efi-arm64-bin" for p in m["packages"])
    [boot] = m["boot_test"]
    assert boot["firmware"] == "uefi" and boot["passed"] and boot["accel"] == "tcg"
    assert boot["cached"] is False, boot  # booted in this session
    assert boot["root_bytes"] > 4.2 * 1024**3
    assert leftovers() == []
