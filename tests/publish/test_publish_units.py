"""Fast tests of publishing's pure parts: properties from a manifest, retention, the gate, settings."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kiln.boot import nova
from kiln.cli import publish as publish_cli
from kiln.cloud import s3
from kiln.cloud.properties import glance_properties, min_disk_gib, min_ram_mib
from kiln.model.publishing import PublishError, PublishSpec, Status
from kiln.model.record import BuildRecord, ImageRecord
from kiln.publish.gates import GATES, CandidateImage, build_gate, choose_gates, manifest_gate, no_gate, qemu_gate
from kiln.publish.retention import Version, plan_retention
from tests.publish.conftest import MakeBuild, manifest_for

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _build(**manifest_args: object) -> tuple[BuildRecord, ImageRecord]:
    image = ImageRecord(file="x.qcow2", format="qcow2", size=10, sha256="a" * 64, sha512="b" * 128)
    manifest = manifest_for("debian-12-amd64", build_id="20261129T000000Z-abcdef", **manifest_args)  # type: ignore[arg-type]
    return BuildRecord.model_validate({**manifest, "images": [image], "output": Path("/nonexistent")}), image


def _changed(build: BuildRecord, change: Callable[[dict[str, Any]], object]) -> BuildRecord:
    """The build as if its manifest had been written with `change` applied."""
    manifest = build.manifest()
    change(manifest)
    return BuildRecord.model_validate({**manifest, "output": build.output})


def test_properties_map_the_manifest_to_what_nova_reads() -> None:
    build, image = _build()
    props = glance_properties(build, image, PublishSpec(), name="debian-12")
    assert props["os_distro"] == "debian"
    assert props["os_version"] == "12"
    assert props["architecture"] == "x86_64"
    assert props["hw_disk_bus"] == "virtio"
    assert props["hw_qemu_guest_agent"] == "yes"
    assert "hw_firmware_type" not in props, "a BIOS+UEFI disk must not be pinned to UEFI"
    assert props["kiln_name"] == "debian-12"
    assert props["kiln_build_id"] == "20261129T000000Z-abcdef"
    assert props["kiln_sha256"] == "a" * 64
    assert props["kiln_base_checksum"] == build.base["key"]
    assert len(props["kiln_spec_sha256"]) == 64 and len(props["kiln_elements_sha256"]) == 64
    assert props["kiln_element_qemu-guest-agent"] == build.elements[5].sha256
    assert all(len(v) <= 255 for v in props.values())


def test_os_version_is_the_release_number_for_debian_and_ubuntu() -> None:
    """Nova and Glance read os_version as a number: Ubuntu's was its codename (issue 14)."""
    build, image = _build()
    for distro, release, version in (("debian", "bookworm", "12"), ("debian", "trixie", "13"),
                                     ("ubuntu", "noble", "24.04"), ("ubuntu", "jammy", "22.04"),
                                     ("fedora", "41", "41"), ("ubuntu", "unknownrelease", "unknownrelease")):
        changed = _changed(build, lambda m, d=distro, r=release: m["spec"].update(distro=d, release=r))
        props = glance_properties(changed, image, PublishSpec(), name="n")
        assert (props["os_distro"], props["os_version"]) == (distro, version)


def test_spec_hash_changes_with_the_spec_and_elements_hash_with_an_element() -> None:
    build, image = _build()
    before = glance_properties(build, image, PublishSpec(), name="n")
    build = _changed(build, lambda m: (m["spec"].update(packages=["htop"]), m["elements"][0].update(sha256="0" * 64)))
    after = glance_properties(build, image, PublishSpec(), name="n")
    assert before["kiln_spec_sha256"] != after["kiln_spec_sha256"]
    assert before["kiln_elements_sha256"] != after["kiln_elements_sha256"]


def test_the_spec_hash_ignores_where_the_image_is_published() -> None:
    build, image = _build()
    before = glance_properties(build, image, PublishSpec(), name="n")["kiln_spec_sha256"]
    build = _changed(build, lambda m: m["spec"].update(publish={"targets": ["glance:prod"], "keep": 7}))
    assert glance_properties(build, image, PublishSpec(), name="n")["kiln_spec_sha256"] == before


