"""The build record: what one build made, typed. The flow makes it once and passes it along; manifest.json
is its serialization, read back (`BuildRecord.load`) only by commands that start from an output
directory (`kiln publish`, `kiln boot-test OUTPUT`). Manifests of other builds (the stable one a refresh
diffs against, from S3 or this host's records) are compared as plain data (kiln.model.pkgdiff).
"""

from __future__ import annotations

import json
import os
import re
import stat
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln.model.checks import CheckOutcome
from kiln.model.names import is_plain_name
from kiln.model.publishing import PublishError, PublishSpec

MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"


@dataclass(frozen=True)
class BootOutcome:
    """One boot test of the build's image: under local QEMU (one per firmware) or in a cloud's Nova."""

    firmware: str
    passed: bool
    seconds: float = 0.0
    accel: str = ""
    root_bytes: int | None = None
    disk_bytes: int | None = None
    login_ok: bool | None = None
    serial_log: str = ""
    cached: bool = False
    backend: str = "qemu"
    ssh_ok: bool | None = None  # root's password login over SSH (boot_test.ssh_login); None when not asked
    criterion: str = "cloud-init"  # what the pass was judged by: cloud-init's end, or systemd's (no cloud-init)
    failed_units: list[str] | None = None  # systemd units failed in the guest (None: not reported)
    tail: list[str] = field(default_factory=list)  # the console's last lines, of a boot that failed
    checks: list[CheckOutcome] = field(default_factory=list)  # the conformance suite, every boot

    def __post_init__(self) -> None:
        # read back from JSON (a cached boot, a manifest): the checks come as dicts
        object.__setattr__(self, "checks", [c if isinstance(c, CheckOutcome) else CheckOutcome(**c)
                                            for c in self.checks])

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RecordError(PublishError):
    """A build's output directory cannot be read as one: bad input, named by its file and field."""

    exit_code = 2


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)  # a newer kiln's fields survive a round trip


class ImageRecord(_Part):
    file: str
    format: str
    size: int
    sha256: str
    sha512: str


class ElementRecord(_Part):
    name: str
    path: str = ""
    sha256: str = ""
    origin: str = ""


class StepRecord(_Part):
    phase: str
    name: str
    element: str
    key: str


class DiskRecord(_Part):
    size: int = 0
    root_uuid: str | None = None
    esp_serial: str | None = None
    cmdline: str | None = None
    key: str | None = None
    firmware: list[str] = Field(default_factory=list)  # what the disk boots with


class SpaceUse(_Part):
    path: str  # a directory of the tree ("/usr/lib"), or a package's name
    bytes: int


class SpaceRecord(_Part):
    """What takes the image's space: the root tree's size, its largest directories and packages."""

    tree_bytes: int = 0
    directories: list[SpaceUse] = Field(default_factory=list)
    packages: list[SpaceUse] = Field(default_factory=list)


class SbomRecord(_Part):
    """An SBOM beside the images (every installed package: name, version, architecture, purl, licence)."""

    file: str
    format: str  # spdx-2.3, cyclonedx-1.6
    sha256: str


class SignatureRecord(_Part):
    """SHA256SUMS's detached OpenPGP signature, and the signer's public key beside it (for reference:
    `kiln verify` trusts it only when told to)."""

    file: str  # SHA256SUMS.gpg
    key_file: str  # SHA256SUMS.key
    fingerprint: str
    development: bool = False  # signed with this host's development key, not one the operator named


class StageRecord(_Part):
    seconds: float
    cached: bool


