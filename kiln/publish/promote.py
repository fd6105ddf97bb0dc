"""Glance promotion with a boot gate, and rollback.

Independent of Prefect: the CLI (`kiln publish`, `kiln rollback`) and the flow's publish task call the
same functions. A build's output directory holds the images, `manifest.json` and `SHA256SUMS`.

Every image kiln manages in Glance carries `kiln_name` (the stable name) and `kiln_status`:

    candidate --gate passes--> stable --next promotion--> previous --next promotion--> retired
        |                        |                                                    (hidden)
        +--gate fails: deleted   +--rollback: withdrawn (hidden); previous -> stable; newest retired -> previous

Only one image per name is `stable` (named NAME, with the configured visibility); the one before it is
`previous` (NAME-previous), which `rollback` restores. The same content (sha512) is never uploaded
twice: a candidate, previous or retired image with it is promoted again without an upload; a
withdrawn one only when asked (`allow_withdrawn`), so a cached nightly rebuild cannot quietly bring
back an image an operator rolled back. Retention keeps the newest N images per name and never
deletes one a server still uses. S3 gets `PREFIX/NAME/BUILD_ID/{images, SHA256SUMS, manifest.json}`
after the gate passed, with the same retention per name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import openstack.connection

from kiln.cloud import glance
from kiln.cloud.glance import GlanceImage
from kiln.cloud.properties import P_BUILD_ID, P_CREATED, P_NAME, P_STATUS, glance_properties, min_disk_gib, min_ram_mib
from kiln.host.progress import ProgressFactory, no_progress
from kiln.model.publishing import CANDIDATE_TAG, GateFailedError, PublishError, PublishSpec, Status, Visibility
from kiln.model.record import BuildRecord, ImageRecord
from kiln.publish.gates import LOCAL_GATES, CandidateImage, Gate, GateResult, run_gate

if TYPE_CHECKING:
    pass

log = logging.getLogger("kiln.publish")

# ---------------------------------------------------------------------------------------------------
# Glance: promotion and rollback


@dataclass
class GlanceReport:
    cloud: str
    name: str
    image_id: str
    action: str  # uploaded | reused | already-stable
    gate: str = ""
    previous_id: str | None = None
    retired_ids: list[str] = field(default_factory=list)
    deleted_ids: list[str] = field(default_factory=list)
    kept_in_use_ids: list[str] = field(default_factory=list)


def status_of(image: GlanceImage) -> str:
    return str(image.properties.get(P_STATUS, ""))


def build_id_of(image: GlanceImage) -> str:
    return str(image.properties.get(P_BUILD_ID) or image.id[:8])


def created_of(image: GlanceImage) -> datetime:
    """When the image's build was made (kiln_created), else when Glance created the image."""
    for value in (image.properties.get(P_CREATED), image.created_at):
        if value:
            try:
                parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            except ValueError:
                continue
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return datetime.fromtimestamp(0, UTC)


def age_key(image: GlanceImage) -> tuple[datetime, str, str]:
    """Sorts images by build time; build ids (time-ordered) and Glance's creation time break ties
    between builds made within the same second."""
    return created_of(image), build_id_of(image), image.created_at


def newest_first(images: Iterable[GlanceImage]) -> list[GlanceImage]:
    return sorted(images, key=age_key, reverse=True)


def candidate_name(name: str, build_id: str) -> str:
    return f"{name}-candidate-{build_id}"


def previous_name(name: str) -> str:
    return f"{name}-previous"


def retired_name(name: str, build_id: str) -> str:
    return f"{name}-{build_id}"


def withdrawn_name(name: str, build_id: str) -> str:
    return f"{name}-withdrawn-{build_id}"


def managed_images(conn: openstack.connection.Connection, name: str) -> list[GlanceImage]:
    """Every image of this project that kiln manages under `name`, hidden ones included."""

    return [i for i in glance.list_images(conn, {P_NAME: name}) if status_of(i)]


def upload_candidate(conn: openstack.connection.Connection, build: BuildRecord, image: ImageRecord,
                     spec: PublishSpec, *, name: str, progress: ProgressFactory = no_progress) -> GlanceImage:
    """Upload the image as a private candidate, tagged kiln-candidate, its sha512 verified."""

    props = {**glance_properties(build, image, spec, name=name), P_STATUS: Status.candidate.value}
    upload = glance.ImageUpload(
        path=build.image_path(image), name=candidate_name(name, build.build_id), disk_format=image.format,
        sha512=image.sha512, sha256=image.sha256, visibility=Visibility.private.value, min_disk=min_disk_gib(build),
        min_ram=min_ram_mib(build, spec), properties=props, tags=[CANDIDATE_TAG],
    )
    with progress(f"glance {glance.cloud_name(conn)}: {image.file}", image.size) as advance:
        return glance.upload_image(conn, upload, on_progress=advance)


