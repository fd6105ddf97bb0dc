"""Fixtures of the publishing tests: the real local Keystone + Glance and S3 server (started through
infra/openstack/up.sh and infra/s3/up.sh once per session, stopped at the end unless they were already
running), and small but real builds: a few MiB image made with qemu-img, manifest.json, SHA256SUMS.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kiln.cloud import glance, s3
from kiln.host.run import run
from tests.e2e import started_by_us

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@dataclass(frozen=True)
class OpenStack:
    clouds_yaml: Path
    venv: Path
    cloud: str = "kiln-dev"


@pytest.fixture(scope="session")
def openstack_stack() -> Iterator[OpenStack]:
    """Keystone and Glance on 127.0.0.1 (installed on first use: about 1.5 min cold)."""
    base = Path(os.environ.get("KILN_OPENSTACK_DIR", "/var/lib/kiln-openstack"))
    infra = ROOT / "infra" / "openstack"
    with started_by_us([str(infra / "status.sh"), "keystone", "glance"], [str(infra / "up.sh")],
                        [str(infra / "down.sh")], timeout=1800) as clouds_yaml:
        yield OpenStack(Path(clouds_yaml), base / "venv")


@pytest.fixture(scope="session")
def s3_stack() -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1, its credentials and endpoint exported for boto3's standard chain."""
    infra = ROOT / "infra" / "s3"
    base = Path(os.environ.get("KILN_S3_DIR", "/var/lib/kiln-s3"))
    status = ["bash", "-c", f'kill -0 "$(cat {base / "moto.pid"} 2>/dev/null)" 2>/dev/null']
    with started_by_us(status, [str(infra / "up.sh")], [str(infra / "down.sh")], timeout=600) as env_file, \
            pytest.MonkeyPatch.context() as mp:
        env = dict(raw.split("=", 1) for raw in Path(env_file).read_text().split() if "=" in raw)
        for key, value in env.items():
            mp.setenv(key, value)
        yield env


@pytest.fixture(scope="session")
def conn(openstack_stack: OpenStack) -> Any:
    return glance.connect(openstack_stack.cloud, clouds_yaml=openstack_stack.clouds_yaml)


@pytest.fixture
def image_name(conn: Any) -> Iterator[str]:
    """A stable name of its own for each test; every image kiln made under it is deleted afterwards."""
    name = f"kt-{secrets.token_hex(4)}"
    yield name
    for image in glance.list_images(conn, {"kiln_name": name}):
        glance.delete_image(conn, image)


@pytest.fixture
def s3_client(s3_stack: dict[str, str]) -> Any:
    return s3.client()


@pytest.fixture
def bucket(s3_client: Any) -> Iterator[str]:
    name = f"kiln-test-{secrets.token_hex(4)}"
    s3_client.create_bucket(Bucket=name)
    yield name
    keys = [o.key for o in s3.list_objects(s3_client, name, "")]
    s3.delete_keys(s3_client, name, keys)
    for upload in s3_client.list_multipart_uploads(Bucket=name).get("Uploads", []):
        s3_client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    s3_client.delete_bucket(Bucket=name)


def digests(path: Path) -> dict[str, str]:
    h256, h512 = hashlib.sha256(), hashlib.sha512()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(MiB), b""):
            h256.update(chunk)
            h512.update(chunk)
    return {"sha256": h256.hexdigest(), "sha512": h512.hexdigest()}


def manifest_for(name: str, *, build_id: str, arch: str = "amd64", boots: list[dict[str, Any]] | None = None,
                 firmware: tuple[str, ...] = ("bios", "uefi"), publish: dict[str, Any] | None = None,
                 images: list[dict[str, Any]] | None = None, created: str | None = None,
                 packages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A manifest shaped like the one `kiln build` writes (the fields publishing reads, and a few more)."""
    spec: dict[str, Any] = {
        "name": name, "distro": "debian", "release": "bookworm", "arch": arch,
        "elements": ["vm", "cloud-init", "growroot", "qemu-guest-agent", "openssh-server"], "packages": [],
        "env": {}, "size": 4 * 1024**3, "formats": ["qcow2"], "compress": False, "mirror": None,
        "boot_test": {"enabled": True, "firmware": list(firmware), "timeout": 900, "memory": 1024, "cpus": 2,
                      "root_login": False},
    }
    if publish is not None:
        spec["publish"] = publish
    elements = ["cleanup", "cloud-init", "debian", "growroot", "openssh-server", "qemu-guest-agent", "vm"]
    return {
        "kiln_version": "0.1.0", "build_id": build_id,
        "created": created or datetime.now(UTC).isoformat(timespec="seconds"),
        "spec": spec, "mirror": "http://mirror.invalid/debian",
        "elements": [{"name": e, "path": f"/elements/{e}", "sha256": hashlib.sha256(e.encode()).hexdigest()}
                     for e in elements],
        "base": {"kind": "bootstrap", "key": hashlib.sha256(b"base").hexdigest(), "distro": "debian",
                 "release": "bookworm", "arch": arch},
        "disk": {"size": 4 * 1024**3},
        "packages": packages or [], "images": images or [], "timings": {},
        "boot_test": boots if boots is not None else [
            {"firmware": f, "passed": True, "seconds": 95.0, "accel": "tcg"} for f in firmware],
        "published": [],
    }


MakeBuild = Callable[..., Path]


@pytest.fixture
def make_build(tmp_path: Path) -> MakeBuild:
    """make_build(name, seed=…, formats=("qcow2",), boots=…) -> an output directory like `kiln build -o`.

    The image is real: `size_mib` of seeded random bytes as a raw disk, converted with qemu-img; the same
    seed gives the same bytes, so two builds (different build ids) can share their content."""
    counter = [0]

    def make(name: str, *, seed: int | None = None, formats: tuple[str, ...] = ("qcow2",), size_mib: int = 3,
             **manifest_args: Any) -> Path:
        counter[0] += 1
        seed = seed if seed is not None else random.SystemRandom().randrange(1 << 30)
        build_id = manifest_args.pop("build_id", None) or \
            f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{counter[0]:02d}{secrets.token_hex(2)}"
        out = tmp_path / f"build-{build_id}"
        out.mkdir()
        raw = out / f"{name}.raw"
        raw.write_bytes(random.Random(seed).randbytes(size_mib * MiB))
        images = []
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            if fmt != "raw":
                run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(path)], quiet=True)
            images.append({"file": path.name, "format": fmt, "size": path.stat().st_size, **digests(path)})
        if "raw" not in formats:
            raw.unlink()
        manifest = manifest_for(name, build_id=build_id, images=images, **manifest_args)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (out / "SHA256SUMS").write_text("".join(f"{i['sha256']}  {i['file']}\n" for i in images))
        return out

    return make
