"""The build record read back from an output directory, which may be a stranger's (kiln publish OUTPUT,
kiln boot-test OUTPUT): nothing in it makes kiln read, upload or write a host file, and every bad input is a
RecordError (exit code 2) naming the file and field."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kiln.boot import qemu
from kiln.host.checksums import write_replacing
from kiln.model.errors import BootTestError
from kiln.model.record import BuildRecord, RecordError

DISK = b"\0" * 4096


def output(tmp_path: Path, **changes: Any) -> Path:
    """A well-formed output directory (one raw image), with `changes` applied to its manifest."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "disk.raw").write_bytes(DISK)
    sha256 = hashlib.sha256(DISK).hexdigest()
    manifest: dict[str, Any] = {
        "kiln_version": "0.1.0", "build_id": "20261207T000000Z-abcdef",
        "spec": {"name": "deb", "arch": "amd64", "boot_test": {"memory": 1024}},
        "images": [{"file": "disk.raw", "format": "raw", "size": len(DISK), "sha256": sha256,
                    "sha512": hashlib.sha512(DISK).hexdigest()}],
    }
    manifest.update(changes)
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "SHA256SUMS").write_text(f"{sha256}  disk.raw\n")
    return out


def test_a_good_output_loads(tmp_path: Path) -> None:
    record = BuildRecord.load(output(tmp_path))
    assert record.name == "deb" and record.image_path(record.image()) == tmp_path / "out" / "disk.raw"


@pytest.mark.parametrize(("changes", "says"), [
    ({"spec": {"name": ""}}, "spec.name must be a plain name"),
    ({"spec": {"name": "../../etc"}}, "spec.name must be a plain name"),
    ({"spec": {"arch": "amd64"}}, "spec.name must be a plain name"),
    ({"build_id": "../../tmp/evil"}, "build_id must be a plain name"),
    ({"spec": {"name": "deb", "boot_test": ["x"]}}, "spec.boot_test must be a JSON dict"),
    ({"spec": {"name": "deb", "boot_test": {"memory": "lots"}}}, "spec.boot_test.memory must be a whole number"),
    ({"spec": {"name": "deb", "size": "4G"}}, "spec.size must be a JSON int"),
])
def test_bad_fields_are_named(tmp_path: Path, changes: dict[str, Any], says: str) -> None:
    with pytest.raises(RecordError, match=says) as caught:
        BuildRecord.load(output(tmp_path, **changes))
    assert caught.value.exit_code == 2 and "manifest.json" in str(caught.value)


@pytest.mark.parametrize("name", ["../disk.raw", "/etc/passwd", "a/b", "..", "x\0y", ""])
def test_an_image_name_is_a_file_in_the_directory(tmp_path: Path, name: str) -> None:
    out = output(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["images"][0]["file"] = name
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RecordError, match=r"images\[0\]\.file"):
        BuildRecord.load(out)


def test_links_and_devices_are_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("root:$y$j9T$SECRETHASH\n")
    out = output(tmp_path)
    (out / "disk.raw").unlink()
    (out / "disk.raw").symlink_to("/dev/zero")
    with pytest.raises(RecordError, match="not a regular file"):
        BuildRecord.load(out)
    out = output(tmp_path)  # the image back; now SHA256SUMS names a host file
    (out / "SHA256SUMS").unlink()
    (out / "SHA256SUMS").symlink_to(secret)
    with pytest.raises(RecordError, match="a link is never followed") as caught:
        BuildRecord.load(out)
    assert "SECRETHASH" not in str(caught.value)
    (out / "SHA256SUMS").unlink()
    (out / "SHA256SUMS").write_text(secret.read_text())  # a copy of it: the error does not echo the line
    with pytest.raises(RecordError, match="not a SHA256SUMS line") as caught:
        BuildRecord.load(out)
    assert "SECRETHASH" not in str(caught.value)
    manifest = (out / "manifest.json").read_text()
    (out / "manifest.json").unlink()
    (tmp_path / "m.json").write_text(manifest)
    (out / "manifest.json").symlink_to(tmp_path / "m.json")
    with pytest.raises(RecordError, match="a link is never followed"):
        BuildRecord.load(out)
    (out / "manifest.json").unlink()
    os.mkfifo(out / "manifest.json")  # a FIFO would block a plain read forever
    with pytest.raises(RecordError, match="not a regular file"):
        BuildRecord.load(out)


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[" * 100_000, b'{"build_id": ' + b"9" * 5000 + b"}"])
def test_unreadable_manifests_are_errors_not_tracebacks(tmp_path: Path, content: bytes) -> None:
    out = output(tmp_path)
    (out / "manifest.json").write_bytes(content)
    with pytest.raises(RecordError, match=r"manifest\.json: not"):
        BuildRecord.load(out)


def test_writes_into_an_output_replace_a_planted_link_instead_of_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "boot-nova-console.log").symlink_to(victim)
    write_replacing(out / "boot-nova-console.log", "the guest's console\n")
    assert victim.read_text() == "untouched\n"
    assert not (out / "boot-nova-console.log").is_symlink()
    assert (out / "boot-nova-console.log").read_text() == "the guest's console\n"
    assert [p.name for p in out.iterdir()] == ["boot-nova-console.log"]  # no temporary left


def test_a_disk_naming_a_host_file_is_never_booted(tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"HOST-SECRET" * 100)
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(disk), "1M"],
                   check=True)
    with pytest.raises(BootTestError, match="names another file"):
        qemu._image_info(disk)
