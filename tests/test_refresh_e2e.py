"""The nightly refresh for real: the `nightly-refresh` deployment run through a Prefect server and a
process worker (as the schedule or the UI runs it), two cells built from a private Debian-layout archive
(release, -updates, -security, signed by a throwaway key, served on 127.0.0.1), published to the local
Glance and S3 through the matrix's `publish:` section.

    night 1: both cells built, booted and published
    night 2: nothing new in the archive: both rebuilt from the cache, nothing published, "unchanged"
    night 3: a security upload (a newer `hostname`) in both -security suites: new bases, both published,
             each with a package diff naming the upgrade as a security one; night 1's images kept as previous

The archive's packages are the .debs this session's default-image build downloaded (seed_build).
About 8-10 min here: two bootstraps and two BIOS boots under TCG, twice.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.cloud import glance, s3
from kiln.publish.promote import managed_images, status_of
from tests.e2e import kiln, kiln_env, leftovers
from tests.publish.conftest import OpenStack, openstack_stack, s3_stack  # noqa: F401  (fixtures)
from tests.test_deployments_stack import PrefectStack, started_stack
from tests.test_private_mirror_e2e import PATCHED, distribution_debs, publish_suite, rebuild_newer
from tests.upstream_fixtures import FixtureServer, GpgKey, make_key

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]

RELEASES = ("kilnone", "kilntwo")


def make_archive(root: Path, debs: Path, key: GpgKey, installed: list[dict[str, Any]]) -> Path:
    """Both releases from one pool, each with an empty -updates and an empty -security suite."""
    import os

    archive = root / "archive"
    pool = archive / "pool" / "main"
    pool.mkdir(parents=True)
    for deb in distribution_debs(debs, installed):
        os.link(deb, pool / deb.name)
    (archive / "pool" / "security").mkdir()
    for release in RELEASES:
        publish_suite(archive, release, "main", key, components=("main",))
        publish_suite(archive, f"{release}-updates", None, key, components=("main",))
        publish_suite(archive, f"{release}-security", None, key, components=("main",))
    return archive


@pytest.fixture
def prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    with started_stack(tmp_path_factory.mktemp("refresh-prefect")) as stack:
        yield stack


def _cleanup(conn: Any, names: list[str]) -> None:
    for name in names:
        for image in glance.list_images(conn, {"kiln_name": name}):
            glance.delete_image(conn, image)


def test_nightly_refresh_publishes_what_changed_and_only_that(
        seed_build: tuple[Path, dict[str, Any], float],
        openstack_stack: OpenStack, s3_stack: dict[str, str],  # noqa: F811
        prefect: PrefectStack, tmp_path: Path) -> None:
    debs = Path(kiln_env()["KILN_CACHE"]) / "debs" / "debian-amd64"
    key = make_key(tmp_path / "archive-key", "kiln refresh archive")
    archive = make_archive(tmp_path, debs, key, seed_build[1]["packages"])
    server = FixtureServer(archive)
    bucket = f"kiln-refresh-{secrets.token_hex(4)}"
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    conn = glance.connect(openstack_stack.cloud, clouds_yaml=openstack_stack.clouds_yaml)
    prefix = f"kr{secrets.token_hex(3)}"
    names = [f"{prefix}-{r}" for r in RELEASES]
    mirror = server.url("").rstrip("/")
    matrix = tmp_path / "refresh.yaml"
    matrix.write_text(json.dumps({
        "name": "refresh-test", "cell_name": prefix + "-{release}",
        # growroot and openssh-server: without them the root stays at the image's size on a bigger disk, and
        # cloud-init's ssh module logs a traceback for every host key it cannot make: the conformance suite
        # fails such an image
        "base": {"distro": "debian", "elements": ["vm", "cloud-init", "growroot", "openssh-server"], "size": "2G",
                 "mirror": mirror, "security_mirror": mirror, "mirror_keyring": str(key.keyring),
                 "boot_test": {"firmware": ["bios"]}},
        "axes": {"release": list(RELEASES)},
        "publish": {"targets": [f"glance:{openstack_stack.cloud}", f"s3://{bucket}/catalog"], "keep": 3},
    }))
    out = tmp_path / "out"
    state = tmp_path / "kiln-state"
    prefect.worker("refresh-worker", limit=3, PREFECT_WORKER_QUERY_SECONDS="2", KILN_STATE=str(state),
                   OS_CLIENT_CONFIG_FILE=str(openstack_stack.clouds_yaml))

    def logs_with(run_id: str, text: str) -> str:
        """The run's logs once they hold `text` (they reach the API in batches, a little after the run ends)."""
        deadline = time.monotonic() + 60
        while True:
            logs = "\n".join(prefect.logs(run_id))
            if text in logs or time.monotonic() > deadline:
                return logs
            time.sleep(2)

    def night() -> tuple[dict[str, Any], dict[str, Any], str]:
        run_id = prefect.run_deployment("nightly-refresh/nightly-refresh", {
            "matrix": str(matrix), "output": str(out)})
        run = prefect.wait(run_id, timeout=2400)
        assert run["state_type"] == "COMPLETED", f"{run['state']['message']}\n{prefect.log_tail()}"
        summary = json.loads((out / "matrix.json").read_text())
        cells = {c["name"]: c for c in summary["cells"]}
        artifact = next(a for a in prefect.artifacts(run_id) if a["key"] == "matrix-refresh-test")
        return cells, artifact, logs_with(run_id, f"refresh refresh-test: {names[-1]}: ")

    try:
        # night 1: both published, each the only (stable) image of its name
        cells, artifact, _ = night()
        night1 = {}
        for name in names:
            assert cells[name]["status"] == "built" and cells[name]["published"]["status"] == "published", cells[name]
            assert all(b["passed"] and not b["cached"] for b in cells[name]["boot_test"])
            [image] = managed_images(conn, name)
            assert status_of(image) == "stable"
            night1[name] = image
        assert "published" in artifact["data"]

        # night 2: nothing new: built again from the cache, nothing published
        cells, artifact, logs = night()
        for name in names:
            assert cells[name]["published"]["status"] == "unchanged", cells[name]
            assert [i.id for i in managed_images(conn, name)] == [night1[name].id]
            assert len(s3.list_prefixes(client, bucket, f"catalog/{name}")) == 1
        assert artifact["data"].count("| unchanged |") == 2, artifact["data"]
        assert f"{names[0]}: built, unchanged" in logs, logs[-3000:]

        # a security upload to both releases
        newer = {}
        original = max((archive / "pool" / "main").glob(f"{PATCHED}_*.deb"))
        version, _ = rebuild_newer(original, "+kilnsec1", archive / "pool" / "security")
        for release in RELEASES:
            publish_suite(archive, f"{release}-security", "security", key, components=("main",))
            newer[release] = version

        # night 3: both published with a diff naming the upgrade; night 1's images kept as previous
        cells, artifact, _ = night()
        for release, name in zip(RELEASES, names, strict=True):
            published = cells[name]["published"]
            assert published["status"] == "published", cells[name]
            assert published["replaces"] == night1[name].properties["kiln_build_id"]
            [upgrade] = published["diff"]["upgraded"]
            assert upgrade["name"] == PATCHED and upgrade["new"] == newer[release] and upgrade["security"] is True
            by_status = {status_of(i): i for i in managed_images(conn, name)}
            assert set(by_status) == {"stable", "previous"}, by_status
            assert by_status["previous"].id == night1[name].id
            manifest = json.loads((out / name / "manifest.json").read_text())
            assert manifest["diff"]["upgraded"][0]["name"] == PATCHED
            # the build record says where it went (issue 14: `published` was never filled)
            assert [(p["status"], p["replaces"]) for p in manifest["published"]] == [
                ("published", night1[name].properties["kiln_build_id"])], manifest["published"]
            assert {p["name"]: p["suite"] for p in manifest["packages"]}[PATCHED] == f"{release}-security"
            assert len(s3.list_prefixes(client, bucket, f"catalog/{name}")) == 2
        assert f"~ {PATCHED}" in artifact["data"] and "[security]" in artifact["data"], artifact["data"]

        # the same flow from the command line, in its own process: one cell, nothing new since night 3
        env = {**kiln_env(), "OS_CLIENT_CONFIG_FILE": str(openstack_stack.clouds_yaml)}
        cli = kiln("refresh", str(matrix), "--only", f"release={RELEASES[0]}", "--output", str(tmp_path / "cli"),
                   env=env)
        assert f"{names[0]}" in cli.stdout and "unchanged" in cli.stdout, cli.stdout
        assert names[1] not in cli.stdout
        as_json = json.loads(kiln("refresh", str(matrix), "--only", f"release={RELEASES[0]}", "--output",
                                  str(tmp_path / "cli"), "--json", env=env).stdout)
        assert [(c["name"], c["published"]["status"]) for c in as_json["cells"]] == [(names[0], "unchanged")]
        assert leftovers() == []
    finally:
        _cleanup(conn, names)
        s3.delete_keys(client, bucket, [o.key for o in s3.list_objects(client, bucket, "")])
        client.delete_bucket(Bucket=bucket)
        server.close()
        key.stop()
