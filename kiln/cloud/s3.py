"""S3 (and S3-compatible stores) through boto3: verified, idempotent uploads, listing and deletion.

Credentials come from boto3's standard chain (environment, shared config/credentials files, instance
roles); `endpoint_url` (or the standard `AWS_ENDPOINT_URL_S3`) points it at an S3-compatible store.
Every object carries its sha256 in the metadata (`x-amz-meta-sha256`), so an upload whose object
already holds the same sha256 is skipped. Large files go up as a multipart upload with a SHA256
checksum on every part (the store rejects a part whose bytes do not match); the whole file's sha256,
hashed from the very bytes sent, must equal the caller's expected value or the upload is aborted and
nothing appears in the bucket.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import botocore.exceptions

from kiln.model.publishing import S3Error as S3Error
from kiln.model.publishing import S3Location as S3Location  # the API of this module too
from kiln.model.publishing import parse_s3_url as parse_s3_url

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

T = TypeVar("T")

log = logging.getLogger("kiln.s3")

MiB = 1 << 20
DEFAULT_PART_SIZE = 16 * MiB
MAX_PARTS = 10_000
Progress = Callable[[int], None]


class S3ChecksumError(S3Error):
    """The bytes of a file are not the ones the build recorded; nothing was stored."""


@dataclass(frozen=True)
class UploadResult:
    key: str
    uploaded: bool  # False: the object already held this sha256, nothing was sent
    size: int
    sha256: str
    etag: str


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    last_modified: datetime
    etag: str


def client(*, endpoint_url: str | None = None, region: str | None = None) -> S3Client:
    """An S3 client from the standard credential chain; `endpoint_url` for S3-compatible stores."""
    import boto3  # here, not at the top: importing kiln.publish (and so the spec) stays cheap
    from botocore.config import Config

    config = Config(retries={"max_attempts": 5, "mode": "standard"},
                    request_checksum_calculation="when_required", response_checksum_validation="when_required")
    try:
        return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
    except botocore.exceptions.BotoCoreError as exc:
        raise S3Error(f"cannot set up the S3 client: {exc}") from None


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _fail(exc: Exception, what: str) -> S3Error:
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return S3Error(f"{what}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                       f"or a shared credentials file)")
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        return S3Error(f"{what}: {err.get('Code', '?')}: {err.get('Message', '')}".rstrip(": "))
    return S3Error(f"{what}: {exc}")


def _unless_missing(call: Callable[[], T], bucket: str, key: str) -> T | None:
    """`call()`, or None when the object does not exist; other failures become an S3Error."""
    try:
        return call()
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise _fail(exc, f"s3://{bucket}/{key}") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise _fail(exc, f"s3://{bucket}/{key}") from None


def head(s3: S3Client, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's HEAD response (metadata, ETag, checksum), or None when there is no such object."""
    return _unless_missing(lambda: dict(s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")),
                           bucket, key)


def _part_size(size: int, part_size: int) -> int:
    while size > part_size * MAX_PARTS:
        part_size *= 2
    return part_size


def upload_file(s3: S3Client, path: Path, bucket: str, key: str, *, sha256: str,
                metadata: Mapping[str, str] | None = None, content_type: str = "application/octet-stream",
                part_size: int = DEFAULT_PART_SIZE, concurrency: int = 4,
                on_progress: Progress | None = None) -> UploadResult:
    """Upload `path` to `bucket`/`key` unless the object already holds `sha256`.

    Up to `part_size` bytes go in one PUT; larger files as a multipart upload of `part_size` parts,
    `concurrency` in flight (memory: about `concurrency` x `part_size`)."""
    where = f"s3://{bucket}/{key}"
    size = path.stat().st_size
    existing = head(s3, bucket, key)
    if existing is not None and existing.get("Metadata", {}).get("sha256") == sha256:
        log.info("%s: already holds sha256 %s…, skipped", where, sha256[:16])
        if on_progress:
            on_progress(size)
        return UploadResult(key, False, size, sha256, str(existing.get("ETag", "")))
    meta = {**(metadata or {}), "sha256": sha256}
    try:
        if size <= part_size:
            etag = _put_small(s3, path, bucket, key, sha256=sha256, metadata=meta, content_type=content_type)
            if on_progress:
                on_progress(size)
        else:
            etag = _put_multipart(s3, path, bucket, key, sha256=sha256, metadata=meta, content_type=content_type,
                                  part_size=_part_size(size, part_size), concurrency=concurrency,
                                  on_progress=on_progress)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        raise _fail(exc, f"upload {path.name} to {where}") from None
    log.info("%s: uploaded %s (%d bytes, sha256 verified)", where, path.name, size)
    return UploadResult(key, True, size, sha256, etag)


def _mismatch(path: Path, where: str, *, expected: str, actual: str) -> S3ChecksumError:
    return S3ChecksumError(f"{where}: {path.name} has sha256 {actual[:16]}… but the build recorded "
                           f"{expected[:16]}…: the file changed after the build; nothing was stored")


def _put_small(s3: S3Client, path: Path, bucket: str, key: str, *, sha256: str, metadata: Mapping[str, str],
               content_type: str) -> str:
    data = path.read_bytes()
    digest = hashlib.sha256(data).digest()
    if digest.hex() != sha256:
        raise _mismatch(path, f"s3://{bucket}/{key}", expected=sha256, actual=digest.hex())
    response = s3.put_object(Bucket=bucket, Key=key, Body=data, ChecksumSHA256=_b64(digest),
                             Metadata=dict(metadata), ContentType=content_type)
    _verify_checksum(s3, bucket, key, _b64(digest))
    return str(response.get("ETag", ""))


def _put_multipart(s3: S3Client, path: Path, bucket: str, key: str, *, sha256: str, metadata: Mapping[str, str],
                   content_type: str, part_size: int, concurrency: int, on_progress: Progress | None) -> str:
    where = f"s3://{bucket}/{key}"
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key, Metadata=dict(metadata), ContentType=content_type,
                                           ChecksumAlgorithm="SHA256")["UploadId"]
    whole = hashlib.sha256()
    part_digests: list[bytes] = []
    parts: list[CompletedPartTypeDef] = []

    def send(number: int, data: bytes, checksum: str) -> CompletedPartTypeDef:
        response = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data,
                                  ChecksumSHA256=checksum)
        if on_progress:
            on_progress(len(data))
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}

    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="kiln-s3") as pool, \
                path.open("rb") as fh:
            in_flight: deque[Future[CompletedPartTypeDef]] = deque()
            number = 0
            while data := fh.read(part_size):
                number += 1
                digest = hashlib.sha256(data).digest()
                whole.update(data)
                part_digests.append(digest)
                in_flight.append(pool.submit(send, number, data, _b64(digest)))
                del data
                if len(in_flight) >= concurrency:
                    parts.append(in_flight.popleft().result())
            while in_flight:
                parts.append(in_flight.popleft().result())
        if whole.hexdigest() != sha256:
            raise _mismatch(path, where, expected=sha256, actual=whole.hexdigest())
        response = s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                                MultipartUpload={"Parts": parts})
    except BaseException:
        try:
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            log.warning("%s: could not abort multipart upload %s: %s", where, upload_id, exc)
        raise
    composite = _b64(hashlib.sha256(b"".join(part_digests)).digest())
    _verify_checksum(s3, bucket, key, composite)
    return str(response.get("ETag", ""))


