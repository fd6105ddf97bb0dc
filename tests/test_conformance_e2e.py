"""The conformance suite in real guests (issue 16): the default image booted once per firmware (SeaBIOS,
OVMF, OVMF with Secure Boot enforced) passes every check at both boots; an element's own checks run in the
guest; a failed check fails the build naming it, and a waiver lets it through, recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.model.checks import BUILTIN, HOST_CHECKS
from tests.e2e import REPO, kiln, kiln_env, leftovers, manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]

GUEST_CHECKS = [n for n in BUILTIN if n not in HOST_CHECKS]
FIRST_BOOT_ONLY = {"host-keys-fresh", "machine-id-fresh", "no-leftovers"}


def _checks(boot: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(c["name"], c["boot"]): c for c in boot["checks"]}


def test_the_default_image_passes_every_check_under_every_firmware_and_after_a_reboot(
        default_boots: dict[str, dict[str, Any]], default_build: Path) -> None:
    assert set(default_boots) == {"bios", "uefi", "uefi-secureboot"}
    assert "uefi-secureboot" in manifest(default_build)["disk"]["firmware"]  # the ESP carries the signed chain
    for firmware, boot in default_boots.items():
        assert boot["passed"] and boot["cached"] is False, boot
        checks = _checks(boot)
        # every check at the first boot, the guest's again after the reboot, each with its verdict
        assert set(checks) == {(n, 1) for n in BUILTIN} | {(n, 2) for n in GUEST_CHECKS}, sorted(checks)
        failed = [c for c in boot["checks"] if c["result"] not in ("pass", "skip")]
        assert failed == [], failed
        for name in ("cloud-init", "failed-units", "root-locked", "sshd-no-passwords", "host-keys-fresh",
                     "machine-id-fresh", "no-leftovers", "security-suite", "serial-console", "time-sync",
                     "power-button", "root-grown", "guest-agent"):
            assert checks[(name, 1)]["result"] == "pass", (firmware, checks[(name, 1)])
        for name in set(GUEST_CHECKS) - FIRST_BOOT_ONLY - {"secure-boot"}:
            assert checks[(name, 2)]["result"] == "pass", (firmware, checks[(name, 2)])
        assert checks[("security-suite", 1)]["detail"] == "bookworm-security"
        sb = checks[("secure-boot", 1)]
        if firmware == "uefi-secureboot":
            assert sb["result"] == "pass" and sb["detail"] == "SecureBoot=1", sb
            console = Path(boot["serial_log"]).read_text(errors="replace")
            assert "Secure boot enabled" in console and "Kernel is locked down from EFI Secure Boot" in console
        else:
            assert sb["result"] == "skip", sb
        print(f"default image, {firmware}: cloud-init's end in {boot['seconds']:.0f} s ({boot['accel']})")
    assert leftovers() == []


# Debian's own bookworm genericcloud qcow2 (issue 17): the default image may be at most 0.8 of it
DEBIAN_GENERICCLOUD_BYTES = 332_000_000


def test_the_default_image_is_a_small_zstd_qcow2_that_says_what_takes_its_space(default_build: Path) -> None:
    """Issue 17: compressed (zstd), at most 0.8x Debian's genericcloud image, and the manifest names the largest
    directories and packages (the boot test of the very same image passed every check, above)."""
    m = manifest(default_build)
    [image] = m["images"]
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(default_build / image["file"])],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    assert m["spec"]["compression"] == "zstd"
    print(f"default image: {image['size'] / 1e6:.0f} MB ({image['size'] / DEBIAN_GENERICCLOUD_BYTES:.2f} of Debian's)")
    assert image["size"] <= 0.8 * DEBIAN_GENERICCLOUD_BYTES, image["size"]
    space = m["space"]
    dirs = {d["path"]: d["bytes"] for d in space["directories"]}
    assert "/usr" in dirs and dirs["/usr"] <= space["tree_bytes"] and len(space["directories"]) >= 10
    assert space["packages"][0]["path"].startswith("linux-image-")  # the kernel is the largest package
    assert "/var/cache" not in dirs or dirs["/var/cache"] < 5 * 2**20  # apt's binary caches are gone
    # every package names its licence where its copyright file declares one (most of Debian's do)
    declared = [p for p in m["packages"] if p.get("license")]
    assert len(declared) >= 0.7 * len(m["packages"]), (len(declared), len(m["packages"]))


def test_the_seed_image_skips_the_password_checks_it_asks_to_fail(
        seed_build: tuple[Path, dict[str, Any], float]) -> None:
    """The seed's element asks for root logins with a password: root-locked and sshd-no-passwords are skipped
    (the boot test set the password), every other check passes."""
    _, m, _ = seed_build
    for boot in m["boot_test"]:
        checks = _checks(boot)
        assert checks[("root-locked", 1)]["result"] == "skip" and checks[("sshd-no-passwords", 1)]["result"] == "skip"
        assert not [c for c in boot["checks"] if c["result"] == "fail"], boot["checks"]


def _element(root: Path) -> Path:
    """An element whose image has a unit that fails at boot, with a check of its own that passes and one that
    fails on purpose."""
    element = root / "kiln-test-conformance"
    (element / "install.d").mkdir(parents=True)
    (element / "checks.d").mkdir()
    hooks = {
        "install.d/50-broken-unit": """#!/bin/bash
