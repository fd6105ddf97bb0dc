"""Publishing a finished build: Glance promotion with a boot gate, rollback, retention, and an S3 mirror.

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

import contextlib
import hashlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kiln.cloud import s3
from kiln.model.errors import KilnError
from kiln.model.names import check_name
from kiln.model.pkgdiff import content_digest

if TYPE_CHECKING:
    import openstack.connection
    from mypy_boto3_s3 import S3Client

    from kiln.boot.nova import NovaBootResult
    from kiln.cloud.glance import GlanceImage

# kiln.glance (openstacksdk, half a second to import) is imported where it is used, so that the spec
# model, which every kiln command loads, stays cheap to import

log = logging.getLogger("kiln.publish")

CANDIDATE_TAG = "kiln-candidate"
STALE_CANDIDATE = timedelta(days=1)
GiB = 1 << 30

# kiln's own Glance properties
P_NAME = "kiln_name"
P_STATUS = "kiln_status"
P_BUILD_ID = "kiln_build_id"
P_CREATED = "kiln_created"
P_SHA256 = "kiln_sha256"
P_SPEC = "kiln_spec_sha256"
P_ELEMENTS = "kiln_elements_sha256"
P_ELEMENT = "kiln_element_"
P_BASE = "kiln_base_checksum"
P_VERSION = "kiln_version"
P_CONTENT = "kiln_content_sha256"  # packages, elements and spec: equal for a rebuild that changed nothing

ARCHITECTURES = {"amd64": "x86_64", "arm64": "aarch64"}
DEBIAN_VERSIONS = {"buster": "10", "bullseye": "11", "bookworm": "12", "trixie": "13", "forky": "14"}
TARGET_RE = re.compile(r"^(glance:[A-Za-z0-9][A-Za-z0-9._@-]*|s3://[^\s]+)$")
PROPERTY_KEY_RE = re.compile(r"^[A-Za-z0-9_:.-]{1,255}$")


class PublishError(KilnError):
    """A build cannot be published as asked; the message says what to fix."""


class GateFailedError(PublishError):
    """The candidate did not pass the boot gate; it was deleted and the stable image left as it was."""

    exit_code = 3


class Status(StrEnum):
    candidate = "candidate"
    stable = "stable"
    previous = "previous"
    retired = "retired"
    withdrawn = "withdrawn"


class Visibility(StrEnum):
    public = "public"
    private = "private"
    shared = "shared"
    community = "community"


# ---------------------------------------------------------------------------------------------------
# The `publish:` section of an ImageSpec


class PublishSpec(BaseModel):
    """Where and how a build is published (the `publish:` section of an image spec)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[str] = Field(default_factory=list,
                               description="glance:CLOUD (a clouds.yaml entry) or s3://BUCKET/PREFIX")
    name: str | None = Field(default=None, description="the stable image name; default: the spec's name")
    visibility: Visibility = Field(default=Visibility.private, description="of the stable image in Glance")
    keep: int = Field(default=3, ge=1, le=100, description="images (and S3 builds) kept per name, stable included")
    properties: dict[str, str] = Field(default_factory=dict, description="extra Glance properties; override kiln's")
    tags: list[str] = Field(default_factory=list, description="Glance tags of the stable image")
    disk_format: str | None = Field(default=None, description="which of the build's formats goes to Glance; "
                                                              "default: the first")
    min_ram: int | None = Field(default=None, ge=0, description="MiB; default: the boot test's memory")
    s3_endpoint_url: str | None = Field(default=None, description="for S3-compatible stores; default: boto3's "
                                                                  "(AWS_ENDPOINT_URL_S3)")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        for target in v:
            if not TARGET_RE.match(target):
                raise ValueError(f"target {target!r} must be glance:CLOUD or s3://BUCKET/PREFIX")
            if target.startswith("s3://"):
                try:
                    s3.parse_s3_url(target)
                except s3.S3Error as exc:
                    raise ValueError(str(exc)) from None
        return list(dict.fromkeys(v))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        # the name is an S3 key prefix and the family retention deletes within: no '/', no '..', not empty
        return None if v is None else check_name(v, "publish name")

    @field_validator("properties")
    @classmethod
    def _properties(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not PROPERTY_KEY_RE.match(key):
                raise ValueError(f"property name {key!r} may only contain letters, digits, '_', ':', '.', '-'")
            if key.startswith("kiln_") or key.startswith("os_hash") or key == "os_hidden":
                raise ValueError(f"property {key!r} is kiln's or Glance's own and cannot be set")
            if len(value) > 255:
                raise ValueError(f"property {key!r}: values are at most 255 characters")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        for tag in v:
            if not tag or len(tag) > 255 or tag == CANDIDATE_TAG:
                raise ValueError(f"tag {tag!r} is empty, too long or kiln's own")
        return list(dict.fromkeys(v))

    @property
    def glance_clouds(self) -> list[str]:
        return [t.removeprefix("glance:") for t in self.targets if t.startswith("glance:")]

    @property
    def s3_locations(self) -> list[s3.S3Location]:
        return [s3.parse_s3_url(t) for t in self.targets if t.startswith("s3://")]


# ---------------------------------------------------------------------------------------------------
# A finished build


@dataclass(frozen=True)
class BuildImage:
    path: Path
    format: str
    size: int
    sha256: str
    sha512: str


@dataclass(frozen=True)
class Build:
    output: Path
    manifest: dict[str, Any]
    images: tuple[BuildImage, ...]

    @property
    def name(self) -> str:
        return str(self.manifest["spec"]["name"])

    @property
    def build_id(self) -> str:
        return str(self.manifest["build_id"])

    @property
    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.manifest["spec"]
        return spec

    def image(self, disk_format: str | None = None) -> BuildImage:
        if disk_format is None:
            return self.images[0]
        for img in self.images:
            if img.format == disk_format:
                return img
        raise PublishError(f"{self.output}: the build has no {disk_format} image "
                           f"(it has {', '.join(i.format for i in self.images)})")

    def publish_spec(self) -> PublishSpec:
        """The `publish:` section the build's spec carried, or the defaults."""
        section = self.spec.get("publish") or {}
        try:
            return PublishSpec.model_validate(section)
        except ValueError as exc:
            raise PublishError(f"{self.output / 'manifest.json'}: spec.publish: {exc}") from None


def read_sha256sums(path: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = re.match(r"^([0-9a-f]{64}) [ *](.+)$", line.strip())
        if not m:
            raise PublishError(f"{path}:{number}: not a SHA256SUMS line: {line[:80]!r}")
        sums[m.group(2)] = m.group(1)
    return sums


def load_build(output: Path) -> Build:
    """Read and cross-check a build's output directory (cheap: sizes and recorded checksums, no hashing;
    the uploads hash every byte they send and compare with the manifest)."""
    manifest_path = output / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except OSError as exc:
        raise PublishError(f"{manifest_path}: cannot read: {exc.strerror} (is {output} a kiln build's output "
                           f"directory?)") from None
    except json.JSONDecodeError as exc:
        raise PublishError(f"{manifest_path}: not valid JSON: {exc}") from None
    for key in ("build_id", "spec", "images"):
        if key not in manifest:
            raise PublishError(f"{manifest_path}: no {key!r} field")
    sums_path = output / "SHA256SUMS"
    try:
        sums = read_sha256sums(sums_path)
    except OSError as exc:
        raise PublishError(f"{sums_path}: cannot read: {exc.strerror}") from None
    images: list[BuildImage] = []
    for index, entry in enumerate(manifest["images"]):
        missing = [k for k in ("file", "format", "size", "sha256", "sha512") if k not in entry]
        if missing:
            raise PublishError(f"{manifest_path}: images[{index}] lacks {', '.join(missing)}")
        path = output / entry["file"]
        if sums.get(entry["file"]) != entry["sha256"]:
            raise PublishError(f"{sums_path}: {entry['file']} is missing or its sha256 differs from manifest.json")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise PublishError(f"{path}: {exc.strerror}") from None
        if size != entry["size"]:
            raise PublishError(f"{path}: {size} bytes, but the manifest recorded {entry['size']}: the file changed "
                               f"after the build")
        images.append(BuildImage(path, entry["format"], size, entry["sha256"], entry["sha512"]))
    if not images:
        raise PublishError(f"{manifest_path}: the build has no images")
    return Build(output, manifest, tuple(images))


# ---------------------------------------------------------------------------------------------------
# Glance properties from the manifest


def canonical_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _element_key(name: str) -> str:
    return P_ELEMENT + re.sub(r"[^A-Za-z0-9_-]", "_", name)


def uefi_only(manifest: Mapping[str, Any]) -> bool:
    """Whether the image boots only under UEFI: the disk's recorded firmware, else arm64 (always UEFI)."""
    firmware = (manifest.get("disk") or {}).get("firmware")
    if firmware:
        return set(firmware) == {"uefi"}
    return bool(manifest["spec"].get("arch") == "arm64")


def min_disk_gib(manifest: Mapping[str, Any]) -> int:
    size = (manifest.get("disk") or {}).get("size") or manifest["spec"].get("size") or 0
    return math.ceil(int(size) / GiB)


def min_ram_mib(manifest: Mapping[str, Any], spec: PublishSpec) -> int:
    if spec.min_ram is not None:
        return spec.min_ram
    return int((manifest["spec"].get("boot_test") or {}).get("memory") or 0)


def glance_properties(build: Build, image: BuildImage, spec: PublishSpec, *, name: str) -> dict[str, str]:
    """The properties a published image carries: the ones Nova and users read, then kiln's own
    (provenance and state), then the spec's `properties`, which win over kiln's defaults."""
    manifest, s = build.manifest, build.spec
    distro, release, arch = str(s.get("distro", "")), str(s.get("release", "")), str(s.get("arch", ""))
    elements = {e["name"]: e.get("sha256", "") for e in manifest.get("elements", [])}
    props: dict[str, str] = {
        "os_type": "linux",
        "os_distro": distro,
        "os_version": DEBIAN_VERSIONS.get(release, release) if distro == "debian" else release,
        "architecture": ARCHITECTURES.get(arch, arch),
        "hw_disk_bus": "virtio",
        "hw_qemu_guest_agent": "yes" if "qemu-guest-agent" in elements else "no",
    }
    if uefi_only(manifest):
        props["hw_firmware_type"] = "uefi"
    base = manifest.get("base") or {}
    props.update({
        P_NAME: name,
        P_BUILD_ID: build.build_id,
        P_CREATED: str(manifest.get("created", "")),
        P_SHA256: image.sha256,
        P_SPEC: canonical_sha256({k: v for k, v in s.items() if k != "publish"}),  # what was built, not where to
        P_ELEMENTS: canonical_sha256(sorted(elements.items())),
        P_BASE: str(base.get("sha256") or base.get("checksum") or base.get("key") or ""),
        P_VERSION: str(manifest.get("kiln_version", "")),
        P_CONTENT: content_digest(manifest),
    })
    for element, digest in sorted(elements.items()):
        props[_element_key(element)] = digest
    props.update(spec.properties)
    return {k: v for k, v in props.items() if v != ""}


# ---------------------------------------------------------------------------------------------------
# The boot gate


@dataclass(frozen=True)
class CandidateImage:
    """What a gate is asked about: the build's image and, for a Glance target, the uploaded candidate."""

    name: str
    build: Build
    image: BuildImage
    cloud: str | None = None
    image_id: str | None = None
    clouds_yaml: Path | None = None


@dataclass(frozen=True)
class GateResult:
    passed: bool
    detail: str
    log_tail: tuple[str, ...] = ()


Gate = Callable[[CandidateImage], GateResult]


class NovaBoot(Protocol):
    def __call__(self, cloud: str | None, image_id: str, *, clouds_yaml: Path | None, flavor: str | None,
                 network: str | None, timeout: int | None) -> NovaBootResult: ...


def manifest_gate(candidate: CandidateImage) -> GateResult:
    """The boot test as the build recorded it: every firmware the spec asked for booted under QEMU, or the
    image booted in a cloud's Nova (boot_test.backend nova)."""
    manifest = candidate.build.manifest
    boots = manifest.get("boot_test") or []
    if not boots:
        return GateResult(False, "the build was not boot-tested (built with --no-boot-test?): nothing proves it "
                                 "boots; rebuild with the boot test, or publish with --gate none")
    wanted = (manifest["spec"].get("boot_test") or {}).get("firmware") or []
    failed = [b["firmware"] for b in boots if not b.get("passed")]
    if failed:
        tail = tuple(str(line) for b in boots if not b.get("passed") for line in (b.get("tail") or [])[-20:])
        return GateResult(False, f"the boot test failed under {', '.join(failed)}", tail)
    # a boot in the cloud's Nova stands for the image, whatever firmware the cloud chose for it
    booted_in_nova = any(b.get("backend") == "nova" for b in boots)
    missing = [] if booted_in_nova else [f for f in wanted if f not in {b["firmware"] for b in boots}]
    if missing:
        return GateResult(False, f"no boot test result for {', '.join(missing)}")
    return GateResult(True, "booted to cloud-init's end under " +
                      ", ".join(f"{b['firmware']} ({b.get('accel', '?')}, {b.get('seconds', 0):.0f} s)" for b in boots))


def qemu_gate(candidate: CandidateImage) -> GateResult:
    """Boot the build's image now under local QEMU, every firmware of its spec (minutes under TCG): for a
    build made with --no-boot-test, or to check again before promoting."""
    from kiln.boot.local import run_boot_test_of_output

    try:
        outcomes = run_boot_test_of_output(candidate.build.output)
    except (KilnError, ValueError) as exc:  # ValueError: pydantic's, for a spec this kiln cannot read
        lines = str(exc).splitlines()
        return GateResult(False, f"the local QEMU boot failed: {lines[0]}", tuple(lines[1:]))
    return GateResult(True, "booted under local QEMU: " +
                      ", ".join(f"{o.firmware} ({o.accel}, {o.seconds:.0f} s)" for o in outcomes))


def no_gate(candidate: CandidateImage) -> GateResult:
    return GateResult(True, "no gate: promoted without a boot check, as the operator asked")


def nova_gate(candidate: CandidateImage, boot: NovaBoot | None = None) -> GateResult:
    """Boot the uploaded candidate in the cloud's own Nova (its firmware, disk bus, config drive) until
    cloud-init has finished; the server is deleted whatever happens. Flavor and network: the spec's
    boot_test, else kiln/nova.py's defaults. `boot` is nova.boot_candidate, or the flow's Prefect task."""
    from kiln.boot import nova

    if candidate.cloud is None or candidate.image_id is None:
        return GateResult(False, "the nova gate boots the uploaded candidate: publish to a glance:CLOUD target "
                                 "whose cloud has Nova")
    settings = candidate.build.spec.get("boot_test") or {}
    boot = boot or nova.boot_candidate
    try:
        result = boot(candidate.cloud, candidate.image_id, clouds_yaml=candidate.clouds_yaml,
                      flavor=settings.get("flavor"), network=settings.get("network"),
                      timeout=int(settings.get("timeout") or nova.DEFAULT_BOOT_TIMEOUT))
    except nova.NovaBootError as exc:
        return GateResult(False, f"the Nova boot failed: {exc.reason}", tuple(exc.tail))
    return GateResult(True, f"booted in Nova on {result.cloud} to cloud-init's end (flavor {result.flavor}, "
                            f"network {result.network}, ACTIVE in {result.active_seconds:.0f} s, "
                            f"{result.seconds:.0f} s in all)")


GATES: dict[str, Gate] = {"manifest": manifest_gate, "qemu": qemu_gate, "none": no_gate, "nova": nova_gate}
# gates that judge the build alone, not the uploaded image: run before uploading anything
LOCAL_GATES: set[Gate] = {manifest_gate, qemu_gate, no_gate}


def run_gate(gate: Gate, candidate: CandidateImage) -> GateResult:
    start = time.monotonic()
    try:
        result = gate(candidate)
    except KilnError as exc:
        result = GateResult(False, f"the gate failed to run: {exc}")
    log.info("gate for %s (%s): %s in %.0f s: %s", candidate.name, candidate.image_id or candidate.image.path.name,
             "passed" if result.passed else "FAILED", time.monotonic() - start, result.detail)
    return result


# ---------------------------------------------------------------------------------------------------
# Progress on a terminal

Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager[Advance]]


@contextlib.contextmanager
def terminal_progress(label: str, total: int) -> Iterator[Advance]:
    """A progress bar on stderr when it is a terminal; otherwise a log line every quarter."""
    if sys.stderr.isatty():
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), transient=False) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)
        return
    done = [0, 0]

    def advance(n: int) -> None:
        done[0] += n
        quarter = done[0] * 4 // max(total, 1)
        if quarter > done[1]:
            done[1] = quarter
            log.info("%s: %d%% of %.0f MiB", label, min(100, quarter * 25), total / (1 << 20))

    yield advance


