"""Publishing to a real S3 server (moto's server mode) on 127.0.0.1, started by infra/s3/up.sh, through
boto3's standard credential chain (the env file up.sh prints). Each test has a bucket of its own."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kiln.cloud import s3
from kiln.model.publishing import GateFailedError, PublishSpec
from kiln.model.record import BuildRecord
from kiln.publish.core import publish
from kiln.publish.gates import GateResult
from kiln.publish.s3_builds import publish_s3, retain_s3, s3_versions
from kiln.publish.verify import verify_output
from tests.attested import kiln_state, signed_output  # noqa: F401  (a fixture)
from tests.publish.conftest import MakeBuild

pytestmark = pytest.mark.slow
MiB = 1 << 20


def _objects(client: Any, bucket: str) -> dict[str, dict[str, Any]]:
    out = {}
    for obj in s3.list_objects(client, bucket, ""):
        head = s3.head(client, bucket, obj.key)
        assert head is not None
        out[obj.key] = {"etag": head["ETag"], "modified": head["LastModified"], "meta": head["Metadata"],
                        "size": obj.size}
    return out


def test_a_build_lands_beside_its_manifest_and_sha256sums_with_metadata(s3_client: Any, bucket: str,
                                                                        make_build: MakeBuild) -> None:
    out = make_build("deb", formats=("qcow2", "raw"))
    build = BuildRecord.load(out)
    location = s3.parse_s3_url(f"s3://{bucket}/images/nightly")
    report = publish_s3(s3_client, location, build)
    base = f"images/nightly/deb/{build.build_id}/"
    assert report.prefix == base
    assert sorted(report.uploaded) == sorted(base + f for f in ("deb.qcow2", "deb.raw", "SHA256SUMS", "manifest.json"))
    objects = _objects(s3_client, bucket)
    for image in build.images:
        obj = objects[base + image.file]
        assert obj["meta"]["sha256"] == image.sha256 and obj["meta"]["sha512"] == image.sha512
        assert obj["meta"]["kiln-build-id"] == build.build_id and obj["size"] == image.size
        body = s3.get_bytes(s3_client, bucket, base + image.file)
        assert body is not None and hashlib.sha256(body).hexdigest() == image.sha256
    manifest = s3.get_bytes(s3_client, bucket, base + "manifest.json")
    assert manifest is not None and json.loads(manifest)["build_id"] == build.build_id
    assert s3.get_bytes(s3_client, bucket, base + "SHA256SUMS") == (out / "SHA256SUMS").read_bytes()


def test_publishing_again_uploads_nothing(s3_client: Any, bucket: str, make_build: MakeBuild) -> None:
    build = BuildRecord.load(make_build("deb", size_mib=20))  # above the part size: a multipart object
    location = s3.parse_s3_url(f"s3://{bucket}/x")
    publish_s3(s3_client, location, build)
    before = _objects(s3_client, bucket)
    again = publish_s3(s3_client, location, build)
    assert again.uploaded == [] and len(again.skipped) == 3
    assert _objects(s3_client, bucket) == before, "ETag and LastModified of every object are unchanged"


def test_multipart_upload_sends_a_sha256_per_part_and_the_composite_matches(s3_client: Any, bucket: str,
                                                                            tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    data = random.Random(3).randbytes(12 * MiB)
    path.write_bytes(data)
    advanced: list[int] = []
    result = s3.upload_file(s3_client, path, bucket, "big.img", sha256=hashlib.sha256(data).hexdigest(),
                            part_size=5 * MiB, on_progress=advanced.append)
    assert result.uploaded and result.etag.strip('"').endswith("-3")
    assert sum(advanced) == len(data)
    head = s3.head(s3_client, bucket, "big.img")
    assert head is not None
    parts = [data[i:i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
    composite = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).digest()
    assert head["ChecksumSHA256"].split("-")[0] == base64.b64encode(composite).decode()
    assert s3.get_bytes(s3_client, bucket, "big.img") == data


@pytest.mark.parametrize("size_mib", [2, 12], ids=["single-put", "multipart"])
def test_a_file_changed_after_the_build_stores_nothing(s3_client: Any, bucket: str, tmp_path: Path,
                                                       size_mib: int) -> None:
    """A real corruption: the checksum was recorded, then the file changed; the upload hashes the bytes
    it sends, and a mismatch aborts it (the multipart upload too: no object, no pending parts)."""
    path = tmp_path / "img.raw"
    data = random.Random(5).randbytes(size_mib * MiB)
    path.write_bytes(data)
    recorded = hashlib.sha256(data).hexdigest()
    with path.open("r+b") as fh:
        fh.seek(len(data) - 4096)
        fh.write(b"\0" * 512)
    with pytest.raises(s3.S3ChecksumError, match="changed after the build"):
        s3.upload_file(s3_client, path, bucket, "img.raw", sha256=recorded, part_size=5 * MiB)
    assert s3.head(s3_client, bucket, "img.raw") is None
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_retention_keeps_the_newest_builds_per_name_and_a_protected_one(s3_client: Any, bucket: str,
                                                                        make_build: MakeBuild) -> None:
    """What protects a build is a predicate (here injected: "still in use"), as for Glance."""
    location = s3.parse_s3_url(f"s3://{bucket}/mirror")
    prefixes = []
    for _ in range(4):
        build = BuildRecord.load(make_build("deb"))
        publish_s3(s3_client, location, build)
        prefixes.append(f"mirror/deb/{build.build_id}/")
    other = BuildRecord.load(make_build("other"))
    publish_s3(s3_client, location, other)
    # an interrupted upload: images but no manifest.json
    s3_client.put_object(Bucket=bucket, Key="mirror/deb/interrupted/deb.qcow2", Body=b"partial")

    report = retain_s3(s3_client, location, "deb", keep=2, in_use=lambda prefix: prefix == prefixes[0])
    assert report.kept_in_use == [prefixes[0]] and report.deleted == [prefixes[1]]
    left = {v.id for v in s3_versions(s3_client, location, "deb")}
    assert left == {prefixes[0], prefixes[2], prefixes[3], "mirror/deb/interrupted/"}, \
        "a fresh partial upload may be another run's; left alone"
    assert {v.id for v in s3_versions(s3_client, location, "other")} == {f"mirror/other/{other.build_id}/"}

    later = datetime.now(UTC) + timedelta(days=2)
    report = retain_s3(s3_client, location, "deb", keep=2, now=later)
    assert sorted(report.deleted) == sorted([prefixes[0], "mirror/deb/interrupted/"])
    assert [o.key for o in s3.list_objects(s3_client, bucket, "mirror/deb/interrupted/")] == []


def test_publish_to_s3_alone_still_runs_the_gate(s3_client: Any, bucket: str, make_build: MakeBuild) -> None:
    build = BuildRecord.load(make_build("deb", boots=[]))
    spec = PublishSpec(targets=[f"s3://{bucket}/g"])
    with pytest.raises(GateFailedError, match="not boot-tested"):
        publish(build, spec)
    assert s3.list_objects(s3_client, bucket, "") == []
    report = publish(build, spec, gate=lambda c: GateResult(True, "operator waived the gate"))
    assert len(report.s3[0].uploaded) == 3


def _download_and_verify(s3_client: Any, bucket: str, prefix: str, build: BuildRecord, into: Path) -> None:
    """Every object of the build's S3 prefix into `into`, then `kiln verify`'s check of it (the signer's key
    pinned by the fingerprint the manifest names)."""
    assert build.signature is not None
    into.mkdir()
    for obj in s3.list_objects(s3_client, bucket, prefix):
        body = s3.get_bytes(s3_client, bucket, obj.key)
        assert body is not None
        (into / obj.key.removeprefix(prefix)).write_bytes(body)
    assert verify_output(into, key=build.signature.fingerprint).signer == build.signature.fingerprint


@pytest.mark.usefixtures("kiln_state")
def test_a_signed_build_lands_with_its_sboms_signature_and_key(s3_client: Any, bucket: str, tmp_path: Path) -> None:
    build = BuildRecord.load(signed_output(tmp_path / "out").output or tmp_path)
    report = publish_s3(s3_client, s3.parse_s3_url(f"s3://{bucket}/signed"), build)
    base = f"signed/deb-test/{build.build_id}/"
    assert sorted(report.uploaded) == sorted(base + f for f in (
        "deb-test.qcow2", "deb-test.spdx.json", "deb-test.cdx.json", "SHA256SUMS", "SHA256SUMS.gpg", "SHA256SUMS.key",
        "manifest.json"))
    head = s3.head(s3_client, bucket, base + "SHA256SUMS.gpg")
    assert head is not None and head["ContentType"] == "application/pgp-signature"
    _download_and_verify(s3_client, bucket, base, build, tmp_path / "downloaded")


def test_a_real_kiln_build_mirrors_to_s3(s3_client: Any, bucket: str, default_build: Path, tmp_path: Path) -> None:
    build = BuildRecord.load(default_build)
    report = publish_s3(s3_client, s3.parse_s3_url(f"s3://{bucket}/real"), build)
    key = f"real/{build.name}/{build.build_id}/{build.images[0].file}"
    assert key in report.uploaded
    head = s3.head(s3_client, bucket, key)
    assert head is not None and head["Metadata"]["sha256"] == build.images[0].sha256
    assert head["ContentLength"] == build.images[0].size
    # the SBOMs, the signature and its key beside it: the S3 copy verifies as the output does
    base = f"real/{build.name}/{build.build_id}/"
    for sbom in build.sboms:
        assert base + sbom.file in report.uploaded
    assert base + "SHA256SUMS.gpg" in report.uploaded and base + "SHA256SUMS.key" in report.uploaded
    _download_and_verify(s3_client, bucket, base, build, tmp_path / "downloaded")
