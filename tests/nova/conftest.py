"""Fixtures of the Nova boot tests: the whole single-node OpenStack (Keystone, Glance, RabbitMQ,
placement, Neutron API, libvirt, Nova) started once for this package through infra/openstack/up.sh and
stopped as soon as its tests are done (so the rest of the suite neither pays for its 1.7 GB nor sees a
compute endpoint), unless it was already running; and the default image built (or taken from the cache).

The slow tests here run in `make test` (and so in CI); `KILN_TEST_NOVA=0` leaves them out of a local run,
and says so as a skip. They need the stack (30 s to start once installed;
about 2.5 min more to install and initialise it the first time) and boot Debian guests under TCG
(about 80 s for the default image on 2 cores).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kiln.boot import nova
from kiln.cloud import glance
from kiln.host.run import run
from tests.e2e import REPO, started_by_us
from tests.publish.conftest import digests, manifest_for

NOVA_SWITCH = "KILN_TEST_NOVA"
SKIP_REASON = (f"Nova boot tests left out by {NOVA_SWITCH}=0 (they start the whole single-node OpenStack and "
               f"boot Debian guests under TCG: about 5 min with the stack installed, 7-8 min on a fresh machine)")


def nova_enabled() -> bool:
    return os.environ.get(NOVA_SWITCH, "1") not in ("0", "false", "no")


@dataclass(frozen=True)
class NovaStack:
    clouds_yaml: Path
    cloud: str = "kiln-dev"


@pytest.fixture(scope="package")
def nova_stack() -> Iterator[NovaStack]:
    infra = REPO / "infra" / "openstack"
    with started_by_us([str(infra / "status.sh")], [str(infra / "up.sh"), "nova"], [str(infra / "down.sh")],
                        timeout=2400) as clouds_yaml:
        yield NovaStack(Path(clouds_yaml))


@pytest.fixture(scope="package")
def nova_conn(nova_stack: NovaStack) -> Any:
    return glance.connect(nova_stack.cloud, clouds_yaml=nova_stack.clouds_yaml)


@pytest.fixture
def nova_image_name(nova_conn: Any) -> Iterator[str]:
    """A stable name of its own; every image kiln made under it is deleted afterwards, and no boot-test
    server may be left behind."""
    name = f"kt-nova-{secrets.token_hex(4)}"
    yield name
    for image in glance.list_images(nova_conn, {"kiln_name": name}):
        glance.delete_image(nova_conn, image)
    assert nova.leftover_servers(nova_conn) == []


def unbootable_build(out: Path, name: str, *, timeout: int = 60) -> Path:
    """An output directory like `kiln build -o` whose image is a blank 1 GiB disk: no partition table, no
    bootloader. Nova boots it under SeaBIOS, which says "No bootable device" on the screen only: the
    serial console stays empty until the boot test's `timeout` (from the spec) runs out."""
    out.mkdir(parents=True)
    disk = out / f"{name}.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1G"], quiet=True)
    build_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    manifest = manifest_for(name, build_id=build_id, firmware=("bios",), boots=[],
                            images=[{"file": disk.name, "format": "qcow2", "size": disk.stat().st_size,
                                     **digests(disk)}])
    manifest["spec"]["boot_test"]["timeout"] = timeout
    manifest["disk"] = {"size": 1 << 30, "firmware": ["bios"]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "SHA256SUMS").write_text(f"{manifest['images'][0]['sha256']}  {disk.name}\n")
    return out
