"""A build in S3: PREFIX/NAME/BUILD_ID/{images, SBOMs, SHA256SUMS, SHA256SUMS.gpg, SHA256SUMS.key,
manifest.json}."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from kiln.cloud import s3
from kiln.host.progress import ProgressFactory, no_progress
from kiln.model.names import is_plain_name
from kiln.model.publishing import PublishError, S3Location, Status
from kiln.model.record import BuildRecord
from kiln.publish.retention import RetentionReport, Version, plan_retention
from kiln.publish.signing import PUBLIC_KEY, SIGNATURE

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger("kiln.publish")

# ---------------------------------------------------------------------------------------------------
# S3


@dataclass
class S3Report:
    url: str
    prefix: str
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deleted_builds: list[str] = field(default_factory=list)
    kept_in_use: list[str] = field(default_factory=list)


def publish_s3(client: S3Client, location: S3Location, build: BuildRecord, *, name: str | None = None,
               progress: ProgressFactory = no_progress) -> S3Report:
    """Upload the images, the SBOMs, SHA256SUMS's signature and the signer's public key, then SHA256SUMS, then
    manifest.json (its presence marks a complete build)."""
    name = name or build.name
    base = location.key(name, build.build_id)
    report = S3Report(location.url, base + "/")
    meta = {"kiln-name": name, "kiln-build-id": build.build_id}
    for img in build.images:
        with progress(f"{location.url}: {img.file}", img.size) as advance:
            result = s3.upload_file(client, build.image_path(img), location.bucket, f"{base}/{img.file}",
                                    sha256=img.sha256, metadata={**meta, "sha512": img.sha512, "format": img.format},
                                    on_progress=advance)
        (report.uploaded if result.uploaded else report.skipped).append(result.key)
    for file, content_type in (*attached_files(build), ("SHA256SUMS", "text/plain"),
                               ("manifest.json", "application/json")):
        result = s3.put_bytes(client, _read_beside(build, file), location.bucket, f"{base}/{file}",
                              metadata=meta, content_type=content_type)
        (report.uploaded if result.uploaded else report.skipped).append(result.key)
    return report


def attached_files(build: BuildRecord) -> list[tuple[str, str]]:
    """(file, content type) of what goes beside the images besides SHA256SUMS and manifest.json: the SBOMs,
    the signature and the signer's public key (none for a build from before them)."""
    files = [(s.file, "application/json") for s in build.sboms]
    if build.signature is not None:
        files += [(SIGNATURE, "application/pgp-signature"), (PUBLIC_KEY, "application/pgp-keys")]
    return files


def _read_beside(build: BuildRecord, name: str) -> bytes:
    """A small file of the build's output directory, by a plain name, never through a link (the manifest that
    names it may be a stranger's)."""
    if not is_plain_name(name):
        raise PublishError(f"{build.where}: {name[:80]!r} is not a file name in the output directory: refused")
    path = build.path_of(name)
    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW | os.O_NONBLOCK)) as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise PublishError(f"{path}: not a regular file: refused")
            return fh.read()
    except OSError as exc:
        raise PublishError(f"{path}: cannot read: {exc.strerror} (a link is never followed)") from None


def s3_versions(client: S3Client, location: S3Location, name: str) -> list[Version]:
    """The builds under PREFIX/NAME/: the newest complete one is `stable`, older ones `retired`, and a
    build without manifest.json (an interrupted upload) a `candidate`."""
    complete: list[Version] = []
    partial: list[Version] = []
    for prefix in s3.list_prefixes(client, location.bucket, location.key(name)):
        objects = s3.list_objects(client, location.bucket, prefix)
        if not objects:
            continue
        manifest = [o for o in objects if o.key == prefix + "manifest.json"]
        if manifest:
            complete.append(Version(prefix, Status.retired, manifest[0].last_modified, prefix))
        else:
            partial.append(Version(prefix, Status.candidate, max(o.last_modified for o in objects), prefix))
    complete.sort(key=lambda v: (v.created, v.tiebreak), reverse=True)
    if complete:
        complete[0] = Version(complete[0].id, Status.stable, complete[0].created, complete[0].tiebreak)
    return complete + partial


def retain_s3(client: S3Client, location: S3Location, name: str, *, keep: int,
              in_use: Callable[[str], bool] | None = None, now: datetime | None = None) -> RetentionReport:
    """Keep the newest `keep` builds of `name`; `in_use(prefix)` protects a build (none by default)."""
    plan = plan_retention(s3_versions(client, location, name), keep=keep, now=now or datetime.now(UTC))
    report = RetentionReport()
    for v in plan.delete:
        if in_use is not None and in_use(v.id):
            report.kept_in_use.append(v.id)
            continue
        count = s3.delete_prefix(client, location.bucket, v.id)
        log.info("s3://%s/%s: deleted %d objects (%s)", location.bucket, v.id, count, v.status.value)
        report.deleted.append(v.id)
    return report


