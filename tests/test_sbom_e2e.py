"""The default image's SBOMs and signed checksums (issue 17): both SBOMs valid by their libraries' own
validators and listing exactly the packages of the image's dpkg database; `kiln verify` passes on the output
and fails naming the file after a byte of the image is flipped."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from kiln.publish.sbom import cyclonedx_packages, spdx_packages
from tests.e2e import kiln, manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]


def _dpkg_installed(tree: Path) -> list[tuple[str, str, str]]:
    """Every installed package of the image's own dpkg database."""
    text = subprocess.run(["dpkg-query", f"--admindir={tree}/var/lib/dpkg", "-W", "-f",
                           "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"],
                          capture_output=True, text=True, check=True).stdout
    rows = [line.split("\t") for line in text.splitlines()]
    return sorted((name, version, arch) for status, name, version, arch in rows if status.startswith("ii"))


def test_the_sboms_are_valid_and_list_every_package_of_the_dpkg_database(default_build: Path,
                                                                         default_tree: Path) -> None:
    record = manifest(default_build)
    files = {s["format"]: default_build / s["file"] for s in record["sboms"]}
    assert set(files) == {"spdx-2.3", "cyclonedx-1.6"}
    installed = _dpkg_installed(default_tree)
    assert len(installed) > 100

    document = parse_file(str(files["spdx-2.3"]))
    assert validate_full_spdx_document(document) == []
    spdx_text = files["spdx-2.3"].read_text()
    assert sorted(spdx_packages(spdx_text, "spdx")) == installed

    cdx_text = files["cyclonedx-1.6"].read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(cdx_text) is None
    assert sorted(cyclonedx_packages(cdx_text, "cdx")) == installed

    cdx = json.loads(cdx_text)
    purls = {c["name"]: c["purl"] for c in cdx["components"]}
    assert purls["libc6"].startswith("pkg:deb/debian/libc6@") and "arch=amd64" in purls["libc6"]
    assert "distro=debian-12" in purls["libc6"]
    # licences where the packages declare them (DEP-5 copyright files): most of Debian's base does
    with_licence = [c for c in cdx["components"] if c.get("licenses")]
    assert len(with_licence) > len(installed) // 2, f"{len(with_licence)} of {len(installed)} carry a licence"


def test_kiln_verify_passes_and_names_a_flipped_byte(default_build: Path, tmp_path: Path) -> None:
    good = kiln("verify", str(default_build))
    assert "verified" in good.stdout and "development key" in good.stdout, good.stdout
    assert "valid, lists the manifest's" in good.stdout

    copy = tmp_path / "output"
    subprocess.run(["cp", "-a", "--sparse=always", "--reflink=auto", str(default_build), str(copy)], check=True)
    image = copy / manifest(default_build)["images"][0]["file"]
    with open(image, "r+b") as fh:
        fh.seek(image.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    bad = kiln("verify", str(copy), check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    lines = [line for line in bad.stderr.splitlines() if line.startswith("kiln: error:")]
    assert lines == [f"kiln: error: {image}: its sha256 differs from SHA256SUMS's: the file changed after it was "
                     "signed"], bad.stderr
    assert "Traceback" not in bad.stderr
