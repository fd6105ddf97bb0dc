"""The SBOMs: SPDX 2.3 and CycloneDX 1.6 JSON from a package list, valid by their libraries' own validators,
deterministic, with purls and licences where packages declare them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from kiln.model import facts
from kiln.publish.sbom import (
    ImageFacts,
    InstalledPackage,
    Licences,
    SbomError,
    compare_packages,
    cyclonedx_packages,
    installed_packages,
    package_of_purl,
    package_url,
    spdx_packages,
    write_sboms,
)
from tests.attested import PACKAGES, image_facts


def test_both_sboms_validate_with_their_libraries_and_list_every_package(tmp_path: Path) -> None:
    records = write_sboms(tmp_path, PACKAGES, image_facts())
    assert [r.file for r in records] == ["deb-test.spdx.json", "deb-test.cdx.json"]
    assert [r.format for r in records] == ["spdx-2.3", "cyclonedx-1.6"]
    # SPDX: spdx-tools' own parser and full validator, from the file
    document = parse_file(str(tmp_path / "deb-test.spdx.json"))
    assert validate_full_spdx_document(document) == []
    assert document.creation_info.spdx_version == "SPDX-2.3"
    # CycloneDX: the library's strict JSON schema validator
    text = (tmp_path / "deb-test.cdx.json").read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    want = sorted((p["name"], p["version"], p["arch"]) for p in PACKAGES)
    assert sorted(spdx_packages((tmp_path / "deb-test.spdx.json").read_text(), "spdx")) == want
    assert sorted(cyclonedx_packages(text, "cdx")) == want


def test_purls_versions_arches_and_licences(tmp_path: Path) -> None:
    write_sboms(tmp_path, PACKAGES, image_facts())
    cdx = json.loads((tmp_path / "deb-test.cdx.json").read_text())
    by_name = {c["name"]: c for c in cdx["components"]}
    assert by_name["libc6"]["purl"] == \
        "pkg:deb/debian/libc6@2.36-9%2Bdeb12u9?arch=amd64&distro=debian-12&upstream=glibc"
    assert by_name["tzdata"]["purl"] == "pkg:deb/debian/tzdata@2024a-0%2Bdeb12u1?arch=all&distro=debian-12"
    assert by_name["libc6"]["licenses"] == [{"expression": "GPL-2.0-or-later OR LGPL-2.1-or-later"}]
    assert by_name["tzdata"]["licenses"] == [{"license": {"name": "public-domain"}}]
    assert "licenses" not in by_name["base-files"]  # declares none
    assert {"name": "kiln:arch", "value": "all"} in by_name["tzdata"]["properties"]
    assert cdx["metadata"]["component"]["type"] == "operating-system"

    spdx = json.loads((tmp_path / "deb-test.spdx.json").read_text())
    packages = {p["name"]: p for p in spdx["packages"]}
    assert packages["libc6"]["licenseDeclared"] == "GPL-2.0-or-later OR LGPL-2.1-or-later"
    assert packages["base-files"]["licenseDeclared"] == "NOASSERTION"
    assert packages["tzdata"]["licenseDeclared"] == "LicenseRef-public-domain"
    assert packages["perl-base"]["versionInfo"] == "1:5.36.0-7+deb12u1"
    assert {"referenceCategory": "PACKAGE_MANAGER", "referenceType": "purl",
            "referenceLocator": "pkg:deb/debian/libssl3@3.0.15-1~deb12u1?arch=amd64&distro=debian-12&upstream=openssl"
            } in packages["libssl3"]["externalRefs"]
    refs = {e["licenseId"]: e["name"] for e in spdx["hasExtractedLicensingInfos"]}
    assert refs["LicenseRef-public-domain"] == "public-domain"
    assert refs["LicenseRef-GPL-3-with-GCC-exception"] == "GPL-3+ with GCC exception"
    assert spdx["creationInfo"]["created"] == "2026-12-06T12:00:00Z"


def test_the_output_is_deterministic_and_derived_from_the_build(tmp_path: Path) -> None:
    for name in ("one", "two", "three"):
        (tmp_path / name).mkdir()
    one = write_sboms(tmp_path / "one", PACKAGES, image_facts())
    two = write_sboms(tmp_path / "two", list(reversed(PACKAGES)), image_facts())
    assert [r.sha256 for r in one] == [r.sha256 for r in two]
    other = write_sboms(tmp_path / "three", PACKAGES, image_facts(sha256="cd" * 32))
    assert other[0].sha256 != one[0].sha256
    a = json.loads((tmp_path / "one" / "deb-test.cdx.json").read_text())
    b = json.loads((tmp_path / "three" / "deb-test.cdx.json").read_text())
    assert a["serialNumber"] != b["serialNumber"] and a["serialNumber"].startswith("urn:uuid:")


def test_rpm_purls_carry_the_epoch_as_a_qualifier() -> None:
    image = ImageFacts(name="f", distro="fedora", release="41", build_id="b", created="2026-01-01T00:00:00+00:00",
                       image_sha256="00" * 32, kiln_version="0")
    pkg = InstalledPackage("openssl-libs", "1:3.2.2-9.fc41", "x86_64", "Apache-2.0")
    purl = package_url(pkg, image).to_string()
    assert purl == "pkg:rpm/fedora/openssl-libs@3.2.2-9.fc41?arch=x86_64&distro=fedora-41&epoch=1"
    assert package_of_purl(purl) == ("openssl-libs", "1:3.2.2-9.fc41", "x86_64")
    assert facts.purl_namespace("ubuntu") == ("deb", "ubuntu")
    assert facts.purl_namespace("rocky") == ("rpm", "rocky")


@pytest.mark.parametrize(("declared", "expression", "spdx_only"), [
    ("GPL-2+", "GPL-2.0-or-later", True),
    ("GPL-2", "GPL-2.0-only", True),
    ("LGPL-2.1+ or GPL-2+", "LGPL-2.1-or-later OR GPL-2.0-or-later", True),
    ("Expat", "MIT", True),
    ("BSD-3-clause and Expat", "BSD-3-Clause AND MIT", True),
    ("GPLv2+", "GPL-2.0-or-later", True),  # RPM's old-style names
    ("MIT AND (LGPL-2.1-or-later OR BSD-3-Clause)", "MIT AND (LGPL-2.1-or-later OR BSD-3-Clause)", True),
    ("public-domain", "LicenseRef-public-domain", False),
    ("BSD-3-clause and public-domain", "BSD-3-Clause AND LicenseRef-public-domain", False),
    ("permissive, see below", "LicenseRef-permissive-see-below", False),
])
def test_declared_licences_become_spdx_expressions(declared: str, expression: str, spdx_only: bool) -> None:
    assert Licences().expression(declared) == (expression, spdx_only)


def test_missing_license_and_source_keys_are_tolerated(tmp_path: Path) -> None:
    plain = [{"name": p["name"], "version": p["version"], "arch": p["arch"]} for p in PACKAGES]
    write_sboms(tmp_path, plain, image_facts())
    spdx = json.loads((tmp_path / "deb-test.spdx.json").read_text())
    assert {p.get("licenseDeclared") for p in spdx["packages"][1:]} == {"NOASSERTION"}
    assert installed_packages(plain)[0].license is None


def test_an_sbom_that_lists_other_packages_than_the_manifest_is_named() -> None:
    listed = [(p["name"], p["version"], p["arch"]) for p in PACKAGES[1:]]
    with pytest.raises(SbomError, match=r"x\.spdx\.json: lists 5 packages, the manifest 6: 1 of the manifest's "
                                        r"packages missing \(libc6 2\.36"):
        compare_packages(listed, PACKAGES, "x.spdx.json")
    compare_packages([(p["name"], p["version"], p["arch"]) for p in PACKAGES], PACKAGES, "x")


def test_an_invalid_sbom_is_refused_by_the_validators(tmp_path: Path) -> None:
    write_sboms(tmp_path, PACKAGES, image_facts())
    cdx = json.loads((tmp_path / "deb-test.cdx.json").read_text())
    cdx["components"][0]["type"] = "not-a-type"
    with pytest.raises(SbomError, match="CycloneDX validation"):
        cyclonedx_packages(json.dumps(cdx), "x.cdx.json")
    spdx = json.loads((tmp_path / "deb-test.spdx.json").read_text())
    spdx["relationships"][1]["relatedSpdxElement"] = "SPDXRef-nowhere"
    with pytest.raises(SbomError, match=r"x\.spdx\.json: SPDX validation"):
        spdx_packages(json.dumps(spdx), "x.spdx.json")