@contextlib.contextmanager
def _no_progress(label: str, total: int) -> Iterator[Advance]:
    yield lambda n: None


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
    from kiln.cloud import glance

    return [i for i in glance.list_images(conn, {P_NAME: name}) if status_of(i)]


def upload_candidate(conn: openstack.connection.Connection, build: Build, image: BuildImage, spec: PublishSpec, *,
                     name: str, progress: ProgressFactory = _no_progress) -> GlanceImage:
    """Upload the image as a private candidate, tagged kiln-candidate, its sha512 verified."""
    from kiln.cloud import glance

    props = {**glance_properties(build, image, spec, name=name), P_STATUS: Status.candidate.value}
    upload = glance.ImageUpload(
        path=image.path, name=candidate_name(name, build.build_id), disk_format=image.format, sha512=image.sha512,
        sha256=image.sha256, visibility=Visibility.private.value, min_disk=min_disk_gib(build.manifest),
        min_ram=min_ram_mib(build.manifest, spec), properties=props, tags=[CANDIDATE_TAG],
    )
    with progress(f"glance {glance.cloud_name(conn)}: {image.path.name}", image.size) as advance:
        return glance.upload_image(conn, upload, on_progress=advance)


def promote(conn: openstack.connection.Connection, candidate: GlanceImage, *, name: str, spec: PublishSpec,
            properties: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """Give `candidate` the stable name and visibility; the stable before it becomes previous, the previous
    before that retired (hidden). Returns (previous id, retired ids)."""
    from kiln.cloud import glance

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


def stage_glance(conn: openstack.connection.Connection, build: Build, spec: PublishSpec, *, gate: Gate,
                 name: str | None = None, allow_withdrawn: bool = False, clouds_yaml: Path | None = None,
                 progress: ProgressFactory = _no_progress) -> StagedGlance:
    """Upload (or find) the candidate and run the gate; promote nothing. Publishing the same content again
    uploads nothing. A failed gate deletes a candidate uploaded for this run and raises GateFailedError;
    a gate that judges the build alone (LOCAL_GATES) runs before the upload."""
    from kiln.cloud import glance

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
    from kiln.cloud import glance

    c = staged.candidate
    if c is not None and (staged.uploaded or status_of(c) == Status.candidate):
        glance.delete_image(staged.conn, c)
        log.warning("%s: deleted candidate %s; %s stays as it was", staged.cloud, c.id, staged.name)
        staged.candidate = None


def finish_glance(staged: StagedGlance, spec: PublishSpec) -> GlanceReport:
    """Promote a staged candidate (or refresh the metadata of the stable image that already holds it)."""
    from kiln.cloud import glance

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


def publish_glance(conn: openstack.connection.Connection, build: Build, spec: PublishSpec, *, gate: Gate,
                   name: str | None = None, allow_withdrawn: bool = False, clouds_yaml: Path | None = None,
                   progress: ProgressFactory = _no_progress) -> GlanceReport:
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
    from kiln.cloud import glance

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
    from kiln.cloud import glance

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


def publish_s3(client: S3Client, location: s3.S3Location, build: Build, *, name: str | None = None,
               progress: ProgressFactory = _no_progress) -> S3Report:
    """Upload the images, then SHA256SUMS, then manifest.json (its presence marks a complete build)."""
    name = name or build.name
    base = location.key(name, build.build_id)
    report = S3Report(location.url, base + "/")
    meta = {"kiln-name": name, "kiln-build-id": build.build_id}
    for img in build.images:
        with progress(f"{location.url}: {img.path.name}", img.size) as advance:
            result = s3.upload_file(client, img.path, location.bucket, f"{base}/{img.path.name}", sha256=img.sha256,
                                    metadata={**meta, "sha512": img.sha512, "format": img.format},
                                    on_progress=advance)
        (report.uploaded if result.uploaded else report.skipped).append(result.key)
    for file, content_type in (("SHA256SUMS", "text/plain"), ("manifest.json", "application/json")):
        result = s3.put_bytes(client, (build.output / file).read_bytes(), location.bucket, f"{base}/{file}",
                              metadata=meta, content_type=content_type)
        (report.uploaded if result.uploaded else report.skipped).append(result.key)
    return report


def s3_versions(client: S3Client, location: s3.S3Location, name: str) -> list[Version]:
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


def retain_s3(client: S3Client, location: s3.S3Location, name: str, *, keep: int,
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


# ---------------------------------------------------------------------------------------------------
# Everything a spec asks for


@dataclass
class PublishReport:
    glance: list[GlanceReport] = field(default_factory=list)
    s3: list[S3Report] = field(default_factory=list)
    gate: str = ""


def publish(build: Build, spec: PublishSpec, *, gate: Gate = manifest_gate, allow_withdrawn: bool = False,
            clouds_yaml: Path | None = None, progress: ProgressFactory = _no_progress,
            in_use: Callable[[GlanceImage], bool] | None = None,
            gates: Mapping[str, Gate] | None = None) -> PublishReport:
    """Publish to every target of `spec`: every Glance cloud staged first (candidate and gate, each cloud
    with its own gate from `gates`, else `gate`), and only when every one passed, each promoted (with
    retention); a gate failing on one cloud deletes the candidates of all, so no cloud is left
    half-promoted. Then, only when the gate passed, each S3 location (upload, retention)."""
    from kiln.cloud import glance

    if not spec.targets:
        raise PublishError("no publish targets: give --to glance:CLOUD or --to s3://BUCKET/PREFIX, or set "
                           "publish.targets in the spec")
    name = spec.name or build.name
    report = PublishReport()
    staged: list[StagedGlance] = []
    try:
        for cloud in spec.glance_clouds:
            conn = glance.connect(cloud, clouds_yaml=clouds_yaml)
            staged.append(stage_glance(conn, build, spec, gate=(gates or {}).get(cloud, gate), name=name,
                                       allow_withdrawn=allow_withdrawn, clouds_yaml=clouds_yaml, progress=progress))
    except BaseException:
        for done in staged:
            discard_staged(done)
        raise
    for done in staged:
        result = finish_glance(done, spec)
        kept = retain_glance(done.conn, name, keep=spec.keep, in_use=in_use)
        result.deleted_ids, result.kept_in_use_ids = kept.deleted, kept.kept_in_use
        report.glance.append(result)
        report.gate = report.gate or result.gate
    if spec.s3_locations:
        if not spec.glance_clouds:
            result_gate = run_gate(gate, CandidateImage(name, build, build.image(spec.disk_format)))
            if not result_gate.passed:
                raise GateFailedError(f"{name}: the build did not pass the boot gate: {result_gate.detail}")
            report.gate = result_gate.detail
        client = s3.client(endpoint_url=spec.s3_endpoint_url)
        for location in spec.s3_locations:
            s3_report = publish_s3(client, location, build, name=name, progress=progress)
            kept = retain_s3(client, location, name, keep=spec.keep)
            s3_report.deleted_builds, s3_report.kept_in_use = kept.deleted, kept.kept_in_use
            report.s3.append(s3_report)
    return report
