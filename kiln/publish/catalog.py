"""The catalog: every version kiln published, per image name, with its state. For `kiln images`.

A version is a Glance image kiln manages (its `kiln_status`: stable, previous, candidate, retired,
withdrawn) or a build in S3 (PREFIX/NAME/BUILD_ID/: the newest complete one stable, older ones retired, one
without manifest.json a candidate). What the cloud does not hold (the package count, the boot results) comes
from the build's manifest: S3 keeps it beside the build; for Glance, this host's publish records do
(kiln.publish.refresh), so a version published from another host shows what Glance knows only.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import openstack.connection

from kiln.cloud import glance, s3
from kiln.cloud.properties import P_NAME
from kiln.model.names import is_plain_name
from kiln.model.publishing import S3Location
from kiln.publish.promote import build_id_of, created_of, newest_first, status_of
from kiln.publish.refresh import recorded_manifest
from kiln.publish.s3_builds import s3_versions

log = logging.getLogger("kiln.publish")

STATE_ORDER = {"stable": 0, "previous": 1, "candidate": 2, "retired": 3, "withdrawn": 4}


@dataclass
class CatalogEntry:
    name: str
    state: str
    build_id: str
    built: str  # ISO 8601, UTC
    where: str  # glance:CLOUD or s3://BUCKET/PREFIX
    ref: str  # the Glance image id, or the S3 build prefix
    packages: int | None = None  # from the build's manifest, where it is known
    boot_test: list[str] = field(default_factory=list)  # "bios passed", "nova on c (m1.small) passed", …
    in_use: bool | None = None  # a Nova server runs from it (None: not asked, or no compute)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_MANIFEST = 16 << 20  # a manifest with every package of a big image is a few MiB
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _text(value: Any, limit: int = 120) -> str:
    """A value from a manifest or a cloud, as one printable line (they may be a stranger's)."""
    return UNPRINTABLE.sub("?", str(value))[:limit]


def _boots(manifest: dict[str, Any] | None) -> list[str]:
    boots = (manifest or {}).get("boot_test") or []
    if not isinstance(boots, list):
        return []
    return [f"{_text(b.get('firmware', '?'), 16)} {'passed' if b.get('passed') is True else 'FAILED'}" + (
        f" ({_text(b['accel'], 60)})" if b.get("backend") == "nova" and b.get("accel") else "")
        for b in boots if isinstance(b, dict)]


def _packages(manifest: dict[str, Any] | None) -> int | None:
    packages = (manifest or {}).get("packages")
    return len(packages) if isinstance(packages, list) else None


def glance_catalog(conn: openstack.connection.Connection, name: str | None = None, *,
                   check_use: bool = True) -> list[CatalogEntry]:
    """Every image kiln manages in this cloud's project (or those of `name`), newest first per name."""
    cloud = glance.cloud_name(conn)
    images = [i for i in glance.list_images(conn, {P_NAME: name} if name else None)
              if status_of(i) and isinstance(i.properties.get(P_NAME), str)]
    compute = check_use and glance.has_compute(conn)
    entries = []
    for image in newest_first(images):
        image_name, build_id = str(image.properties[P_NAME]), build_id_of(image)
        manifest = recorded_manifest(image_name, build_id)
        entries.append(CatalogEntry(
            name=image_name, state=status_of(image), build_id=build_id, built=created_of(image).isoformat(),
            where=f"glance:{cloud}", ref=image.id, packages=_packages(manifest), boot_test=_boots(manifest),
            in_use=glance.image_in_use(conn, image) if compute else None))
    return _ordered(entries)


def s3_catalog(client: Any, location: S3Location, name: str | None = None) -> list[CatalogEntry]:
    """Every build under the S3 location (or those of `name`), with what its manifest says."""
    names = [name] if name else [p.rstrip("/").rsplit("/", 1)[-1] for p in
                                 s3.list_prefixes(client, location.bucket, location.key())]
    entries = []
    for image_name in names:
        if not is_plain_name(image_name):  # a stranger's key; never used to build further keys
            log.warning("catalog: %s: skipping %r, not an image name kiln writes", location.url, image_name)
            continue
        for version in s3_versions(client, location, image_name):
            head = s3.head(client, location.bucket, version.id + "manifest.json")
            data = (s3.get_bytes(client, location.bucket, version.id + "manifest.json")
                    if head and int(head.get("ContentLength") or 0) <= MAX_MANIFEST else None)
            manifest: dict[str, Any] | None = None
            if data:
                try:
                    loaded = json.loads(data)
                except (ValueError, RecursionError):
                    loaded = None
                manifest = loaded if isinstance(loaded, dict) else None
            prefix_id = version.id.rstrip("/").rsplit("/", 1)[-1]
            claimed = (manifest or {}).get("build_id")
            build_id = claimed if isinstance(claimed, str) and claimed == prefix_id else prefix_id
            entries.append(CatalogEntry(
                name=image_name, state=version.status.value, build_id=build_id,
                built=str((manifest or {}).get("created") or version.created.isoformat()),
                where=location.url, ref=version.id, packages=_packages(manifest), boot_test=_boots(manifest)))
    return _ordered(entries)


def _ordered(entries: list[CatalogEntry]) -> list[CatalogEntry]:
    """By name, then state (stable first), then newest first."""
    entries = sorted(entries, key=lambda e: e.built, reverse=True)
    return sorted(entries, key=lambda e: (e.name, STATE_ORDER.get(e.state, 9)))


def table(entries: list[CatalogEntry]) -> str:
    """The catalog for people: one row per version."""
    head = ("name", "state", "build", "built", "packages", "boot test", "in use", "where")
    rows = [head] + [tuple(_text(c) for c in (
        e.name, e.state, e.build_id, e.built[:19].replace("T", " "), "?" if e.packages is None else str(e.packages),
        ", ".join(e.boot_test) or "?", {True: "yes", False: "no", None: "?"}[e.in_use], e.where)) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)
