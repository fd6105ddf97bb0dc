"""`kiln build` with its boot test in Nova (boot_test.backend: nova), on the real single-node OpenStack of
infra/openstack (opt-in: KILN_TEST_NOVA=1).

With a glance target, the build's boot test is the publish step's gate: the candidate boots in Nova as the
flow's `boot_test nova` task and only then is promoted; without one, the finished build boots as a
temporary image and the result goes into manifest.json. The build itself comes from the cache.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.boot import nova
from kiln.cloud import glance
from kiln.model.checks import BUILTIN, HOST_CHECKS
from kiln.publish.promote import managed_images, status_of
from tests.e2e import REPO, kiln_env
from tests.nova.conftest import SKIP_REASON, NovaStack, nova_enabled

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not nova_enabled(), reason=SKIP_REASON)]


def build(spec: dict[str, Any], tmp_path: Path, stack: NovaStack, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**kiln_env(), "OS_CLIENT_CONFIG_FILE": str(stack.clouds_yaml)}
    env.pop("OS_CLOUD", None)
    return subprocess.run([sys.executable, "-m", "kiln.cli", "build", str(path), "-o", str(tmp_path / "out"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)


def default_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((REPO / "images" / "debian-12.yaml").read_text())
    spec["boot_test"]["backend"] = "nova"
    return spec


def test_build_publishing_to_a_nova_cloud_boots_the_candidate_then_promotes_it(
        nova_stack: NovaStack, nova_conn: Any, default_build: Path, nova_image_name: str, tmp_path: Path) -> None:
    spec = default_spec()
    spec["publish"] = {"targets": [f"glance:{nova_stack.cloud}"], "name": nova_image_name}
    proc = build(spec, tmp_path, nova_stack)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert not [s for s in manifest["timings"] if s.startswith("boot_test")]  # no local QEMU boot
    assert manifest["timings"]["pack"]["cached"]  # the image itself came from the cache
    # the Nova boot ran as the flow's own task (its run logger), inside the publish step, before promotion
    said = rf"(prefect\.task_runs\W|Task run ')[^\n]*boot test in Nova on {re.escape(nova_stack.cloud)}: passed"
    assert re.search(said, out), out[-6000:]
    assert out.index("boot test in Nova on") < out.index(f"is now {nova_image_name}")
    assert f"boot gate: booted in Nova on {nova_stack.cloud}" in proc.stdout, out[-6000:]
    stable = [i for i in managed_images(nova_conn, nova_image_name) if status_of(i) == "stable"]
    assert len(stable) == 1 and stable[0].name == nova_image_name
    assert f"{nova_image_name} = {stable[0].id} (uploaded)" in proc.stdout
    assert nova.leftover_servers(nova_conn) == []


def test_build_without_a_glance_target_boots_a_temporary_image_and_records_it(
        nova_stack: NovaStack, nova_conn: Any, default_build: Path, tmp_path: Path) -> None:
    before = {i.id for i in glance.list_images(nova_conn)}
    proc = build(default_spec(), tmp_path, nova_stack, "--boot-cloud", nova_stack.cloud)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    [boot] = manifest["boot_test"]
    assert boot["backend"] == "nova" and boot["passed"] and boot["firmware"] == "bios"
    assert boot["accel"].startswith(f"nova on {nova_stack.cloud}")
    assert boot["root_bytes"] > 4 << 30  # growroot filled the flavor's disk
    assert "boot_test nova" in manifest["timings"]
    console = (out / "boot-nova-console.log").read_text()
    assert "KILN-MARKER=KILN-NOVA-" in console
    # the conformance suite ran in Nova's guest too, at its first boot and after a soft reboot through Nova
    checks = {(c["name"], c["boot"]): c for c in boot["checks"]}
    guest = [n for n in BUILTIN if n not in HOST_CHECKS]
    assert {(n, b) for n in guest for b in (1, 2)} <= set(checks), sorted(checks)
    assert not [c for c in boot["checks"] if c["result"] == "fail"], boot["checks"]
    assert checks[("guest-agent", 1)]["result"] == "skip" and checks[("failed-units", 2)]["result"] == "pass"
    assert "boot test bios: passed" in proc.stdout and "nova on" in proc.stdout
    # the temporary image and the server are gone
    assert {i.id for i in glance.list_images(nova_conn)} == before
    assert nova.leftover_servers(nova_conn) == []
    password = yaml.safe_load(nova_stack.clouds_yaml.read_text())["clouds"][nova_stack.cloud]["auth"]["password"]
    assert password not in proc.stdout + proc.stderr + (out / "manifest.json").read_text() + console
