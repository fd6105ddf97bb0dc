"""The `publish:` section of an image spec, and the names and states of what kiln publishes.

A publish target is `glance:CLOUD` (a clouds.yaml entry) or `s3://BUCKET/PREFIX`. The model is checked
here, without a cloud or an S3 client: the spec loader uses it for every command.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kiln.model.errors import KilnError
from kiln.model.names import check_name

CANDIDATE_TAG = "kiln-candidate"  # the Glance tag of an image uploaded but not yet promoted
TARGET_RE = re.compile(r"^(glance:[A-Za-z0-9][A-Za-z0-9._@-]*|s3://[^\s]+)$")
PROPERTY_KEY_RE = re.compile(r"^[A-Za-z0-9_:.-]{1,255}$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class PublishError(KilnError):
    """A build cannot be published as asked; the message says what to fix."""


class PublishInputError(PublishError):
    """What to publish, or where, is not something kiln can use (bad input: exit code 2)."""

    exit_code = 2


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


class S3Error(KilnError):
    """The S3 store refused or failed a request; the message names the bucket and key."""



@dataclass(frozen=True)
class S3Location:
    """`s3://BUCKET/PREFIX` split up; `prefix` has no leading or trailing slash."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))


def parse_s3_url(url: str) -> S3Location:
    if not url.startswith("s3://"):
        raise S3Error(f"{url!r} is not an S3 URL (s3://BUCKET/PREFIX)")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not BUCKET_RE.match(bucket):
        raise S3Error(f"{url!r}: {bucket!r} is not a valid bucket name (3-63 of a-z, 0-9, '.', '-')")
    prefix = prefix.strip("/")
    if "//" in prefix or any(part in (".", "..") for part in prefix.split("/")):
        raise S3Error(f"{url!r}: the prefix may not contain empty, '.' or '..' parts")
    return S3Location(bucket, prefix)


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
                    parse_s3_url(target)
                except S3Error as exc:
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
    def s3_locations(self) -> list[S3Location]:
        return [parse_s3_url(t) for t in self.targets if t.startswith("s3://")]
