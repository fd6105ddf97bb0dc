"""Publishing only what changed: the nightly refresh's publish step (plain Python; the flows call it).

For each target of a build's `publish:` section, the current stable version's content digest (Glance:
the stable image's `kiln_content_sha256`; S3: the stable build's manifest.json) is compared with the
build's. Targets whose stable already has this content get nothing ("unchanged"); the others get the
build through kiln's publishing (candidate, gate, promotion, retention), after the build's manifest has
recorded its package diff against the stable it replaces.

The stable's manifest, for the diff, comes from an S3 target that holds it, else from this host's
records of what it published (`<state>/published/NAME/BUILD_ID.json`, written after every publish).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.cloud import glance, s3
from kiln.cloud.properties import P_CONTENT
from kiln.host.progress import ProgressFactory, no_progress
from kiln.host.state import state_dir
from kiln.model.names import is_plain_name
from kiln.model.pkgdiff import DiffInputError, PackageDiff, content_digest, load_manifest, package_diff
from kiln.model.publishing import PublishError, PublishSpec, S3Error, S3Location, Status, parse_s3_url
from kiln.model.record import BuildRecord
from kiln.publish.core import publish
from kiln.publish.gates import Gate, manifest_gate
from kiln.publish.manifest import write_record
from kiln.publish.promote import build_id_of, managed_images, newest_first, status_of
from kiln.publish.s3_builds import s3_versions

log = logging.getLogger("kiln.refresh")


@dataclass
class Stable:
    """What one target holds under the image's name now."""

    target: str
    build_id: str | None = None
    content: str | None = None
    manifest: dict[str, Any] | None = None


@dataclass
class ChangeReport:
    name: str
    status: str  # published | unchanged
    content: str
    changed_targets: list[str] = field(default_factory=list)
    unchanged_targets: list[str] = field(default_factory=list)
    replaces: str | None = None  # the build id of the stable this build replaces
    replaces_on: str | None = None  # the target whose stable that is (the diff's `target`)
    diff: dict[str, Any] | None = None
    publish: dict[str, Any] | None = None

    def line(self) -> str:
        """What the command line and the summary say of it."""
        if self.status == "unchanged":
            return f"{self.name}: unchanged (the stable image already has this content); nothing published"
        diff = f"; {self.diff['summary']} since {self.replaces}" if self.diff and self.replaces else ""
        return f"{self.name}: published to {', '.join(self.changed_targets)}{diff}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def manifest_diff(report: Mapping[str, Any] | ChangeReport) -> dict[str, Any] | None:
    """What the build's manifest records of a refresh's package diff: against which build, on which target."""
    data = asdict(report) if isinstance(report, ChangeReport) else report
    if not data.get("replaces") or data.get("diff") is None:
        return None
    return {"against": data["replaces"], "target": data.get("replaces_on"), **data["diff"]}


def records_dir() -> Path:
    return state_dir() / "published"


def _record_path(name: str, build_id: str) -> Path:
    """Where the record of `name`'s build `build_id` lives. Both come from a manifest or a cloud, which a
    stranger may have written: anything but a plain name (a `/`, `..`) is refused, never followed."""
    for what, value in (("image name", name), ("build id", build_id)):
        if not is_plain_name(value):
            raise PublishError(f"{what} {value!r} is not a plain name (letters, digits, '.', '_', '+', '-')")
    return records_dir() / name / f"{build_id}.json"


def record_published(build: BuildRecord, name: str) -> Path:
    """Keep the manifest of a build that was published under `name` (for later diffs against it)."""
    target = _record_path(name, build.build_id)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(build.manifest(), indent=1) + "\n")
    os.replace(tmp, target)
    return target


def recorded_manifest(name: str, build_id: str) -> dict[str, Any] | None:
    try:
        path = _record_path(name, build_id)
    except PublishError:
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def glance_stable(cloud: str, name: str, *, clouds_yaml: Path | None) -> Stable:
    conn = glance.connect(cloud, clouds_yaml=clouds_yaml)
    stables = newest_first(i for i in managed_images(conn, name) if status_of(i) == Status.stable)
    if not stables:
        return Stable(f"glance:{cloud}")
    image = stables[0]
    build_id = build_id_of(image)
    content = image.properties.get(P_CONTENT)
    return Stable(f"glance:{cloud}", build_id, str(content) if content else None, recorded_manifest(name, build_id))


def s3_stable(client: Any, location: S3Location, name: str) -> Stable:
    target = location.url
    stables = [v for v in s3_versions(client, location, name) if v.status == Status.stable]
    if not stables:
        return Stable(target)
    data = s3.get_bytes(client, location.bucket, stables[0].id + "manifest.json")
    try:
        manifest = json.loads(data) if data else None
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):
        return Stable(target, stables[0].id)
    return Stable(target, str(manifest.get("build_id", "")), content_digest(manifest), manifest)


