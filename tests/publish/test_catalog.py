"""`kiln images`: the catalog of what is published, against the real local Glance and S3 (issue 19)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from kiln.cli import publish as publish_cli
from kiln.cli.common import KilnArgumentParser
from kiln.cloud import s3
from kiln.model.publishing import PublishSpec
from kiln.model.record import BuildRecord
from kiln.publish.core import publish
from kiln.publish.gates import manifest_gate
from kiln.publish.promote import upload_candidate
from tests.publish.conftest import MakeBuild, OpenStack

pytestmark = pytest.mark.slow


def kiln_images(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="kiln")
    publish_cli.register(parser.add_subparsers(dest="cmd", required=True, parser_class=KilnArgumentParser))
    parsed = parser.parse_args(["images", *args, "--json"])
    assert parsed.func(parsed) == 0
    rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return rows


def test_the_glance_catalog_has_stable_previous_and_candidate(conn: Any, openstack_stack: OpenStack,
                                                              make_build: MakeBuild, image_name: str,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KILN_STATE", str(tmp_path / "state"))  # this host's publish records
    clouds = ["--cloud", openstack_stack.cloud, "--clouds-yaml", str(openstack_stack.clouds_yaml)]
    parser = argparse.ArgumentParser(prog="kiln")
    publish_cli.register(parser.add_subparsers(dest="cmd", required=True, parser_class=KilnArgumentParser))
    builds = []
    for seed in (31, 32):  # published through the command line: the second makes the first previous
        out = make_build(image_name, seed=seed, packages=[{"name": "bash", "version": "5.2", "arch": "amd64"}])
        args = parser.parse_args(["publish", str(out), "--name", image_name, "--json", *clouds])
        assert args.func(args) == 0
        capsys.readouterr()
        builds.append(BuildRecord.load(out))
    # a third build uploaded as a candidate and left there (as a publish interrupted before its gate)
    third = BuildRecord.load(make_build(image_name, seed=33))
    candidate = upload_candidate(conn, third, third.image(), PublishSpec(), name=image_name)

    rows = kiln_images([image_name, *clouds], capsys)
    assert [(r["state"], r["build_id"]) for r in rows] == [
        ("stable", builds[1].build_id), ("previous", builds[0].build_id), ("candidate", third.build_id)]
    by_state = {r["state"]: r for r in rows}
    assert by_state["candidate"]["ref"] == candidate.id
    # what this host recorded when it published: the package count and the boot results
    assert by_state["stable"]["packages"] == 1 and by_state["stable"]["boot_test"] == ["bios passed", "uefi passed"]
    assert by_state["candidate"]["packages"] is None  # published by nobody on this host: unknown, not 0
    assert all(r["in_use"] is None for r in rows)  # this Glance has no Nova: nothing to ask
    assert all(r["where"] == f"glance:{openstack_stack.cloud}" for r in rows)
    # and for people: one row per version
    args = parser.parse_args(["images", image_name, *clouds])
    assert args.func(args) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split()[:3] == ["name", "state", "build"] and len(text) == 4


def test_the_s3_catalog_has_the_stable_build_and_older_ones(s3_client: Any, bucket: str, make_build: MakeBuild,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    spec = PublishSpec(targets=[f"s3://{bucket}/catalog"], name="deb", keep=5)
    builds = [BuildRecord.load(make_build("deb", seed=seed)) for seed in (41, 42)]
    for build in builds:
        publish(build, spec, gate=manifest_gate)
    rows = kiln_images(["--s3", f"s3://{bucket}/catalog"], capsys)
    assert [(r["name"], r["state"], r["build_id"]) for r in rows] == [
        ("deb", "stable", builds[1].build_id), ("deb", "retired", builds[0].build_id)]
    assert rows[0]["packages"] == 0 and rows[0]["boot_test"] == ["bios passed", "uefi passed"]
    assert s3.list_prefixes(s3_client, bucket, "catalog") == ["catalog/deb/"]