def test_uefi_only_images_say_so() -> None:
    build, image = _build(arch="arm64")
    props = glance_properties(build, image, PublishSpec(), name="n")
    assert props["hw_firmware_type"] == "uefi" and props["architecture"] == "aarch64"
    build, image = _build()
    build = _changed(build, lambda m: m["disk"].update(firmware=["uefi"]))
    assert glance_properties(build, image, PublishSpec(), name="n")["hw_firmware_type"] == "uefi"


def test_without_the_guest_agent_element_the_property_says_no() -> None:
    build, image = _build()
    build = _changed(build, lambda m: m.update(elements=[e for e in m["elements"] if e["name"] != "qemu-guest-agent"]))
    assert glance_properties(build, image, PublishSpec(), name="n")["hw_qemu_guest_agent"] == "no"


def test_spec_properties_override_kilns_defaults() -> None:
    build, image = _build()
    props = glance_properties(build, image, PublishSpec(properties={"hw_disk_bus": "scsi", "os_admin_user": "debian"}),
                              name="n")
    assert props["hw_disk_bus"] == "scsi" and props["os_admin_user"] == "debian"


def test_min_disk_rounds_up_and_min_ram_defaults_to_the_boot_test_memory() -> None:
    build, _ = _build()
    build = _changed(build, lambda m: m["disk"].update(size=4 * 1024**3 + 1))
    assert min_disk_gib(build) == 5
    assert min_ram_mib(build, PublishSpec()) == 1024
    assert min_ram_mib(build, PublishSpec(min_ram=512)) == 512


def test_publish_spec_refuses_what_it_does_not_know() -> None:
    with pytest.raises(ValidationError, match="extra"):
        PublishSpec.model_validate({"target": ["glance:x"]})
    with pytest.raises(ValidationError, match="glance:CLOUD or s3://"):
        PublishSpec(targets=["swift:x"])
    with pytest.raises(ValidationError, match="bucket name"):
        PublishSpec(targets=["s3://Bad_Bucket/x"])
    with pytest.raises(ValidationError, match="kiln's or Glance's own"):
        PublishSpec(properties={"kiln_status": "stable"})
    with pytest.raises(ValidationError):
        PublishSpec(keep=0)
    # the name is an S3 prefix and the family retention deletes in: one that reaches another image's objects
    # (another family's prefix, or everything) is refused
    for name in ["other/debian-12", "", "..", "x/../y", "/abs", "prod\n"]:
        with pytest.raises(ValidationError, match="publish name"):
            PublishSpec(name=name)
    assert PublishSpec(name="debian-12-amd64").name == "debian-12-amd64"
    spec = PublishSpec(targets=["glance:a", "s3://bucket-1/images/x", "glance:a"])
    assert spec.glance_clouds == ["a"]
    assert spec.s3_locations == [s3.S3Location("bucket-1", "images/x")]
    with pytest.raises(ValidationError):
        spec.keep = 5  # type: ignore[misc]


def test_s3_urls_split_into_bucket_and_prefix() -> None:
    assert s3.parse_s3_url("s3://images/") == s3.S3Location("images", "")
    loc = s3.parse_s3_url("s3://my.bucket/a/b/")
    assert loc.key("debian", "b1", "x.qcow2") == "a/b/debian/b1/x.qcow2"
    with pytest.raises(s3.S3Error, match=r"'\.\.'"):
        s3.parse_s3_url("s3://bucket/a/../b")


def _v(ident: str, status: Status, hours_ago: float) -> Version:
    return Version(ident, status, NOW - timedelta(hours=hours_ago))


def test_retention_keeps_stable_previous_and_the_newest_others() -> None:
    versions = [_v("s", Status.stable, 10), _v("p", Status.previous, 20), _v("r1", Status.retired, 30),
                _v("r2", Status.retired, 40), _v("r3", Status.retired, 50)]
    plan = plan_retention(versions, keep=3, now=NOW)
    assert [v.id for v in plan.keep] == ["s", "p", "r1"]
    assert sorted(v.id for v in plan.delete) == ["r2", "r3"]


