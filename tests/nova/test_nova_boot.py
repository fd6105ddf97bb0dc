"""The Nova boot gate against the real single-node OpenStack of infra/openstack (in `make test`).

The default image is published as a candidate, booted in Nova until its console shows the boot test's
marker and cloud-init's end, and promoted; an image that cannot boot is rejected with the console's tail
and never promoted. No server outlives a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kiln.boot import nova
from kiln.boot.serial_console import FINISHED_RE
from kiln.cloud import glance
from kiln.model.publishing import PublishSpec
from kiln.model.record import BuildRecord
from kiln.publish.core import publish
from kiln.publish.gates import GATES, no_gate
from kiln.publish.promote import managed_images, status_of
from tests.e2e import REPO, kiln_env
from tests.nova.conftest import SKIP_REASON, NovaStack, nova_enabled, unbootable_build
from tests.publish.conftest import digests

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not nova_enabled(), reason=SKIP_REASON)]


def test_default_image_boots_in_nova_and_is_promoted(nova_stack: NovaStack, nova_conn: Any, default_build: Path,
                                                     nova_image_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[nova.NovaBootResult] = []
    real_boot_test = nova.boot_test

    def spy(*args: Any, **kwargs: Any) -> nova.NovaBootResult:
        result = real_boot_test(*args, **kwargs)
        seen.append(result)
        return result

    monkeypatch.setattr(nova, "boot_test", spy)
    build = BuildRecord.load(default_build)
    spec = PublishSpec(targets=[f"glance:{nova_stack.cloud}"], name=nova_image_name)
    start = time.monotonic()
    report = publish(build, spec, gate=GATES["nova"], clouds_yaml=nova_stack.clouds_yaml)
    print(f"publish with the nova gate: {time.monotonic() - start:.0f} s")

    assert len(seen) == 1 and seen[0].passed
    console = seen[0].console
    marker_lines = [line for line in console.splitlines() if "KILN-MARKER=KILN-NOVA-" in line]
    assert marker_lines, console[-3000:]
    assert FINISHED_RE.search(console), console[-3000:]
    assert seen[0].flavor == "kiln.boot" and seen[0].network == "none"
    assert seen[0].root_bytes and seen[0].root_bytes > 4 << 30  # growroot filled the flavor's 10 GiB disk

    [result] = report.glance
    assert result.action == "uploaded"
    assert "booted in Nova" in report.gate
    stable = [i for i in managed_images(nova_conn, nova_image_name) if status_of(i) == "stable"]
    assert [i.id for i in stable] == [result.image_id]
    assert stable[0].name == nova_image_name
    assert nova_conn.compute.find_server(seen[0].server_id, ignore_missing=True) is None
    assert nova.leftover_servers(nova_conn) == []


def test_unbootable_image_is_rejected_with_the_console_tail_and_never_promoted(
        nova_stack: NovaStack, nova_conn: Any, nova_image_name: str, tmp_path: Path) -> None:
    out = unbootable_build(tmp_path / "broken", nova_image_name)
    before = {i.id for i in glance.list_images(nova_conn)}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "publish", str(out), "--to", f"glance:{nova_stack.cloud}",
         "--clouds-yaml", str(nova_stack.clouds_yaml), "--gate", "nova"],
        cwd=REPO, env=kiln_env(), capture_output=True, text=True, timeout=900)
    print(f"publish of an unbootable image with the nova gate: {time.monotonic() - start:.0f} s")

    assert proc.returncode == 3, proc.stderr[-4000:]
    err = proc.stderr
    assert "did not pass the boot gate: the Nova boot failed" in err, err[-4000:]
    assert "Traceback" not in err
    # the reason, then the console's tail: SeaBIOS found nothing to boot and said so only on the screen
    assert "the marker and cloud-init's end not on the console within 60 s" in err, err[-4000:]
    assert "the console log is empty" in err.split("the Nova boot failed", 1)[1], err[-4000:]
    assert managed_images(nova_conn, nova_image_name) == []
    assert {i.id for i in glance.list_images(nova_conn)} == before
    assert nova.leftover_servers(nova_conn) == []


def test_boot_test_cli_boots_a_build_in_nova_and_deletes_what_it_made(nova_stack: NovaStack, nova_conn: Any,
                                                                      tmp_path: Path) -> None:
    """`kiln boot-test --backend nova` on an unbootable build: a temporary image, a server, both gone after."""
    out = unbootable_build(tmp_path / "broken", "kt-nova-cli")
    before = {i.id for i in glance.list_images(nova_conn)}
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "boot-test", str(out), "--backend", "nova", "--cloud", nova_stack.cloud,
         "--clouds-yaml", str(nova_stack.clouds_yaml), "--network", "none", "--timeout", "30"],
        cwd=REPO, env=kiln_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "kiln: error: " in proc.stderr and "console log (last lines)" in proc.stderr, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert {i.id for i in glance.list_images(nova_conn)} == before
    assert nova.leftover_servers(nova_conn) == []


def test_the_default_image_boots_under_uefi_in_nova(nova_stack: NovaStack, nova_conn: Any, default_build: Path,
                                                   nova_image_name: str) -> None:
    """The image asks the cloud for UEFI (hw_firmware_type=uefi, through the spec's publish properties):
    Nova's libvirt picks OVMF from the host's firmware descriptors (with infra/openstack's patch for
    Debian 12's libvirt 9.0), the guest's kernel reports EFI and cloud-init runs to its end.

    Not the boot gate: in this stack a UEFI guest (OVMF on Nova's default i440fx machine) does not see
    its config drive (cloud-init ends on DataSourceNone), so the gate's user-data marker never shows;
    the console is read here instead."""
    spec = PublishSpec(targets=[f"glance:{nova_stack.cloud}"], name=nova_image_name,
                       properties={"hw_firmware_type": "uefi"})
    report = publish(BuildRecord.load(default_build), spec, gate=no_gate, clouds_yaml=nova_stack.clouds_yaml)
    image_id = report.glance[0].image_id
    assert glance.get_image(nova_conn, image_id).properties.get("hw_firmware_type") == "uefi"
    flavor = nova.pick_flavor(nova_conn, None, min_ram=0, min_disk=5)
    server = nova_conn.compute.create_server(name=f"kiln-test-uefi-{nova_image_name}", image_id=image_id,
                                             flavor_id=flavor.id, networks="none")
    try:
        nova_conn.compute.wait_for_server(server, status="ACTIVE", wait=600)
        deadline = time.monotonic() + 600
        console = ""
        while time.monotonic() < deadline and not FINISHED_RE.search(console):
            time.sleep(5)
            console = nova_conn.compute.get_server_console_output(server)["output"] or ""
        assert FINISHED_RE.search(console), console[-3000:]
        result = nova.NovaBootResult(True, nova_stack.cloud, image_id, server.id, flavor.name, "none", 0, 0,
                                     None, None, console)
        assert result.firmware == "uefi", [line for line in console.splitlines() if "efi" in line.lower()][:10]
    finally:
        nova.delete_servers(nova_conn, [server.id], name=server.name)
    assert nova.leftover_servers(nova_conn) == []


def test_retention_keeps_an_image_a_server_in_nova_runs_on(nova_stack: NovaStack, nova_conn: Any,
                                                          nova_image_name: str, tmp_path: Path) -> None:
    """keep=1 wants every older image gone; the one a real Nova server was created from stays (and goes at
    the first publish after the server is deleted)."""
    spec = PublishSpec(targets=[f"glance:{nova_stack.cloud}"], name=nova_image_name, keep=1)

    def build(n: int) -> Any:
        out = unbootable_build(tmp_path / f"b{n}", nova_image_name)
        disk = out / f"{nova_image_name}.qcow2"  # blank disks are all alike: write one byte so each differs
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {n} 0 512", str(disk)], check=True,
                       capture_output=True)
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["images"][0].update({"size": disk.stat().st_size, **digests(disk)})
        (out / "manifest.json").write_text(json.dumps(manifest))
        (out / "SHA256SUMS").write_text(f"{manifest['images'][0]['sha256']}  {disk.name}\n")
        return BuildRecord.load(out)

    first = publish(build(1), spec, gate=no_gate, clouds_yaml=nova_stack.clouds_yaml).glance[0].image_id
    flavor = nova.pick_flavor(nova_conn, None, min_ram=0, min_disk=1)
    server = nova_conn.compute.create_server(name=f"kiln-test-in-use-{nova_image_name}", image_id=first,
                                             flavor_id=flavor.id, networks="none")
    try:
        nova_conn.compute.wait_for_server(server, status="ACTIVE", wait=600)
        assert glance.servers_using(nova_conn, first) == [server.id]
        second = publish(build(2), spec, gate=no_gate, clouds_yaml=nova_stack.clouds_yaml).glance[0]
        third = publish(build(3), spec, gate=no_gate, clouds_yaml=nova_stack.clouds_yaml).glance[0]
        assert first in second.kept_in_use_ids + third.kept_in_use_ids
        assert second.image_id in third.deleted_ids  # not in use: retention took it
        assert nova_conn.image.find_image(first, ignore_missing=True) is not None
    finally:
        nova.delete_servers(nova_conn, [server.id], name=server.name)
    fourth = publish(build(4), spec, gate=no_gate, clouds_yaml=nova_stack.clouds_yaml).glance[0]
    assert first in fourth.deleted_ids
    assert nova_conn.image.find_image(first, ignore_missing=True) is None