def promote(conn: openstack.connection.Connection, candidate: GlanceImage, *, name: str, spec: PublishSpec,
            properties: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """Give `candidate` the stable name and visibility; the stable before it becomes previous, the previous
    before that retired (hidden). Returns (previous id, retired ids)."""

    others = [i for i in managed_images(conn, name) if i.id != candidate.id]
    stables = newest_first(i for i in others if status_of(i) == Status.stable)
    retired: list[str] = []
    for old in (i for i in others if status_of(i) == Status.previous):
        glance.patch_image(conn, old, name=retired_name(name, build_id_of(old)), hidden=True,
                           properties={P_STATUS: Status.retired.value})
        retired.append(old.id)
    previous_id = None
    for index, old in enumerate(stables):
        if index == 0:
            glance.patch_image(conn, old, name=previous_name(name), hidden=False,
                               properties={P_STATUS: Status.previous.value})
            previous_id = old.id
        else:  # more than one stable (a crashed or concurrent run): the older ones retire
            glance.patch_image(conn, old, name=retired_name(name, build_id_of(old)), hidden=True,
                               properties={P_STATUS: Status.retired.value})
            retired.append(old.id)
    # user-facing properties follow the current spec; provenance stays the image's own
    facing = {k: v for k, v in properties.items() if not k.startswith("kiln_")}
    glance.patch_image(conn, candidate, name=name, visibility=spec.visibility.value, hidden=False,
                       properties={**facing, P_STATUS: Status.stable.value},
                       add_tags=spec.tags, remove_tags=[CANDIDATE_TAG])
    log.info("%s: image %s is now %s (%s); previous: %s", glance.cloud_name(conn), candidate.id, name,
             spec.visibility.value, previous_id or "none")
    return previous_id, retired


def _gate_failed(cloud: str, name: str, result: GateResult) -> GateFailedError:
    tail = "".join(f"\n    {line}" for line in result.log_tail)
    return GateFailedError(f"cloud {cloud!r}: {name}: the candidate did not pass the boot gate: {result.detail}{tail}")


@dataclass
class StagedGlance:
    """A Glance target between its gate and its promotion: the candidate that passed (or the stable image
    that already holds this content), not yet visible under the stable name."""

    conn: openstack.connection.Connection
    cloud: str
    name: str
    props: dict[str, str]
    candidate: GlanceImage | None = None
    uploaded: bool = False
    gate: str = ""
    already_stable: GlanceImage | None = None


def stage_glance(conn: openstack.connection.Connection, build: BuildRecord, spec: PublishSpec, *, gate: Gate,
                 name: str | None = None, allow_withdrawn: bool = False, clouds_yaml: Path | None = None,
                 progress: ProgressFactory = no_progress) -> StagedGlance:
    """Upload (or find) the candidate and run the gate; promote nothing. Publishing the same content again
    uploads nothing. A failed gate deletes a candidate uploaded for this run and raises GateFailedError;
    a gate that judges the build alone (LOCAL_GATES) runs before the upload."""

    name = name or spec.name or build.name
    image = build.image(spec.disk_format)
    cloud = glance.cloud_name(conn)
    props = glance_properties(build, image, spec, name=name)
    staged = StagedGlance(conn, cloud, name, props)
    same = [i for i in managed_images(conn, name) if i.hash_value == image.sha512]
    stable = [i for i in same if status_of(i) == Status.stable]
    if stable:
        staged.already_stable = stable[0]
        return staged
    reusable = newest_first(i for i in same if status_of(i) in (Status.candidate, Status.previous, Status.retired))
    withdrawn = [i for i in same if status_of(i) == Status.withdrawn]
    if withdrawn and not reusable and not allow_withdrawn:
        raise PublishError(f"cloud {cloud!r}: this content is image {withdrawn[0].id}, which was withdrawn from "
                           f"{name} by a rollback; publish with --allow-withdrawn to promote it again")
    result = None
    if gate in LOCAL_GATES:  # it judges the build alone: no upload for a build that cannot pass
        result = run_gate(gate, CandidateImage(name, build, image, cloud=cloud, clouds_yaml=clouds_yaml))
        if not result.passed:
            raise _gate_failed(cloud, name, result)
    if reusable or withdrawn:
        staged.candidate = (reusable or withdrawn)[0]
        log.info("%s: image %s (%s) already holds this content; no upload", cloud, staged.candidate.id,
                 status_of(staged.candidate))
    else:
        staged.candidate = upload_candidate(conn, build, image, spec, name=name, progress=progress)
        staged.uploaded = True
    if result is None:
        result = run_gate(gate, CandidateImage(name, build, image, cloud=cloud, image_id=staged.candidate.id,
                                               clouds_yaml=clouds_yaml))
    if not result.passed:
        discard_staged(staged)
        raise _gate_failed(cloud, name, result)
    staged.gate = result.detail
    return staged


def discard_staged(staged: StagedGlance) -> None:
    """Delete the candidate this run uploaded (or a candidate it found); the stable image stays as it was."""

    c = staged.candidate
    if c is not None and (staged.uploaded or status_of(c) == Status.candidate):
        glance.delete_image(staged.conn, c)
        log.warning("%s: deleted candidate %s; %s stays as it was", staged.cloud, c.id, staged.name)
        staged.candidate = None


def finish_glance(staged: StagedGlance, spec: PublishSpec) -> GlanceReport:
    """Promote a staged candidate (or refresh the metadata of the stable image that already holds it)."""

    conn, name = staged.conn, staged.name
    if staged.already_stable is not None:
        # no upload, no gate; only metadata the spec may have changed since (no request when nothing did)
        facing = {k: v for k, v in staged.props.items() if not k.startswith("kiln_")}
        glance.patch_image(conn, staged.already_stable, visibility=spec.visibility.value, properties=facing,
                           add_tags=spec.tags)
        log.info("%s: %s already holds this build's content (image %s); nothing uploaded", staged.cloud, name,
                 staged.already_stable.id)
        return GlanceReport(staged.cloud, name, staged.already_stable.id, "already-stable")
    assert staged.candidate is not None
    previous_id, retired = promote(conn, glance.get_image(conn, staged.candidate.id), name=name, spec=spec,
                                   properties=staged.props)
    return GlanceReport(staged.cloud, name, staged.candidate.id, "uploaded" if staged.uploaded else "reused",
                        gate=staged.gate, previous_id=previous_id, retired_ids=retired)


def publish_glance(conn: openstack.connection.Connection, build: BuildRecord, spec: PublishSpec, *, gate: Gate,
                   name: str | None = None, allow_withdrawn: bool = False, clouds_yaml: Path | None = None,
                   progress: ProgressFactory = no_progress) -> GlanceReport:
    """One Glance target: stage (candidate and gate), then promote."""
    staged = stage_glance(conn, build, spec, gate=gate, name=name, allow_withdrawn=allow_withdrawn,
                          clouds_yaml=clouds_yaml, progress=progress)
    return finish_glance(staged, spec)


@dataclass
class RollbackReport:
    cloud: str
    name: str
    restored_id: str
    withdrawn_id: str
    previous_id: str | None


def rollback(conn: openstack.connection.Connection, name: str) -> RollbackReport:
    """Put the previous image back under the stable name. The stable one is withdrawn (hidden, renamed,
    never promoted again unless asked); the newest retired image becomes the new previous."""

    cloud = glance.cloud_name(conn)
    images = managed_images(conn, name)
    stables = newest_first(i for i in images if status_of(i) == Status.stable)
    previous = newest_first(i for i in images if status_of(i) == Status.previous)
    if not stables:
        raise PublishError(f"cloud {cloud!r}: no stable image named {name!r} that kiln published")
    if not previous:
        raise PublishError(f"cloud {cloud!r}: {name!r} has no previous image to roll back to")
    bad, good = stables[0], previous[0]
    glance.patch_image(conn, bad, name=withdrawn_name(name, build_id_of(bad)), hidden=True,
                       properties={P_STATUS: Status.withdrawn.value})
    glance.patch_image(conn, good, name=name, visibility=bad.visibility, hidden=False,
                       properties={P_STATUS: Status.stable.value})
    retired = newest_first(i for i in images if status_of(i) == Status.retired)
    new_previous = None
    if retired:
        glance.patch_image(conn, retired[0], name=previous_name(name), hidden=False,
                           properties={P_STATUS: Status.previous.value})
        new_previous = retired[0].id
    log.info("%s: rolled %s back to image %s; withdrew %s", cloud, name, good.id, bad.id)
    return RollbackReport(cloud, name, good.id, bad.id, new_previous)