def current_stables(spec: PublishSpec, name: str, *, clouds_yaml: Path | None) -> list[Stable]:
    out = [glance_stable(cloud, name, clouds_yaml=clouds_yaml) for cloud in spec.glance_clouds]
    if spec.s3_locations:
        client = s3.client(endpoint_url=spec.s3_endpoint_url)
        out += [s3_stable(client, location, name) for location in spec.s3_locations]
    return out


def publish_changes(build: BuildRecord, spec: PublishSpec, *, gate: Gate = manifest_gate,
                    gates: Mapping[str, Gate] | None = None, clouds_yaml: Path | None = None,
                    progress: ProgressFactory = no_progress) -> ChangeReport:
    """Publish `build` to the targets of `spec` whose stable does not already have its content."""
    name = spec.name or build.name
    mine = content_digest(build.manifest())
    stables = current_stables(spec, name, clouds_yaml=clouds_yaml)
    changed = [s.target for s in stables if s.content != mine]
    report = ChangeReport(name, "unchanged", mine, changed_targets=changed,
                          unchanged_targets=[s.target for s in stables if s.content == mine])
    if not changed:
        log.info("publish: %s: unchanged on %s (stable build %s); nothing published", name,
                 ", ".join(report.unchanged_targets), next((s.build_id for s in stables if s.build_id), "?"))
        return report
    old = next((s for s in stables if s.target in changed and s.manifest is not None), None)
    if old is not None and old.manifest is not None:
        diff: PackageDiff = package_diff(old.manifest, build.manifest())
        report.replaces, report.replaces_on, report.diff = old.build_id, old.target, diff.as_dict()
        build.diff = manifest_diff(report)
        write_record(build)
        log.info("publish: %s replaces build %s: %s", name, old.build_id, diff.summary())
        for line in diff.lines():
            log.info("publish: %s", line)
    elif any(s.build_id for s in stables if s.target in changed):
        log.warning("publish: %s: the stable's manifest is neither in an S3 target nor in this host's records "
                    "(%s): no package diff", name, records_dir())
    result = publish(build, spec.model_copy(update={"targets": changed}), gate=gate, gates=gates,
                         clouds_yaml=clouds_yaml, progress=progress)
    record_published(build, name)
    report.status, report.publish = "published", asdict(result)
    log.info("publish: %s", report.line())
    return report


def manifest_of(ref: str, *, clouds_yaml: Path | None = None, s3_endpoint: str | None = None) -> dict[str, Any]:
    """The manifest `ref` names, for `kiln diff`: an output directory or manifest file; `s3://BUCKET/PREFIX/
    NAME` (its stable build) or `s3://BUCKET/PREFIX/NAME/BUILD_ID`; `glance:CLOUD/NAME` (the stable image's
    build, from an S3 copy or this host's publish records)."""
    if ref.startswith("s3://"):
        try:
            location = parse_s3_url(ref.rstrip("/"))
        except S3Error as exc:
            raise DiffInputError(str(exc)) from None
        client = s3.client(endpoint_url=s3_endpoint)
        data = s3.get_bytes(client, location.bucket, location.key("manifest.json"))
        if data is None:
            parent, _, name = location.prefix.rpartition("/")
            stable = s3_stable(client, S3Location(location.bucket, parent), name)
            if stable.manifest is None:
                raise DiffInputError(f"{ref}: no kiln build there (neither PREFIX/NAME/BUILD_ID/manifest.json nor a "
                                     "stable build of NAME)")
            return stable.manifest
        return _manifest_json(data, ref)
    if ref.startswith("glance:"):
        cloud, _, name = ref.removeprefix("glance:").partition("/")
        if not cloud or not name:
            raise DiffInputError(f"{ref}: use glance:CLOUD/NAME")
        stable = glance_stable(cloud, name, clouds_yaml=clouds_yaml)
        if stable.build_id is None:
            raise DiffInputError(f"{ref}: cloud {cloud!r} has no stable image named {name!r} managed by kiln")
        if stable.manifest is None:
            raise DiffInputError(f"{ref}: the stable image is build {stable.build_id}, whose manifest is not in "
                                 f"this host's publish records ({records_dir() / name}); diff its S3 copy or "
                                 "output directory")
        return stable.manifest
    return load_manifest(Path(ref))


def _manifest_json(data: bytes, ref: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise DiffInputError(f"{ref}: manifest.json is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or "packages" not in manifest:
        raise DiffInputError(f"{ref}: not a kiln manifest")
    return manifest