def test_retention_keeps_the_stable_image_even_when_it_is_older() -> None:
    # after a rollback the stable image can be older than the previous and retired ones
    versions = [_v("s", Status.stable, 100), _v("p", Status.previous, 1), _v("r", Status.retired, 2)]
    assert [v.id for v in plan_retention(versions, keep=1, now=NOW).keep] == ["s"]
    assert [v.id for v in plan_retention(versions, keep=2, now=NOW).keep] == ["s", "p"]


def test_retention_drops_withdrawn_and_stale_candidates_but_not_fresh_ones() -> None:
    versions = [_v("s", Status.stable, 5), _v("w", Status.withdrawn, 1), _v("c-fresh", Status.candidate, 1),
                _v("c-stale", Status.candidate, 48)]
    plan = plan_retention(versions, keep=5, now=NOW)
    assert {v.id for v in plan.keep} == {"s", "c-fresh"}
    assert {v.id for v in plan.delete} == {"w", "c-stale"}


def test_retention_refuses_keep_zero() -> None:
    with pytest.raises(PublishError):
        plan_retention([], keep=0, now=NOW)


def _candidate(**manifest_args: object) -> CandidateImage:
    build, image = _build(**manifest_args)
    return CandidateImage("n", build, image)


def test_manifest_gate_passes_a_build_that_booted_under_every_firmware() -> None:
    result = manifest_gate(_candidate())
    assert result.passed and "bios" in result.detail and "uefi" in result.detail


def test_manifest_gate_fails_a_failed_an_untested_and_a_half_tested_build() -> None:
    failed = manifest_gate(_candidate(boots=[{"firmware": "bios", "passed": True},
                                             {"firmware": "uefi", "passed": False, "tail": ["Kernel panic"]}]))
    assert not failed.passed and "uefi" in failed.detail and failed.log_tail == ("Kernel panic",)
    untested = manifest_gate(_candidate(boots=[]))
    assert not untested.passed and "not boot-tested" in untested.detail
    half = manifest_gate(_candidate(boots=[{"firmware": "bios", "passed": True}]))
    assert not half.passed and "uefi" in half.detail


def test_manifest_gate_takes_a_boot_in_nova_for_any_firmware() -> None:
    nova_boot = {"firmware": "bios", "passed": True, "seconds": 70.0, "accel": "nova on c (m1)", "backend": "nova"}
    result = manifest_gate(_candidate(boots=[nova_boot]))  # the spec asked for bios and uefi
    assert result.passed and "nova on c" in result.detail
    failed = manifest_gate(_candidate(boots=[{**nova_boot, "passed": False, "tail": ["grub rescue>"]}]))
    assert not failed.passed and failed.log_tail == ("grub rescue>",)


def test_load_build_reads_a_build_and_catches_a_changed_or_unlisted_file(make_build: MakeBuild) -> None:
    out = make_build("n1", formats=("qcow2", "raw"))
    build = BuildRecord.load(out)
    assert [i.format for i in build.images] == ["qcow2", "raw"]
    assert build.image_path(build.image("raw")) == out / "n1.raw"
    with pytest.raises(PublishError, match="no vmdk image"):
        build.image("vmdk")
    with (out / "n1.raw").open("ab") as fh:
        fh.write(b"x")
    with pytest.raises(PublishError, match="the file changed after the build"):
        BuildRecord.load(out)
    (out / "SHA256SUMS").write_text("")
    with pytest.raises(PublishError, match=r"SHA256SUMS: n1\.qcow2 is missing"):
        BuildRecord.load(out)
    with pytest.raises(PublishError, match=r"manifest\.json: not a kiln build output"):
        BuildRecord.load(out / "nope")


