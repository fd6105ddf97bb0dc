"""Publishing to a real Glance (behind a real Keystone, password login through clouds.yaml) on 127.0.0.1,
started by infra/openstack/up.sh. Every test has an image name of its own and deletes what it made."""

from __future__ import annotations

import argparse
import hashlib
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from kiln.cli import publish as publish_cli
from kiln.cloud import glance
from kiln.host.run import run
from kiln.model.publishing import CANDIDATE_TAG, GateFailedError, PublishError, PublishSpec
from kiln.model.record import BuildRecord
from kiln.publish.gates import CandidateImage, GateResult, manifest_gate
from kiln.publish.promote import managed_images, publish_glance, rollback, status_of
from kiln.publish.retention import retain_glance
from tests.publish.conftest import MakeBuild, OpenStack, digests

pytestmark = pytest.mark.slow


def _spec(**kw: Any) -> PublishSpec:
    return PublishSpec(**{"targets": ["glance:kiln-dev"], "visibility": "public", **kw})


def _by_status(conn: Any, name: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for image in managed_images(conn, name):
        out.setdefault(status_of(image), []).append(image)
    return out


def _all_image_ids(conn: Any) -> set[str]:
    return {i.id for i in glance.list_images(conn)}


def test_upload_records_properties_and_glance_sha512_matches_the_build(conn: Any, make_build: MakeBuild,
                                                                       image_name: str) -> None:
    out = make_build(image_name)
    build = BuildRecord.load(out)
    report = publish_glance(conn, build, _spec(tags=["nightly"], properties={"os_admin_user": "debian"}),
                            gate=manifest_gate, name=image_name)
    assert report.action == "uploaded"
    image = glance.get_image(conn, report.image_id)
    local = digests(out / f"{image_name}.qcow2")
    assert image.hash_algo == "sha512"
    assert image.hash_value == local["sha512"] == build.images[0].sha512
    assert image.name == image_name and image.visibility == "public" and image.status == "active"
    assert image.disk_format == "qcow2" and image.container_format == "bare"
    assert image.min_disk == 4 and image.min_ram == 1024
    assert set(image.tags) == {"nightly"}, "the candidate tag goes when the image is promoted"
    props = image.properties
    assert {k: props[k] for k in ("os_distro", "os_version", "architecture", "hw_disk_bus", "hw_qemu_guest_agent",
                                  "os_admin_user")} == {
        "os_distro": "debian", "os_version": "12", "architecture": "x86_64", "hw_disk_bus": "virtio",
        "hw_qemu_guest_agent": "yes", "os_admin_user": "debian"}
    assert "hw_firmware_type" not in props
    assert props["kiln_build_id"] == build.build_id
    assert props["kiln_sha256"] == local["sha256"]
    assert props["kiln_base_checksum"] == build.base["key"]
    assert props["kiln_status"] == "stable"
    assert props["kiln_element_vm"] == build.elements[6].sha256
    assert "owner_specified.openstack.object" not in props


def test_openstack_image_show_lists_the_properties(conn: Any, openstack_stack: OpenStack, make_build: MakeBuild,
                                                   image_name: str) -> None:
    report = publish_glance(conn, BuildRecord.load(make_build(image_name)), _spec(), gate=manifest_gate,
                            name=image_name)
    shown = run([str(openstack_stack.venv / "bin" / "openstack"), "--os-cloud", "kiln-dev", "image", "show",
                 report.image_id, "-f", "json"], env={"OS_CLIENT_CONFIG_FILE": str(openstack_stack.clouds_yaml),
                                                      "PATH": "/usr/bin:/bin"}, quiet=True)
    body = json.loads(shown.output[shown.output.index("{"):])
    props = body["properties"]
    for key in ("os_distro", "os_version", "architecture", "hw_disk_bus", "hw_qemu_guest_agent", "kiln_build_id",
                "kiln_spec_sha256", "kiln_elements_sha256", "kiln_base_checksum", "kiln_status", "os_hash_value"):
        assert key in props, f"openstack image show lacks {key}"
    assert props["os_hash_algo"] == "sha512"
    assert body["name"] == image_name and body["min_ram"] == 1024


def test_publishing_the_same_content_twice_uploads_nothing(conn: Any, make_build: MakeBuild,
                                                           image_name: str) -> None:
    first = publish_glance(conn, BuildRecord.load(make_build(image_name, seed=7)), _spec(), gate=manifest_gate,
                           name=image_name)
    created = glance.get_image(conn, first.image_id).created_at
    images_before = _all_image_ids(conn)
    # a second build with identical bytes (a cached rebuild: new build id, same image)
    again = publish_glance(conn, BuildRecord.load(make_build(image_name, seed=7)), _spec(), gate=manifest_gate,
                           name=image_name)
    assert again.action == "already-stable" and again.image_id == first.image_id
    assert _all_image_ids(conn) == images_before, "no image was created"
    assert glance.get_image(conn, first.image_id).created_at == created
    assert [i.id for i in managed_images(conn, image_name)] == [first.image_id]


def test_a_file_changed_after_the_build_is_caught_and_its_image_deleted(conn: Any, make_build: MakeBuild,
                                                                        image_name: str) -> None:
    """A real corruption, not an injected one: the build recorded the checksums, then the file changed
    (same size, so the cheap checks before the upload pass). Glance computes the sha512 of what it got."""
    out = make_build(image_name, formats=("raw",))
    build = BuildRecord.load(out)
    path = out / f"{image_name}.raw"
    with path.open("r+b") as fh:
        fh.seek(1 << 20)
        fh.write(b"\xff" * 512)
    before = _all_image_ids(conn)
    with pytest.raises(glance.ChecksumMismatchError, match="changed after the build") as err:
        publish_glance(conn, build, _spec(), gate=manifest_gate, name=image_name)
    assert "the image was deleted" in str(err.value)
    assert _all_image_ids(conn) == before
    assert managed_images(conn, image_name) == []


def test_promotion_runs_the_gate_on_a_private_candidate_and_keeps_the_previous(conn: Any, make_build: MakeBuild,
                                                                                image_name: str) -> None:
    seen: list[dict[str, Any]] = []

    def inspecting_gate(candidate: CandidateImage) -> GateResult:
        """The manifest gate, after recording what the candidate looks like in Glance while it is gated."""
        assert candidate.image_id is not None
        image = glance.get_image(conn, candidate.image_id)
        stable = [i.id for i in _by_status(conn, image_name).get("stable", [])]
        seen.append({"name": image.name, "visibility": image.visibility, "tags": list(image.tags),
                     "status": status_of(image), "stable": stable})
        return manifest_gate(candidate)

    a = publish_glance(conn, BuildRecord.load(make_build(image_name)), _spec(), gate=inspecting_gate, name=image_name)
    assert seen[0]["visibility"] == "private" and seen[0]["tags"] == [CANDIDATE_TAG]
    assert seen[0]["status"] == "candidate" and seen[0]["name"].startswith(f"{image_name}-candidate-")
    assert seen[0]["stable"] == [], "nothing takes the stable name before the gate passed"

    b = publish_glance(conn, BuildRecord.load(make_build(image_name)), _spec(), gate=inspecting_gate, name=image_name)
    assert seen[1]["stable"] == [a.image_id], "the old stable stays stable while the candidate is gated"
    assert b.previous_id == a.image_id
    state = _by_status(conn, image_name)
    assert [i.id for i in state["stable"]] == [b.image_id]
    assert [i.id for i in state["previous"]] == [a.image_id]
    prev = state["previous"][0]
    assert prev.name == f"{image_name}-previous" and not prev.hidden

    c = publish_glance(conn, BuildRecord.load(make_build(image_name)), _spec(), gate=inspecting_gate, name=image_name)
    state = _by_status(conn, image_name)
    assert [i.id for i in state["stable"]] == [c.image_id]
    assert [i.id for i in state["previous"]] == [b.image_id]
    assert [i.id for i in state["retired"]] == [a.image_id] and state["retired"][0].hidden
    stable = state["stable"][0]
    assert stable.name == image_name and stable.visibility == "public" and CANDIDATE_TAG not in stable.tags


def test_a_failed_candidate_is_deleted_and_the_stable_image_stays_as_it_was(conn: Any, make_build: MakeBuild,
                                                                            image_name: str) -> None:
    a = publish_glance(conn, BuildRecord.load(make_build(image_name)), _spec(), gate=manifest_gate, name=image_name)
    stable_before = glance.get_image(conn, a.image_id)
    gated: list[str] = []

    def console_gate(candidate: CandidateImage) -> GateResult:
        """Stands in for a boot in the cloud: sees the uploaded candidate, reports the console's verdict."""
        assert candidate.image_id is not None
        assert glance.get_image(conn, candidate.image_id).status == "active"
        gated.append(candidate.image_id)
        return GateResult(False, "no 'login:' on the console within 600 s", ("BdsDxe: failed to load Boot0001",))

    bad = BuildRecord.load(make_build(image_name))
    with pytest.raises(GateFailedError, match="no 'login:'") as err:
        publish_glance(conn, bad, _spec(), gate=console_gate, name=image_name)
    assert "BdsDxe" in str(err.value)
    assert gated and gated[0] not in _all_image_ids(conn), "the candidate was deleted"
    assert [i.id for i in managed_images(conn, image_name)] == [a.image_id]
    assert not [i for i in glance.list_images(conn) if i.hash_value == bad.images[0].sha512]
    stable_after = glance.get_image(conn, a.image_id)
    assert (stable_after.name, stable_after.visibility, stable_after.updated_at, status_of(stable_after)) == \
        (stable_before.name, stable_before.visibility, stable_before.updated_at, "stable")


def test_a_build_whose_own_boot_test_failed_is_not_even_uploaded(conn: Any, make_build: MakeBuild,
                                                                 image_name: str) -> None:
    failing = make_build(image_name, boots=[{"firmware": "bios", "passed": True, "seconds": 90, "accel": "tcg"},
                                            {"firmware": "uefi", "passed": False, "seconds": 900, "accel": "tcg",
                                             "tail": ["BdsDxe: failed to load Boot0001"]}])
    before = _all_image_ids(conn)
    with pytest.raises(GateFailedError, match="failed under uefi") as err:
        publish_glance(conn, BuildRecord.load(failing), _spec(), gate=manifest_gate, name=image_name)
    assert "BdsDxe" in str(err.value)
    assert _all_image_ids(conn) == before


def test_a_gate_that_rejects_everything_never_promotes(conn: Any, make_build: MakeBuild, image_name: str) -> None:
    def reject(candidate: CandidateImage) -> GateResult:
        return GateResult(False, "console shows no login prompt", ("[  OK  ] Reached target", "no login:"))

    with pytest.raises(GateFailedError, match="no login prompt"):
        publish_glance(conn, BuildRecord.load(make_build(image_name)), _spec(), gate=reject, name=image_name)
    assert managed_images(conn, image_name) == []


def test_rollback_restores_the_previous_image_and_refuses_to_repromote_the_withdrawn(
        conn: Any, make_build: MakeBuild, image_name: str) -> None:
    a = publish_glance(conn, BuildRecord.load(make_build(image_name, seed=1)), _spec(), gate=manifest_gate,
                       name=image_name)
    b_out = make_build(image_name, seed=2)
    b = publish_glance(conn, BuildRecord.load(b_out), _spec(), gate=manifest_gate, name=image_name)
    c = publish_glance(conn, BuildRecord.load(make_build(image_name, seed=3)), _spec(), gate=manifest_gate,
                       name=image_name)
    report = rollback(conn, image_name)
    assert (report.restored_id, report.withdrawn_id, report.previous_id) == (b.image_id, c.image_id, a.image_id)
    state = _by_status(conn, image_name)
    restored = state["stable"][0]
    assert restored.id == b.image_id and restored.name == image_name and restored.visibility == "public"
    assert state["withdrawn"][0].id == c.image_id and state["withdrawn"][0].hidden
    assert state["previous"][0].id == a.image_id and state["previous"][0].name == f"{image_name}-previous"

    # a nightly rebuild with the withdrawn content must not quietly bring it back
    with pytest.raises(PublishError, match="withdrawn"):
        publish_glance(conn, BuildRecord.load(make_build(image_name, seed=3)), _spec(), gate=manifest_gate,
                       name=image_name)
    again = publish_glance(conn, BuildRecord.load(make_build(image_name, seed=3)), _spec(), gate=manifest_gate,
                           name=image_name, allow_withdrawn=True)
    assert again.action == "reused" and again.image_id == c.image_id

    # the previous image's content comes back without an upload either
    back = publish_glance(conn, BuildRecord.load(b_out), _spec(), gate=manifest_gate, name=image_name)
    assert back.action == "reused" and back.image_id == b.image_id


def test_rollback_without_a_previous_image_says_so(conn: Any, make_build: MakeBuild, image_name: str) -> None:
    with pytest.raises(PublishError, match="no stable image"):
        rollback(conn, image_name)
    publish_glance(conn, BuildRecord.load(make_build(image_name)), _spec(), gate=manifest_gate, name=image_name)
    with pytest.raises(PublishError, match="no previous image"):
        rollback(conn, image_name)


def test_retention_keeps_the_newest_n_and_never_an_image_in_use(conn: Any, make_build: MakeBuild,
                                                                image_name: str) -> None:
    """Without Nova here, which image a server uses is an injected predicate; the default one (ask Nova
    when the catalog has compute) is exercised by the Nova issue's tests."""
    ids = [publish_glance(conn, BuildRecord.load(make_build(image_name)), _spec(), gate=manifest_gate,
                          name=image_name).image_id for _ in range(5)]
    oldest, second = ids[0], ids[1]

    def in_use(image: Any) -> bool:  # a server still runs from the oldest image
        return bool(image.id == oldest)

    report = retain_glance(conn, image_name, keep=2, in_use=in_use)
    assert report.kept_in_use == [oldest]
    assert sorted(report.deleted) == sorted([second, ids[2]])
    state = _by_status(conn, image_name)
    assert [i.id for i in state["stable"]] == [ids[4]]
    assert [i.id for i in state["previous"]] == [ids[3]]
    assert [i.id for i in state["retired"]] == [oldest]
    assert {i.id for i in glance.list_images(conn)} >= {oldest, ids[3], ids[4]}


def test_the_default_in_use_check_asks_nova_only_when_the_catalog_has_compute(conn: Any, make_build: MakeBuild,
                                                                              image_name: str) -> None:
    report = publish_glance(conn, BuildRecord.load(make_build(image_name)), _spec(), gate=manifest_gate,
                            name=image_name)
    assert glance.has_compute(conn) is False  # this stack is Keystone + Glance
    assert glance.servers_using(conn, report.image_id) == []
    assert glance.image_in_use(conn, glance.get_image(conn, report.image_id)) is False


def test_kiln_publish_and_kiln_rollback_on_the_command_line(conn: Any, openstack_stack: OpenStack,
                                                            make_build: MakeBuild, image_name: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="kiln")
    publish_cli.register(parser.add_subparsers(dest="cmd", required=True))
    clouds = ["--clouds-yaml", str(openstack_stack.clouds_yaml)]
    reports = []
    for seed in (11, 12):
        out = make_build(image_name, seed=seed)
        args = parser.parse_args(["publish", str(out), "--to", "glance:kiln-dev",
                                  "--name", image_name, "--visibility", "community", "--keep", "2", "--json",
                                  *clouds])
        assert args.func(args) == 0
        reports.append(json.loads(capsys.readouterr().out))
        # the build's record says where it went (issue 14: manifest.json's `published` was never filled)
        published = BuildRecord.load(out).published
        assert [p["glance"][0]["image_id"] for p in published] == [reports[-1]["glance"][0]["image_id"]]
    report = reports[1]
    assert report["glance"][0]["action"] == "uploaded" and report["glance"][0]["previous_id"]
    args = parser.parse_args(["rollback", image_name, "--cloud", "kiln-dev", *clouds])
    assert args.func(args) == 0
    assert "again" in capsys.readouterr().out
    assert glance.get_image(conn, report["glance"][0]["previous_id"]).name == image_name


def test_a_real_kiln_build_publishes_and_downloads_streamed(conn: Any, image_name: str, tmp_path: Path,
                                                           default_build: Path) -> None:
    build = BuildRecord.load(default_build)
    report = publish_glance(conn, build, _spec(), gate=lambda c: GateResult(True, "gated by the build's own test"),
                            name=image_name)
    image = glance.get_image(conn, report.image_id)
    assert image.hash_value == build.images[0].sha512 and image.size == build.images[0].size
    props = image.properties
    assert props["kiln_build_id"] == build.build_id and props["os_distro"] == build.spec["distro"]

    tracemalloc.start()
    try:
        glance.download_image(conn, image, tmp_path / "back.img")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"the download held {peak >> 20} MiB in memory at once"
    h = hashlib.sha256()
    with (tmp_path / "back.img").open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    assert h.hexdigest() == build.images[0].sha256


def test_publish_to_glance_and_s3_together_then_again_uploads_nothing(conn: Any, openstack_stack: OpenStack,
                                                                       s3_client: Any, bucket: str,
                                                                       make_build: MakeBuild, image_name: str) -> None:
    from kiln.cloud import s3
    from kiln.publish.core import publish

    spec = PublishSpec(targets=["glance:kiln-dev", f"s3://{bucket}/catalog"], visibility="public", keep=2,
                       tags=["nightly"])
    build = BuildRecord.load(make_build(image_name))
    first = publish(build, spec, clouds_yaml=openstack_stack.clouds_yaml)
    assert first.glance[0].action == "uploaded" and len(first.s3[0].uploaded) == 3
    assert "booted" in first.gate
    key = f"catalog/{image_name}/{build.build_id}/{image_name}.qcow2"
    head = s3.head(s3_client, bucket, key)
    assert head is not None
    again = publish(build, spec, clouds_yaml=openstack_stack.clouds_yaml)
    assert again.glance[0].action == "already-stable" and again.glance[0].image_id == first.glance[0].image_id
    assert again.s3[0].uploaded == [] and len(again.s3[0].skipped) == 3
    head_again = s3.head(s3_client, bucket, key)
    assert head_again is not None
    assert (head_again["ETag"], head_again["LastModified"]) == (head["ETag"], head["LastModified"])
