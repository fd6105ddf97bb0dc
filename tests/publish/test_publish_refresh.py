"""Publishing only what changed (kiln/refresh.py), against the real local Glance (two projects: two
clouds) and S3: a rebuild with the same content publishes nothing and says "unchanged"; a changed one
is published with a package diff against the stable it replaces, which stays as previous; a gate that
fails on one cloud leaves no cloud half-promoted; `kiln diff` reads output directories, S3 and Glance."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.cloud import glance, s3
from kiln.model.publishing import GateFailedError, PublishSpec
from kiln.model.record import BuildRecord
from kiln.publish.core import publish
from kiln.publish.gates import CandidateImage, GateResult
from kiln.publish.promote import managed_images, status_of
from kiln.publish.refresh import publish_changes
from tests.e2e import kiln
from tests.publish.conftest import MakeBuild, OpenStack

pytestmark = pytest.mark.slow

OTHER_CLOUD = "kiln-dev-admin"  # the same Glance, another project: a second cloud to kiln
OPENSSL_OLD = {"name": "openssl", "version": "3.0.20-1~deb12u2", "arch": "amd64", "suite": "bookworm"}
OPENSSL_NEW = {"name": "openssl", "version": "3.0.22-1~deb12u2", "arch": "amd64", "suite": "bookworm-security"}
BASH = {"name": "bash", "version": "5.2.15-2+b7", "arch": "amd64", "suite": "bookworm"}


@pytest.fixture
def other_conn(openstack_stack: OpenStack, image_name: str) -> Iterator[Any]:
    conn = glance.connect(OTHER_CLOUD, clouds_yaml=openstack_stack.clouds_yaml)
    yield conn
    for image in glance.list_images(conn, {"kiln_name": image_name}):
        glance.delete_image(conn, image)


def _statuses(conn: Any, name: str) -> list[str]:
    return sorted(status_of(i) for i in managed_images(conn, name))


def test_only_what_changed_is_published_with_a_package_diff(conn: Any, openstack_stack: OpenStack, s3_client: Any,
                                                            bucket: str, make_build: MakeBuild, image_name: str,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_STATE", str(tmp_path / "state"))
    spec = PublishSpec(targets=["glance:kiln-dev", f"s3://{bucket}/catalog"], keep=3)
    night1 = BuildRecord.load(make_build(image_name, packages=[OPENSSL_OLD, BASH]))
    first = publish_changes(night1, spec, clouds_yaml=openstack_stack.clouds_yaml)
    assert first.status == "published" and first.diff is None
    assert _statuses(conn, image_name) == ["stable"]

    # night 2: new bytes (another seed), same packages, elements and spec: nothing goes anywhere
    night2 = BuildRecord.load(make_build(image_name, packages=[BASH, OPENSSL_OLD]))
    second = publish_changes(night2, spec, clouds_yaml=openstack_stack.clouds_yaml)
    assert second.status == "unchanged", second
    assert sorted(second.unchanged_targets) == sorted(spec.targets) and "unchanged" in second.line()
    assert _statuses(conn, image_name) == ["stable"]
    assert [p.rstrip("/").rsplit("/", 1)[-1] for p in s3.list_prefixes(s3_client, bucket, f"catalog/{image_name}")] \
        == [night1.build_id]

    # night 3: openssl upgraded from the security suite: published, the diff names it, night 1 is previous
    night3 = BuildRecord.load(make_build(image_name, packages=[OPENSSL_NEW, BASH]))
    third = publish_changes(night3, spec, clouds_yaml=openstack_stack.clouds_yaml)
    assert third.status == "published" and third.replaces == night1.build_id
    assert third.diff is not None
    assert third.diff["upgraded"] == [{"name": "openssl", "old": OPENSSL_OLD["version"],
                                       "new": OPENSSL_NEW["version"], "security": True}]
    assert third.diff["summary"] == "1 upgraded (1 security)"
    stables = {status_of(i): i for i in managed_images(conn, image_name)}
    assert set(stables) == {"stable", "previous"}
    assert stables["previous"].properties["kiln_build_id"] == night1.build_id
    written = json.loads((night3.output / "manifest.json").read_text())
    assert written["diff"]["against"] == night1.build_id and written["diff"]["upgraded"][0]["name"] == "openssl"

    # kiln diff: two output directories, the S3 copies, and Glance's stable against night 1's output
    out = kiln("diff", str(night1.output), str(night3.output)).stdout
    assert f"openssl {OPENSSL_OLD['version']} -> {OPENSSL_NEW['version']}  [security]" in out, out
    # (KILN_STATE, set above, reaches kiln's environment: the Glance stable's manifest is in its records)
    as_json = json.loads(kiln("diff", f"s3://{bucket}/catalog/{image_name}/{night1.build_id}",
                              f"s3://{bucket}/catalog/{image_name}", "--json").stdout)
    assert as_json["new_build"] == night3.build_id and as_json["upgraded"][0]["name"] == "openssl"
    from_glance = kiln("diff", str(night1.output), f"glance:kiln-dev/{image_name}", "--clouds-yaml",
                       str(openstack_stack.clouds_yaml)).stdout
    assert "1 upgraded (1 security)" in from_glance, from_glance
    bad = kiln("diff", str(tmp_path / "nowhere"), str(night3.output), check=False)
    assert bad.returncode == 2 and "nowhere: no such file (give a kiln output directory" in bad.stderr


def test_a_gate_failing_on_one_cloud_leaves_no_cloud_half_promoted(conn: Any, other_conn: Any,
                                                                  openstack_stack: OpenStack, make_build: MakeBuild,
                                                                  image_name: str) -> None:
    spec = PublishSpec(targets=["glance:kiln-dev", f"glance:{OTHER_CLOUD}"])
    old = BuildRecord.load(make_build(image_name))
    publish(old, spec, clouds_yaml=openstack_stack.clouds_yaml)
    assert _statuses(conn, image_name) == ["stable"] and _statuses(other_conn, image_name) == ["stable"]

    def refuses(candidate: CandidateImage) -> GateResult:  # this cloud's gate: its boot fails
        return GateResult(False, f"image {candidate.image_id} did not boot on {candidate.cloud}")

    new = BuildRecord.load(make_build(image_name))
    with pytest.raises(GateFailedError, match=f"cloud '{OTHER_CLOUD}'"):
        publish(new, spec, clouds_yaml=openstack_stack.clouds_yaml, gates={OTHER_CLOUD: refuses})
    # kiln-dev's candidate passed its gate but was never promoted, and is gone with the other's
    for c in (conn, other_conn):
        images = managed_images(c, image_name)
        assert [status_of(i) for i in images] == ["stable"], [(i.id, status_of(i)) for i in images]
        assert images[0].properties["kiln_build_id"] == old.build_id
