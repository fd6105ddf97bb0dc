"""Retention: the newest N images (and S3 builds) per name, never one a server uses."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import openstack.connection

from kiln.cloud import glance
from kiln.cloud.glance import GlanceImage
from kiln.model.publishing import PublishError, Status
from kiln.publish.promote import build_id_of, created_of, managed_images, status_of

if TYPE_CHECKING:
    pass

log = logging.getLogger("kiln.publish")

STALE_CANDIDATE = timedelta(days=1)  # a candidate older than this is a leftover of a crashed publish
# ---------------------------------------------------------------------------------------------------
# Retention (one policy for Glance images and S3 builds)


@dataclass(frozen=True)
class Version:
    """One published version of a name: a Glance image or an S3 build prefix."""

    id: str
    status: Status
    created: datetime
    tiebreak: str = ""  # orders versions made within the same second (a time-ordered build id)


@dataclass(frozen=True)
class RetentionPlan:
    keep: tuple[Version, ...]
    delete: tuple[Version, ...]


def plan_retention(versions: Sequence[Version], *, keep: int, now: datetime,
                   stale_candidate_after: timedelta = STALE_CANDIDATE) -> RetentionPlan:
    """Keep `keep` versions: the stable one always, the previous one next, then the newest others.
    Withdrawn versions never take a slot; candidates are another run's business until they are stale."""
    if keep < 1:
        raise PublishError(f"keep must be at least 1, not {keep}")
    kept: list[Version] = []
    delete: list[Version] = []
    ranked: list[Version] = []
    for v in versions:
        if v.status == Status.candidate:
            (delete if now - v.created > stale_candidate_after else kept).append(v)
        elif v.status == Status.withdrawn:
            delete.append(v)
        else:
            ranked.append(v)
    order = {Status.stable: 0, Status.previous: 1}
    ranked.sort(key=lambda v: v.tiebreak, reverse=True)
    ranked.sort(key=lambda v: (order.get(v.status, 2), -v.created.timestamp()))
    slots = keep
    for v in ranked:
        if v.status == Status.stable or slots > 0:
            kept.append(v)
            slots -= 1
        else:
            delete.append(v)
    return RetentionPlan(tuple(kept), tuple(delete))


@dataclass
class RetentionReport:
    deleted: list[str] = field(default_factory=list)
    kept_in_use: list[str] = field(default_factory=list)


def retain_glance(conn: openstack.connection.Connection, name: str, *, keep: int,
                  in_use: Callable[[GlanceImage], bool] | None = None, now: datetime | None = None) -> RetentionReport:
    """Delete what the retention plan drops, except images a server still uses (`in_use`, default: ask
    Nova when the catalog has a compute endpoint)."""

    images = {i.id: i for i in managed_images(conn, name)}
    versions = [Version(i.id, Status(status_of(i)), created_of(i), f"{build_id_of(i)} {i.created_at}")
                for i in images.values()
                if status_of(i) in Status.__members__]
    plan = plan_retention(versions, keep=keep, now=now or datetime.now(UTC))
    check = in_use or (lambda image: glance.image_in_use(conn, image))
    report = RetentionReport()
    for v in plan.delete:
        if check(images[v.id]):
            log.info("%s: keeping %s (%s): a server still uses it", glance.cloud_name(conn), v.id, v.status.value)
            report.kept_in_use.append(v.id)
            continue
        glance.delete_image(conn, v.id)
        log.info("%s: deleted %s image %s of %s", glance.cloud_name(conn), v.status.value, v.id, name)
        report.deleted.append(v.id)
    return report