set -eu
cat > /etc/systemd/system/kiln-broken.service <<UNIT
[Unit]
Description=a unit that fails at every boot (kiln's conformance test)
[Service]
Type=oneshot
ExecStart=/bin/false
[Install]
WantedBy=multi-user.target
UNIT
systemctl enable kiln-broken.service
""",
        "checks.d/50-unit-shipped": "#!/bin/sh\ntest -e /etc/systemd/system/kiln-broken.service && echo shipped\n",
        "checks.d/60-fails": "#!/bin/sh\necho 'fails on purpose'\nexit 3\n",
    }
    for rel, text in hooks.items():
        (element / rel).write_text(text)
        (element / rel).chmod(0o755)
    (element / "README.md").write_text("kiln's conformance test element\n")
    return root


def _spec(path: Path, waive: dict[str, str]) -> Path:
    spec = yaml.safe_load((REPO / "images/debian-12.yaml").read_text())
    spec.update(name="kiln-conformance-test", elements=[*spec["elements"], "kiln-test-conformance"])
    # one firmware, no reboot: what is tested here is the verdict, the firmware and the reboot are above
    spec["boot_test"] = {"firmware": ["bios"], "reboot": False, "timeout": 900, "waive": waive}
    path.write_text(yaml.safe_dump(spec))
    return path


def test_an_elements_checks_run_and_a_failed_check_fails_the_build_by_name(tmp_path: Path) -> None:
    elements = _element(tmp_path / "elements")
    on_purpose = {"kiln-test-conformance/60-fails": "fails on purpose"}
    waived = _spec(tmp_path / "waived.yaml", {**on_purpose, "failed-units": "the test's broken unit"})
    kiln("build", str(waived), "--elements-path", str(elements), "--output", str(tmp_path / "out"), timeout=2400)
    [boot] = manifest(tmp_path / "out")["boot_test"]
    checks = _checks(boot)
    assert checks[("kiln-test-conformance/50-unit-shipped", 1)] == {
        "name": "kiln-test-conformance/50-unit-shipped", "boot": 1, "result": "pass", "detail": "shipped"}
    fails = checks[("kiln-test-conformance/60-fails", 1)]
    assert fails["result"] == "waived" and "exit 3" in fails["detail"] and "fails on purpose" in fails["detail"]
    units = checks[("failed-units", 1)]
    assert units["result"] == "waived" and "kiln-broken.service" in units["detail"], units

    # the same image (from the cache), its boot without the waiver: the build fails, naming the check
    strict = _spec(tmp_path / "strict.yaml", on_purpose)
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "build", str(strict), "--elements-path", str(elements),
                           "--output", str(tmp_path / "strict-out")], cwd=REPO, env=kiln_env(), capture_output=True,
                          text=True, timeout=2400)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert "conformance check failed: failed-units (boot 1): kiln-broken.service" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, error
    assert "pack: cached" in proc.stdout + proc.stderr  # the image was not built again: only booted
    assert leftovers() == []


def test_an_image_without_cloud_init_is_judged_by_systemd_and_says_so(tmp_path: Path) -> None:
    """Nothing in such an image reads the seed, so no suite can run in it: the boot test passes on systemd's
    multi-user target and a login prompt (real boot, this session), and the manifest says which criterion
    it used and that no check ran (issue 18, item 6)."""
    spec = tmp_path / "no-cloud-init.yaml"
    spec.write_text(yaml.safe_dump({"name": "kiln-no-cloud-init", "elements": ["vm", "growroot"],
                                    "boot_test": {"firmware": ["bios"], "timeout": 900}}))
    kiln("build", str(spec), "--output", str(tmp_path / "out"), timeout=2400)
    m = manifest(tmp_path / "out")
    assert "cloud-init" not in {p["name"] for p in m["packages"]}
    [boot] = m["boot_test"]
    assert boot["passed"] and boot["cached"] is False and boot["criterion"] == "systemd", boot
    assert boot["checks"] == []
    console = Path(boot["serial_log"]).read_text(errors="replace")
    assert "login:" in console and "Cloud-init v." not in console
    assert leftovers() == []
