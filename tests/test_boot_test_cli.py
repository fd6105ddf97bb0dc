"""`kiln boot-test OUTPUT_DIR`: a disk that cannot boot is rejected with the console's tail."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from kiln.boot.local import console_kept, serial_log_of
from kiln.model.errors import BootTestError
from tests.e2e import REPO, kiln_env, leftovers


def test_unbootable_output_is_rejected_with_the_console_tail(tmp_path: Path) -> None:
    disk = tmp_path / "broken.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1G"], check=True)
    data = disk.read_bytes()
    sha256, sha512 = hashlib.sha256(data).hexdigest(), hashlib.sha512(data).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps({
        "build_id": "20261207T000000Z-broken",
        "spec": {"name": "broken", "boot_test": {"firmware": ["bios"], "timeout": 60}},
        "images": [{"file": "broken.qcow2", "format": "qcow2", "size": len(data), "sha256": sha256,
                    "sha512": sha512}],
    }))
    (tmp_path / "SHA256SUMS").write_text(f"{sha256}  broken.qcow2\n")
    # the output directory is a stranger's: a link where the console log goes must not be written through
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    victim.write_text("host file\n")
    (tmp_path / "boot-test-qemu-bios-console.log").symlink_to(victim)
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "boot-test", str(tmp_path)], cwd=REPO,
                          env=kiln_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    assert "kiln: error: " in err and "bios" in err
    assert "Traceback" not in err
    # the console's tail, as SeaBIOS printed it: the error says why, not only that a boot test failed
    assert "No bootable device" in err or "not a bootable disk" in err, err
    assert leftovers(str(tmp_path)) == []
    # nothing of the boot is left in the output but its console log, which the error names
    kept = tmp_path / "boot-test-qemu-bios-console.log"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["broken.qcow2", "manifest.json", "SHA256SUMS", kept.name]), list(tmp_path.iterdir())
    assert str(kept) in err and not kept.is_symlink() and kept.stat().st_size > 0
    assert victim.read_text() == "host file\n"


def test_not_a_build_output(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "boot-test", str(tmp_path)], cwd=REPO,
                          env=kiln_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "manifest.json: not a kiln build output" in proc.stderr


def test_a_failed_boots_console_is_kept_and_named_instead_of_the_scratch_copy(tmp_path: Path) -> None:
    """console_kept (the flow's failed-boots/ copy and `kiln boot-test`'s): the error names the copy, whose
    content is the console's, and a link planted at the copy's name is replaced, not written through."""
    serial = serial_log_of(tmp_path / "scratch", "uefi")
    serial.parent.mkdir(parents=True)
    serial.write_text("BdsDxe: starting Boot0001\n")
    victim = tmp_path / "victim"
    victim.write_text("host file\n")
    kept = tmp_path / "kept" / "uefi.log"
    kept.parent.mkdir()
    kept.symlink_to(victim)
    exc = console_kept(BootTestError(f"boot test (uefi): stuck; console log: {serial}"), serial, kept)
    assert str(exc) == f"boot test (uefi): stuck; console log: {kept}"
    assert not kept.is_symlink() and kept.read_text() == "BdsDxe: starting Boot0001\n"
    assert victim.read_text() == "host file\n"