class BuildRecord(BaseModel):
    """One build: its spec (as built), inputs, layers, disk, packages, images, stage timings, boot tests
    and where it was published."""

    model_config = ConfigDict(extra="allow")

    kiln_version: str
    build_id: str
    created: str = ""
    spec: dict[str, Any]
    mirror: str | None = None
    elements: list[ElementRecord] = Field(default_factory=list)
    base: dict[str, Any] = Field(default_factory=dict)  # bootstrap or upstream: see docs/design-notes.md
    tree_key: str | None = None
    steps: list[StepRecord] = Field(default_factory=list)
    disk: DiskRecord = Field(default_factory=DiskRecord)
    packages: list[dict[str, Any]] = Field(default_factory=list)  # name, version, arch (+ suite, origin)
    package_origins: dict[str, int] = Field(default_factory=dict)
    security_updates: int = 0
    images: list[ImageRecord] = Field(default_factory=list)
    space: SpaceRecord | None = None  # what takes the image's space (the pack stage's report)
    sboms: list[SbomRecord] = Field(default_factory=list)  # SPDX and CycloneDX, in SHA256SUMS
    signature: SignatureRecord | None = None  # SHA256SUMS signed (it then lists the SBOMs and manifest.json too)
    timings: dict[str, StageRecord] = Field(default_factory=dict)
    boot_test: list[BootOutcome] = Field(default_factory=list)
    published: list[dict[str, Any]] = Field(default_factory=list)  # one report per publish of this build
    diff: dict[str, Any] | None = None  # the package diff against the stable build it replaced (the refresh)
    run_url: str | None = None  # the build's flow run in the Prefect UI
    output: Path | None = Field(default=None, exclude=True)  # the output directory, once written or loaded

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def arch(self) -> str:
        return str(self.spec.get("arch", ""))

    @property
    def boot_settings(self) -> dict[str, Any]:
        """The spec's boot_test section as built (memory, firmware, flavor, …)."""
        section = self.spec.get("boot_test")
        return dict(section) if isinstance(section, dict) else {}

    def manifest(self) -> dict[str, Any]:
        """manifest.json's content."""
        return self.model_dump(mode="json")

    def image(self, disk_format: str | None = None) -> ImageRecord:
        if not self.images:
            raise PublishError(f"{self.where}: the build has no images")
        if disk_format is None:
            return self.images[0]
        for img in self.images:
            if img.format == disk_format:
                return img
        raise PublishError(f"{self.where}: the build has no {disk_format} image "
                           f"(it has {', '.join(i.format for i in self.images)})")

    def image_path(self, image: ImageRecord) -> Path:
        return self.path_of(image.file)

    def path_of(self, name: str) -> Path:
        """A file of the build's output directory (an image, manifest.json, SHA256SUMS)."""
        if self.output is None:
            raise PublishError(f"build {self.build_id}: not written to an output directory yet")
        return self.output / name

    @property
    def where(self) -> str:
        return str(self.output / MANIFEST) if self.output else f"build {self.build_id}"

    def publish_spec(self) -> PublishSpec:
        """The `publish:` section the build's spec carried, or the defaults."""
        try:
            return PublishSpec.model_validate(self.spec.get("publish") or {})
        except ValueError as exc:
            raise PublishError(f"{self.where}: spec.publish: {exc}") from None

    @classmethod
    def load(cls, output: Path) -> BuildRecord:
        """Read and cross-check a build's output directory (cheap: sizes and recorded checksums, no hashing;
        the uploads hash every byte they send and compare with the manifest).

        The directory may be a stranger's: manifest.json, SHA256SUMS and every image must be regular files
        (not links, devices or FIFOs) directly in it, the image's name and build id plain names, and
        anything unreadable or malformed is a RecordError naming the file and field (exit code 2)."""
        manifest_path = output / MANIFEST
        try:
            data = json.loads(_read_regular(manifest_path, MAX_MANIFEST_BYTES, missing_means="not a kiln build "
                                            f"output ({output}: no manifest.json)"))
        except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, absurd numbers or nesting
            raise RecordError(f"{manifest_path}: not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise RecordError(f"{manifest_path}: not a JSON object")
        for key in ("build_id", "spec", "images"):
            if key not in data:
                raise RecordError(f"{manifest_path}: no {key!r} field")
        spec = data["spec"]
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not is_plain_name(spec["name"]):
            raise RecordError(f"{manifest_path}: spec.name must be a plain name (letters, digits, '.', '_', '+', "
                              f"'-'), got {spec.get('name') if isinstance(spec, dict) else spec!r:.80}")
        if not isinstance(data["build_id"], str) or not is_plain_name(data["build_id"]):
            raise RecordError(f"{manifest_path}: build_id must be a plain name, got {data['build_id']!r:.80}")
        for field_name, kind in (("boot_test", dict), ("publish", dict), ("size", int), ("arch", str)):
            if spec.get(field_name) is not None and not isinstance(spec[field_name], kind):
                raise RecordError(f"{manifest_path}: spec.{field_name} must be a JSON {kind.__name__}")
        for field_name in ("memory", "timeout", "cpus"):
            value = (spec.get("boot_test") or {}).get(field_name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise RecordError(f"{manifest_path}: spec.boot_test.{field_name} must be a whole number")
        for index, entry in enumerate(data["images"] if isinstance(data["images"], list) else []):
            missing = [k for k in ("file", "format", "size", "sha256", "sha512") if not isinstance(entry, dict)
                       or k not in entry]
            if missing:
                raise RecordError(f"{manifest_path}: images[{index}] lacks {', '.join(missing)}")
            if not isinstance(entry["file"], str) or not is_plain_name(entry["file"]):
                raise RecordError(f"{manifest_path}: images[{index}].file {entry['file']!r:.80} is not a file name "
                                  f"in {output}")
        data.setdefault("kiln_version", "")
        try:
            record = cls.model_validate({**data, "output": output})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise RecordError(f"{manifest_path}: {where}: {first['msg']}") from None
        sums_path = output / SUMS
        sums = read_sha256sums(sums_path)
        for entry in record.images:
            path = output / entry.file
            if sums.get(entry.file) != entry.sha256:
                raise RecordError(f"{sums_path}: {entry.file} is missing or its sha256 differs from manifest.json")
            size = _regular_size(path)
            if size != entry.size:
                raise RecordError(f"{path}: {size} bytes, but the manifest recorded {entry.size}: the file "
                                  f"changed after the build")
        if not record.images:
            raise RecordError(f"{manifest_path}: the build has no images")
        return record


MAX_MANIFEST_BYTES = 64 << 20  # a manifest with every package of a large image is a few MiB


def _regular_size(path: Path) -> int:
    """The size of `path`, a regular file itself (a link, device or FIFO is refused, never followed)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise RecordError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RecordError(f"{path}: not a regular file (a link, directory or device): refused")
    return st.st_size


def _read_regular(path: Path, limit: int, *, missing_means: str | None = None) -> str:
    """The text of `path`, a regular file of at most `limit` bytes, opened without following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise RecordError(f"{path}: {missing_means or 'no such file'}") from None
    except OSError as exc:
        raise RecordError(f"{path}: cannot read: {exc.strerror} (a link is never followed)") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise RecordError(f"{path}: not a regular file: refused")
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise RecordError(f"{path}: larger than {limit >> 20} MiB: not a kiln file")
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise RecordError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def new_build_id() -> str:
    """A build's id: when it started (UTC, sortable) and six random hex digits."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def read_sha256sums(path: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    for number, line in enumerate(_read_regular(path, MAX_MANIFEST_BYTES).splitlines(), 1):
        if not line.strip():
            continue
        m = re.match(r"^([0-9a-f]{64}) [ *](.+)$", line.strip())
        if not m:  # the line itself is not shown: the file may be a stranger's copy of a host file
            raise RecordError(f"{path}:{number}: not a SHA256SUMS line (HEX, two spaces, file name)")
        sums[m.group(2)] = m.group(1)
    return sums
