"""Glance through openstacksdk: connect, upload with end-to-end checksum verification, find, patch,
download (streamed), delete, and whether a server still uses an image.

Clouds come from the usual clouds.yaml (`OS_CLOUD`, `OS_CLIENT_CONFIG_FILE`, `--cloud NAME`). Uploads
stream the file through a reader that hashes the bytes actually sent; afterwards Glance's
`os_hash_value` must equal the sha512 the caller expects (the build's manifest), else the image is
deleted and `ChecksumMismatchError` names which side changed. Property updates are explicit JSON-patch
operations, because openstacksdk's `update_image(**props)` replaces the whole property set.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import openstack
import openstack.config
import openstack.connection
import openstack.exceptions
from keystoneauth1 import exceptions as ks_exceptions
from openstack.image.v2 import _proxy as image_v2

from kiln.model.errors import KilnError

log = logging.getLogger("kiln.glance")

PATCH_TYPE = "application/openstack-images-v2.1-json-patch"
CHUNK = 1 << 20
Progress = Callable[[int], None]


class GlanceError(KilnError):
    """Glance (or Keystone in front of it) refused or failed a request; the message names the cloud."""


class ChecksumMismatchError(GlanceError):
    """What Glance stored is not what the build produced; the image has been deleted."""


# the image fields of the Glance v2 API; every other key of an image's JSON is a property
CORE_FIELDS = frozenset({
    "id", "name", "status", "visibility", "protected", "os_hidden", "tags", "checksum", "os_hash_algo",
    "os_hash_value", "size", "virtual_size", "min_disk", "min_ram", "disk_format", "container_format", "owner",
    "created_at", "updated_at", "file", "schema", "self", "locations", "direct_url",
})


@dataclass(frozen=True)
class GlanceImage:
    """kiln's view of an image: Glance's own JSON, its fields typed and every other key a property
    (openstacksdk's Image moves known properties such as os_distro out of `.properties`)."""

    id: str
    name: str
    status: str
    visibility: str
    hidden: bool
    tags: tuple[str, ...]
    hash_algo: str | None
    hash_value: str | None
    size: int | None
    min_disk: int
    min_ram: int
    disk_format: str | None
    container_format: str | None
    owner: str | None
    created_at: str
    updated_at: str
    properties: Mapping[str, Any]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> GlanceImage:
        return cls(
            id=str(body["id"]), name=str(body.get("name") or ""), status=str(body.get("status") or ""),
            visibility=str(body.get("visibility") or ""), hidden=bool(body.get("os_hidden")),
            tags=tuple(body.get("tags") or ()), hash_algo=body.get("os_hash_algo"),
            hash_value=body.get("os_hash_value"), size=body.get("size"), min_disk=int(body.get("min_disk") or 0),
            min_ram=int(body.get("min_ram") or 0), disk_format=body.get("disk_format"),
            container_format=body.get("container_format"), owner=body.get("owner"),
            created_at=str(body.get("created_at") or ""), updated_at=str(body.get("updated_at") or ""),
            properties={k: v for k, v in body.items() if k not in CORE_FIELDS},
        )


@dataclass(frozen=True)
class ImageUpload:
    """One file to upload, with everything Glance should record about it."""

    path: Path
    name: str
    disk_format: str
    sha512: str
    sha256: str
    container_format: str = "bare"
    visibility: str = "private"
    min_disk: int = 0
    min_ram: int = 0
    properties: Mapping[str, str] = field(default_factory=dict)
    tags: Sequence[str] = ()


def connect(cloud: str | None = None, *, clouds_yaml: Path | None = None) -> openstack.connection.Connection:
    """A connection to `cloud` (default: `OS_CLOUD`) from clouds.yaml, or from `clouds_yaml` when given."""
    name = cloud or os.environ.get("OS_CLOUD")
    try:
        if clouds_yaml is not None:
            if not clouds_yaml.is_file():
                raise GlanceError(f"clouds.yaml {clouds_yaml} does not exist")
            region = openstack.config.OpenStackConfig(config_files=[str(clouds_yaml)]).get_one(cloud=name)
            return openstack.connection.Connection(config=region)
        return openstack.connect(cloud=name)
    except openstack.exceptions.ConfigException as exc:
        where = str(clouds_yaml) if clouds_yaml else \
            "clouds.yaml (OS_CLIENT_CONFIG_FILE, ./, ~/.config/openstack/, /etc/openstack/)"
        raise GlanceError(f"cloud {name or '(OS_CLOUD not set)'!r}: not found in {where}: {exc}") from None


def cloud_name(conn: openstack.connection.Connection) -> str:
    return str(conn.config.name or "(unnamed cloud)")


@contextlib.contextmanager
def sdk_errors(conn: openstack.connection.Connection, what: str,
               error: type[KilnError] = GlanceError) -> Iterator[None]:
    """Turn openstacksdk and keystoneauth failures into one `error` that names the cloud and step."""
    try:
        yield
    except KilnError:
        raise
    except ks_exceptions.Unauthorized:
        raise error(f"cloud {cloud_name(conn)!r}: {what}: authentication failed (check the credentials "
                    f"in clouds.yaml)") from None
    except ks_exceptions.ConnectFailure as exc:
        raise error(f"cloud {cloud_name(conn)!r}: {what}: cannot connect ({exc})") from None
    except (openstack.exceptions.SDKException, ks_exceptions.ClientException) as exc:
        raise error(f"cloud {cloud_name(conn)!r}: {what}: {exc}") from None


def image_api(conn: openstack.connection.Connection) -> image_v2.Proxy:
    with sdk_errors(conn, "find the image service"):  # the first use authenticates and reads the catalog
        proxy = conn.image
    if not isinstance(proxy, image_v2.Proxy):
        raise GlanceError(f"cloud {cloud_name(conn)!r}: only the Image API v2 is supported")
    return proxy


def _check(conn: openstack.connection.Connection, response: Any, what: str) -> Any:
    if response.status_code >= 400:
        detail = response.text.strip().splitlines()[-1:] or [""]
        raise GlanceError(f"cloud {cloud_name(conn)!r}: {what}: HTTP {response.status_code} {detail[0][:300]}")
    return response


def list_images(conn: openstack.connection.Connection, filters: Mapping[str, str] | None = None, *,
                include_hidden: bool = True, own_only: bool = True) -> list[GlanceImage]:
    """Images matching Glance filters, including any extra property (`kiln_name=...`), which
    openstacksdk's `images()` refuses. Hidden images are listed too unless `include_hidden=False`."""
    api = image_api(conn)
    params: dict[str, str] = {"visibility": "all", **(filters or {})}
    if own_only:
        with sdk_errors(conn, "find the project"):
            project = conn.current_project_id
        if project:
            params["owner"] = project
    found: dict[str, GlanceImage] = {}
    for hidden in ("false", "true") if include_hidden else ("false",):
        url: str | None = "/images"
        query: dict[str, str] | None = {**params, "os_hidden": hidden, "limit": "200"}
        while url:
            with sdk_errors(conn, "list images"):
                body = _check(conn, api.get(url, params=query), "list images").json()
            for item in body.get("images", []):
                found[item["id"]] = GlanceImage.from_body(item)
            nxt = body.get("next")
            # `next` is a path with its own query string, relative to the API root (/v2/images?marker=…)
            url, query = (nxt.removeprefix("/v2"), None) if nxt else (None, None)
    return list(found.values())


def get_image(conn: openstack.connection.Connection, image_id: str) -> GlanceImage:
    api = image_api(conn)
    with sdk_errors(conn, f"get image {image_id}"):
        body = _check(conn, api.get(f"/images/{image_id}"), f"get image {image_id}").json()
    return GlanceImage.from_body(body)


def patch_image(conn: openstack.connection.Connection, image: GlanceImage, *, name: str | None = None,
                visibility: str | None = None, hidden: bool | None = None,
                properties: Mapping[str, str | None] | None = None,
                add_tags: Sequence[str] = (), remove_tags: Sequence[str] = ()) -> GlanceImage:
    """Change exactly what is asked: a property set to None is removed; other properties stay."""
    current = image.properties
    ops: list[dict[str, Any]] = []
    if name is not None and name != image.name:
        ops.append({"op": "replace", "path": "/name", "value": name})
    if visibility is not None and visibility != image.visibility:
        ops.append({"op": "replace", "path": "/visibility", "value": visibility})
    if hidden is not None and hidden != image.hidden:
        ops.append({"op": "replace", "path": "/os_hidden", "value": hidden})
    for key, value in (properties or {}).items():
        if value is None:
            if key in current:
                ops.append({"op": "remove", "path": f"/{key}"})
        elif current.get(key) != value:
            ops.append({"op": "add", "path": f"/{key}", "value": value})
    tags = list(image.tags)
    new_tags = [t for t in tags if t not in remove_tags] + [t for t in add_tags if t not in tags]
    if sorted(set(new_tags)) != sorted(set(tags)):
        ops.append({"op": "replace", "path": "/tags", "value": sorted(set(new_tags))})
    if not ops:
        return image
    api = image_api(conn)
    what = f"update image {image.id} ({image.name})"
    with sdk_errors(conn, what):
        body = _check(conn, api.patch(f"/images/{image.id}", data=json.dumps(ops),
                                      headers={"Content-Type": PATCH_TYPE}), what).json()
    return GlanceImage.from_body(body)


def delete_image(conn: openstack.connection.Connection, image: GlanceImage | str) -> None:
    image_id = image if isinstance(image, str) else image.id
    with sdk_errors(conn, f"delete image {image_id}"):
        image_api(conn).delete_image(image_id, ignore_missing=True)


class HashingReader(io.RawIOBase):
    """A file read once, front to back, hashing what is read (the bytes that go on the wire)."""

    def __init__(self, fh: BinaryIO, size: int, *, on_progress: Progress | None = None) -> None:
        super().__init__()
        self._fh = fh
        self._size = size
        self._on_progress = on_progress
        self.sha256 = hashlib.sha256()
        self.sha512 = hashlib.sha512()
        self.sent = 0

    def readable(self) -> bool:
        return True

    def __len__(self) -> int:  # requests sends a Content-Length instead of chunking
        return self._size - self.sent

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size if size and size > 0 else CHUNK)
        if data:
            self.sha256.update(data)
            self.sha512.update(data)
            self.sent += len(data)
            if self._on_progress:
                self._on_progress(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def upload_image(conn: openstack.connection.Connection, upload: ImageUpload, *,
                 on_progress: Progress | None = None) -> GlanceImage:
    """Create the image, stream the file into it, and verify Glance's sha512 against `upload.sha512`.

    On any failure, including a checksum mismatch, the half-made image is deleted before raising."""
    api = image_api(conn)
    size = upload.path.stat().st_size
    what = f"upload {upload.path.name} as {upload.name!r}"
    with upload.path.open("rb") as fh:
        reader = HashingReader(fh, size, on_progress=on_progress)
        with sdk_errors(conn, what):
            image = api.create_image(
                upload.name, data=reader, size=size, sha256=upload.sha256, disk_format=upload.disk_format,
                container_format=upload.container_format, tags=list(upload.tags), allow_duplicates=True,
                validate_checksum=False, visibility=upload.visibility, min_disk=upload.min_disk,
                min_ram=upload.min_ram, properties=dict(upload.properties),
            )
    try:
        stored = get_image(conn, image.id)
        # openstacksdk records an empty md5 and a swift object path that never existed: drop them
        stored = patch_image(conn, stored, properties={"owner_specified.openstack.md5": None,
                                                       "owner_specified.openstack.object": None})
        verify_stored(conn, stored, expected_sha512=upload.sha512, sent_sha512=reader.sha512.hexdigest(),
                      sent_bytes=reader.sent, size=size, path=upload.path)
    except BaseException:
        log.warning("deleting image %s (%s): its upload did not verify", image.id, upload.name)
        delete_image(conn, image.id)
        raise
    log.info("uploaded %s to %s as image %s (%s), sha512 verified", upload.path.name, cloud_name(conn),
             stored.id, upload.name)
    return stored


def verify_stored(conn: openstack.connection.Connection, image: GlanceImage, *, expected_sha512: str,
                  sent_sha512: str | None = None, sent_bytes: int | None = None, size: int | None = None,
                  path: Path | None = None) -> None:
    """Raise ChecksumMismatchError unless Glance holds data whose sha512 is `expected_sha512`."""
    where = f"cloud {cloud_name(conn)!r}, image {image.id} ({image.name})"
    if image.status != "active":
        raise GlanceError(f"{where}: status {image.status!r} after upload, not 'active'")
    algo, value = image.hash_algo, image.hash_value
    if algo != "sha512" or not value:
        raise ChecksumMismatchError(f"{where}: Glance reports os_hash_algo={algo!r}, so its data cannot be "
                                    f"checked against the build's sha512; set hashing_algorithm = sha512")
    if value == expected_sha512:
        return
    name = path.name if path else "the image"
    if sent_sha512 is not None and sent_sha512 == value:
        cause = (f"{name} changed after the build recorded its checksum (kiln sent {sent_bytes} bytes with "
                 f"sha512 {sent_sha512[:16]}…, the manifest says {expected_sha512[:16]}…)")
    elif sent_sha512 is not None:
        cause = (f"the data was altered on the way: kiln sent sha512 {sent_sha512[:16]}…, Glance stored "
                 f"{value[:16]}…")
    else:
        cause = f"Glance stored sha512 {value[:16]}…, expected {expected_sha512[:16]}…"
    if size is not None and sent_bytes is not None and sent_bytes != size:
        cause += f"; the file was {size} bytes when the upload began and {sent_bytes} were read"
    raise ChecksumMismatchError(f"{where}: checksum mismatch: {cause}; the image was deleted")


def download_image(conn: openstack.connection.Connection, image: GlanceImage, dest: Path, *,
                   on_progress: Progress | None = None) -> Path:
    """Stream an image to `dest` (never whole in memory), verifying Glance's sha512 on the way."""
    api = image_api(conn)
    partial = dest.with_name(dest.name + ".partial")
    hasher = hashlib.new(image.hash_algo or "sha512")
    what = f"download image {image.id}"
    try:
        with sdk_errors(conn, what):
            response = api.download_image(image.id, stream=True)
            _check(conn, response, what)
            with partial.open("wb") as out:
                for chunk in response.iter_content(chunk_size=CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                    if on_progress:
                        on_progress(len(chunk))
            response.close()
        if image.hash_value and hasher.hexdigest() != image.hash_value:
            raise ChecksumMismatchError(f"cloud {cloud_name(conn)!r}: image {image.id}: downloaded data has "
                                        f"{image.hash_algo} {hasher.hexdigest()[:16]}…, Glance recorded "
                                        f"{image.hash_value[:16]}…")
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def has_compute(conn: openstack.connection.Connection) -> bool:
    """Whether the cloud's catalog has a compute (Nova) endpoint."""
    with sdk_errors(conn, "read the service catalog"):
        return bool(conn.has_service("compute"))


def servers_using(conn: openstack.connection.Connection, image_id: str) -> list[str]:
    """Ids of servers booted from `image_id`, in all projects (needs an admin account for others' servers).
    Without a compute endpoint in the catalog there can be no server: an empty list."""
    if not has_compute(conn):
        return []
    with sdk_errors(conn, f"list servers using image {image_id}"):
        return [s.id for s in conn.compute.servers(all_projects=True, image=image_id)]


def image_in_use(conn: openstack.connection.Connection, image: GlanceImage) -> bool:
    """The default in-use check of retention: a Nova server still runs from this image."""
    return bool(servers_using(conn, image.id))