def test_the_spec_publish_section_is_read_from_the_manifest_and_flags_override_it(make_build: MakeBuild) -> None:
    out = make_build("n2", publish={"targets": ["glance:prod"], "visibility": "public", "keep": 5,
                                    "tags": ["nightly"], "properties": {"os_admin_user": "debian"}})
    build = BuildRecord.load(out)
    assert build.publish_spec().targets == ["glance:prod"]
    parser = argparse.ArgumentParser()
    publish_cli.register(parser.add_subparsers())
    args = parser.parse_args(["publish", str(out), "--keep", "2", "--tag", "extra", "--property", "a=b",
                              "--to", "s3://bucket-1/x"])
    spec = publish_cli.spec_from_args(build.publish_spec(), args)
    assert spec.targets == ["s3://bucket-1/x"] and spec.keep == 2 and spec.visibility.value == "public"
    assert spec.tags == ["nightly", "extra"]
    assert spec.properties == {"os_admin_user": "debian", "a": "b"}
    bad = parser.parse_args(["publish", str(out), "--property", "kiln_status=x"])
    with pytest.raises(PublishError, match="kiln's or Glance's own"):
        publish_cli.spec_from_args(build.publish_spec(), bad)


def test_a_bad_publish_section_in_the_manifest_names_the_file(make_build: MakeBuild) -> None:
    out = make_build("n3")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["spec"]["publish"] = {"keep": -1}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PublishError, match=r"manifest\.json: spec\.publish"):
        BuildRecord.load(out).publish_spec()


def test_retention_orders_builds_of_the_same_second_by_build_id() -> None:
    same = NOW - timedelta(hours=1)
    versions = [Version(f"b{i}", Status.retired, same, f"20261129T110000Z-{i:02d}") for i in (3, 1, 4, 2)]
    plan = plan_retention(versions, keep=2, now=NOW)
    assert [v.id for v in plan.keep] == ["b4", "b3"]


def test_the_qemu_gate_turns_a_boot_error_into_a_failed_result(make_build: MakeBuild) -> None:
    """Only the error path: a real boot takes minutes (kiln boot-test's own tests boot for real)."""
    out = make_build("n4")
    (out / "n4.qcow2").unlink()
    build = load_build_unchecked(out)
    result = qemu_gate(CandidateImage("n4", build, build.image("qcow2")))
    assert not result.passed and "missing" in result.detail


def load_build_unchecked(out: Path) -> BuildRecord:
    return BuildRecord.model_validate({**json.loads((out / "manifest.json").read_text()), "output": out})


def test_the_gate_is_chosen_in_one_place() -> None:
    """gates.build_gate and gates.choose_gates: a build boot-tested in Nova and going to Glance is gated by
    the Nova boot of its candidate; otherwise Nova where the cloud has compute, else the build's own boot
    test; S3 alone has no cloud to choose for; an operator's --gate wins everywhere."""
    glance_and_s3 = PublishSpec(targets=["glance:a", "glance:b", "s3://bucket/x"])
    assert build_gate(True, glance_and_s3) == "nova" and build_gate(False, glance_and_s3) is None
    assert build_gate(True, PublishSpec(targets=["s3://bucket/x"])) is None
    gates = choose_gates(glance_and_s3, None, has_compute=lambda cloud: cloud == "a")
    assert gates == {"a": GATES["nova"], "b": GATES["manifest"]}
    assert choose_gates(glance_and_s3, "none", has_compute=lambda cloud: True) == {"a": no_gate, "b": no_gate}
    booted: list[str] = []

    def nova_boot(cloud: str | None, image_id: str, **_: object) -> Any:
        booted.append(image_id)
        raise nova.NovaBootError("the flow's task ran", reason="no server", fault=None, tail=[])

    gated = choose_gates(glance_and_s3, "nova", has_compute=lambda cloud: True, nova_boot=nova_boot)
    assert gated["a"](CandidateImage("n", *_build(), cloud="a", image_id="img-1")).passed is False
    assert booted == ["img-1"]
    assert choose_gates(PublishSpec(targets=["s3://bucket/x"]), None, has_compute=lambda cloud: True) == {}
