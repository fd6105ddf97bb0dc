"""Helpers of the SBOM, signing and verify tests: a synthetic package list and a signed output directory as
the outputs stage writes it (SBOMs, manifest.json, SHA256SUMS and its signature), without building."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.model.record import BuildRecord, ImageRecord
from kiln.publish.manifest import signature_record, write_record
from kiln.publish.sbom import ImageFacts, write_sboms
from kiln.publish.signing import signer

PACKAGES: list[dict[str, Any]] = [
    {"name": "libc6", "version": "2.36-9+deb12u9", "arch": "amd64", "license": "GPL-2+ or LGPL-2.1+",
     "source": "glibc", "suite": "bookworm-security"},
    {"name": "base-files", "version": "12.4+deb12u8", "arch": "amd64", "suite": "bookworm"},  # declares none
    {"name": "tzdata", "version": "2024a-0+deb12u1", "arch": "all", "license": "public-domain", "suite": "bookworm"},
    {"name": "libssl3", "version": "3.0.15-1~deb12u1", "arch": "amd64", "license": "Apache-2.0", "source": "openssl"},
    {"name": "libstdc++6", "version": "12.2.0-14", "arch": "amd64", "license": "GPL-3+ with GCC exception",
     "source": "gcc-12"},
    {"name": "perl-base", "version": "1:5.36.0-7+deb12u1", "arch": "amd64", "license": "Artistic or GPL-1+",
     "source": "perl"},
]


@pytest.fixture
def kiln_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state directory of its own (the development key is made there), with a short path: gpg-agent's
    socket lives in the key's home, and a socket's path is at most 107 bytes."""
    state = Path(tempfile.mkdtemp(prefix="ks-", dir="/tmp"))
    monkeypatch.setenv("KILN_STATE", str(state))
    for name in ("KILN_SIGNING_KEY", "KILN_GNUPGHOME", "KILN_SIGNING_PASSPHRASE_FILE"):
        monkeypatch.delenv(name, raising=False)
    yield state
    subprocess.run(["gpgconf", "--homedir", str(state / "signing"), "--kill", "gpg-agent"], capture_output=True)
    shutil.rmtree(state, ignore_errors=True)


def image_facts(name: str = "deb-test", sha256: str = "ab" * 32) -> ImageFacts:
    return ImageFacts(name=name, distro="debian", release="bookworm", build_id="20261206T120000Z-abc123",
                      created="2026-12-06T12:00:00+00:00", image_sha256=sha256, kiln_version="0.1.0")


def signed_output(out: Path, packages: list[dict[str, Any]] | None = None, *, name: str = "deb-test") -> BuildRecord:
    """A signed output in `out`: NAME.qcow2 (a few KiB of bytes, not a real disk), its SBOMs, manifest.json,
    SHA256SUMS, SHA256SUMS.gpg and SHA256SUMS.key, as the outputs stage leaves them."""
    out.mkdir(parents=True, exist_ok=True)
    image = out / f"{name}.qcow2"
    image.write_bytes(os.urandom(8192))
    data = image.read_bytes()
    record = BuildRecord(
        kiln_version="0.1.0", build_id="20261206T120000Z-abc123", created="2026-12-06T12:00:00+00:00",
        spec={"name": name, "distro": "debian", "release": "bookworm", "arch": "amd64"},
        packages=list(PACKAGES if packages is None else packages),
        images=[ImageRecord(file=image.name, format="qcow2", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                            sha512=hashlib.sha512(data).hexdigest())],
        output=out)
    record.sboms = write_sboms(out, record.packages, image_facts(name, record.images[0].sha256))
    record.signature = signature_record(signer())
    write_record(record, seal=True)
    return record