def _verify_checksum(s3: S3Client, bucket: str, key: str, expected: str) -> None:
    """Compare the store's SHA256 checksum (plain, or composite `…-N` for multipart) when it reports one."""
    info = head(s3, bucket, key)
    if info is None:
        raise S3Error(f"s3://{bucket}/{key}: the object is missing right after its upload")
    stored = info.get("ChecksumSHA256")
    if not stored:
        log.debug("s3://%s/%s: the store reports no SHA256 checksum; relying on its per-request checks",
                  bucket, key)
        return
    if str(stored).split("-")[0] != expected:
        delete_keys(s3, bucket, [key])
        raise S3ChecksumError(f"s3://{bucket}/{key}: the store's SHA256 checksum {stored} is not kiln's "
                              f"{expected}; the object was deleted")


def put_bytes(s3: S3Client, data: bytes, bucket: str, key: str, *, metadata: Mapping[str, str] | None = None,
              content_type: str = "application/octet-stream") -> UploadResult:
    """A small object from memory (manifest, SHA256SUMS), skipped when it already holds the same sha256."""
    sha256 = hashlib.sha256(data).hexdigest()
    existing = head(s3, bucket, key)
    if existing is not None and existing.get("Metadata", {}).get("sha256") == sha256:
        return UploadResult(key, False, len(data), sha256, str(existing.get("ETag", "")))
    digest = _b64(bytes.fromhex(sha256))
    try:
        response = s3.put_object(Bucket=bucket, Key=key, Body=data, ChecksumSHA256=digest,
                                 Metadata={**(metadata or {}), "sha256": sha256}, ContentType=content_type)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        raise _fail(exc, f"upload s3://{bucket}/{key}") from None
    _verify_checksum(s3, bucket, key, digest)
    return UploadResult(key, True, len(data), sha256, str(response.get("ETag", "")))


def get_bytes(s3: S3Client, bucket: str, key: str) -> bytes | None:
    """A small object's content, or None when it does not exist."""
    return _unless_missing(lambda: s3.get_object(Bucket=bucket, Key=key)["Body"].read(), bucket, key)


def list_prefixes(s3: S3Client, bucket: str, prefix: str) -> list[str]:
    """The "directories" directly under `prefix` (each ending in '/')."""
    out: list[str] = []
    base = prefix.rstrip("/") + "/" if prefix else ""
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base, Delimiter="/"):
            out += [p["Prefix"] for p in page.get("CommonPrefixes", []) if "Prefix" in p]
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        raise _fail(exc, f"list s3://{bucket}/{base}") from None
    return out


def list_objects(s3: S3Client, bucket: str, prefix: str) -> list[S3Object]:
    out: list[S3Object] = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                out.append(S3Object(item["Key"], item["Size"], item["LastModified"], item.get("ETag", "")))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        raise _fail(exc, f"list s3://{bucket}/{prefix}") from None
    return out


def delete_keys(s3: S3Client, bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), 1000):
        batch = keys[start:start + 1000]
        try:
            response = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch],
                                                                "Quiet": True})
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise _fail(exc, f"delete from s3://{bucket}") from None
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise S3Error(f"s3://{bucket}/{first.get('Key')}: delete failed: {first.get('Code')} "
                          f"{first.get('Message', '')} ({len(errors)} objects not deleted)")


def delete_prefix(s3: S3Client, bucket: str, prefix: str) -> int:
    """Delete every object under `prefix` (which must end in '/'); returns how many."""
    if not prefix.endswith("/"):
        raise S3Error(f"refusing to delete s3://{bucket}/{prefix}*: a prefix to delete must end in '/'")
    keys = [o.key for o in list_objects(s3, bucket, prefix)]
    delete_keys(s3, bucket, keys)
    return len(keys)
