"""The SBOMs and the signature are published beside the image: uploaded to S3 with it, named in its Glance
properties."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln.cloud.properties import glance_properties
from kiln.model.publishing import PublishError, PublishSpec
from kiln.model.record import BuildRecord
from kiln.publish.s3_builds import _read_beside, attached_files
from tests.attested import kiln_state, signed_output  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("kiln_state")


@pytest.fixture
def build(tmp_path: Path) -> BuildRecord:
    signed_output(tmp_path / "out")
    return BuildRecord.load(tmp_path / "out")


def test_glance_properties_name_the_sboms_and_the_signature(build: BuildRecord) -> None:
    assert build.signature is not None
    props = glance_properties(build, build.images[0], PublishSpec(), name="deb")
    assert props["kiln_sbom_spdx"] == "deb-test.spdx.json"
    assert props["kiln_sbom_cyclonedx"] == "deb-test.cdx.json"
    assert props["kiln_sha256sums_signature"] == "SHA256SUMS.gpg"
    assert props["kiln_signing_key"] == build.signature.fingerprint
    in_s3 = glance_properties(build, build.images[0], PublishSpec(targets=["glance:c", "s3://images/debian"]),
                              name="deb")
    base = f"s3://images/debian/deb/{build.build_id}/"
    assert in_s3["kiln_sbom_spdx"] == base + "deb-test.spdx.json"
    assert in_s3["kiln_sha256sums_signature"] == base + "SHA256SUMS.gpg"


def test_an_unsigned_build_has_no_such_properties(build: BuildRecord) -> None:
    old = build.model_copy(update={"sboms": [], "signature": None})
    props = glance_properties(old, old.images[0], PublishSpec(), name="deb")
    assert not {k for k in props if k.startswith(("kiln_sbom", "kiln_sha256sums", "kiln_signing"))}
    assert attached_files(old) == []


def test_s3_gets_the_sboms_signature_and_key_beside_the_image(build: BuildRecord) -> None:
    assert attached_files(build) == [("deb-test.spdx.json", "application/json"),
                                     ("deb-test.cdx.json", "application/json"),
                                     ("SHA256SUMS.gpg", "application/pgp-signature"),
                                     ("SHA256SUMS.key", "application/pgp-keys")]
    assert _read_beside(build, "SHA256SUMS.key").startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK")


def test_what_a_strangers_manifest_names_is_read_only_inside_the_output(build: BuildRecord, tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="is not a file name in the output directory"):
        _read_beside(build, "../../etc/passwd")
    assert build.output is not None
    (build.output / "deb-test.cdx.json").unlink()
    os.symlink("/etc/passwd", build.output / "deb-test.cdx.json")
    with pytest.raises(PublishError, match="a link is never followed"):
        _read_beside(build, "deb-test.cdx.json")
